"""Which variant to ship: for each agreement target, the fastest and the smallest variant that meets it.

Judged on the report's own numbers: top-1 agreement with PyTorch at the validation corpus's [MASK]
positions, p50 latency as measured in this build (b1, this machine) and size on disk. A variant whose
gates failed is never recommended. Extras (the masked-head variant) are named apart: they fill masks
(in ORTModelForMaskedLM too) but their logits are zeros away from the [MASK] positions. The Pareto
frontier (among the variants that passed their gates, no other both at least as fast and at least as
accurate, and better in one) is what the plots mark.

Latencies are compared with their noise: variants timed together in this build's run pair up round by
round (bench.summarize's round medians), and two whose per-round ratios reach both sides of 1 are a tie
within noise. Among the variants tied with the fastest, the smallest wins, then the more accurate; the
summary says so.
"""

from __future__ import annotations

from typing import Any

from bertforge.stages import EXTRA_VARIANTS

TARGETS = (0.99, 0.95, 0.90)


def _facts(variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: {"top1": entry.get("metrics", {}).get("top1_agreement"),
                   "ms": entry.get("latency", {}).get("p50_ms"), "mb": entry["size_bytes"] / 1e6,
                   "rounds": entry.get("latency", {}).get("round_ms"),
                   "this_run": entry.get("latency", {}).get("this_run", True),
                   "passed": entry.get("passed", True)}
            for name, entry in variants.items()}


def pareto_frontier(variants: dict[str, dict[str, Any]]) -> list[str]:
    """Standard variants whose gates passed, with a latency and a top-1 that no other such variant
    dominates, fastest first: a variant that failed its gates is not a trade-off on offer."""
    facts = {n: f for n, f in _facts(variants).items()
             if n not in EXTRA_VARIANTS and f["passed"] and f["ms"] is not None and f["top1"] is not None}
    def dominates(g: dict[str, Any], f: dict[str, Any]) -> bool:
        return g["ms"] <= f["ms"] and g["top1"] >= f["top1"] and (g["ms"] < f["ms"] or g["top1"] > f["top1"])

    frontier = [n for n, f in facts.items() if not any(dominates(g, f) for m, g in facts.items() if m != n)]
    return sorted(frontier, key=lambda n: facts[n]["ms"])


def ratio_interval(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float] | None:
    """The range of a's latency over b's, round by round, where both were timed in this run's rounds."""
    if not (a.get("this_run") and b.get("this_run") and a.get("rounds") and b.get("rounds")
            and len(a["rounds"]) == len(b["rounds"]) >= 2):
        return None
    ratios = [x / y for x, y in zip(a["rounds"], b["rounds"], strict=True) if y > 0]
    return (min(ratios), max(ratios)) if ratios else None


