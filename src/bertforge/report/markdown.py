"""report.md: one comparison table and the notes a reader needs to trust it."""

from __future__ import annotations

from typing import Any

from bertforge.report.content import (
    PLAN_HEADER,
    PROBES_NOTE,
    columns,
    fmt,
    plan_table,
    probe_tables,
    reference_note,
    variant_row,
)


def comparison_table(report: dict[str, Any]) -> str:
    shown = columns(report)
    header = "| variant | " + " | ".join(title for _, title, _ in shown) + " | gates |"
    lines = [header, "|" + "---|" * (len(shown) + 2)]
    for name, entry in report["variants"].items():
        row = variant_row(entry)
        failed = [g["metric"] for g in entry["gates"] if not g["passed"]]
        gates = "pass" if not failed else "FAIL: " + ", ".join(failed)
        cells = [fmt(row.get(key), pattern) for key, _, pattern in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {gates} |")
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
        "at the masked positions.",
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
        parts.append(f"- {gate['variant']}: {gate['metric']} = {gate['value']:.6g}, gate {gate['op']} "
                     f"{gate['threshold']:g}")
    plan = plan_table(report)
    if plan is not None:
        rows, note = plan
        parts += ["", "## INT8 sensitivity and the int8-auto plan", "", "| " + " | ".join(PLAN_HEADER) + " |",
                  "|" + "---|" * len(PLAN_HEADER)] + ["| " + " | ".join(cells) + " |" for cells in rows] + ["", note]
    probes = probe_tables(report)
    if probes:
        parts += ["", "## Probes", "", PROBES_NOTE]
        for text, header, rows in probes:
            parts += ["", f"`{text}`", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            parts += ["| " + " | ".join(cells) + " |" for cells in rows]
    if report["warnings"]:
        parts += ["", "Warnings:"] + [f"- {w}" for w in report["warnings"]]
    machine = report["machine"]
    parts += ["", f"Machine: {machine['cpu']}, {machine['physical_cores']} physical cores, ISA "
              + ", ".join(k for k, v in machine["isa"].items() if v) + ". Latency: p50 of interleaved runs, "
              "batch 1 × sequence 128, onnxruntime CPU."]
    return "\n".join(parts) + "\n"
