"""Parity and agreement metrics between a variant's logits and the reference's.

Pure numpy on arrays of shape [positions, vocab]; `Accumulator` aggregates batch after batch so no
[tokens x vocab] matrix is kept for the whole corpus.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass, field, fields

import numpy as np

TOP_K = 5
DEGENERATE_SHARE = 0.5  # one token as top-1 at half the masked positions or more
# top_k and kl_to work through [positions x vocab] arrays this many rows at a time: their temporaries
# (a partitioned copy, a float64 copy) then stay a few MB and are reused, instead of one fresh array of
# the whole matrix per step, whose first touch alone cost more than the arithmetic (int8-auto's search
# calls both once per evaluated graph: 0.30 against 0.16 s for demo's 756 x 30,522 calibration logits,
# the same results to the bit)
ROW_BLOCK = 16


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64)  # a copy: the in-place steps below leave `logits` alone
    shifted -= shifted.max(axis=-1, keepdims=True)
    shifted -= np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return shifted


def kl_divergence(reference: np.ndarray, variant: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(variant)) per row, in nats."""
    log_p = log_softmax(reference)
    p = np.exp(log_p)
    return kl_to(p, (p * log_p).sum(axis=-1), variant)


def kl_to(p: np.ndarray, p_log_p: np.ndarray, variant: np.ndarray) -> np.ndarray:
    """kl_divergence from the reference's softmax p and sum(p log p) per row, computed once where many
    variants meet one reference: KL = sum p log p - (sum p x - logsumexp x), x the variant's logits,
    which needs no [rows x vocab] log-softmax of the variant.

    With t = max x per row and sum p = 1: sum p x - logsumexp x = sum p (x - t) - log sum exp(x - t).
    One float64 copy of x, shifted and exponentiated in place: allocating a new [rows x vocab] array
    per step made this 12x slower (1.2 s against 0.1 s for demo's 756 x 30,522 calibration logits,
    equal to 1e-13), and the int8-auto search calls it once per evaluated graph.

    A row's value depends on that row alone, however rows are grouped and on any thread count (the
    int8-auto search sums them a calibration batch at a time, in Ray tasks too, and must equal one
    pass over every position): einsum sums a block of two or more rows row by row the same way, but a
    lone row another way (its last bit), so a lone row is summed as a block of two; np.vecdot calls
    BLAS, whose dot product splits long rows across threads."""
    if variant.ndim == 2 and len(variant) > ROW_BLOCK:
        return np.concatenate([kl_to(p[i:i + ROW_BLOCK], p_log_p[i:i + ROW_BLOCK], variant[i:i + ROW_BLOCK])
                               for i in range(0, len(variant), ROW_BLOCK)])
    x = variant.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    np.subtract(x, top, out=x)
    rows = x.reshape(-1, x.shape[-1])
    weights = np.asarray(p).reshape(rows.shape)
    count = len(rows)
    if count == 1:  # summed as a block of two rows' first (above)
        rows, weights = np.repeat(rows, 2, axis=0), np.repeat(weights, 2, axis=0)
    expected = np.einsum("ij,ij->i", weights, rows)[:count].reshape(x.shape[:-1])
    np.exp(x, out=x)
    return p_log_p - (expected - np.log(x.sum(axis=-1)))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)  # no copy when already float64
    denominator = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(axis=-1) / np.maximum(denominator, 1e-30)


def relative_l2(reference: np.ndarray, variant: np.ndarray, difference: np.ndarray | None = None) -> np.ndarray:
    """|variant - reference| / |reference| per row; `difference`: |variant - reference| in float64 where the
    caller has it (the norm of |d| is the norm of d, to the bit)."""
    reference = np.asarray(reference, dtype=np.float64)
    if difference is None:
        difference = np.asarray(variant, dtype=np.float64) - reference
    return np.linalg.norm(difference, axis=-1) / np.maximum(np.linalg.norm(reference, axis=-1), 1e-30)


