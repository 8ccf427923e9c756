"""What a reader needs to weigh the report's numbers: intervals, the positions behind a gate, definitions.

Top-1 agreement and "reference top-1 in top-5" are shares of masked positions where something holds,
so each gets a 95% Wilson score interval from its value and the number of positions. A gate on one of
them cannot tell a regression of REGRESSION_POINTS from noise when the interval's half-width exceeds
that (under ~320 positions at 70% agreement, ~75 at 95%): the report then warns that the corpus is
too small for the gate (24 masked positions of an 8-line corpus passed every gate).
"""

from __future__ import annotations

import math
from typing import Any

Z95 = 1.959964
REGRESSION_POINTS = 0.05  # a gate that cannot catch a 5-point regression means little


def fmt(value: Any, pattern: str) -> str:
    """`value` in `pattern`, or n/a where it is None or NaN (report.json stores NaN as null)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return pattern.format(value)


PROPORTIONS = ("top1_agreement", "ref_top1_in_top5")
GATED_PROPORTIONS = {"top1_min": "top1_agreement", "ref_top1_in_top5_min": "ref_top1_in_top5"}

METRIC_DEFINITIONS = (
    ("max abs", "largest |variant logit - PyTorch logit| over the masked positions"),
    ("mean abs", "mean |difference| of the logits at the masked positions"),
    ("cosine", "mean cosine similarity of the variant's and PyTorch's logit vectors per masked position"),
    ("KL mean", "mean KL(PyTorch's softmax || the variant's), in nats, per masked position"),
    ("top-1", "share of masked positions where the variant's most likely token is PyTorch's (95% interval "
              "in report.json)"),
    ("top-5 overlap", "mean share of PyTorch's top-5 tokens that are in the variant's top-5"),
    ("ref top-1 in top-5", "share of masked positions where PyTorch's most likely token is in the variant's top-5"),
    ("truth recovery", "share of masked positions where the variant's top-1 is the word that was masked "
                       "(how good the model is, not how faithful the variant is)"),
    ("p50 / p90 ms", "median and 90th percentile latency at batch 1, this machine, in this build's run"),
)


def wilson(share: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a share measured on n positions."""
    if n <= 0:
        return (0.0, 1.0)
    denominator = 1 + Z95 ** 2 / n
    centre = (share + Z95 ** 2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(share * (1 - share) / n + Z95 ** 2 / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def intervals(metrics: dict[str, Any]) -> dict[str, list[float]]:
    n = int(metrics.get("positions") or 0)
    return {key: [round(v, 6) for v in wilson(float(metrics[key]), n)]
            for key in PROPORTIONS if metrics.get(key) is not None and n}


def few_positions_warnings(variants: dict[str, dict[str, Any]], gates: dict[str, dict[str, Any]]) -> list[str]:
    """A line per variant whose gated shares rest on too few positions to catch a 5-point regression."""
    found = []
    for name, entry in variants.items():
        gate = gates.get(name) or {}
        metrics = entry.get("metrics", {})
        for key, metric in GATED_PROPORTIONS.items():
            span = entry.get("intervals", {}).get(metric)
            if gate.get(key) is None or not span or (span[1] - span[0]) / 2 <= REGRESSION_POINTS:
                continue
            found.append(f"{name}: {metric} {metrics[metric]:.1%} on {metrics['positions']} masked positions has a "
                         f"95% interval of {span[0]:.1%}-{span[1]:.1%}, too wide for its gate (>= {gate[key]:g}) to "
                         f"catch a {REGRESSION_POINTS:.0%} regression; validate on more sentences")
            break
    return found


def gate_rows(variants: dict[str, dict[str, Any]]) -> list[list[str]]:
    """[variant, metric, measured, gate, verdict] for every gate, thresholds beside the verdict."""
    rows = []
    for name, entry in variants.items():
        for gate in entry.get("gates", []):
            share = gate["metric"] in (*PROPORTIONS, "top5_overlap")
            shown = fmt(gate["value"], "{:.2%}" if share else "{:.3g}")
            # a threshold shown as given (98.5%, not a rounded 98%), so the verdict beside it reads true
            threshold = f"{gate['threshold'] * 100:g}%" if share else f"{gate['threshold']:g}"
            verdict = "pass" if gate["passed"] else "FAIL"
            rows.append([name, gate["metric"], shown, f"{gate['op']} {threshold}", verdict])
    return rows


def plan_miss_warnings(variants: dict[str, dict[str, Any]]) -> list[str]:
    """A line per int8-auto variant whose validation top-1 falls short of the target its plan was chosen
    for (on the calibration split): by how much, and why it can."""
    found = []
    for name, entry in variants.items():
        meta = entry.get("metadata", {})
        target = (meta.get("target") or {}).get("top1_min") if isinstance(meta.get("target"), dict) else None
        measured = entry.get("metrics", {}).get("top1_agreement")
        if target is None or measured is None or measured >= target:
            continue
        calibration = (meta.get("calibration") or {}).get("top1_agreement")
        found.append(f"{name}: top-1 {measured:.2%} on the validation corpus, {100 * (target - measured):.2f} points "
                     f"under the {target:.0%} its plan was chosen for: the plan met it on the calibration split "
                     f"({calibration:.2%} on {meta.get('calibration_positions', '?')} positions), other sentences "
                     "than these; raise int8_auto.target.top1_min or calibrate on text like the validation corpus")
    return found
