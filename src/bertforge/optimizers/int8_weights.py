"""Symmetric int8 weights whose u8 x s8 products no CPU saturates (cpu_target.py says why they can).

MLAS's AVX2 and AVX-512 core kernels add the products of each pair of K-adjacent weights (k = 2i, 2i+1)
with their u8 activations in int16 (vpmaddubsw). A pair of opposite signs never leaves int16 (255 * 127
< 32768); a pair of one sign does once |w0| + |w1| > 128 (255 * 129 = 32895). For the `portable`
target every slice's scale is the smallest one at which each of its same-sign pairs sums to at most
128 in magnitude: the slices with no such pair keep the full [-127, 127] grid, the others lose what they
must and no more (at most one bit, onnxruntime's reduce_range, which halves every slice's grid).
Checked on an emulated AVX2 CPU: pairs (127, 1), (100, 28), (-127, 127) are exact, (100, 29) is not.

onnxruntime's quantizers have no such rule, only reduce_range; requantize_pair_safe rewrites the int8
weights they wrote, from the float weights they came from, on the same per-channel axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

PAIR_SUM_MAX = 128  # 255 * 128 = 32640: the largest same-sign pair sum an int16 accumulator holds


def _same_sign_pair_sums(q: np.ndarray) -> np.ndarray:
    """[slices, K] ints -> [slices, ceil(K/2)]: |q[2i]| + |q[2i+1]| where the pair has one sign, else 0."""
    if q.shape[1] % 2:
        q = np.concatenate([q, np.zeros((q.shape[0], 1), q.dtype)], axis=1)
    first, second = q[:, 0::2].astype(np.int32), q[:, 1::2].astype(np.int32)
    return np.where((first * second) > 0, np.abs(first) + np.abs(second), 0)


def symmetric_int8(weight: np.ndarray, axis: int, target: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per slice along `axis` (the axis the scale varies over; the other
    axis is K): weight ~= q * scale, q in [-127, 127]; for target `portable` also no same-sign K-adjacent
    pair past PAIR_SUM_MAX."""
    slices = np.moveaxis(np.asarray(weight, dtype=np.float32), axis, 0)  # [slices, K]
    scale = np.abs(slices).max(axis=1).astype(np.float32) / np.float32(127)
    scale[scale == 0] = 1.0
    quantized = np.clip(np.rint(slices / scale[:, None]), -127, 127)
    if target == "portable":
        for _ in range(64):  # each round widens only the offending slices' scales; 2-3 rounds in practice
            worst = _same_sign_pair_sums(quantized).max(axis=1, initial=0)
            over = worst > PAIR_SUM_MAX
            if not over.any():
                break
            scale[over] *= np.maximum(worst[over] / PAIR_SUM_MAX, 1.001).astype(np.float32)
            quantized[over] = np.clip(np.rint(slices[over] / scale[over, None]), -127, 127)
        else:
            raise AssertionError("pair-safe int8 scales did not converge")
    elif target != "vnni":
        raise ValueError(f"unknown int8 target {target!r}")
    q = np.moveaxis(quantized.astype(np.int8), 0, axis)
    assert q.shape == np.shape(weight)
    return np.ascontiguousarray(q), scale.astype(np.float32)


def saturating_pairs(q: np.ndarray, axis: int) -> int:
    """How many same-sign K-adjacent pairs of int8 weights q (scales along `axis`) sum past PAIR_SUM_MAX."""
    return int((_same_sign_pair_sums(np.moveaxis(q, axis, 0)) > PAIR_SUM_MAX).sum())


# the u8 x s8 GEMMs MLAS runs through vpmaddubsw on x86 without VNNI (their B, input 1, the s8 weight)
U8S8_KERNELS = ("DynamicQuantizeMatMul", "MatMulInteger", "QAttention")


def u8s8_weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, int]]:
    """{name: (s8 weight, the axis its scales vary over; K is the other)} of every u8 x s8 GEMM in the
    graph: the B of U8S8_KERNELS, an s8 weight a DequantizeLinear reads (QDQ MatMuls, fused into
    QLinearMatMul at load) and the tied int8 table read through a Transpose (its rows; K is hidden).
    u8 weights (weight_type quint8) run u8 x u8 kernels, which do not saturate, and are not listed."""
    initializers = {i.name: i for i in model.graph.initializer}
    transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose"}
    found = {}
    for node in model.graph.node:
        names = list(node.input[1:2]) if node.op_type in U8S8_KERNELS else []
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            names = list(node.input[:1])
        for name in names:
            table = transposed.get(name)
            name = table or name
            if name in initializers and initializers[name].data_type == TensorProto.INT8:
                found[name] = (numpy_helper.to_array(initializers[name]), 0 if table else 1)
    return found


