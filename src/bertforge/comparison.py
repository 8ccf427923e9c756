"""`bertforge compare RUN_A RUN_B`: two builds side by side, a CI gate on regressions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertforge.errors import UsageError
from bertforge.json_files import read_json

# metric -> (direction where bigger is better?, how a regression is measured)
COMPARED = {
    "top1_agreement": True,
    "top5_overlap": True,
    "ref_top1_in_top5": True,
    "cosine_mean": True,
    "max_abs": False,
    "kl_mean": False,
}


@dataclass(frozen=True)
class Tolerances:
    agreement: float = 0.005  # absolute drop allowed in top-1 / top-5 / ref-in-top-5 / cosine
    error_factor: float = 1.5  # max_abs and KL may grow by this factor (plus a small floor)
    latency: float = 0.25  # relative latency increase allowed (shared machines are noisy)
    size: float = 0.01  # relative size increase allowed


def load_report(run: Path) -> dict[str, Any]:
    path = Path(run) / "report.json" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise UsageError(f"{path} not found (give a bertforge build directory or its report.json)")
    return read_json(path)


def _delta(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        return None
    return b - a


# what must be equal for two reports' numbers to be comparable: (where in the report, what it is)
SAME_BASIS = (
    (("schema_version",), "report schema"),
    (("model", "source_key"), "model (its checkpoint files' hash)"),
    (("corpus", "digest"), "validation corpus text"),
    (("corpus", "seed"), "masking seed"),
    (("corpus", "mask_fraction"), "mask fraction"),
    (("corpus", "max_sentences"), "sentence limit"),
)


def basis_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Why A's and B's numbers are not measurements of the same thing (empty when they are)."""
    def get(report: dict[str, Any], path: tuple[str, ...]) -> Any:
        for part in path:
            report = report.get(part) if isinstance(report, dict) else None
        return report

    basis = SAME_BASIS
    if get(a, ("model", "source_key")) is None or get(b, ("model", "source_key")) is None:
        # a report written before it recorded the checkpoint's hash: its spec string is all there is
        basis = tuple((("model", "spec"), "model") if path == ("model", "source_key") else (path, what)
                      for path, what in SAME_BASIS)
    return [f"{what}: {get(a, path)!r} vs {get(b, path)!r}" for path, what in basis
            if get(a, path) != get(b, path)]


def timing_machine(report: dict[str, Any]) -> dict[str, Any]:
    """The CPU, its class and the threads the report's latencies were timed with: a Ray build's worker
    where the report names one, else the machine of the build."""
    on = (report.get("executor") or {}).get("latency_measured_on") or {}
    if "cpu" in on:
        return {"cpu": on["cpu"], "cpu_class": on.get("cpu_class"), "threads": on.get("threads")}
    machine = report.get("machine") or {}
    return {"cpu": machine.get("cpu"), "cpu_class": machine.get("cpu_class"), "threads": machine.get("physical_cores")}


