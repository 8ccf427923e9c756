"""`bertforge inspect`: what is inside a model.onnx, in numbers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from bertforge.artifact import MODEL_FILE
from bertforge.errors import UsageError
from bertforge.onnx_files import model_bytes

# fused ops are onnxruntime's own kernels (its com.microsoft domain: Attention, SkipLayerNormalization,
# DynamicQuantizeMatMul, MatMulNBits ...), never standard ONNX ops such as LayerNormalization or MatMulInteger
FUSED_DOMAIN = "com.microsoft"


def dtype_name(elem_type: int) -> str:
    """numpy's name for an ONNX element type, else ONNX's own (string, an undefined 0, a newer type)."""
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() \
            else f"type {elem_type}"


def value_type(info: onnx.ValueInfoProto) -> str:
    """A graph input's or output's type: a tensor's element type, else what kind of value it is."""
    kind = info.type.WhichOneof("value")
    if kind == "tensor_type":
        return dtype_name(info.type.tensor_type.elem_type)
    if kind == "sequence_type":
        inner = info.type.sequence_type.elem_type
        return f"sequence of {dtype_name(inner.tensor_type.elem_type)}" if inner.HasField("tensor_type") \
            else "sequence"
    return kind or "untyped"


def initializer_bytes(init: onnx.TensorProto) -> int:
    """Bytes of an initializer's values, however they are stored (raw, typed fields, loaded external data)."""
    if init.HasField("raw_data"):
        return len(init.raw_data)
    count = 1
    for dim in init.dims:
        count *= dim
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    except (KeyError, ValueError):
        return 0


def inspect_model(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / "model.onnx" if directory.is_dir() else directory
    if not path.is_file():
        raise UsageError(f"{path} does not exist (expected a variant directory holding model.onnx)")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for a bad file
        raise UsageError(f"{path} is not a readable ONNX model: {exc}") from exc
    if model.ir_version == 0 or not model.graph.node:  # an empty file parses as an empty ModelProto
        raise UsageError(f"{path} is not an ONNX model (ir_version {model.ir_version}, {len(model.graph.node)} "
                         "nodes): an empty or foreign file")
    ops = Counter(node.op_type for node in model.graph.node)
    fused = Counter(node.op_type for node in model.graph.node if node.domain == FUSED_DOMAIN)
    dtype_count: Counter[str] = Counter()
    dtype_bytes: Counter[str] = Counter()
    for init in model.graph.initializer:
        name = dtype_name(init.data_type)
        dtype_count[name] += 1
        dtype_bytes[name] += initializer_bytes(init)
    total = sum(dtype_bytes.values()) or 1
    from bertforge.runtime_floor import runtime_floor

    return {
        "needs": runtime_floor(model).as_dict(),
        "path": str(path),
        "size_bytes": model_bytes(path.parent) if path.name == MODEL_FILE else path.stat().st_size,
        "opsets": {opset.domain or "ai.onnx": opset.version for opset in model.opset_import},
        "ir_version": model.ir_version,
        "nodes": len(model.graph.node),
        "op_types": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "fused_ops": dict(sorted(fused.items())),
        "initializers": {name: {"count": dtype_count[name], "bytes": dtype_bytes[name],
                                "share": round(dtype_bytes[name] / total, 4)} for name in sorted(dtype_count)},
        "inputs": {i.name: value_type(i) for i in model.graph.input},
        "outputs": {o.name: value_type(o) for o in model.graph.output},
    }


def needs_line(needs: dict[str, Any]) -> str:
    from bertforge.runtime_floor import RuntimeFloor

    return RuntimeFloor.from_dict(needs).line()


def render(info: dict[str, Any]) -> str:
    lines = [f"{info['path']}: {info['size_bytes'] / 1e6:.1f} MB, {info['nodes']} nodes, ir {info['ir_version']}, "
             "opsets " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()),
             "inputs:  " + ", ".join(f"{k} {v}" for k, v in info["inputs"].items()),
             "outputs: " + ", ".join(f"{k} {v}" for k, v in info["outputs"].items()),
             "needs:   " + needs_line(info["needs"]),
             "precision mix (initializer bytes):"]
    for name, facts in info["initializers"].items():
        lines.append(f"  {name:<8} {facts['count']:5d} tensors {facts['bytes'] / 1e6:9.1f} MB  {facts['share']:.1%}")
    lines.append("fused ops: " + (", ".join(f"{k} {v}" for k, v in info["fused_ops"].items()) or "none"))
    lines.append("op types:")
    for op, count in info["op_types"].items():
        lines.append(f"  {op:<28} {count}")
    return "\n".join(lines)
