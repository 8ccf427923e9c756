"""report.md: one comparison table and the notes a reader needs to trust it."""

from __future__ import annotations

import textwrap
from typing import Any

from bertforge.report.content import (
    EARLIER_RUN_NOTE,
    PLAN_HEADER,
    PROBES_NOTE,
    batching_note,
    columns,
    fmt,
    from_earlier_run,
    gates_table,
    latency_cell,
    plan_table,
    probe_tables,
    provenance,
    reference_note,
    variant_row,
)
from bertforge.report.weigh import METRIC_DEFINITIONS


def table_cell(text: str) -> str:
    """A cell's text as Markdown table syntax reads it back: a '|' (a probe's token can be one) escaped,
    a line break as a space."""
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def table_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table: the header, its rule, one line per row."""
    return ["| " + " | ".join(map(table_cell, header)) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(map(table_cell, cells)) + " |" for cells in rows]


def gate_verdict(entry: dict[str, Any]) -> str:
    failed = [g["metric"] for g in entry["gates"] if not g["passed"]]
    return "pass" if not failed else "FAIL: " + ", ".join(failed)


def comparison_table(report: dict[str, Any]) -> str:
    shown = columns(report)
    rows = []
    for name, entry in report["variants"].items():
        row = variant_row(entry)
        cells = [latency_cell(entry, fmt(row.get(key), pattern)) if key.startswith("latency")
                 else fmt(row.get(key), pattern) for key, _, pattern in shown]
        rows.append([name, *cells, gate_verdict(entry)])
    lines = table_lines(["variant", *(title for _, title, _ in shown), "gates"], rows)
    if any(from_earlier_run(entry) for entry in report["variants"].values()):
        lines += ["", EARLIER_RUN_NOTE]
    return "\n".join(lines)


def terminal_summary(report: dict[str, Any]) -> str:
    """The closing summary of a build: within 100 columns (report.md keeps every metric), then what to ship."""
    lines = [f"{'variant':<20} {'MB':>7} {'p50 ms':>7} {'top-1':>8} {'ref in top-5':>12}  gates"]
    for name, entry in report["variants"].items():
        row = variant_row(entry)
        lines.append(f"{name:<20} {row['size_mb']:>7.1f} {fmt(row.get('latency_p50_ms'), '{:.1f}'):>7} "
                     f"{fmt(row.get('top1_agreement'), '{:.2%}'):>8} {fmt(row.get('ref_top1_in_top5'), '{:.2%}'):>12}"
                     f"  {gate_verdict(entry)}"[:100])
    summary = report.get("recommendation", {}).get("summary")
    if summary:
        lines += ["", *textwrap.wrap(summary, 100)]
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    model = report["model"]
    corpus = report["corpus"]
    parts = [
        f"# bertforge report: {model['spec']}",
        "",
        f"Model: {model['description']}.",
        f"Corpus: {corpus['sentences']} sentences ({corpus['source']}), {corpus['masked_positions']} masked "
        f"positions, seed {corpus['seed']}. Metrics compare each variant's logits with PyTorch fp32 (eager) "
        "at the masked positions. " + batching_note(corpus),
        "",
        *([report["recommendation"]["summary"], ""] if report.get("recommendation") else []),
        comparison_table(report),
        "",
        reference_note(report["reference"]),
        "",
        f"Gates: {'all passed' if report['gates_passed'] else 'FAILED'}.",
    ]
    failures = [g for entry in report["variants"].values() for g in entry["gates"] if not g["passed"]]
    for gate in failures:
        parts.append(f"- {gate['variant']}: {gate['metric']} = {fmt(gate['value'], '{:.6g}')}, gate {gate['op']} "
                     f"{gate['threshold']:g}")
    plan = plan_table(report)
    if plan is not None:
        rows, note = plan
        parts += ["", "## INT8 sensitivity and the int8-auto plan", "", *table_lines(PLAN_HEADER, rows), "", note]
    header, rows = gates_table(report)
    if rows:
        parts += ["", "## Gates", "", *table_lines(header, rows)]
    probes = probe_tables(report)
    if probes:
        parts += ["", "## Probes", "", PROBES_NOTE]
        for text, header, rows in probes:
            parts += ["", f"`{text}`", "", *table_lines(header, rows)]
    if report["warnings"]:
        parts += ["", "Warnings:"] + [f"- {w}" for w in report["warnings"]]
    parts += ["", "## Metrics", ""] + [f"- **{name}**: {meaning}" for name, meaning in METRIC_DEFINITIONS]
    timed = next((e["latency"] for e in report["variants"].values() if e.get("latency")), {})
    parts += ["", provenance(report) + f" Latency: batch {timed.get('batch', 1)} × sequence "
              f"{timed.get('sequence', 128)}, onnxruntime CPU with its default (spinning) thread pools, the "
              "variants timed in turns of 2 untimed and 5 timed calls."]
    return "\n".join(parts) + "\n"
