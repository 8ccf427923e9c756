"""Metric code against values computed by hand on small arrays."""

import math

import numpy as np
import pytest

from bertforge.validation.batch_metrics import ReferenceRows, variant_metrics
from bertforge.validation.config import Gate
from bertforge.validation.gates import evaluate
from bertforge.validation.metrics import (
    cosine_similarity,
    kl_divergence,
    kl_to,
    relative_l2,
    top_k,
    top_k_overlap,
)
from bertforge.validation.tallies import Accumulator, ReferenceStats


def test_kl_divergence_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([0, 0]) = [1/2, 1/2]
    ref = np.array([[0.0, math.log(3.0)]])
    var = np.array([[0.0, 0.0]])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_divergence(ref, var)[0] == pytest.approx(expected, rel=1e-12)
    assert kl_divergence(ref, ref)[0] == pytest.approx(0.0, abs=1e-15)


def test_cosine_and_relative_l2_by_hand():
    a = np.array([[1.0, 0.0], [3.0, 4.0]])
    b = np.array([[0.0, 1.0], [3.0, 4.0]])
    assert cosine_similarity(a, b).tolist() == pytest.approx([0.0, 1.0])
    # |(0,1)-(1,0)| / |(1,0)| = sqrt(2)
    assert relative_l2(a, b).tolist() == pytest.approx([math.sqrt(2.0), 0.0])


def test_top_k_and_overlap():
    ref = np.array([[9, 8, 7, 6, 5, 4, 0.0]])
    var = np.array([[9, 8, 7, 0, 0, 5, 6.0]])  # top-5: 0,1,2,6,5 vs ref's 0,1,2,3,4
    assert top_k(ref).tolist() == [[0, 1, 2, 3, 4]]
    assert top_k_overlap(ref, var).tolist() == [pytest.approx(3 / 5)]



@pytest.mark.parametrize("kth_by", ["torch", "numpy"])
def test_top_k_orders_like_a_stable_full_sort_with_ties_infinities_and_nans(kth_by, monkeypatch):
    import sys

    import torch

    if kth_by == "numpy":  # the path where torch is not loaded
        monkeypatch.delitem(sys.modules, "torch")
    else:
        assert sys.modules["torch"] is torch
    rng = np.random.default_rng(0)
    for trial in range(200):
        rows, vocab = int(rng.integers(1, 30)), int(rng.integers(2, 50))
        logits = (rng.integers(-3, 4, size=(rows, vocab)) if trial % 2 else rng.standard_normal((rows, vocab)))
        logits = logits.astype(np.float32)
        if trial % 5 == 0:
            logits[rng.integers(rows), rng.integers(vocab)] = np.nan  # in any block of ROW_BLOCK rows
        if trial % 11 == 0:
            logits[:, :3] = np.inf
        for k in (1, 5, vocab):
            expected = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
            assert top_k(logits, k).tolist() == expected.tolist(), (trial, k)
    batched = rng.standard_normal((3, 40, 100))
    assert top_k(batched).tolist() == np.argsort(-batched, axis=-1, kind="stable")[..., :5].tolist()


def test_kl_to_in_row_blocks_is_each_rows_own_kl():
    rng = np.random.default_rng(1)
    reference, variant = rng.standard_normal((2, 40, 30522)) * 3
    log_p = np.log(np.exp(reference) / np.exp(reference).sum(axis=-1, keepdims=True))
    p = np.exp(log_p)
    p_log_p = (p * log_p).sum(axis=-1)
    blocked = kl_to(p, p_log_p, variant)
    assert blocked.shape == (40,)
    # to the bit, however the rows are grouped (one at a time, or blocks starting anywhere): the int8-auto
    # search sums them a calibration batch at a time and must equal one pass over every position
    one_by_one = [kl_to(p[i:i + 1], p_log_p[i:i + 1], variant[i:i + 1])[0] for i in range(40)]
    assert np.array_equal(blocked, one_by_one)
    for start in (1, 7, 33):
        assert np.array_equal(kl_to(p[start:].copy(), p_log_p[start:], variant[start:]), blocked[start:])
    assert (blocked > 0).all()


def test_exp_rows_keeps_every_digit_of_libms_exp_on_the_route_this_cpu_takes():
    # validation exponentiates through exp_rows: numpy's loop with AVX-512, torch's elsewhere (the AVX2
    # class: .ci/run runs this file again as one). Both within an ulp of the true value, so within two
    # of libm's; a route that lost digits fails here: torch's exp did, by 3.3e-9 relative, run on an
    # AVX-512 CPU after other work in a long process (docs/memory.md), which is why it is not the route there
    from bertforge.validation import metrics

    x = np.random.default_rng(3).uniform(-60.0, 0.0, size=(5, 30522))  # rows shifted by their max
    out = np.empty_like(x)
    assert metrics.exp_rows(x, out) is out
    sample = np.random.default_rng(4).choice(x.size, 3000, replace=False)
    expected = np.array([math.exp(value) for value in x.ravel()[sample]])
    np.testing.assert_allclose(out.ravel()[sample], expected, rtol=4.5e-16, atol=0)


