"""The sensitivity table of `bertforge sensitivity` as markdown."""

from __future__ import annotations

from typing import Any

from bertforge.report.content import SENSITIVITY_HEADER, sensitivity_cells
from bertforge.report.markdown import table_lines


def render_markdown(result: dict[str, Any]) -> str:
    ms = result["costs_ms"]["ms"]
    rows = []
    for row in result["groups"]:
        group = row["group"]
        by_scheme = {scheme: ms[scheme][group] for scheme in ms if group in ms[scheme]}
        rows.append([group, *sensitivity_cells(row, by_scheme)])
    lines = table_lines(["group", *SENSITIVITY_HEADER], rows)
    lines.append("")
    lines.append(f"Each group quantized alone, compared with the fp32 graph at {result['calibration_positions']} "
                 f"[MASK] positions of the calibration split ({result['calibration_corpus']}); ms: the group's "
                 "kernel time at b1×s128 with every group in that scheme (ORT profiler). Whole graph: "
                 + ", ".join(f"{s} {v:.1f} ms" for s, v in result["costs_ms"]["model_ms"].items()) + ".")
    return "\n".join(lines) + "\n"
