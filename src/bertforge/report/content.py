"""The report's data: one dict, schema-versioned, that the markdown and HTML views render."""

from __future__ import annotations

import math
from typing import Any

from bertforge import __version__
from bertforge.environment import library_versions, machine_info

SCHEMA_VERSION = 1

# (metric key, column title, format) shown in every comparison table
COLUMNS = [
    ("size_mb", "size MB", "{:.1f}"),
    ("latency_p50_ms", "p50 ms b1×s128", "{:.1f}"),
    ("max_abs", "max abs", "{:.2e}"),
    ("mean_abs", "mean abs", "{:.2e}"),
    ("cosine_mean", "cosine", "{:.6f}"),
    ("kl_mean", "KL mean", "{:.2e}"),
    ("top1_agreement", "top-1", "{:.2%}"),
    ("top5_overlap", "top-5 overlap", "{:.2%}"),
    ("ref_top1_in_top5", "ref top-1 in top-5", "{:.2%}"),
    ("truth_recovery", "truth recovery", "{:.2%}"),
]


def fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return pattern.format(value)


def variant_row(entry: dict[str, Any]) -> dict[str, Any]:
    row = dict(entry.get("metrics", {}))
    row["size_mb"] = entry["size_bytes"] / 1e6
    row["latency_p50_ms"] = entry.get("latency", {}).get("p50_ms")
    return row


def make_report(*, model: dict[str, Any], validation: dict[str, Any], variants: dict[str, dict[str, Any]],
                warnings: list[str]) -> dict[str, Any]:
    passed = all(g["passed"] for entry in variants.values() for g in entry["gates"])
    return without_nan({
        "schema_version": SCHEMA_VERSION,
        "bertforge_version": __version__,
        "model": model,
        "machine": machine_info(),
        "libraries": library_versions(),
        "corpus": validation["corpus"],
        "reference": validation["reference"],
        "variants": variants,
        "gates_passed": passed,
        "warnings": warnings,
    })


def without_nan(value: Any) -> Any:
    """NaN (a metric that does not apply) becomes null: report.json stays strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nan(v) for v in value]
    return value


def reference_note(reference: dict[str, Any]) -> str:
    note = (f"Reference: {reference['distinct_top1']} distinct top-1 tokens over {reference['positions']} masked "
            f"positions; median top-1/top-2 logit margin {reference['median_top1_top2_margin']:.3f}; "
            f"ground-truth recovery {fmt(reference['truth_recovery'], '{:.2%}')}.")
    if reference.get("degenerate"):
        note += (f" DEGENERATE: one token is the top-1 at {reference['most_common_top1_share']:.0%} of positions, "
                 "so top-k agreement means little here; the continuous metrics (rel. L2, KL, cosine) carry the "
                 "verdict.")
    recovery = reference.get("truth_recovery")
    if recovery is not None and not math.isnan(recovery) and recovery < 0.01:
        note += (" The reference almost never predicts the original token: its predictions carry no meaning "
                 "(random weights?), so agreement here measures numerical fidelity only.")
    if reference.get("mlm_head_missing_from_checkpoint"):
        note += " The checkpoint has no MLM head: it was initialised randomly."
    return note
