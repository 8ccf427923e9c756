"""int8-auto on the tiny model: meets its target on the calibration split, repeatably; the planner's order."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bertforge.errors import UsageError
from bertforge.optimizers.int8_auto.search import hull, ordered_moves, plan_after, search
from conftest import INT8_LOGIT_ERROR, tiny_feeds


def test_hull_drops_dearer_less_accurate_schemes_and_orders_moves():
    options = [("fp32", 1.0, 0.0), ("int8-dynamic", 0.2, 0.01), ("int8-blockwise", 1.5, 0.001)]
    assert [o[0] for o in hull(options)] == ["int8-dynamic", "fp32"]
    costs = {"a": {"fp32": 1.0, "int8-dynamic": 0.2}, "b": {"fp32": 1.0, "int8-dynamic": 0.5},
             "c": {"fp32": 2.0, "int8-dynamic": 2.5}}
    kl = {"a": {"int8-dynamic": 0.01}, "b": {"int8-dynamic": 0.02}, "c": {"int8-dynamic": 0.5}}
    start, moves = ordered_moves(["a", "b", "c"], costs, kl)
    # c is slower in int8 and worse: it starts (and stays) fp32; b removes more KL per ms than a
    assert start == {"a": "int8-dynamic", "b": "int8-dynamic", "c": "fp32"}
    assert [(m.group, m.scheme) for m in moves] == [("b", "fp32"), ("a", "fp32")]
    assert plan_after(start, moves, 1) == {"a": "int8-dynamic", "b": "fp32", "c": "fp32"}


def test_the_search_never_runs_the_all_fp32_plan_whose_agreement_is_the_references_own():
    costs = {"a": {"fp32": 1.0, "int8-dynamic": 0.2}, "b": {"fp32": 1.0, "int8-dynamic": 0.5}}
    kl = {"a": {"int8-dynamic": 0.01}, "b": {"int8-dynamic": 0.02}}
    start, moves = ordered_moves(["a", "b"], costs, kl)
    seen = []

    def evaluate(plan):  # top-1 grows by 10 points a group in fp32
        seen.append(dict(plan))
        fp32 = sum(scheme == "fp32" for scheme in plan.values())
        return {"top1_agreement": 0.8 + 0.1 * fp32, "ref_top1_in_top5": 1.0, "kl_mean": 0.01 * (2 - fp32)}

    found = search(start, moves, evaluate, {"top1_agreement": 0.85, "ref_top1_in_top5": None, "kl_mean": None},
                   lambda plan: 1.0, None)
    assert found["plan"] == {"a": "int8-dynamic", "b": "fp32"}
    assert seen == [{"a": "int8-dynamic", "b": "int8-dynamic"}, {"a": "int8-dynamic", "b": "fp32"}]
    fp32_entry = next(e for e in found["evaluations"] if e["moves"] == len(moves))
    assert fp32_entry == {"moves": 2, "latency_ratio": 1.0, "top1_agreement": 1.0, "ref_top1_in_top5": 1.0,
                          "kl_mean": 0.0, "run": False}
    assert found["calibration"] == {"top1_agreement": 0.9, "ref_top1_in_top5": 1.0, "kl_mean": 0.01}


def fp32_artifact(tiny_variants):
    from bertforge.artifact import Artifact

    return Artifact(tiny_variants["fp32"], tiny_variants["fp32"].name.split("-", 1)[1], "export", None)


def test_int8_auto_meets_its_target_and_picks_the_same_plan_twice(tiny_variants, tmp_path):
    from bertforge.optimizers.int8_auto import stage as int8_auto
    from bertforge.optimizers.int8_auto.config import Int8AutoConfig
    from bertforge.pipeline import stage_inputs
    from bertforge.progress import reporting

    config = Int8AutoConfig(target={"top1_min": 0.9, "ref_top1_in_top5_min": 0.99})
    metas = []
    details: list[str] = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        out.mkdir()
        # the same inputs (calibration text, this machine's measured kernel times): the same bytes
        with reporting(details.append):  # what a build's progress line shows meanwhile
            metas.append(int8_auto.run(tiny_variants["fp32"], out, config,
                                       stage_inputs("int8-auto", fp32_artifact(tiny_variants), config)))
    first, second = metas
    assert "sensitivity: group 10/10" in details and any(d.startswith("plan 1 (bisection") for d in details)
    assert first["plan"] == second["plan"]
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    assert first["calibration"]["top1_agreement"] >= 0.9 and first["calibration"]["ref_top1_in_top5"] >= 0.99
    assert first["calibration_positions"] >= 200
    # 2 layers x 4 groups + the head's transform + the tied table, each with a scheme
    assert len(first["plan"]) == 10
    assert set(first["plan"].values()) <= {"fp32", "int8-dynamic", "int8-smooth", "int8-blockwise"}
    assert {row["group"] for row in first["sensitivity"]} == set(first["plan"])
    # the table ran on one calibration batch in two (the bisection on all of them)
    assert first["sensitivity_positions"] < first["calibration_positions"]
    # a real artifact: it loads and stays near the fp32 logits
    session = ort.InferenceSession(str(tmp_path / "a" / "model.onnx"))
    reference = ort.InferenceSession(str(tiny_variants["fp32"] / "model.onnx")).run(None, tiny_feeds())[0]
    assert 0 < np.abs(session.run(None, tiny_feeds())[0] - reference).max() < INT8_LOGIT_ERROR
    # the plan quantizes something, and the artifact holds an int8 kernel for each group it quantizes
    int8_groups = [group for group, scheme in first["plan"].items() if scheme != "fp32"]
    assert int8_groups
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "a" / "model.onnx")).graph.node)
    assert sum(ops[op] for op in ("DynamicQuantizeMatMul", "MatMulInteger", "QAttention", "MatMulNBits")) >= len(
        int8_groups), (first["plan"], ops)


def test_int8_auto_names_the_best_agreement_when_the_latency_bound_cannot_hold(tiny_variants, tmp_path):
    from bertforge.optimizers.int8_auto import stage as int8_auto
    from bertforge.optimizers.int8_auto.config import Int8AutoConfig
    from bertforge.pipeline import stage_inputs

    # KL 0 needs the fp32 plan (latency ratio 1.0), which the bound forbids
    config = Int8AutoConfig(target={"top1_min": 0.5, "kl_mean_max": 0.0}, max_latency_ratio=0.999)
    with pytest.raises(UsageError) as error:
        int8_auto.run(tiny_variants["fp32"], tmp_path, config,
                      stage_inputs("int8-auto", fp32_artifact(tiny_variants), config))
    message = str(error.value)
    assert message.startswith("int8-auto: ") and "\n" not in message
    assert "max_latency_ratio 0.999" in message
    assert "within it the best plan reaches top-1 " in message and "KL " in message


def test_the_table_measures_the_int8_scheme_the_output_error_favours(tiny_variants, tmp_path):
    """Where int8-dynamic and int8-smooth are both faster than fp32 for a group, the table measures
    only the one its output error on its own inputs favours (both where they are close)."""
    from bertforge.optimizers.int8_auto import stage as int8_auto
    from bertforge.optimizers.int8_auto.config import Int8AutoConfig
    from bertforge.optimizers.int8_auto.screen import screened_out
    from bertforge.pipeline import stage_inputs

    config = Int8AutoConfig(target={"top1_min": 0.5})
    inputs = stage_inputs("int8-auto", fp32_artifact(tiny_variants), config)
    # the tiny model's int8 kernels are slower than its fp32 ones (too small to pay for quantizing), so
    # no group could choose them: these costs make every int8 scheme a third of the fp32 time
    measured = inputs["costs"]["ms"]
    costs = {**inputs["costs"], "ms": {scheme: {group: (ms if scheme == "fp32" else measured["fp32"][group] / 3)
                                                for group, ms in per_group.items()}
                                       for scheme, per_group in measured.items()}}
    meta = int8_auto.run(tiny_variants["fp32"], tmp_path, config, {**inputs, "costs": costs})
    assert meta["screened_out"] == screened_out(meta["output_error"]) != {}
    for row in meta["sensitivity"]:
        left_out = meta["screened_out"].get(row["group"])
        for scheme in ("int8-dynamic", "int8-smooth"):
            assert (row[scheme] is None) == (scheme == left_out), (row["group"], scheme)


def test_the_search_bisects_to_a_mixed_plan_when_the_target_needs_one(tiny_variants, tmp_path):
    """With every int8 scheme a third of fp32's cost (the tiny model's own int8 kernels are slower, so
    its measured plans stay fp32), a KL target at half the all-int8 plan's makes the bisection find a
    plan with some groups int8 and some fp32, and it meets the target."""
    from bertforge.optimizers.int8_auto import stage as int8_auto
    from bertforge.optimizers.int8_auto.config import Int8AutoConfig
    from bertforge.pipeline import stage_inputs

    loose = Int8AutoConfig(target={"top1_min": 0.5, "ref_top1_in_top5_min": None})
    inputs = stage_inputs("int8-auto", fp32_artifact(tiny_variants), loose)
    measured = inputs["costs"]["ms"]
    costs = {**inputs["costs"], "ms": {scheme: {group: (ms if scheme == "fp32" else measured["fp32"][group] / 3)
                                                for group, ms in per_group.items()}
                                       for scheme, per_group in measured.items()}}
    (tmp_path / "loose").mkdir()
    everything = int8_auto.run(tiny_variants["fp32"], tmp_path / "loose", loose, {**inputs, "costs": costs})
    assert "fp32" not in everything["plan"].values()  # the cheapest plan met the loose target
    all_int8_kl = everything["evaluations"][0]["kl_mean"]
    strict = Int8AutoConfig(target={"top1_min": 0.5, "ref_top1_in_top5_min": None, "kl_mean_max": all_int8_kl / 2})
    (tmp_path / "strict").mkdir()
    mixed = int8_auto.run(tiny_variants["fp32"], tmp_path / "strict", strict, {**inputs, "costs": costs})
    schemes = Counter(mixed["plan"].values())
    assert schemes["fp32"] >= 1 and sum(n for s, n in schemes.items() if s != "fp32") >= 1, schemes
    assert mixed["calibration"]["kl_mean"] <= all_int8_kl / 2
    assert len(mixed["evaluations"]) >= 3  # the cheapest plan, the most accurate, then bisection steps
    assert 0 < mixed["moves_applied"] < mixed["evaluations"][1]["moves"]  # neither all int8 nor all fp32


def test_fp32_stays_on_a_groups_hull_when_an_int8_scheme_measures_a_kl_of_zero_or_below():
    """KL of equal logits comes out as +-2e-14: fp32 must still be the last, most accurate point."""
    for noise in (0.0, -1e-14):
        start, moves = ordered_moves(["a"], {"a": {"int8-dynamic": 1.0, "fp32": 2.0}}, {"a": {"int8-dynamic": noise}})
        assert start == {"a": "int8-dynamic"} and [(m.group, m.scheme) for m in moves] == [("a", "fp32")]


def test_a_plan_within_the_latency_bound_that_meets_the_target_is_chosen_over_an_error():
    """Agreement on a finite split is not monotonic in the prefix: the bisection settles on the all-fp32
    plan (over the bound) while a plan within the bound already meets the target."""
    groups = ["g0", "g1", "g2", "g3"]
    costs = {g: {"int8-dynamic": 1.0, "fp32": 2.0} for g in groups}
    start, moves = ordered_moves(groups, costs, {g: {"int8-dynamic": 0.1 * (4 - i)} for i, g in enumerate(groups)})
    by_moves = {0: 0.90, 1: 0.96, 2: 0.94, 3: 0.94}
    runs: list[int] = []

    def evaluate(plan: dict[str, str]) -> dict[str, float]:
        count = sum(scheme == "fp32" for scheme in plan.values())
        runs.append(count)
        return {"top1_agreement": by_moves[count], "ref_top1_in_top5": 1.0, "kl_mean": 0.01}

    def latency_of(plan: dict[str, str]) -> float:
        return sum(costs[g][s] for g, s in plan.items()) / 8

    found = search(start, moves, evaluate, {"top1_agreement": 0.95}, latency_of, max_latency_ratio=0.7)
    assert found["moves_applied"] == 1 and found["calibration"]["top1_agreement"] == 0.96
    assert found["predicted_latency_ratio"] == 0.625 and sorted(runs) == sorted(set(runs))  # none run twice
    with pytest.raises(UsageError, match="within it the best plan reaches top-1 90.00%"):
        search(start, moves, evaluate, {"top1_agreement": 0.95}, latency_of, max_latency_ratio=0.55)


def test_kernel_costs_are_measured_and_keyed_with_the_recipes_outlier_channels(tiny_variants, monkeypatch):
    import bertforge.results_cache as results_cache
    from bertforge.optimizers.int8_auto import costs

    keyed, timed = [], []
    monkeypatch.setattr(results_cache, "load", lambda kind, key: None)
    monkeypatch.setattr(results_cache, "store", lambda kind, key, value: None)
    real_key = results_cache.key_for
    monkeypatch.setattr(results_cache, "key_for", lambda kind, data: keyed.append(data) or real_key(kind, data))
    monkeypatch.setattr(costs, "scheme_costs", lambda model, groups, weights, spec, weight_file: timed.append(
        weights.outlier_channels) or {"ms": {}, "model_ms": {}, "sequence": 0})
    costs.machine_costs(fp32_artifact(tiny_variants), 16, 32)
    assert keyed[-1]["outlier_channels"] == 32 and timed == [32]


def test_a_small_models_groups_are_planned_by_their_costs_however_small():
    # a tiny model's groups cost microseconds: int8 still starts where it is the cheaper scheme
    costs = {"a": {"fp32": 0.004, "int8-dynamic": 0.001}, "b": {"fp32": 0.003, "int8-dynamic": 0.002}}
    kl = {"a": {"int8-dynamic": 0.01}, "b": {"int8-dynamic": 0.03}}
    start, moves = ordered_moves(["a", "b"], costs, kl)
    assert start == {"a": "int8-dynamic", "b": "int8-dynamic"}
    assert [(m.group, m.scheme) for m in moves] == [("b", "fp32"), ("a", "fp32")]
