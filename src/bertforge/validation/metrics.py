"""Parity and agreement metrics between a variant's logits and the reference's, row by row.

Pure numpy on arrays of shape [positions, vocab]. Validation computes them a batch at a time through
`batch_metrics` and tallies them over the corpus in `tallies`; kl_divergence, cosine_similarity and
relative_l2 are the plain definitions batch_metrics is tested against.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import cache

import numpy as np

TOP_K = 5
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


def softmax_terms(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(softmax p, sum p log p per row) of [rows, vocab] logits, float64: what kl_to reads of a reference."""
    log_p = log_softmax(logits)
    p = np.exp(log_p)
    return p, (p * log_p).sum(axis=-1)


def kl_divergence(reference: np.ndarray, variant: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(variant)) per row, in nats."""
    return kl_to(*softmax_terms(reference), variant)


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
    rows = variant.astype(np.float64).reshape(-1, variant.shape[-1])
    weights, weights_p_log_p = np.asarray(p).reshape(rows.shape), np.asarray(p_log_p).reshape(-1)
    count = len(rows)
    if count == 1:  # summed as a block of two rows' first (above)
        rows, weights, weights_p_log_p = (np.repeat(a, 2, axis=0) for a in (rows, weights, weights_p_log_p))
    return kl_in_place(weights, rows, weights_p_log_p)[:count].reshape(variant.shape[:-1])


def kl_in_place(p: np.ndarray, x: np.ndarray, p_log_p: np.ndarray, exp: Callable = np.exp) -> np.ndarray:
    """kl_to's arithmetic on [rows, vocab] float64 arrays of two or more rows, x the variant's logits,
    overwritten: shifted by each row's max t, then exponentiated in place. `exp(x, out=x)`: validation
    passes its own (exp_rows). int8-auto's search keeps numpy's: on bert-base with AVX2 kernels (an Intel
    Xeon masked to AVX2) the search took 194 s with either, and torch's would load torch into every
    process that runs a sensitivity row."""
    np.subtract(x, x.max(axis=-1, keepdims=True), out=x)
    expected = np.einsum("ij,ij->i", p, x)
    exp(x, out=x)
    return p_log_p - (expected - np.log(x.sum(axis=-1)))


def exp_rows(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """exp of each row of float64 `x` into `out` ([rows, vocab]). numpy vectorizes float64 exp only with
    AVX-512: elsewhere (AVX2, ARM) it calls libm a value at a time, 263-310 us a row of bert-base's
    vocabulary against 25-36 us through torch's vectorized exp (measured with numpy's AVX-512 loops
    switched off), so there torch computes it, a row a call, which keeps each call on the calling thread
    (a row is under torch's parallel grain). The route depends on the CPU alone, never on what a process
    happened to import. With AVX-512, numpy's own: from two threads it was the faster of the two.
    Where torch's route is taken (CPUID without AVX-512: AMD and Intel tried), torch's exp stayed within
    an ulp of numpy's after every test of a whole suite process. On AVX-512 CPUs torch's exp has lost
    digits (3.3e-9 relative) after other work in a long process, twice: with AVX-512 hidden from numpy
    and torch by environment variables only, and forced onto that route on an Intel Xeon with AMX; cause
    not found (docs/memory.md). Those CPUs take numpy's route."""
    return np.exp(x, out=out) if numpy_vector_exp() else exp_rows_by_torch(x, out)


def exp_rows_by_torch(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """exp_rows through torch (bertforge depends on it; loaded already wherever a PyTorch reference ran)."""
    import torch

    for source, target in zip(torch.from_numpy(x), torch.from_numpy(out), strict=True):
        torch.exp(source, out=target)
    return out


@cache
def numpy_vector_exp() -> bool:
    """Whether numpy's float64 exp has a vectorized loop on this CPU (its AVX-512 dispatch target, named
    X86_V4 since numpy 2.4, AVX512F before)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # a numpy without this private table: assume the scalar loop
        return False
    return bool(features.get("X86_V4", features.get("AVX512F", False)))


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
    """Each row's k-th largest value, [rows, 1] (NaN counted largest, as np.partition does)."""
    return np.partition(rows, -k, axis=-1)[:, [-k]]


def top_k(logits: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Indices of the k largest logits per row, largest first (ties broken by lower index).

    A full sort of 30,522 logits per row cost int8-auto ~80% of its search on demo; only the entries at
    or above each row's k-th largest value are ordered. Rows with a NaN, or more than k entries at or
    above the k-th value (ties), take the full stable sort."""
    rows = logits.reshape(-1, logits.shape[-1])
    if k >= rows.shape[-1]:
        return np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    torch = sys.modules.get("torch")
    if torch is not None and rows.flags.c_contiguous and rows.dtype in (np.float32, np.float64):
        return top_k_by_torch(torch, rows, k).reshape(*logits.shape[:-1], k)
    if len(rows) > ROW_BLOCK:  # a partitioned copy of a few rows at a time (see ROW_BLOCK)
        found = np.concatenate([top_k(rows[i:i + ROW_BLOCK], k) for i in range(0, len(rows), ROW_BLOCK)])
        return found.reshape(*logits.shape[:-1], k)
    kth = kth_largest(rows, k)
    above = rows >= kth
    plain = (above.sum(axis=-1) == k) & ~np.isnan(rows).any(axis=-1)
    candidates = np.nonzero(above[plain])[1].reshape(-1, k)  # ascending index within each row
    return in_order(rows, k, plain, candidates, np.take_along_axis(rows[plain], candidates, axis=-1)).reshape(
        *logits.shape[:-1], k)


def top_k_by_torch(torch, rows: np.ndarray, k: int) -> np.ndarray:
    """top_k through torch's topk where torch is already loaded (validation runs the PyTorch reference,
    so it is): its k + 1 largest values and their indices, with no [rows x vocab] temporary. A row is
    plain when the (k+1)-th value is below the k-th and none is NaN (topk ranks NaN above every
    number). Validation's 5,000-sentence run: 10.7 s of top_k before, when the k-th value came from
    topk and the candidates from a comparison of every logit with it (np.nonzero alone 4.2 s)."""
    values, indices = (found.numpy() for found in torch.topk(torch.from_numpy(rows), k + 1, dim=-1))
    plain = (values[:, k] < values[:, k - 1]) & ~np.isnan(values).any(axis=-1)
    ascending = np.argsort(indices[plain, :k], axis=-1)  # topk orders ties any way: by index first
    candidates = np.take_along_axis(indices[plain, :k], ascending, axis=-1)
    return in_order(rows, k, plain, candidates, np.take_along_axis(values[plain, :k], ascending, axis=-1))


def in_order(rows: np.ndarray, k: int, plain: np.ndarray, candidates: np.ndarray,
             values: np.ndarray) -> np.ndarray:
    """The plain rows' candidates (ascending index) by value, largest first, a stable sort; the other
    rows fully sorted."""
    found = np.empty((len(rows), k), dtype=np.int64)
    found[plain] = np.take_along_axis(candidates, np.argsort(-values, axis=-1, kind="stable"), axis=-1)
    if not plain.all():
        found[~plain] = np.argsort(-rows[~plain], axis=-1, kind="stable")[:, :k]
    return found


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