def test_variant_metrics_equal_the_one_metric_functions_and_each_row_is_its_own():
    rng = np.random.default_rng(2)
    reference = (rng.standard_normal((21, 30522)) * 3).astype(np.float32)
    variant = reference + (rng.standard_normal(reference.shape) * 0.05).astype(np.float32)
    found = variant_metrics(ReferenceRows.of(reference), variant)
    r64, v64 = reference.astype(np.float64), variant.astype(np.float64)
    assert np.array_equal(found["max_abs"], np.abs(v64 - r64).max(axis=-1))
    np.testing.assert_allclose(found["mean_abs"], np.abs(v64 - r64).mean(axis=-1), rtol=1e-13)
    np.testing.assert_allclose(found["cosine"], cosine_similarity(r64, v64), rtol=1e-13)
    np.testing.assert_allclose(found["rel_l2"], relative_l2(r64, v64), rtol=1e-12)
    np.testing.assert_allclose(found["kl"], kl_divergence(reference, variant), rtol=1e-9)
    assert (found["kl"] > 1e-4).all()
    # to the bit, whichever rows share a block or a thread: validation's shards and batches may group
    # the same positions differently
    for start, stop in ((0, 1), (5, 6), (3, 20), (20, 21), (1, 21)):
        part = variant_metrics(ReferenceRows.of(reference[start:stop].copy()), variant[start:stop].copy())
        for name, values in found.items():
            assert np.array_equal(part[name], values[start:stop]), (name, start, stop)


def test_accumulator_summary_by_hand():
    vocab = 6
    ref = np.zeros((2, vocab))
    ref[0, 2], ref[1, 4] = 5.0, 5.0
    var = ref.copy()
    var[1, 4], var[1, 1] = 1.0, 2.0  # position 1: top-1 changes 4 -> 1, max abs 4.0
    acc = Accumulator()
    acc.add(ref, var, truth=np.array([2, -1]))
    s = acc.summary()
    assert s["positions"] == 2
    assert s["max_abs"] == pytest.approx(4.0)
    assert s["mean_abs"] == pytest.approx((0.0 + (4.0 + 2.0) / vocab) / 2)
    assert s["top1_agreement"] == pytest.approx(0.5)
    assert s["ref_top1_in_top5"] == pytest.approx(1.0)  # 4 is still 2nd at position 1
    assert s["truth_recovery"] == pytest.approx(1.0)  # only position 0 has a label, and it is hit


def test_reference_stats_flags_degenerate_reference():
    stats = ReferenceStats()
    logits = np.zeros((4, 5))
    logits[:, 3] = [2.0, 2.0, 2.0, 0.5]  # token 3 is top-1 at 3 of 4 positions (0.5 ties go to index 0)
    logits[3, 0] = 1.0
    stats.add(logits, np.array([3, 3, 1, -1]))
    s = stats.summary()
    assert s["distinct_top1"] == 2
    assert s["most_common_top1_share"] == pytest.approx(0.75)
    assert s["degenerate"] is True
    assert s["truth_recovery"] == pytest.approx(2 / 3)
    assert s["median_top1_top2_margin"] == pytest.approx(2.0)


def test_reference_stats_from_reference_rows_equal_those_from_the_logits():
    rng = np.random.default_rng(3)
    for trial in range(20):
        logits = rng.integers(-3, 4, size=(37, 300)).astype(np.float32)  # ties at the top
        if trial % 2:
            logits = logits + rng.standard_normal(logits.shape).astype(np.float32)
        if trial % 5 == 4:
            logits[3, 7] = np.nan
        truth = rng.integers(-1, 300, size=37)
        plain, rows = ReferenceStats(), ReferenceStats()
        plain.add(logits, truth)
        rows.add(ReferenceRows.of(logits), truth)
        assert np.array_equal(plain.top1.counts, rows.top1.counts), trial
        assert np.array_equal(plain.margins.values, rows.margins.values, equal_nan=True), trial
        assert plain.truth_hit == rows.truth_hit, trial


def test_a_reference_row_with_a_nan_has_the_top1_the_variants_are_compared_with_and_a_nan_margin():
    logits = np.random.default_rng(4).standard_normal((6, 50)).astype(np.float32)
    logits[0, 3] = np.nan
    rows = ReferenceRows.of(logits)
    for given in (rows, logits):
        stats = ReferenceStats()
        stats.add(given, np.full(6, -1))
        assert np.array_equal(stats.top1.counts, np.bincount(rows.top[:, 0], minlength=stats.top1.counts.size))
        assert rows.top[0, 0] == np.nanargmax(logits[0]) and rows.top[0, 0] != 3
        margins = np.asarray(stats.margins.values)
        assert np.isnan(margins[0]) and not np.isnan(margins[1:]).any()


def test_gate_evaluation_names_metric_and_threshold():
    results = evaluate("int8-dynamic", {"top1_agreement": 0.9, "top5_overlap": 0.97, "max_abs": 0.2,
                                        "kl_mean": 0.01}, Gate(top1_min=0.95, top5_overlap_min=0.95))
    assert [(r.metric, r.passed) for r in results] == [("top1_agreement", False), ("top5_overlap", True)]
    assert results[0].line() == "FAIL: int8-dynamic top1_agreement = 0.9 (gate >= 0.95)"
    nan = evaluate("fp16", {"top1_agreement": float("nan"), "top5_overlap": 1, "max_abs": 0, "kl_mean": 0},
                   Gate(top1_min=0.5))
    assert not nan[0].passed  # a NaN never passes a gate


def test_demo_logit_scale_recovers_a_known_temperature():
    from bertforge.sources.demo import fit_logit_scale

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 50))
    true_scale = 3.0
    probabilities = np.exp(true_scale * logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    truth = np.array([rng.choice(50, p=row) for row in probabilities])
    fitted = fit_logit_scale(logits, truth)
    assert abs(fitted - true_scale) < 0.15
    # ranking is untouched by a positive scale: the reason agreement does not move
    assert (np.argsort(-fitted * logits, axis=1)[:, :5] == np.argsort(-logits, axis=1)[:, :5]).all()