def saturating_pairs_in(model: onnx.ModelProto) -> int:
    """How many same-sign K-adjacent s8 weight pairs of the graph's u8 x s8 GEMMs sum past PAIR_SUM_MAX:
    0 means the graph computes the same integers on every CPU class."""
    return sum(saturating_pairs(weight, axis) for weight, axis in u8s8_weights(model).values())


def requantize_pair_safe(model: onnx.ModelProto, originals: dict[str, np.ndarray]) -> list[str]:
    """Rewrite, in place, every 2-D int8 weight onnxruntime's quantizers wrote (`X_quantized`, its
    `X_scale`, symmetric: zero point 0) as symmetric_int8(X, portable) from X's float values, one scale
    per output column (their per-channel axis for MatMul, QAttention and QDQ weights) or one per tensor
    where they wrote one. Returns the weights rewritten."""
    initializers = {init.name: init for init in model.graph.initializer}
    # QDQ weights name their per-channel axis; MatMulInteger's and DynamicQuantizeMatMul's B scales are
    # per column by definition. A square weight's scale fits either axis, so the axis is read, not guessed.
    qdq_axis = {node.input[0]: next((a.i for a in node.attribute if a.name == "axis"), 1)
                for node in model.graph.node if node.op_type == "DequantizeLinear"}
    rewritten = []
    for name, init in list(initializers.items()):
        if init.data_type != TensorProto.INT8 or not name.endswith("_quantized") or len(init.dims) != 2:
            continue
        if qdq_axis.get(name, 1) not in (1, -1):
            raise ValueError(f"int8 weight {name}: its scales run along axis {qdq_axis[name]}, not the output "
                             "columns this rewrite assumes")
        base = name[: -len("_quantized")]
        scale_init, zero_init = initializers.get(f"{base}_scale"), initializers.get(f"{base}_zero_point")
        if base not in originals or scale_init is None:
            raise ValueError(f"int8 weight {name}: no float original or scale to make it pair-safe from")
        if zero_init is not None and numpy_helper.to_array(zero_init).any():
            raise ValueError(f"int8 weight {name} is asymmetric (non-zero zero point)")
        old_scale = numpy_helper.to_array(scale_init)
        original = originals[base].astype(np.float32)
        if old_scale.size == 1:  # per tensor: the widest column's scale (a wider scale never grows a pair)
            _, per_column = symmetric_int8(original, axis=1, target="portable")
            scale = np.array(per_column.max(), dtype=np.float32).reshape(old_scale.shape)
            q = np.clip(np.rint(original / scale), -127, 127).astype(np.int8)
        else:
            if old_scale.size != original.shape[1]:
                raise ValueError(f"int8 weight {name}: scale of {old_scale.size} for a {original.shape} weight")
            q, scale = symmetric_int8(original, axis=1, target="portable")
            scale = scale.reshape(old_scale.shape)
        init.CopyFrom(numpy_helper.from_array(q, name))
        scale_init.CopyFrom(numpy_helper.from_array(scale.astype(old_scale.dtype), scale_init.name))
        rewritten.append(base)
    return rewritten


def make_pair_safe(quantized: onnx.ModelProto, src: Path, config: Any) -> list[str]:
    """An ORT-quantized graph's int8 weights made pair-safe where the stage's config needs it: target
    portable, s8 weights, full range (reduce_range's [-64, 64] is safe already; u8 weights run the
    exact u8 x u8 kernels). The float originals are read from the stage's input graph `src`."""
    from bertforge.artifact import MODEL_FILE

    if (config.cpu_target != "portable" or getattr(config, "reduce_range", False)
            or getattr(config, "weight_type", "qint8") != "qint8"):
        return []
    wanted = {init.name[: -len("_quantized")] for init in quantized.graph.initializer
              if init.data_type == TensorProto.INT8 and init.name.endswith("_quantized")}
    source = onnx.load(str(src / MODEL_FILE))
    originals = {init.name: numpy_helper.to_array(init) for init in source.graph.initializer if init.name in wanted}
    del source
    return requantize_pair_safe(quantized, originals)
