"""The report's data: one dict, schema-versioned, that the markdown and HTML views render."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from bertforge.environment import library_versions, machine_info
from bertforge.report.recommend import recommend
from bertforge.report.weigh import fmt
from bertforge.version import __version__

SCHEMA_VERSION = 1  # keys added since (recommendation) are optional: readers of 1 still read it

# (metric key, column title, format) shown in every comparison table
COLUMNS = [
    ("size_mb", "size MB", "{:.1f}"),
    ("latency_p50_ms", "p50 ms b1×s128", "{:.1f}"),
    ("latency_p90_ms", "p90 ms", "{:.1f}"),
    ("max_abs", "max abs", "{:.2e}"),
    ("mean_abs", "mean abs", "{:.2e}"),
    ("cosine_mean", "cosine", "{:.6f}"),
    ("kl_mean", "KL mean", "{:.2e}"),
    ("top1_agreement", "top-1", "{:.2%}"),
    ("top5_overlap", "top-5 overlap", "{:.2%}"),
    ("ref_top1_in_top5", "ref top-1 in top-5", "{:.2%}"),
    ("truth_recovery", "truth recovery", "{:.2%}"),
]


def columns(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """COLUMNS, the latency title naming the shape the latencies were measured at."""
    shapes = {(v["latency"].get("batch", 1), v["latency"].get("sequence", 128))
              for v in report["variants"].values() if v.get("latency")}
    if len(shapes) != 1:
        return COLUMNS
    batch, sequence = shapes.pop()
    return [(k, f"p50 ms b{batch}×s{sequence}" if k == "latency_p50_ms" else t, p) for k, t, p in COLUMNS]


def variant_row(entry: dict[str, Any]) -> dict[str, Any]:
    row = dict(entry.get("metrics", {}))
    row["size_mb"] = entry["size_bytes"] / 1e6
    row["latency_p50_ms"] = entry.get("latency", {}).get("p50_ms")
    row["latency_p90_ms"] = entry.get("latency", {}).get("p90_ms")
    return row


def make_report(*, model: dict[str, Any], validation: dict[str, Any], variants: dict[str, dict[str, Any]],
                warnings: list[str], executor: dict[str, Any] | None = None) -> dict[str, Any]:
    passed = all(g["passed"] for entry in variants.values() for g in entry["gates"])
    return without_nan({
        "schema_version": SCHEMA_VERSION,
        "bertforge_version": __version__,
        "generated_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": model,
        "machine": machine_info(),
        "libraries": library_versions(),
        # where the work ran (local: this process; ray: its cluster), and the one machine that timed the variants
        "executor": executor or {"kind": "local"},
        "corpus": validation["corpus"],
        "reference": validation["reference"],
        "variants": variants,
        "gates_passed": passed,
        "recommendation": recommend(variants),
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


def batching_note(corpus: dict[str, Any]) -> str:
    """How the corpus was fed: it matters to int8-dynamic, whose activation scales span a batch."""
    size = corpus.get("batch_size")
    if not size:
        return ""
    return (f"Validation ran in batches of {size} sentences (length-sorted, padded); int8-dynamic's "
            "activation scales are computed per batch, so its agreement depends on the batch size.")


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


SENSITIVITY_SCHEMES = ("int8-dynamic", "int8-smooth", "int8-token", "int8-outlier", "int8-blockwise")
COST_SCHEMES = ("fp32", *SENSITIVITY_SCHEMES)


def sensitivity_cells(row: dict[str, Any], ms: dict[str, float]) -> list[str]:
    """A sensitivity row's cells: top-1 and KL per int8 scheme, then ms per scheme ("—": not measured)."""
    cells = []
    for scheme in SENSITIVITY_SCHEMES:
        alone = row.get(scheme)
        if alone is None:
            cells += ["—", "—"]
            continue
        alpha = f" (α {alone['alpha']:g})" if "alpha" in alone else ""
        cells += [f"{alone['top1_agreement']:.1%}{alpha}", f"{alone['kl_mean']:.1e}"]
    return cells + [f"{ms[scheme]:.2f}" if scheme in ms else "—" for scheme in COST_SCHEMES]


