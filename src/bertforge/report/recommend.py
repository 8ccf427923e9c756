"""Which variant to ship: for each agreement target, the fastest and the smallest variant that meets it.

Judged on the report's own numbers: top-1 agreement with PyTorch at the validation corpus's [MASK]
positions, p50 latency as measured in this build (b1, this machine) and size on disk. A variant whose
gates failed is never recommended. Extras (the masked-head variant) are named apart: they fill masks
(in ORTModelForMaskedLM too) but their logits are zeros away from the [MASK] positions. The Pareto
frontier (no other variant both at least as fast and at least as accurate, and better in one) is
what the plots mark.
"""

from __future__ import annotations

from typing import Any

from bertforge.stages import EXTRA_VARIANTS

TARGETS = (0.99, 0.95, 0.90)


def _facts(variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: {"top1": entry.get("metrics", {}).get("top1_agreement"),
                   "ms": entry.get("latency", {}).get("p50_ms"), "mb": entry["size_bytes"] / 1e6,
                   "this_run": entry.get("latency", {}).get("this_run", True),
                   "passed": entry.get("passed", True)}
            for name, entry in variants.items()}


def pareto_frontier(variants: dict[str, dict[str, Any]]) -> list[str]:
    """Standard variants with a latency and a top-1 that no other one dominates, fastest first."""
    facts = {n: f for n, f in _facts(variants).items()
             if n not in EXTRA_VARIANTS and f["ms"] is not None and f["top1"] is not None}
    def dominates(g: dict[str, Any], f: dict[str, Any]) -> bool:
        return g["ms"] <= f["ms"] and g["top1"] >= f["top1"] and (g["ms"] < f["ms"] or g["top1"] > f["top1"])

    frontier = [n for n, f in facts.items() if not any(dominates(g, f) for m, g in facts.items() if m != n)]
    return sorted(frontier, key=lambda n: facts[n]["ms"])


def recommend(variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    facts = _facts(variants)
    shippable = {n: f for n, f in facts.items() if n not in EXTRA_VARIANTS and f["passed"] and f["top1"] is not None}
    timed = all(f["ms"] is not None for f in shippable.values()) and bool(shippable)
    targets = []
    for target in TARGETS:
        meeting = {n: f for n, f in shippable.items() if f["top1"] >= target}
        fastest = min(meeting, key=lambda n: (meeting[n]["ms"], meeting[n]["mb"])) if meeting and timed else None
        smallest = min(meeting, key=lambda n: (meeting[n]["mb"], meeting[n]["ms"] or 0)) if meeting else None
        targets.append({"top1_min": target, "fastest": fastest, "smallest": smallest})
    fastest_any = min(shippable, key=lambda n: shippable[n]["ms"]) if timed else None
    extras = {n: f for n, f in facts.items() if n in EXTRA_VARIANTS}
    return {"targets": targets, "fastest": fastest_any, "pareto_frontier": pareto_frontier(variants),
            "summary": summary(targets, facts, fastest_any, extras, timed)}


def _describe(name: str, facts: dict[str, dict[str, Any]]) -> str:
    f = facts[name]
    ms = f"{f['ms']:.1f} ms, " if f["ms"] is not None else ""
    return f"{name} ({ms}{f['mb']:.1f} MB, top-1 {f['top1']:.1%})"


def summary(targets: list[dict[str, Any]], facts: dict[str, dict[str, Any]], fastest: str | None,
            extras: dict[str, dict[str, Any]], timed: bool) -> str:
    """One paragraph: what to ship for each target."""
    parts = []
    for entry in targets:
        label = f"top-1 agreement ≥ {entry['top1_min']:.0%}"
        if entry["smallest"] is None:
            parts.append(f"For {label}: no variant of this build meets it.")
            continue
        if entry["fastest"] is None or entry["fastest"] == entry["smallest"]:
            parts.append(f"For {label}: {_describe(entry['smallest'], facts)}.")
        else:
            parts.append(f"For {label}: {_describe(entry['fastest'], facts)}, the fastest; the smallest is "
                         f"{_describe(entry['smallest'], facts)}.")
    if fastest is not None:
        parts.append(f"The fastest is {_describe(fastest, facts)}.")
    for name in extras:
        parts.append(f"{_describe(name, facts)} is for fill-mask only: its logits are zeros except at the [MASK] "
                     "positions.")
    mixed = timed and len({f.get("this_run") for f in facts.values() if f["ms"] is not None}) > 1
    timing = ("Latency was not measured in this build (--no-latency), so only the smallest is named." if not timed
              else "Latency: p50 at batch 1 on this machine; some of it from an earlier build's run (marked *), so "
                   "compare them with `bertforge bench OUT` before choosing on speed." if mixed
              else "Latency: p50 at batch 1, every variant timed in this build's run, on this machine.")
    return ("What to ship (agreement with PyTorch at the validation corpus's [MASK] positions; variants "
            "whose gates failed are left out): " + " ".join(parts) + " " + timing)
