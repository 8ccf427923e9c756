"""Per-position metric columns collected over the corpus (`Accumulator` per variant, `ReferenceStats`
for the reference), appended batch by batch and shard by shard, and their summaries."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field, fields

import numpy as np

from bertforge.validation.batch_metrics import ReferenceRows, variant_metrics
from bertforge.validation.metrics import ref_top1_in_top_k, top1_agrees, top_k, top_k_overlap

DEGENERATE_SHARE = 0.5  # one token as top-1 at half the masked positions or more


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

    def add(self, reference: ReferenceRows | np.ndarray, variant: np.ndarray, truth: np.ndarray) -> None:
        """reference/variant: [masked positions, vocab] (the reference as ReferenceRows where many variants
        meet it); truth: original ids, -1 where unknown."""
        if not isinstance(reference, ReferenceRows):
            reference = ReferenceRows.of(reference)
        for name, values in variant_metrics(reference, variant).items():
            _extend(getattr(self, name), values)
        ref_top, var_top = reference.top, top_k(variant)
        _extend(self.top1_agree, top1_agrees(ref_top, var_top))
        _extend(self.top5_overlap, top_k_overlap(reference.logits, variant, ref_k=ref_top, var_k=var_top))
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

    def add(self, reference: ReferenceRows | np.ndarray, truth: np.ndarray) -> None:
        """reference: [masked positions, vocab]; as ReferenceRows, its top_k gives the two largest (the same
        values as a partition, without one: 3.8 s of validation's 20,000 sentences) unless a row has a NaN."""
        if isinstance(reference, ReferenceRows) and not np.isnan(reference.peak).any():
            first, second = (np.take_along_axis(reference.logits, reference.top[:, [i]], axis=-1)[:, 0] for i in (0, 1))
            top1, margins = reference.top[:, 0], first - second  # ties: top_k's lower index, as argmax's first
        else:
            logits = reference.logits if isinstance(reference, ReferenceRows) else reference
            top2 = np.partition(logits, -2, axis=-1)[:, -2:]  # [second largest, largest]
            top1, margins = logits.argmax(axis=-1), top2[:, 1] - top2[:, 0]
        _extend(self.margins, margins)
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
