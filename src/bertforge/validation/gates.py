"""Per-variant gates: thresholds from the recipe, results that set the exit code."""

from __future__ import annotations

import math
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


# the largest finite float32: a variant whose logits hold a NaN or an infinity (fp16 overflow) fails this
# bound on max_abs whatever its recipe gates (a top-1 gate alone would not see it: NaN ranks last)
FINITE_LOGITS = 3.4028234663852886e38


def evaluate(variant: str, metrics: dict[str, float], gate: Gate | None) -> list[GateResult]:
    results = []
    for field_name, (metric, op) in GATE_METRICS.items():
        threshold = getattr(gate, field_name) if gate is not None else None
        if threshold is None:
            continue
        value = float(metrics[metric])
        passed = value <= threshold if op == "<=" else value >= threshold
        results.append(GateResult(variant, metric, value, op, threshold, passed))
    worst = metrics.get("max_abs")
    if worst is not None and not math.isfinite(float(worst)) and not any(r.metric == "max_abs" for r in results):
        results.append(GateResult(variant, "max_abs", float(worst), "<=", FINITE_LOGITS, False))
    return results
