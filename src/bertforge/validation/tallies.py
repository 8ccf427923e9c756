"""What validation keeps of each variant's metrics (`Accumulator`) and of the reference (`ReferenceStats`)
over the corpus: running counts, exact sums and extremes, added batch by batch and merged shard by
shard, in memory that does not grow with the corpus (running.py). The reference's top-1/top-2 margins
are the one per-position column kept (8 bytes a position): their median needs every value."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field, fields

import numpy as np

from bertforge.validation.batch_metrics import ReferenceRows, variant_metrics
from bertforge.validation.metrics import ref_top1_in_top_k, top1_agrees, top_k, top_k_overlap
from bertforge.validation.running import Running, Share

DEGENERATE_SHARE = 0.5  # one token as top-1 at half the masked positions or more


def merge_fields(tally: Accumulator | ReferenceStats, other: Accumulator | ReferenceStats) -> None:
    """`other`'s positions into `tally` (the same kind), field by field: counts and exact sums, so shards
    merged in any order summarize as one pass."""
    for name in (f.name for f in fields(tally)):
        getattr(tally, name).merge(getattr(other, name))


@dataclass
class Accumulator:
    """One variant's metrics over the corpus: a Running per value, a Share per flag."""

    max_abs: Running = field(default_factory=Running)
    mean_abs: Running = field(default_factory=Running)
    cosine: Running = field(default_factory=Running)
    kl: Running = field(default_factory=Running)
    rel_l2: Running = field(default_factory=Running)
    top1_agree: Share = field(default_factory=Share)
    top5_overlap: Running = field(default_factory=Running)
    ref_top1_in_top5: Share = field(default_factory=Share)
    truth_hit: Share = field(default_factory=Share)

    def add(self, reference: ReferenceRows | np.ndarray, variant: np.ndarray, truth: np.ndarray) -> None:
        """reference/variant: [masked positions, vocab] (the reference as ReferenceRows where many variants
        meet it); truth: original ids, -1 where unknown."""
        if not isinstance(reference, ReferenceRows):
            reference = ReferenceRows.of(reference)
        for name, values in variant_metrics(reference, variant).items():
            getattr(self, name).add(values)
        ref_top, var_top = reference.top, top_k(variant)
        self.top1_agree.add(top1_agrees(ref_top, var_top))
        self.top5_overlap.add(top_k_overlap(reference.logits, variant, ref_k=ref_top, var_k=var_top))
        self.ref_top1_in_top5.add(ref_top1_in_top_k(ref_top, var_top))
        known = truth >= 0
        self.truth_hit.add(var_top[known, 0] == truth[known])

    def merge(self, other: Accumulator) -> None:
        merge_fields(self, other)

    def summary(self) -> dict[str, float]:
        if not self.max_abs.count:
            raise ValueError("no masked positions were evaluated")
        return {
            "positions": self.max_abs.count,
            "max_abs": self.max_abs.high,
            "mean_abs": self.mean_abs.mean(),
            "cosine_mean": self.cosine.mean(),
            "cosine_min": self.cosine.low,
            "kl_mean": self.kl.mean(),
            "kl_max": self.kl.high,
            "rel_l2_mean": self.rel_l2.mean(),
            "top1_agreement": self.top1_agree.value(),
            "top5_overlap": self.top5_overlap.mean(),
            "ref_top1_in_top5": self.ref_top1_in_top5.value(),
            "truth_recovery": self.truth_hit.value(),
        }


@dataclass
class TopCounts:
    """How often each token id is the reference's top-1: a histogram over the vocabulary."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def add(self, ids: np.ndarray) -> None:
        self.merge(TopCounts(np.bincount(np.asarray(ids, dtype=np.int64).ravel())))

    def merge(self, other: TopCounts) -> None:
        size = max(len(self.counts), len(other.counts))
        self.counts = np.pad(self.counts, (0, size - len(self.counts))) + np.pad(other.counts,
                                                                                 (0, size - len(other.counts)))


@dataclass
class Margins:
    """The reference's top-1/top-2 margin at every position, 8 bytes each: a median needs them all."""

    values: array = field(default_factory=lambda: array("d"))

    def add(self, margins: np.ndarray) -> None:
        self.values.frombytes(np.ascontiguousarray(margins, dtype=np.float64).tobytes())

    def merge(self, other: Margins) -> None:
        self.values.extend(other.values)


@dataclass
class ReferenceStats:
    """How informative the reference is: top-1 diversity, margins, its own ground-truth recovery."""

    top1: TopCounts = field(default_factory=TopCounts)
    margins: Margins = field(default_factory=Margins)
    truth_hit: Share = field(default_factory=Share)

    def add(self, reference: ReferenceRows | np.ndarray, truth: np.ndarray) -> None:
        """reference: [masked positions, vocab]. Its top-1 is the variants' comparison's own (metrics.top_k:
        the largest number, ties to the lower index, a NaN ranked below every number), and the margin that
        top-1's lead over the next; a row holding a NaN has a NaN margin, so the median shows it. As
        ReferenceRows its top_k is reused (a partition without it: 3.8 s of 20,000 sentences' validation)."""
        rows = reference if isinstance(reference, ReferenceRows) else None
        logits = rows.logits if rows is not None else reference
        top = rows.top if rows is not None else top_k(logits, 2)
        first, second = (np.take_along_axis(logits, top[:, [i]], axis=-1)[:, 0] for i in (0, 1))
        top1, margins = top[:, 0], first - second
        has_nan = np.isnan(rows.peak) if rows is not None else np.isnan(logits).any(axis=-1)
        if has_nan.any():
            margins = np.where(has_nan, np.nan, margins)
        self.margins.add(margins)
        self.top1.add(top1)
        known = truth >= 0
        self.truth_hit.add(top1[known] == truth[known])

    def merge(self, other: ReferenceStats) -> None:
        merge_fields(self, other)

    def summary(self) -> dict[str, object]:
        counts = self.top1.counts
        positions = int(counts.sum())
        top_share = float(counts.max() / positions)
        return {
            "positions": positions,
            "distinct_top1": int(np.count_nonzero(counts)),
            "most_common_top1_id": int(counts.argmax()),
            "most_common_top1_share": top_share,
            "median_top1_top2_margin": float(np.median(self.margins.values)),
            "truth_recovery": self.truth_hit.value(),
            "degenerate": top_share >= DEGENERATE_SHARE,
        }