def kth_largest(rows: np.ndarray, k: int) -> np.ndarray:
    """Each row's k-th largest value, [rows, 1] (NaN counted largest, as np.partition does).

    torch's topk where torch is already loaded (validation runs the PyTorch reference, so it is):
    at 40 x 30,522 logits it takes 1.4 ms against np.partition's 6.8 ms (AVX-512 VNNI, 2 threads),
    and partitioning was most of validation's metric time. The same value either way: only which
    rows are plain and which candidates they have depend on it, and it is a value of the row."""
    torch = sys.modules.get("torch")
    if torch is not None and rows.flags.c_contiguous and rows.dtype in (np.float32, np.float64):
        return torch.topk(torch.from_numpy(rows), k, dim=-1).values[:, -1:].numpy()
    return np.partition(rows, -k, axis=-1)[:, [-k]]


def top_k(logits: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Indices of the k largest logits per row, largest first (ties broken by lower index).

    A full sort of 30,522 logits per row cost int8-auto ~80% of its search on demo; a partition finds
    each row's k-th largest value, then only the entries at or above it are ordered. Rows with a NaN,
    or more than k entries at or above the k-th value (ties), take the full stable sort."""
    rows = logits.reshape(-1, logits.shape[-1])
    if k >= rows.shape[-1]:
        return np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    # with torch's topk the k-th values come without a partitioned copy: the whole matrix at once costs
    # fewer calls than blocks (validation's 5,000-sentence run: 7.6 s of top_k in blocks)
    whole = sys.modules.get("torch") is not None and rows.flags.c_contiguous and len(rows) <= 4096
    if len(rows) > ROW_BLOCK and not whole:
        found = np.concatenate([top_k(rows[i:i + ROW_BLOCK], k) for i in range(0, len(rows), ROW_BLOCK)])
        return found.reshape(*logits.shape[:-1], k)
    kth = kth_largest(rows, k)
    above = rows >= kth
    plain = (above.sum(axis=-1) == k) & ~np.isnan(rows).any(axis=-1)
    found = np.empty((len(rows), k), dtype=np.int64)
    candidates = np.nonzero(above[plain])[1].reshape(-1, k)  # ascending index within each row
    values = np.take_along_axis(rows[plain], candidates, axis=-1)
    found[plain] = np.take_along_axis(candidates, np.argsort(-values, axis=-1, kind="stable"), axis=-1)
    if not plain.all():
        found[~plain] = np.argsort(-rows[~plain], axis=-1, kind="stable")[:, :k]
    return found.reshape(*logits.shape[:-1], k)


def top1_agrees(ref_top: np.ndarray, var_top: np.ndarray) -> np.ndarray:
    """Per row: the variant's top-1 is the reference's (arguments: top_k of each)."""
    return ref_top[:, 0] == var_top[:, 0]


def ref_top1_in_top_k(ref_top: np.ndarray, var_top: np.ndarray) -> np.ndarray:
    """Per row: the reference's top-1 is among the variant's top-k (arguments: top_k of each)."""
    return (var_top == ref_top[:, :1]).any(axis=-1)


def top_k_overlap(reference: np.ndarray, variant: np.ndarray, k: int = TOP_K,
                  ref_k: np.ndarray | None = None, var_k: np.ndarray | None = None) -> np.ndarray:
    """|top-k(reference) ∩ top-k(variant)| / k per row (pass top_k's result where it is known)."""
    ref_k = top_k(reference, k) if ref_k is None else ref_k
    var_k = top_k(variant, k) if var_k is None else var_k
    return np.array([len(set(r) & set(v)) / k for r, v in zip(ref_k, var_k, strict=True)])


def _floats() -> array:
    return array("d")


def _flags() -> array:
    return array("b")


def _extend(values: array, new: np.ndarray) -> None:
    """Append a numpy vector to a typed array: 8 bytes a float (1 a flag), where a list of Python floats
    took 32; a 60,000-sentence validation holds nine such columns per variant."""
    values.frombytes(np.ascontiguousarray(new, dtype=np.float64 if values.typecode == "d" else np.int8).tobytes())


def append_columns(columns: Accumulator | ReferenceStats, later: Accumulator | ReferenceStats) -> None:
    """`later`'s positions after those of `columns` (the same kind), column by column: shards merged in
    corpus order summarize as one pass."""
    for column in fields(columns):
        getattr(columns, column.name).extend(getattr(later, column.name))


@dataclass
class Accumulator:
    """Per-position metrics for one variant, collected over the corpus."""

    max_abs: array = field(default_factory=_floats)
    mean_abs: array = field(default_factory=_floats)
    cosine: array = field(default_factory=_floats)
    kl: array = field(default_factory=_floats)
    rel_l2: array = field(default_factory=_floats)
    top1_agree: array = field(default_factory=_flags)
    top5_overlap: array = field(default_factory=_floats)
    ref_top1_in_top5: array = field(default_factory=_flags)
    truth_hit: array = field(default_factory=_flags)

    def add(self, reference: np.ndarray, variant: np.ndarray, truth: np.ndarray,
            ref_top: np.ndarray | None = None) -> None:
        """reference/variant: [masked positions, vocab]; truth: original ids, -1 where unknown; ref_top:
        top_k(reference) when the caller has it (one reference meets every variant)."""
        reference64, variant64 = reference.astype(np.float64), variant.astype(np.float64)  # once, for all below
        diff = np.abs(variant64 - reference64)
        _extend(self.max_abs, diff.max(axis=-1))
        _extend(self.mean_abs, diff.mean(axis=-1))
        _extend(self.cosine, cosine_similarity(reference64, variant64))
        _extend(self.kl, kl_divergence(reference, variant))
        _extend(self.rel_l2, relative_l2(reference64, variant64, diff))
        ref_top, var_top = top_k(reference) if ref_top is None else ref_top, top_k(variant)
        _extend(self.top1_agree, top1_agrees(ref_top, var_top))
        _extend(self.top5_overlap, top_k_overlap(reference, variant, ref_k=ref_top, var_k=var_top))
        _extend(self.ref_top1_in_top5, ref_top1_in_top_k(ref_top, var_top))
        known = truth >= 0
        _extend(self.truth_hit, var_top[known, 0] == truth[known])

    def extend(self, later: Accumulator) -> None:
        append_columns(self, later)

    def summary(self) -> dict[str, float]:
        if not self.max_abs:
            raise ValueError("no masked positions were evaluated")
        return {
            "positions": len(self.max_abs),
            "max_abs": float(np.max(self.max_abs)),
            "mean_abs": float(np.mean(self.mean_abs)),
            "cosine_mean": float(np.mean(self.cosine)),
            "cosine_min": float(np.min(self.cosine)),
            "kl_mean": float(np.mean(self.kl)),
            "kl_max": float(np.max(self.kl)),
            "rel_l2_mean": float(np.mean(self.rel_l2)),
            "top1_agreement": float(np.mean(self.top1_agree)),
            "top5_overlap": float(np.mean(self.top5_overlap)),
            "ref_top1_in_top5": float(np.mean(self.ref_top1_in_top5)),
            "truth_recovery": float(np.mean(self.truth_hit)) if self.truth_hit else float("nan"),
        }


@dataclass
class ReferenceStats:
    """How informative the reference is: top-1 diversity, margins, its own ground-truth recovery."""

    top1: array = field(default_factory=lambda: array("q"))
    margins: array = field(default_factory=_floats)
    truth_hit: array = field(default_factory=_flags)

    def add(self, reference: np.ndarray, truth: np.ndarray) -> None:
        top2 = np.partition(reference, -2, axis=-1)[:, -2:]  # [second largest, largest]
        _extend(self.margins, top2[:, 1] - top2[:, 0])
        top1 = reference.argmax(axis=-1)
        self.top1.frombytes(np.ascontiguousarray(top1, dtype=np.int64).tobytes())
        known = truth >= 0
        _extend(self.truth_hit, top1[known] == truth[known])

    def extend(self, later: ReferenceStats) -> None:
        append_columns(self, later)

    def summary(self) -> dict[str, object]:
        values, counts = np.unique(self.top1, return_counts=True)
        top_share = float(counts.max() / counts.sum())
        return {
            "positions": len(self.top1),
            "distinct_top1": int(len(values)),
            "most_common_top1_id": int(values[counts.argmax()]),
            "most_common_top1_share": top_share,
            "median_top1_top2_margin": float(np.median(self.margins)),
            "truth_recovery": float(np.mean(self.truth_hit)) if self.truth_hit else float("nan"),
            "degenerate": top_share >= DEGENERATE_SHARE,
        }