def tied(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether a and b's latencies are equal within the noise of their interleaved rounds."""
    interval = ratio_interval(a, b)
    return interval is not None and interval[0] <= 1.0 <= interval[1]


def fastest_of(candidates: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """(the variant to name as fastest, the others tied with the quickest within noise): among the
    variants tied with the quickest p50, the smallest, then the more accurate."""
    quickest = min(candidates, key=lambda n: (candidates[n]["ms"], candidates[n]["mb"]))
    group = [n for n in candidates if n == quickest or tied(candidates[n], candidates[quickest])]
    chosen = min(group, key=lambda n: (candidates[n]["mb"], -candidates[n]["top1"], candidates[n]["ms"]))
    return chosen, sorted(n for n in group if n != chosen)


def clearly_slower(f: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether `f` is slower than `base` beyond noise: every round slower where their rounds pair up
    (timed together in this run); where they were timed in different runs (one reused from the cache),
    every round of `f` slower than every round of `base`; without rounds (no noise to judge by), by p50."""
    interval = ratio_interval(f, base)
    if interval is not None:
        return interval[0] > 1.0
    if f.get("rounds") and base.get("rounds"):
        return min(f["rounds"]) > max(base["rounds"])
    return f["ms"] > base["ms"]


def slower_than_fp32(facts: dict[str, dict[str, Any]]) -> list[str]:
    """Variants slower than the plain export on this CPU beyond noise (clearly_slower): never worth
    shipping here, whatever their size (int8-blockwise on AVX2)."""
    base = facts.get("fp32")
    if base is None or base["ms"] is None:
        return []
    return [name for name, f in facts.items() if name != "fp32" and f["ms"] is not None and clearly_slower(f, base)]


def recommend(variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    facts = _facts(variants)
    too_slow = slower_than_fp32(facts)
    shippable = {n: f for n, f in facts.items() if n not in EXTRA_VARIANTS and f["passed"] and f["top1"] is not None
                 and n not in too_slow}
    timed = all(f["ms"] is not None for f in shippable.values()) and bool(shippable)
    targets = []
    for target in TARGETS:
        meeting = {n: f for n, f in shippable.items() if f["top1"] >= target}
        fastest, ties = fastest_of(meeting) if meeting and timed else (None, [])
        smallest = min(meeting, key=lambda n: (meeting[n]["mb"], meeting[n]["ms"] or 0)) if meeting else None
        targets.append({"top1_min": target, "fastest": fastest, "tied_within_noise": ties, "smallest": smallest})
    fastest_any, _ = fastest_of(shippable) if timed else (None, [])
    extras = {n: f for n, f in facts.items() if n in EXTRA_VARIANTS}
    return {"targets": targets, "fastest": fastest_any, "pareto_frontier": pareto_frontier(variants),
            "slower_than_fp32": too_slow, "summary": summary(targets, facts, fastest_any, extras, timed, too_slow)}


def _describe(name: str, facts: dict[str, dict[str, Any]]) -> str:
    f = facts[name]
    ms = f"{f['ms']:.1f} ms, " if f["ms"] is not None else ""
    return f"{name} ({ms}{f['mb']:.1f} MB, top-1 {f['top1']:.1%})"


def summary(targets: list[dict[str, Any]], facts: dict[str, dict[str, Any]], fastest: str | None,
            extras: dict[str, dict[str, Any]], timed: bool, too_slow: list[str] = ()) -> str:
    """One paragraph: what to ship for each target."""
    parts = []
    for entry in targets:
        label = f"top-1 agreement ≥ {entry['top1_min']:.0%}"
        if entry["smallest"] is None:
            parts.append(f"For {label}: no variant of this build meets it.")
            continue
        ties = entry.get("tied_within_noise") or []
        tie = (f" (tie within noise with {', '.join(_describe(n, facts) for n in ties)}: the smaller, then the "
               "more accurate, is named)") if ties else ""
        if entry["fastest"] is None or entry["fastest"] == entry["smallest"]:
            parts.append(f"For {label}: {_describe(entry['smallest'], facts)}{tie}.")
        else:
            parts.append(f"For {label}: {_describe(entry['fastest'], facts)}, the fastest{tie}; the smallest is "
                         f"{_describe(entry['smallest'], facts)}.")
    if fastest is not None:
        parts.append(f"The fastest is {_describe(fastest, facts)}.")
    if too_slow:
        parts.append(f"Not recommended on this CPU: {', '.join(_describe(n, facts) for n in too_slow)}, slower than "
                     "fp32 here.")
    for name in extras:
        parts.append(f"{_describe(name, facts)} is for fill-mask only: its logits are zeros except at the [MASK] "
                     "positions.")
    measured = any(f["ms"] is not None for f in facts.values())
    mixed = measured and len({f.get("this_run") for f in facts.values() if f["ms"] is not None}) > 1
    timing = ("Latency was not measured in this build (--no-latency), so only the smallest is named." if not measured
              else "Latency: p50 at batch 1 on this machine; some of it from an earlier build's run (marked *), so "
                   "compare them with `bertforge bench OUT` before choosing on speed." if mixed
              else "Latency: p50 at batch 1, every variant timed in this build's run, on this machine.")
    return ("What to ship (agreement with PyTorch at the validation corpus's [MASK] positions; variants "
            "whose gates failed are left out): " + " ".join(parts) + " " + timing)