def latency_basis(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """Why A's and B's latencies are no measure of a regression (None when they were timed alike)."""
    on_a, on_b = timing_machine(a), timing_machine(b)
    if on_a == on_b:
        return None
    def named(on: dict[str, Any]) -> str:
        return f"{on['cpu']} ({on['cpu_class']}, {on['threads']} threads)"
    return f"A was timed on {named(on_a)}, B on {named(on_b)}"


def absent(value: Any) -> bool:
    """No number: report.json stores a NaN metric as null."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def compare_reports(a: dict[str, Any], b: dict[str, Any], tol: Tolerances = Tolerances(),
                    allow_different: bool = False) -> dict[str, Any]:
    """Regressions of B against A. A variant of A that B lacks is a regression; reports of different
    models, corpora or schemas are refused (UsageError) unless `allow_different`."""
    differences = basis_differences(a, b)
    if differences and not allow_different:
        raise UsageError("the two reports measure different things (" + "; ".join(differences)
                         + "); compare builds of one model on one corpus, or pass --allow-different")
    rows = []
    other_machine = latency_basis(a, b)
    regressions = [f"{variant}: in A, missing from B" for variant in a["variants"] if variant not in b["variants"]]
    for variant in [v for v in a["variants"] if v in b["variants"]]:
        va, vb = a["variants"][variant], b["variants"][variant]
        facts = {
            "size_bytes": (va["size_bytes"], vb["size_bytes"]),
            "latency_p50_ms": (va.get("latency", {}).get("p50_ms"), vb.get("latency", {}).get("p50_ms")),
        }
        facts.update({m: (va["metrics"].get(m), vb["metrics"].get(m)) for m in COMPARED})
        for metric, (x, y) in facts.items():
            rows.append({"variant": variant, "metric": metric, "a": x, "b": y, "delta": _delta(x, y)})
        for metric, bigger_is_better in COMPARED.items():
            x, y = facts[metric]
            if absent(x):
                continue  # nothing in A to regress from
            if absent(y):
                regressions.append(f"{variant} {metric}: {x:.4g} -> n/a (B has no number: NaN logits, or not measured)")
                continue
            if bigger_is_better and y < x - tol.agreement:
                regressions.append(f"{variant} {metric}: {x:.4g} -> {y:.4g} (drop > {tol.agreement:g})")
            if not bigger_is_better and y > x * tol.error_factor + 1e-6:
                regressions.append(f"{variant} {metric}: {x:.3g} -> {y:.3g} (> {tol.error_factor:g}x)")
        size_a, size_b = facts["size_bytes"]
        if size_b > size_a * (1 + tol.size):
            regressions.append(f"{variant} size: {size_a / 1e6:.1f} -> {size_b / 1e6:.1f} MB")
        lat_a, lat_b = facts["latency_p50_ms"]
        if lat_a and lat_b and lat_b > lat_a * (1 + tol.latency) and other_machine is None:
            regressions.append(f"{variant} latency p50: {lat_a:.1f} -> {lat_b:.1f} ms (> +{tol.latency:.0%})")
        if va.get("passed", True) and not vb.get("passed", True):
            regressions.append(f"{variant}: gates passed in A and fail in B")
    only = sorted(set(a["variants"]) ^ set(b["variants"]))
    return {"rows": rows, "regressions": regressions, "variants_in_one_run_only": only,
            "basis_differences": differences, "tolerances": tol.__dict__,
            "latency_not_compared": other_machine}


SHARES = ("top1_agreement", "top5_overlap", "ref_top1_in_top5")


def shown(metric: str, value: float | None, delta: bool = False) -> str:
    """A value as a reader takes it in: MB, ms, percent (deltas in points), error magnitudes in %.3g."""
    if value is None:
        return "n/a"
    sign = "+" if delta and value > 0 else ""
    if metric == "size_bytes":
        return f"{sign}{value / 1e6:.1f} MB"
    if metric == "latency_p50_ms":
        return f"{sign}{value:.1f} ms"
    if metric in SHARES:
        return f"{sign}{value * 100:.2f} pt" if delta else f"{value:.2%}"
    if metric == "cosine_mean":
        return f"{sign}{value:.6f}"
    return f"{sign}{value:.3g}"


def render(result: dict[str, Any]) -> str:
    lines = [f"{'variant':<14} {'metric':<18} {'A':>14} {'B':>14} {'delta':>14}"]
    for row in result["rows"]:
        metric = row["metric"]
        cells = [shown(metric, row["a"]), shown(metric, row["b"]), shown(metric, row["delta"], delta=True)]
        lines.append(f"{row['variant']:<14} {row['metric']:<18} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14}")
    if result["variants_in_one_run_only"]:
        lines.append("in one run only: " + ", ".join(result["variants_in_one_run_only"]))
    if result.get("basis_differences"):
        lines.append("compared although they differ (--allow-different): " + "; ".join(result["basis_differences"]))
    if result.get("latency_not_compared"):
        lines.append(f"latency not judged: {result['latency_not_compared']}")
    if result["regressions"]:
        lines.append("REGRESSIONS:")
        lines += [f"  {r}" for r in result["regressions"]]
    else:
        lines.append("no regression beyond tolerance")
    return "\n".join(lines)
