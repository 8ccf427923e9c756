"""Running statistics of a metric over every [MASK] position, in memory that does not grow with the corpus.

Validation adds a batch's values at a time, shard by shard, and merges shards computed elsewhere (Ray
tasks). A float sum depends on the order and grouping of its additions; `ExactSum` keeps the sum
exactly (integer mantissa sums per binary exponent), so a mean is the same float however the positions
were batched, sharded or merged, and is the exactly rounded mean of the values (np.mean of the whole
column, which validation kept before, rounds its pairwise partial sums). Nothing per position is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

MANTISSA_BITS = 53  # float64: frexp's mantissa times 2**53 is an integer below 2**53 in magnitude
HALF = 26  # each mantissa is summed as two parts below 2**27, exactly in a float64 bincount ...
CHUNK = 1 << 25  # ... of at most this many values (sums below 2**52)


@dataclass
class ExactSum:
    """The exact sum of float64 values: for each binary exponent e, the sum of the integer mantissas m of
    the values m * 2**(e - 53); non-finite values as flags (a NaN, or +inf with -inf, makes it NaN)."""

    by_exponent: dict[int, int] = field(default_factory=dict)
    nan: bool = False
    plus_inf: bool = False
    minus_inf: bool = False

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        finite = np.isfinite(values)
        if not finite.all():
            odd = values[~finite]
            self.nan |= bool(np.isnan(odd).any())
            self.plus_inf |= bool((odd == np.inf).any())
            self.minus_inf |= bool((odd == -np.inf).any())
            values = values[finite]
        for start in range(0, len(values), CHUNK):
            self._add_finite(values[start:start + CHUNK])

    def _add_finite(self, values: np.ndarray) -> None:
        fractions, exponents = np.frexp(values)
        whole = np.ldexp(fractions, MANTISSA_BITS).astype(np.int64)  # exact: 53 significant bits at most
        exponents, at = np.unique(exponents, return_inverse=True)
        high = np.bincount(at, weights=whole >> HALF, minlength=len(exponents))
        low = np.bincount(at, weights=whole & ((1 << HALF) - 1), minlength=len(exponents))
        for exponent, upper, lower in zip(exponents.tolist(), high.tolist(), low.tolist(), strict=True):
            self.by_exponent[exponent] = self.by_exponent.get(exponent, 0) + (int(upper) << HALF) + int(lower)

    def merge(self, other: ExactSum) -> None:
        for exponent, mantissas in other.by_exponent.items():
            self.by_exponent[exponent] = self.by_exponent.get(exponent, 0) + mantissas
        self.nan |= other.nan
        self.plus_inf |= other.plus_inf
        self.minus_inf |= other.minus_inf

    def exact(self) -> Fraction:
        """The sum of the finite values, as a fraction."""
        if not self.by_exponent:
            return Fraction(0)
        lowest = min(self.by_exponent) - MANTISSA_BITS
        numerator = sum(mantissas << (exponent - MANTISSA_BITS - lowest)
                        for exponent, mantissas in self.by_exponent.items())
        return Fraction(numerator, 1 << -lowest) if lowest < 0 else Fraction(numerator << lowest)

    def mean(self, count: int) -> float:
        """The sum over `count` values, rounded once (IEEE semantics for NaN and infinities)."""
        if self.nan or (self.plus_inf and self.minus_inf):
            return float("nan")
        if self.plus_inf or self.minus_inf:
            return float("inf") if self.plus_inf else float("-inf")
        return float(self.exact() / count)


@dataclass
class Running:
    """Count, exact sum, lowest and highest of one metric's values (NaN-propagating, as np.min/np.max)."""

    count: int = 0
    total: ExactSum = field(default_factory=ExactSum)
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        if not len(values):
            return
        self.count += len(values)
        self.total.add(values)
        self.low = float(np.minimum(self.low, values.min()))
        self.high = float(np.maximum(self.high, values.max()))

    def merge(self, other: Running) -> None:
        self.count += other.count
        self.total.merge(other.total)
        self.low = float(np.minimum(self.low, other.low))
        self.high = float(np.maximum(self.high, other.high))

    def mean(self) -> float:
        return self.total.mean(self.count) if self.count else float("nan")


@dataclass
class Share:
    """How many of the positions a flag holds at: a count of each, exact in any grouping."""

    hits: int = 0
    count: int = 0

    def add(self, flags: np.ndarray) -> None:
        flags = np.asarray(flags, dtype=bool).ravel()
        self.hits += int(np.count_nonzero(flags))
        self.count += len(flags)

    def merge(self, other: Share) -> None:
        self.hits += other.hits
        self.count += other.count

    def value(self) -> float:
        return self.hits / self.count if self.count else float("nan")