SENSITIVITY_HEADER = [cell for scheme in SENSITIVITY_SCHEMES for cell in (f"{scheme} alone: top-1", "KL")] + [
    f"ms {scheme}" for scheme in COST_SCHEMES]
PLAN_HEADER = ["group", "int8-auto plan", *SENSITIVITY_HEADER]


def smooth_note(meta: dict[str, Any]) -> str:
    if "smooth_alphas" in meta and "int8-smooth" in meta.get("schemes", ("int8-smooth",)):
        grid = ", ".join(f"{a:g}" for a in meta["smooth_alphas"])
        return f"; int8-smooth: SmoothQuant before int8-dynamic, α per group the lowest-KL of {grid}"
    if "smooth_alpha" in meta:  # manifests of bertforge before per-group alpha
        return f"; int8-smooth: SmoothQuant α {meta['smooth_alpha']:g} before int8-dynamic"
    return ""


def screen_note(meta: dict[str, Any]) -> str:
    from bertforge.optimizers.int8_auto.screen import DYNAMIC_ONLY, SMOOTH_ONLY

    screened = meta.get("screened_out") or {}
    if not screened:
        return ""

    def groups(scheme: str) -> str:
        count = sum(1 for s in screened.values() if s == scheme)
        return f"{count} group{'' if count == 1 else 's'}"

    return (f"; or ruled out by the group's int8 output error on its own fp32 inputs: int8-dynamic where "
            f"int8-smooth's error was under {SMOOTH_ONLY:g}× its own ({groups('int8-dynamic')}), int8-smooth "
            f"where it was not under {DYNAMIC_ONLY:g}× int8-dynamic's ({groups('int8-smooth')})")


def plan_table(report: dict[str, Any]) -> tuple[list[list[str]], str] | None:
    """The int8-auto variant's sensitivity table and plan as text cells, and a note; None without one."""
    entry = report["variants"].get("int8-auto")
    if not entry or "sensitivity" not in entry.get("metadata", {}):
        return None
    meta = entry["metadata"]
    costs = meta["costs_ms"]["per_group"]
    rows = []
    for row in meta["sensitivity"]:
        group = row["group"]
        rows.append([group, meta["plan"].get(group, "fp32")] + sensitivity_cells(row, costs[group]))
    target = meta["target"]
    chosen = meta["calibration"]
    wanted = ", ".join(f"{label} {op} {target[key]:g}" for key, label, op in (
        ("top1_min", "top-1", "≥"), ("ref_top1_in_top5_min", "ref top-1 in top-5", "≥"), ("kl_mean_max", "KL", "≤"))
        if target.get(key) is not None)
    table_positions = meta.get("sensitivity_positions", meta["calibration_positions"])
    share = (f" (one batch in {meta['sensitivity_stride']}; the plans below on all "
             f"{meta['calibration_positions']})" if meta.get("sensitivity_stride", 1) > 1 else "")
    note = (f"int8-auto: each group quantized alone on {table_positions} [MASK] positions of the "
            f"calibration split{share} ({meta.get('calibration_corpus', 'head-fit')} sentences, not the validation "
            f"corpus), against the fp32 graph; ms: the group's kernel time at b1×s128 as planned (measured per "
            f"scheme with the ORT profiler; — where a scheme is slower than fp32 for the group or not in the "
            f"recipe's schemes, so never chosen and not measured"
            + screen_note(meta)
            + smooth_note(meta)
            + f"). Target {wanted}. "
            f"Chosen plan on the calibration split: top-1 {chosen['top1_agreement']:.1%}, ref top-1 in top-5 "
            f"{chosen['ref_top1_in_top5']:.1%}, KL {chosen['kl_mean']:.1e}; predicted latency "
            f"{meta['predicted_latency_ratio']:.2f}× the fp32 graph; "
            f"{sum(e.get('run', True) for e in meta['evaluations'])} plans evaluated, "
            f"search {meta['search_seconds']:.0f} s. Plans on the way (moves → top-1, latency ratio): "
            + "; ".join(f"{e['moves']} → {e['top1_agreement']:.1%}, {e['latency_ratio']:.2f}×"
                        for e in sorted(meta["evaluations"], key=lambda e: e["moves"])) + ".")
    return rows, note


