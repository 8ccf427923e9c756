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
    # fp16 (25 ms) is smaller but slower than fp32 (20 ms) on this CPU: not recommended
    assert by_target == {0.99: ("fused", "fused"), 0.95: ("int8-auto", "int8-auto"),
                         0.90: ("int8-auto", "int8-blockwise")}
    assert found["slower_than_fp32"] == ["fp16"]
    assert found["fastest"] == "int8-dynamic"  # the masked head is faster, but fill-mask only
    assert found["pareto_frontier"] == ["int8-dynamic", "int8-auto", "fused"]
    text = found["summary"]
    assert "For top-1 agreement ≥ 90%: int8-auto (12.5 ms, 52.0 MB, top-1 96.7%), the fastest" in text
    assert "int8-dynamic-masked" in text and "fill-mask only" in text


def test_a_variant_whose_gate_failed_is_never_recommended_and_no_latency_names_only_the_smallest():
    failed = {**VARIANTS, "int8-auto": entry(0.967, 12.5, 52.0, passed=False)}
    assert [t["fastest"] for t in recommend(failed)["targets"]] == ["fused", "fused", "int8-blockwise"]
    # nor on the frontier the plots draw: int8-blockwise takes its place there
    assert recommend(failed)["pareto_frontier"] == ["int8-dynamic", "int8-blockwise", "fused"]
    untimed = {name: {**e, "latency": {}} for name, e in VARIANTS.items()}
    found = recommend(untimed)
    assert all(t["fastest"] is None for t in found["targets"]) and found["fastest"] is None
    assert [t["smallest"] for t in found["targets"]] == ["fp16", "fp16", "int8-blockwise"]
    assert "not measured" in found["summary"] and pareto_frontier(untimed) == []
    none = recommend({"int8-dynamic": entry(0.5, 8.0, 24.0)})
    assert "no variant of this build meets it" in none["summary"]


