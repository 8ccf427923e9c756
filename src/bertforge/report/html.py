"""report.html: the comparison table and agreement-vs-latency/size plots, self-contained.

Inline CSS and inline SVG only: no script, stylesheet, font or image is fetched, so the file opens
offline from a CI artifact.
"""

from __future__ import annotations

import html
import math
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
from bertforge.stages import SPECS

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def color_of(name: str) -> str:
    """A variant's colour from its place in the registry: the same in every report."""
    names = [spec.name for spec in SPECS]
    return COLORS[names.index(name) % len(COLORS)] if name in names else "#555555"
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #ccc;padding:4px 6px;text-align:right}
.wide{overflow-x:auto;max-width:100%}
th{background:#f3f3f3}td{white-space:nowrap}td:first-child,th:first-child{text-align:left}.fail{color:#b00020;font-weight:600}
.pass{color:#1b7f3b}.note{max-width:60em}.plots{display:flex;gap:2em;flex-wrap:wrap}
.probes{overflow-x:auto}table.probe td{text-align:left}
svg text{font-size:12px;font-family:inherit}dt{font-weight:600}dd{margin:0 0 .4em 1.5em}
"""


def scatter(points: list[tuple[str, float, float]], x_label: str, y_label: str, width: int = 460,
            height: int = 320, frontier: list[str] | None = None) -> str:
    """An SVG scatter of (label, x, y); y is an agreement fraction shown in percent. `frontier`: the
    Pareto-optimal variants, joined by a dashed line and ringed."""
    left, right, top, bottom = 60, 20, 20, 50
    valid = [(n, x, y) for n, x, y in points if x is not None and y is not None and not math.isnan(y)]
    if not valid:
        return f"<p>No data for {html.escape(y_label)} against {html.escape(x_label)}.</p>"
    xs = [x for _, x, _ in valid]
    ys = [y for _, _, y in valid]
    x_max = max(xs) * 1.15 or 1.0
    y_min = min(0.9, min(ys) - 0.02)
    span = 1.0 - y_min + 0.01

    def px(x: float) -> float:
        return left + (width - left - right) * x / x_max

    def py(y: float) -> float:
        return top + (height - top - bottom) * (1.0 + 0.01 - y) / span

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(y_label)} vs {html.escape(x_label)}">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="#fafafa" stroke="#999"/>']
    for i in range(5):
        gy = y_min + (1.0 - y_min) * i / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{py(gy):.1f}" y2="{py(gy):.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{left - 6}" y="{py(gy) + 4:.1f}" text-anchor="end">{gy:.1%}</text>')
        gx = x_max * i / 4
        parts.append(f'<text x="{px(gx):.1f}" y="{height - bottom + 16}" text-anchor="middle">{gx:.0f}</text>')
    on_frontier = [(x, y) for n, x, y in sorted(valid, key=lambda p: p[1]) if n in (frontier or [])]
    if len(on_frontier) > 1:
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in on_frontier)
        parts.append(f'<polyline class="frontier" points="{path}" fill="none" stroke="#444" '
                     'stroke-dasharray="4 3"><title>Pareto frontier</title></polyline>')
    placed: list[tuple[float, float]] = []
    for name, x, y in valid:
        color = color_of(name)
        if name in (frontier or []):
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="9" fill="none" stroke="#444"/>')
        label_x, label_y = px(x) + 9, py(y) - 7
        while any(abs(label_x - lx) < 60 and abs(label_y - ly) < 13 for lx, ly in placed):
            label_y += 13  # points that coincide (fp32 and fused) get stacked labels, not overprinted ones
        placed.append((label_x, label_y))
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="6" fill="{color}" fill-opacity="0.8"><title>'
                     f'{html.escape(name)}: {x:.1f}, {y:.2%}</title></circle>'
                     f'<text x="{label_x:.1f}" y="{label_y:.1f}" fill="{color}">{html.escape(name)}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">'
                 f'{html.escape(x_label)}</text>')
    parts.append(f'<text transform="translate(14,{(top + height - bottom) / 2}) rotate(-90)" '
                 f'text-anchor="middle">{html.escape(y_label)}</text></svg>')
    return "".join(parts)


def table(report: dict[str, Any]) -> str:
    shown = columns(report)
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in shown)
    # every table sits in a div.wide: a table wider than the page scrolls inside it, the page does not
    rows = [f'<div class="wide"><table id="variants"><thead><tr><th>variant</th>{head}<th>gates</th></tr></thead>'
            "<tbody>"]
    for name, entry in report["variants"].items():
        row = variant_row(entry)
        texts = [latency_cell(entry, fmt(row.get(k), p)) if k.startswith("latency") else fmt(row.get(k), p)
                 for k, _, p in shown]
        cells = "".join(f"<td>{html.escape(text)}</td>" for text in texts)
        failed = [g for g in entry["gates"] if not g["passed"]]
        if failed:
            text = "; ".join(f"{g['metric']} {fmt(g['value'], '{:.4g}')} (gate {g['op']} {g['threshold']:g})"
                             for g in failed)
            gate_cell = f'<td class="fail">FAIL: {html.escape(text)}</td>'
        else:
            gate_cell = '<td class="pass">pass</td>'
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}{gate_cell}</tr>")
    rows.append("</tbody></table></div>")
    if any(from_earlier_run(entry) for entry in report["variants"].values()):
        rows.append(f'<p class="note" id="earlier-run">{html.escape(EARLIER_RUN_NOTE)}</p>')
    return "".join(rows)


def recommendation_section(report: dict[str, Any]) -> str:
    found = report.get("recommendation")
    if not found:
        return ""
    return f'<h2>What to ship</h2><p class="note" id="recommendation">{html.escape(found["summary"])}</p>'


def html_table(header: list[str], rows: list[list[str]], attributes: str = "", verdict_last: bool = False) -> str:
    """An HTML table of escaped text cells; `verdict_last`: the last cell is a pass/FAIL, coloured."""
    def row_html(cells: list[str]) -> str:
        plain = cells[:-1] if verdict_last else cells
        html_cells = "".join(f"<td>{html.escape(cell)}</td>" for cell in plain)
        if verdict_last:
            html_cells += f'<td class="{"pass" if cells[-1] == "pass" else "fail"}">{html.escape(cells[-1])}</td>'
        return f"<tr>{html_cells}</tr>"

    head = "".join(f"<th>{html.escape(title)}</th>" for title in header)
    return (f'<div class="wide"><table{attributes}><thead><tr>{head}</tr></thead><tbody>'
            + "".join(row_html(cells) for cells in rows) + "</tbody></table></div>")


def gates_section(report: dict[str, Any]) -> str:
    header, rows = gates_table(report)
    if not rows:
        return ""
    return "<h2>Gates</h2>" + html_table(header, rows, ' id="gates"', verdict_last=True)


def definitions_section() -> str:
    items = "".join(f"<dt>{html.escape(name)}</dt><dd>{html.escape(meaning)}</dd>"
                    for name, meaning in METRIC_DEFINITIONS)
    return f'<h2>Metrics</h2><dl class="note" id="metrics">{items}</dl>'


def probes_section(report: dict[str, Any]) -> str:
    tables = probe_tables(report)
    if not tables:
        return ""
    parts = [f'<h2>Probes</h2><p class="note">{html.escape(PROBES_NOTE)}</p><div class="probes">']
    for text, header, rows in tables:
        parts.append(f"<h3>{html.escape(text)}</h3>" + html_table(header, rows, ' class="probe"'))
    return "".join(parts) + "</div>"


def plan_section(report: dict[str, Any]) -> str:
    plan = plan_table(report)
    if plan is None:
        return ""
    rows, note = plan
    return (f"<h2>INT8 sensitivity and the int8-auto plan</h2>{html_table(PLAN_HEADER, rows)}"
            f"<p class=\"note\">{html.escape(note)}</p>")


def render(report: dict[str, Any]) -> str:
    model = report["model"]
    rows = {name: variant_row(entry) for name, entry in report["variants"].items()}
    latency_points = [(n, r.get("latency_p50_ms"), r.get("top1_agreement")) for n, r in rows.items()]
    latency_title = next(t for k, t, _ in columns(report) if k == "latency_p50_ms")
    size_points = [(n, r["size_mb"], r.get("top1_agreement")) for n, r in rows.items()]
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"])
    verdict = ('<p class="pass">All gates passed.</p>' if report["gates_passed"]
               else '<p class="fail">A gate failed: see the table.</p>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>bertforge report: {html.escape(model['spec'])}</title>
<style>{STYLE}</style></head><body>
<h1>bertforge report: {html.escape(model['spec'])}</h1>
<p class="note">Model: {html.escape(model['description'])}. Corpus: {report['corpus']['sentences']} sentences,
{report['corpus']['masked_positions']} masked positions. Every metric compares the variant's logits with PyTorch fp32
(eager) at the [MASK] positions. {html.escape(batching_note(report['corpus']))}</p>
{verdict}
{recommendation_section(report)}
{table(report)}
<p class="note">{html.escape(reference_note(report['reference']))}</p>
<h2>Agreement against cost</h2>
<p class="note">Dashed and ringed: the Pareto frontier (no other variant both as fast and as accurate).</p>
<div class="plots">
{scatter(latency_points, "latency " + latency_title.replace("p50 ms ", "p50, ms, "), "top-1 agreement with PyTorch",
         frontier=report.get("recommendation", {}).get("pareto_frontier"))}
{scatter(size_points, "size on disk, MB", "top-1 agreement with PyTorch")}
</div>
{gates_section(report)}
{probes_section(report)}
{plan_section(report)}
{f'<h2>Warnings</h2><ul>{warnings}</ul>' if warnings else ''}
{definitions_section()}
<p class="note" id="provenance">{html.escape(provenance(report))}</p>
</body></html>
"""