def probe_tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per probe sentence: (text, header, rows): rank by rank, PyTorch's top-5 (token, probability) and
    each variant's, at its first [MASK], as the fill-mask pipeline would print them."""
    reference = report.get("reference", {}).get("probes") or {}
    tables = []
    for text, answers in reference.items():
        columns = {"PyTorch": answers}
        columns.update({name: entry.get("probes", {}).get(text) for name, entry in report["variants"].items()})
        header = ["rank", *columns]
        rows = []
        for rank in range(max(len(a[0]) for a in columns.values() if a)):
            cells = [str(rank + 1)]
            for found in columns.values():
                top = found[0] if found else []
                cells.append(f"{top[rank][0]} {top[rank][1]:.3f}" if rank < len(top) else "—")
            rows.append(cells)
        tables.append((text, header, rows))
    return tables


PROBES_NOTE = ("Each variant's top-5 (token, probability) at the [MASK] of the model card's probe sentences and "
               "the recipe's `validation.probes`, beside PyTorch fp32's, as the fill-mask pipeline gives them.")


def gates_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Every gate with its threshold beside the verdict, and the 95% interval of the shares."""
    from bertforge.report.weigh import gate_rows

    rows = []
    for cells, (name, gate) in zip(gate_rows(report["variants"]),
                                   [(n, g) for n, e in report["variants"].items() for g in e.get("gates", [])],
                                   strict=True):
        span = report["variants"][name].get("intervals", {}).get(gate["metric"])
        rows.append(cells[:3] + ([f"{span[0]:.1%}–{span[1]:.1%}"] if span else ["—"]) + cells[3:])
    return ["variant", "metric", "measured", "95% interval", "gate", "verdict"], rows


def provenance(report: dict[str, Any]) -> str:
    machine = report["machine"]
    libraries = ", ".join(f"{name} {version}" for name, version in report["libraries"].items() if version != "absent")
    return (f"Generated {report.get('generated_utc', 'n/a')} by bertforge {report['bertforge_version']} (report "
            f"schema {report['schema_version']}) on {machine['cpu']} (CPU class {machine.get('cpu_class', '?')}: int8 "
            f"kernels and latencies are this class's), {machine['physical_cores']} physical cores, ISA "
            + ", ".join(k for k, v in machine["isa"].items() if v) + f". Libraries: {libraries}." + ran_on(report))


def ran_on(report: dict[str, Any]) -> str:
    """Where a Ray build's work ran and which node timed the variants (nothing for a local run)."""
    executor = report.get("executor", {})
    if executor.get("kind") != "ray":
        return ""
    timed = executor.get("latency_measured_on")
    return (f" Stages and validation ran on Ray ({executor['nodes']} nodes)" +
            (f"; every latency of this run was timed on {timed['host']} ({timed['cpu_class']})" if timed else "") + ".")


EARLIER_RUN_NOTE = ("* latency from an earlier build's run (the same artifact and bench settings, this machine); "
                    "the others were timed together, in turns, in this build. `bertforge bench OUT` times every "
                    "variant in one run.")


def from_earlier_run(entry: dict[str, Any]) -> bool:
    """Whether a variant's latency was reused from an earlier build rather than timed in this one."""
    latency = entry.get("latency") or {}
    return bool(latency) and latency.get("this_run") is False


def latency_cell(entry: dict[str, Any], text: str) -> str:
    return text + "*" if from_earlier_run(entry) else text