def timed(top1: float, rounds: list[float], mb: float) -> dict:
    """A variant timed in this run's interleaved rounds (bench.summarize's round medians)."""
    return {"metrics": {"top1_agreement": top1}, "size_bytes": int(mb * 1e6), "passed": True,
            "latency": {"p50_ms": sorted(rounds)[len(rounds) // 2], "round_ms": rounds, "this_run": True}}


def test_two_variants_within_noise_are_a_tie_broken_by_size():
    """fused's rounds are 0.97-1.03x fp32's: a tie, so the smaller (fp16 is not in it) or the more accurate
    of the two is named, and the summary says tie within noise."""
    variants = {"fp32": timed(1.0, [20.0, 19.4, 20.6, 20.1], 90.0),
                "fused": timed(1.0, [19.5, 20.0, 20.0, 19.5], 88.0),
                "int8-auto": timed(0.96, [12.0, 12.2, 11.9, 12.1], 52.0)}
    found = recommend(variants)
    at_99 = found["targets"][0]
    assert at_99["fastest"] == "fused" and at_99["tied_within_noise"] == ["fp32"]
    assert "tie within noise with fp32" in found["summary"]
    # the smaller one wins the tie even where its p50 is the slower of the two (19.9 against 19.8 ms)
    variants["fp32"] = timed(1.0, [19.0, 19.8, 19.2, 20.1], 90.0)
    variants["fused"] = timed(1.0, [19.9, 19.7, 20.0, 19.6], 88.0)
    assert variants["fused"]["latency"]["p50_ms"] > variants["fp32"]["latency"]["p50_ms"]
    at_99 = recommend(variants)["targets"][0]
    assert at_99["fastest"] == "fused" and at_99["tied_within_noise"] == ["fp32"]
    # at equal sizes, the more accurate wins the tie, here the slower by p50 (12.1 against 12.0 ms)
    even = {"fp32": timed(1.0, [20.0, 20.1, 19.9, 20.0], 90.0),
            "int8-dynamic": timed(0.92, [12.0, 12.1, 11.9, 12.0], 24.0),
            "int8-static": timed(0.93, [12.2, 11.9, 12.1, 11.8], 24.0)}
    at_90 = recommend(even)["targets"][2]
    assert at_90["fastest"] == "int8-static" and at_90["tied_within_noise"] == ["int8-dynamic"]
    # apart beyond the noise: no tie, the faster is named whatever its size
    variants["fused"] = timed(1.0, [17.0, 17.2, 16.9, 17.1], 95.0)
    at_99 = recommend(variants)["targets"][0]
    assert at_99["fastest"] == "fused" and at_99["tied_within_noise"] == []
    variants["fused"] = timed(1.0, [21.0, 21.2, 20.9, 21.1], 80.0)
    at_99 = recommend(variants)["targets"][0]
    assert at_99["fastest"] == "fp32" and at_99["tied_within_noise"] == []
    assert found["targets"][1]["fastest"] == "int8-auto" and found["targets"][1]["tied_within_noise"] == []


def test_a_latency_whose_rounds_spread_wide_is_a_busy_machines():
    from bertforge.bench import busy, summarize

    quiet = summarize([0.010, 0.0101, 0.0099, 0.010, 0.010] * 4, 1)
    assert quiet["round_ms"] == [10.0] * 4 and not busy(quiet)
    loud = summarize([0.010] * 5 + [0.016] * 5 + [0.010] * 10, 1)
    assert loud["spread"] == 1.6 and busy(loud)
    assert busy({"p50_ms": 10.0})  # an older entry with no rounds is measured again
    tiny = summarize([0.0010] * 5 + [0.0014] * 5 + [0.0010] * 10, 1)
    assert tiny["spread"] == 1.4 and not busy(tiny)  # 0.4 ms: the timer's and scheduler's own jitter


def test_a_variant_slower_than_fp32_is_never_recommended_even_where_it_is_smallest():
    variants = {"fp32": timed(1.0, [20.0, 20.1, 19.9, 20.0], 90.0),
                "int8-dynamic": timed(0.91, [12.0, 12.1, 11.9, 12.0], 24.0),
                "int8-blockwise": timed(0.95, [27.0, 27.5, 26.9, 27.2], 26.0)}  # AVX2: slower than fp32
    found = recommend(variants)
    assert found["slower_than_fp32"] == ["int8-blockwise"]
    assert {t["smallest"] for t in found["targets"]} <= {"fp32", "int8-dynamic"}
    assert "int8-blockwise" not in {t["fastest"] for t in found["targets"]}
    assert "Not recommended on this CPU: int8-blockwise" in found["summary"]
    # within noise of fp32 it stays a candidate
    variants["int8-blockwise"] = timed(0.95, [19.0, 20.5, 20.2, 19.7], 26.0)
    assert recommend(variants)["slower_than_fp32"] == []


def test_a_latency_reused_from_the_cache_makes_a_variant_slower_only_where_every_round_is():
    def cached(entry: dict) -> dict:
        return {**entry, "latency": {**entry["latency"], "this_run": False}}

    variants = {"fp32": cached(timed(1.0, [9.9, 10.0, 10.1, 10.0], 90.0)),
                "int8-weights": timed(0.96, [10.0, 10.05, 9.98, 10.02], 26.0)}  # p50 10.02 against 10.0
    found = recommend(variants)
    assert found["slower_than_fp32"] == [] and found["targets"][1]["smallest"] == "int8-weights"
    variants["int8-weights"] = timed(0.96, [10.2, 10.3, 10.25, 10.4], 26.0)  # every round above fp32's
    assert recommend(variants)["slower_than_fp32"] == ["int8-weights"]


def test_the_summary_says_latency_was_measured_even_where_every_variant_failed_its_gates():
    variants = {"fp32": timed(1.0, [20.0, 20.1, 19.9, 20.0], 90.0),
                "int8-dynamic": timed(0.5, [12.0, 12.1, 11.9, 12.0], 24.0)}
    for entry in variants.values():
        entry["passed"] = False
    text = recommend(variants)["summary"]
    assert "not measured" not in text and "every variant timed in this build's run" in text
