"""The oldest onnxruntime a model runs on, and the contrib ops it needs, read off its graph.

Measured, not assumed: `benchmarks/runtime_floor.py` loads and runs every variant of a build on each
onnxruntime it is given (each in a virtual environment of its own) and prints the table. On demo's build
(onnxruntime 1.16.3, 1.21.1, 1.22.0 and 1.32.0; docs/benchmarks.md has the run) fp32, fused, fp16,
int8-dynamic, int8-static and int8-dynamic-masked ran on all four. int8-blockwise, int8-auto and
int8-auto-masked hold MatMulNBits with 8-bit weights: 1.21.1 refuses them at session start
(matmul_nbits.cc: only 4-bit), 1.16.3 already when loading the graph, and 1.22.0 runs them. Older releases
were not tested, so the floor of everything else is the oldest one tested, and the card says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OLDEST_TESTED = "1.16"
CONTRIB_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class RuntimeFloor:
    onnxruntime: str  # the oldest version it runs on, as "1.22"
    reasons: tuple[str, ...]  # what sets it above the oldest tested, one line each
    contrib_ops: tuple[str, ...]  # onnxruntime's own ops (com.microsoft) the graph uses

    def line(self) -> str:
        floor = (f"onnxruntime >= {self.onnxruntime}" + (f" ({'; '.join(self.reasons)})" if self.reasons else
                                                          " (the oldest release tested; none older was tried)"))
        ops = ", ".join(self.contrib_ops) if self.contrib_ops else "none"
        return f"{floor}; onnxruntime contrib ops: {ops}"

    def as_dict(self) -> dict[str, Any]:
        return {"onnxruntime": self.onnxruntime, "reasons": list(self.reasons), "contrib_ops": list(self.contrib_ops)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeFloor:
        """Back from as_dict (report.json's `needs`, `bertforge inspect --json`)."""
        return cls(data["onnxruntime"], tuple(data["reasons"]), tuple(data["contrib_ops"]))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def runtime_floor(model: Any) -> RuntimeFloor:
    """`model`: an onnx.ModelProto (its graph only is read; external data need not be loaded)."""
    floor, reasons = OLDEST_TESTED, []
    contrib = sorted({node.op_type for node in model.graph.node if node.domain == CONTRIB_DOMAIN})
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == CONTRIB_DOMAIN:
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            if bits != 4:
                reason = f"MatMulNBits with {bits}-bit weights: 1.21 and older run only 4-bit"
                if _version("1.22") > _version(floor):
                    floor = "1.22"
                if reason not in reasons:
                    reasons.append(reason)
    return RuntimeFloor(floor, tuple(reasons), tuple(contrib))


def floor_of_file(path: Any) -> RuntimeFloor:
    import onnx

    return runtime_floor(onnx.load(str(path), load_external_data=False))
