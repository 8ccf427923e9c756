"""Validation's running tallies: exact sums, so a mean is one rounding of the exact value however the
positions were batched, sharded or merged, and nothing per position is kept."""

import math
import pickle
from fractions import Fraction

import numpy as np
import pytest

from bertforge.validation.batch_metrics import ReferenceRows
from bertforge.validation.running import ExactSum, Running, Share
from bertforge.validation.tallies import Accumulator


def awkward_values(rng, count):
    """Values whose float sum depends on the order: a wide range of exponents, both signs, subnormals, zeros."""
    values = rng.standard_normal(count) * 10.0 ** rng.integers(-30, 30, count)
    values[::17] = 0.0
    values[5::23] = 5e-324 * rng.integers(1, 1000, len(values[5::23]))  # subnormals
    values[3::29] = 1e300 * rng.choice([-1.0, 1.0], len(values[3::29]))
    return values


def split_at_random(rng, values):
    cuts = np.sort(rng.choice(np.arange(1, len(values)), size=rng.integers(1, 12), replace=False))
    return np.split(values, cuts)


def test_an_exact_sum_is_one_rounding_of_the_true_sum_in_any_grouping():
    rng = np.random.default_rng(7)
    for trial in range(30):
        values = awkward_values(rng, int(rng.integers(2, 400)))
        truth = sum((Fraction(v) for v in values.tolist()), Fraction(0))
        whole = ExactSum()
        whole.add(values)
        assert whole.exact() == truth, trial
        assert float(whole.exact()) == math.fsum(values.tolist()), trial
        assert whole.mean(len(values)) == float(truth / len(values)), trial
        parts = []
        for piece in split_at_random(rng, rng.permutation(values)):
            part = ExactSum()
            part.add(piece)
            parts.append(part)
        merged = ExactSum()
        for part in reversed(parts):
            merged.merge(part)
        assert merged.exact() == truth and merged.mean(len(values)) == whole.mean(len(values)), trial


def test_a_plain_float_sum_of_the_same_values_depends_on_the_grouping():
    """What the exact sum is for: the same values summed in float64 in two groupings give two answers."""
    big, one = 1e16, 1.0  # 1e16 + 1 rounds back to 1e16
    assert (big + one) + (-big + one) == 0.0 and ((big + one) - big) + one == 1.0  # the exact sum is 2
    for grouping in ([[big, one], [-big, one]], [[big], [one, -big], [one]]):
        exact = ExactSum()
        for group in grouping:
            exact.add(np.array(group))
        assert exact.mean(4) == 0.5


def test_nan_and_infinities_follow_ieee_as_numpy_does():
    for values in ([1.0, np.nan], [np.inf, 1.0], [-np.inf, 2.0], [np.inf, -np.inf], [np.nan, np.inf]):
        exact, running = ExactSum(), Running()
        exact.add(np.array(values))
        running.add(np.array(values))
        with np.errstate(invalid="ignore"):
            expected = np.mean(values)
        assert (math.isnan(exact.mean(2)) and math.isnan(expected)) or exact.mean(2) == expected, values
        assert np.array_equal([running.low, running.high], [np.min(values), np.max(values)], equal_nan=True), values


def test_running_extremes_and_shares_merge_as_one_pass():
    rng = np.random.default_rng(1)
    values, flags = awkward_values(rng, 300), rng.random(300) < 0.3
    one, pieces = Running(), Running()
    one.add(values)
    for piece in split_at_random(rng, values):
        part = Running()
        part.add(piece)
        pieces.merge(part)
    assert one == pieces and (one.low, one.high) == (values.min(), values.max())
    share = Share()
    for piece in split_at_random(rng, flags):
        share.add(piece)
    assert share.value() == np.mean(flags)


def test_a_variants_tally_does_not_grow_with_the_positions_it_has_seen():
    rng = np.random.default_rng(0)

    def tallied(batches):
        accumulator = Accumulator()
        for _ in range(batches):
            reference = rng.standard_normal((24, 50)).astype(np.float32)
            accumulator.add(reference, reference + 0.1 * rng.standard_normal((24, 50)).astype(np.float32),
                            rng.integers(-1, 50, 24))
        return accumulator

    few, many = tallied(4), tallied(400)
    assert many.summary()["positions"] == 100 * few.summary()["positions"]
    assert len(pickle.dumps(many)) < 1.5 * len(pickle.dumps(few))


def test_a_tally_summarizes_as_the_whole_columns_did():
    """The summaries against numpy over every position's values (what validation kept before): counts,
    extremes and shares equal, means to one rounding, the most common top-1 the lowest id among ties."""
    from bertforge.validation.batch_metrics import variant_metrics
    from bertforge.validation.metrics import top_k
    from bertforge.validation.tallies import ReferenceStats

    rng = np.random.default_rng(11)
    accumulator, stats, columns, top1, margins = Accumulator(), ReferenceStats(), {}, [], []
    for _ in range(9):
        reference = rng.integers(-2, 3, size=(int(rng.integers(1, 30)), 40)).astype(np.float32)  # near-ties at the top
        reference += 0.01 * rng.standard_normal(reference.shape).astype(np.float32)
        variant = reference + 0.3 * rng.standard_normal(reference.shape).astype(np.float32)
        truth = rng.integers(-1, 40, len(reference))
        accumulator.add(reference, variant, truth)
        stats.add(reference, truth)
        for name, values in variant_metrics(ReferenceRows.of(reference), variant).items():
            columns.setdefault(name, []).append(values)
        columns.setdefault("agree", []).append(top_k(reference)[:, 0] == top_k(variant)[:, 0])
        ordered = np.sort(reference, axis=-1)
        top1.append(reference.argmax(axis=-1))
        margins.append(ordered[:, -1] - ordered[:, -2])
    whole = {name: np.concatenate(parts) for name, parts in columns.items()}
    found = accumulator.summary()
    assert found["positions"] == len(whole["kl"])
    assert found["max_abs"] == whole["max_abs"].max() and found["cosine_min"] == whole["cosine"].min()
    assert found["kl_max"] == whole["kl"].max() and found["top1_agreement"] == np.mean(whole["agree"])
    means = {"kl_mean": "kl", "mean_abs": "mean_abs", "cosine_mean": "cosine", "rel_l2_mean": "rel_l2"}
    for key, name in means.items():
        assert found[key] == float(sum(map(Fraction, whole[name].tolist())) / len(whole[name])), key
        assert found[key] == pytest.approx(np.mean(whole[name]), rel=1e-15, abs=0), key
    ids, counts = np.unique(np.concatenate(top1), return_counts=True)
    reference = stats.summary()
    assert reference["distinct_top1"] == len(ids) and reference["most_common_top1_id"] == ids[counts.argmax()]
    assert reference["median_top1_top2_margin"] == np.median(np.concatenate(margins))
