"""Per-variant gates: thresholds from the recipe, results that set the exit code."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bertforge.validation.config import Gate

# gate field -> (metric in the validation summary, comparison)
GATE_METRICS = {
    "max_abs_max": ("max_abs", "<="),
    "top1_min": ("top1_agreement", ">="),
    "top5_overlap_min": ("top5_overlap", ">="),
    "ref_top1_in_top5_min": ("ref_top1_in_top5", ">="),
    "kl_mean_max": ("kl_mean", "<="),
}


@dataclass(frozen=True)
class GateResult:
    variant: str
    metric: str
    value: float
    op: str
    threshold: float
    passed: bool

    def line(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return f"{verdict}: {self.variant} {self.metric} = {self.value:.6g} (gate {self.op} {self.threshold:g})"

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(variant: str, metrics: dict[str, float], gate: Gate | None) -> list[GateResult]:
    results = []
    if gate is None:
        return results
    for field_name, (metric, op) in GATE_METRICS.items():
        threshold = getattr(gate, field_name)
        if threshold is None:
            continue
        value = float(metrics[metric])
        passed = value <= threshold if op == "<=" else value >= threshold
        results.append(GateResult(variant, metric, value, op, threshold, passed))
    return results
