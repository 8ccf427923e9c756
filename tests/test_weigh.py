"""The report's intervals and the warning when a gate rests on too few masked positions."""

import pytest

from bertforge.report.weigh import few_positions_warnings, intervals, wilson


def test_wilson_intervals_match_the_textbook_values():
    low, high = wilson(0.9, 100)  # Wilson 95% for 90/100: 0.8256 .. 0.9448
    assert (low, high) == (pytest.approx(0.8256, abs=1e-4), pytest.approx(0.9448, abs=1e-4))
    assert wilson(1.0, 1405) == (pytest.approx(0.99727, abs=1e-4), pytest.approx(1.0))
    assert wilson(0.5, 0) == (0.0, 1.0)


def test_a_gate_on_too_few_positions_is_warned_about_and_the_full_demo_corpus_is_not():
    gates = {"int8-dynamic": {"top1_min": 0.70, "ref_top1_in_top5_min": None}}

    def variants(positions):
        metrics = {"positions": positions, "top1_agreement": 0.736, "ref_top1_in_top5": 0.905}
        return {"int8-dynamic": {"metrics": metrics, "intervals": intervals(metrics)}}

    assert few_positions_warnings(variants(1405), gates) == []  # demo's validation corpus
    (line,) = few_positions_warnings(variants(24), gates)
    assert line.startswith("int8-dynamic: top1_agreement 73.6% on 24 masked positions has a 95% interval of")
    assert few_positions_warnings(variants(24), {"int8-dynamic": {"top1_min": None}}) == []  # no gate, no warning


def test_an_int8_auto_plan_that_misses_its_target_on_validation_is_reported_with_the_gap():
    from bertforge.report.weigh import plan_miss_warnings

    def auto(top1: float) -> dict:
        return {"metrics": {"top1_agreement": top1},
                "metadata": {"target": {"top1_min": 0.95}, "calibration": {"top1_agreement": 0.9523},
                             "calibration_positions": 378}}

    (line,) = plan_miss_warnings({"int8-auto": auto(0.9409), "fused": {"metrics": {"top1_agreement": 1.0}}})
    assert line.startswith("int8-auto: top-1 94.09% on the validation corpus, 0.91 points under the 95%")
    assert "95.23% on 378 positions" in line
    assert plan_miss_warnings({"int8-auto": auto(0.9552)}) == []


def test_the_gates_table_shows_thresholds_as_given_and_n_a_for_a_missing_value():
    from bertforge.report.weigh import gate_rows

    gates = [{"metric": "top1_agreement", "value": 0.9849, "op": ">=", "threshold": 0.985, "passed": False},
             {"metric": "kl_mean", "value": None, "op": "<=", "threshold": 0.01, "passed": False}]
    assert gate_rows({"v": {"gates": gates}}) == [["v", "top1_agreement", "98.49%", ">= 98.5%", "FAIL"],
                                                  ["v", "kl_mean", "n/a", "<= 0.01", "FAIL"]]


def test_compare_calls_a_metric_b_lost_a_regression():
    from bertforge.comparison import compare_reports

    def report(metrics: dict) -> dict:
        return {"schema_version": 1, "model": {"source_key": "k"}, "corpus": {"digest": "d", "seed": 0},
                "variants": {"fp16": {"size_bytes": 10, "latency": {}, "metrics": metrics}}}

    a = report({"top1_agreement": 0.99, "kl_mean": 1e-5, "max_abs": 0.01})
    b = report({"top1_agreement": 0.99, "kl_mean": None, "max_abs": 0.01})
    assert compare_reports(a, b)["regressions"] == [
        "fp16 kl_mean: 1e-05 -> n/a (B has no number: NaN logits, or not measured)"]
    assert compare_reports(a, a)["regressions"] == []


def test_compare_judges_latency_only_between_reports_timed_on_the_same_kind_of_machine():
    from bertforge.comparison import compare_reports, render

    def report(ms: float, machine: dict) -> dict:
        return {"schema_version": 1, "model": {"source_key": "k"}, "corpus": {"digest": "d", "seed": 0},
                "machine": machine, "variants": {"fp16": {"size_bytes": 10, "latency": {"p50_ms": ms},
                                                          "metrics": {"top1_agreement": 0.99}}}}

    here = {"cpu": "AMD EPYC 7B13", "cpu_class": "avx2", "physical_cores": 2}
    slower = report(30.0, here)
    assert compare_reports(report(20.0, here), slower)["regressions"] == [
        "fp16 latency p50: 20.0 -> 30.0 ms (> +25%)"]
    there = report(20.0, {"cpu": "Intel Xeon", "cpu_class": "amx", "physical_cores": 2})
    found = compare_reports(there, slower)
    assert found["regressions"] == []  # another CPU: its speed says nothing about a regression
    assert "latency not judged: A was timed on Intel Xeon (amx, 2 threads), B on AMD EPYC 7B13" in render(found)
    # a Ray build's latencies were timed on the worker its report names
    on_worker = {**report(20.0, {"cpu": "Intel Xeon", "cpu_class": "amx", "physical_cores": 2}),
                 "executor": {"latency_measured_on": {"host": "w1", "cpu": "AMD EPYC 7B13", "cpu_class": "avx2",
                                                      "threads": 2}}}
    assert compare_reports(on_worker, slower)["regressions"] == ["fp16 latency p50: 20.0 -> 30.0 ms (> +25%)"]
