"""The report's recommendation: the fastest and the smallest variant meeting each agreement target."""

from bertforge.report.recommend import pareto_frontier, recommend


def entry(top1: float, ms: float | None, mb: float, passed: bool = True) -> dict:
    return {"metrics": {"top1_agreement": top1}, "latency": {} if ms is None else {"p50_ms": ms},
            "size_bytes": int(mb * 1e6), "passed": passed}


VARIANTS = {
    "fp32": entry(1.0, 20.0, 90.0), "fused": entry(1.0, 19.0, 90.0), "fp16": entry(0.999, 25.0, 46.0),
    "int8-dynamic": entry(0.74, 8.0, 24.0), "int8-static": entry(0.70, 18.0, 60.0),
    "int8-blockwise": entry(0.94, 14.0, 26.0), "int8-auto": entry(0.967, 12.5, 52.0),
    "int8-dynamic-masked": entry(0.73, 4.0, 24.0),
}


def test_each_target_gets_its_fastest_and_smallest_variant_and_extras_are_named_apart():
    found = recommend(VARIANTS)
    by_target = {t["top1_min"]: (t["fastest"], t["smallest"]) for t in found["targets"]}
    assert by_target == {0.99: ("fused", "fp16"), 0.95: ("int8-auto", "fp16"), 0.90: ("int8-auto", "int8-blockwise")}
    assert found["fastest"] == "int8-dynamic"  # the masked head is faster, but fill-mask only
    assert found["pareto_frontier"] == ["int8-dynamic", "int8-auto", "fused"]
    text = found["summary"]
    assert "For top-1 agreement ≥ 95%: int8-auto (12.5 ms, 52.0 MB, top-1 96.7%), the fastest" in text
    assert "int8-dynamic-masked" in text and "fill-mask only" in text


def test_a_variant_whose_gate_failed_is_never_recommended_and_no_latency_names_only_the_smallest():
    failed = {**VARIANTS, "int8-auto": entry(0.967, 12.5, 52.0, passed=False)}
    assert [t["fastest"] for t in recommend(failed)["targets"]] == ["fused", "fused", "int8-blockwise"]
    untimed = {name: {**e, "latency": {}} for name, e in VARIANTS.items()}
    found = recommend(untimed)
    assert all(t["fastest"] is None for t in found["targets"]) and found["fastest"] is None
    assert [t["smallest"] for t in found["targets"]] == ["fp16", "fp16", "int8-blockwise"]
    assert "not measured" in found["summary"] and pareto_frontier(untimed) == []
    none = recommend({"int8-dynamic": entry(0.5, 8.0, 24.0)})
    assert "no variant of this build meets it" in none["summary"]
