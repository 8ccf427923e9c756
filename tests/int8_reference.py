"""Exact-integer references for the int8 nodes bertforge emits, and a runner that holds ORT against them.

Each int8 node of a graph is run by onnxruntime alone (a one-node graph over its own initializers, fed the
inputs it gets inside the whole graph) and computed here in numpy with the same quantized values,
products summed in int64: what a CPU that sums u8 x s8 products exactly (VNNI, AMX, ARM) computes. Where
ORT saturates a pair sum (AVX2 and AVX-512 without VNNI, weights past [-64, 64]), the two part by far
more than float rounding; where they agree on an AVX2 machine, the artifact computes the same integers on
every class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

INT8_OPS = ("DynamicQuantizeMatMul", "MatMulInteger", "QAttention", "MatMulNBits")


def _attr(node: onnx.NodeProto, name: str, default=None):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def quantize_u8(x: np.ndarray, scale: np.float32, zero_point: int) -> np.ndarray:
    """QuantizeLinear to uint8: x / scale rounded half to even, plus the zero point, saturated."""
    return np.clip(np.rint(x.astype(np.float32) / np.float32(scale)) + zero_point, 0, 255).astype(np.int64)


def dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, np.float32, int]:
    """DynamicQuantizeLinear: uint8 over [min(0, x), max(0, x)], its scale and zero point."""
    low, high = np.float32(min(0.0, float(x.min()))), np.float32(max(0.0, float(x.max())))
    scale = np.float32((high - low) / np.float32(255))
    if scale == 0:
        return np.zeros(x.shape, np.int64), np.float32(0), 0
    zero_point = int(np.clip(np.rint(-low / scale), 0, 255))
    return quantize_u8(x, scale, zero_point), scale, zero_point


def int_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b over the last two axes, exactly (int64: no pair sum can saturate)."""
    return np.matmul(a.astype(np.int64), b.astype(np.int64))


def dynamic_quantize_matmul(node, a, b, b_scale, b_zero_point=None, bias=None):
    aq, scale, zero_point = dynamic_quantize(a)
    bzp = 0 if b_zero_point is None else b_zero_point.astype(np.int64)
    acc = int_matmul(aq - zero_point, b.astype(np.int64) - bzp)
    out = acc.astype(np.float64) * (np.float64(scale) * b_scale.astype(np.float64))
    return (out if bias is None else out + bias).astype(np.float32)


def matmul_integer(node, a, b, a_zero_point=None, b_zero_point=None):
    azp = 0 if a_zero_point is None else a_zero_point.astype(np.int64)
    bzp = 0 if b_zero_point is None else b_zero_point.astype(np.int64)
    return int_matmul(a.astype(np.int64) - azp, b.astype(np.int64) - bzp).astype(np.int32)


def qattention(node, x, weight, bias, x_scale, w_scale, mask_index=None, x_zero_point=None, w_zero_point=None,
               past=None):
    """QAttention: the packed Q/K/V projection in integers, then BERT's attention in float64."""
    xzp = 0 if x_zero_point is None else int(x_zero_point)
    wzp = 0 if w_zero_point is None else w_zero_point.astype(np.int64)
    qkv = int_matmul(x.astype(np.int64) - xzp, weight.astype(np.int64) - wzp).astype(np.float64)
    qkv = qkv * (np.float64(x_scale) * w_scale.astype(np.float64)) + bias
    heads = int(_attr(node, "num_heads"))
    batch, length, _ = qkv.shape
    hidden = qkv.shape[-1] // 3
    size = hidden // heads
    q, k, v = (qkv[..., i * hidden:(i + 1) * hidden].reshape(batch, length, heads, size).transpose(0, 2, 1, 3)
               for i in range(3))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(size)
    if mask_index is not None and mask_index.size:
        if mask_index.ndim == 1 and mask_index.shape[0] == batch:  # each sequence's length
            keep = np.arange(length)[None, :] < mask_index[:, None]
        else:  # a 0/1 attention mask [batch, length]
            keep = mask_index.reshape(batch, length) != 0
        scores = np.where(keep[:, None, None, :], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden).astype(np.float32)


def matmul_nbits(node, a, b_blocks, scales, zero_points=None, *rest):
    """MatMulNBits, 8 bits. int8 compute (accuracy_level 4): A quantized to int8 per block of its row
    (scale max|a|/127), B's blocks offset by their zero point (128 when symmetric), summed per block.
    fp32 compute (accuracy_level 0, int8-weights): A as it is times B's blocks dequantized, in float64."""
    bits, block = int(_attr(node, "bits")), int(_attr(node, "block_size"))
    n, k = int(_attr(node, "N")), int(_attr(node, "K"))
    assert bits == 8 and zero_points is None, "the reference covers 8-bit symmetric blocks"
    blocks = -(-k // block)
    b = b_blocks.reshape(n, blocks * block)[:, :k].astype(np.int64) - 128  # [N, K]
    b_scale = scales.reshape(n, blocks).astype(np.float64)
    rows = a.reshape(-1, k).astype(np.float32)
    if int(_attr(node, "accuracy_level", 0)) == 0:
        weights = b.astype(np.float64) * np.repeat(b_scale, block, axis=1)[:, :k]  # [N, K]
        out = rows.astype(np.float64) @ weights.T
        if rest and rest[-1] is not None:
            out = out + rest[-1]
        return out.reshape(*a.shape[:-1], n).astype(np.float32)
    padded = np.zeros((rows.shape[0], blocks * block), np.float32)
    padded[:, :k] = rows
    per_block = padded.reshape(rows.shape[0], blocks, block)
    a_scale = np.abs(per_block).max(axis=-1) / np.float32(127)
    inverse = np.where(a_scale > 0, np.float32(1) / np.where(a_scale > 0, a_scale, 1), 0).astype(np.float32)
    aq = np.rint(per_block * inverse[..., None]).astype(np.int64)  # [M, blocks, block]
    bq = np.zeros((n, blocks * block), np.int64)
    bq[:, :k] = b
    bq = bq.reshape(n, blocks, block)
    sums = np.einsum("mbj,nbj->mnb", aq, bq)  # exact int64 per block
    out = (sums * a_scale.astype(np.float64)[:, None, :] * b_scale[None, :, :]).sum(-1)
    if rest and rest[-1] is not None:  # bias, MatMulNBits' sixth input
        out = out + rest[-1]
    return out.reshape(*a.shape[:-1], n).astype(np.float32)


REFERENCES = {"DynamicQuantizeMatMul": dynamic_quantize_matmul, "MatMulInteger": matmul_integer,
              "QAttention": qattention, "MatMulNBits": matmul_nbits}


@dataclass
class Mismatch:
    node: str
    op_type: str
    error: float  # max |ORT - reference|, in units of max |reference|


def _one_node_model(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: dict[str, np.ndarray],
                    outputs: list[str]) -> onnx.ModelProto:
    initializers = {i.name: i for i in model.graph.initializer}
    used = {name for node in nodes for name in node.input if name}
    graph = helper.make_graph(
        nodes, "one-node",
        [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
         for name, value in inputs.items()],
        [onnx.ValueInfoProto(name=name) for name in outputs],
        [initializers[name] for name in sorted(used) if name in initializers])
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def node_inputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The values `names` take inside the whole graph (run unoptimized, every tensor an output)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    graph_outputs = {o.name for o in exposed.graph.output}
    initializers = {i.name for i in exposed.graph.initializer}
    wanted = [n for n in dict.fromkeys(names) if n not in initializers and n not in feeds]
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted if n not in graph_outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = dict(zip(wanted, session.run(wanted, {k: v for k, v in feeds.items()
                                                   if k in {i.name for i in session.get_inputs()}}), strict=True))
    return {**{k: v for k, v in feeds.items() if k in names}, **values}


def int8_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type in INT8_OPS]


def check_nodes(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[int, list[Mismatch]]:
    """(how many int8 nodes were checked, those whose ORT output parts from the exact-integer one by more
    than float rounding)."""
    nodes = int8_nodes(model)
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    # a weight the graph transposes at load (the tied int8 table) is a constant B there, which onnxruntime
    # folds and prepacks: the Transpose goes into the one-node model too, so the kernel that ships runs
    folded = {n.output[0]: n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in initializers}
    values = node_inputs(model, feeds, [name for node in nodes for name in node.input if name])
    mismatches = []
    for node in nodes:
        runtime_inputs = {name: values[name] for name in node.input
                          if name and name not in initializers and name not in folded}
        single = _one_node_model(model, [*(folded[n] for n in node.input if n in folded), node], runtime_inputs,
                                 [node.output[0]])
        session = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, runtime_inputs)[0]
        args = [None if not name else initializers[name] if name in initializers else values[name]
                for name in node.input]
        expected = REFERENCES[node.op_type](node, *args)
        if node.op_type == "MatMulInteger":
            error = float(np.abs(got.astype(np.int64) - expected.astype(np.int64)).max())  # integers: exact
        else:
            error = float(np.abs(got.astype(np.float64) - expected).max() / max(np.abs(expected).max(), 1e-12))
        # float rounding of the scales' products: ~1e-6 of the output's range
        if error > (0 if node.op_type == "MatMulInteger" else 2e-5):
            mismatches.append(Mismatch(node.name, node.op_type, error))
    return len(nodes), mismatches


def qdq_matmuls(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, ...]]:
    """(QuantizeLinear, its DequantizeLinear, the weight's DequantizeLinear, MatMul) of every QDQ MatMul."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found = []
    for matmul in (n for n in model.graph.node if n.op_type == "MatMul"):
        dq_x, dq_w = (producer.get(name) for name in matmul.input)
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        q_x = producer.get(dq_x.input[0])
        if q_x is not None and q_x.op_type == "QuantizeLinear":
            found.append((q_x, dq_x, dq_w, matmul))
    return found


def check_qdq(model: onnx.ModelProto, feeds: dict[str, np.ndarray], scratch) -> tuple[int, list[Mismatch], set]:
    """The QDQ MatMuls of an int8-static graph, each as ORT fuses it at load (Q -> DQ -> MatMul <- DQ(W)),
    against activations quantized here and an exact integer product. Also returns the op types ORT made of
    them, so a test sees which int8 kernel ran."""
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    chains = qdq_matmuls(model)
    values = node_inputs(model, feeds, [q.input[0] for q, *_ in chains])
    mismatches, fused_ops = [], set()
    for q_x, dq_x, dq_w, matmul in chains:
        x = values[q_x.input[0]]
        single = _one_node_model(model, [q_x, dq_x, dq_w, matmul], {q_x.input[0]: x}, [matmul.output[0]])
        options = ort.SessionOptions()
        options.log_severity_level = 3  # not the warning that an optimized model is machine-specific
        options.optimized_model_filepath = str(scratch / f"{len(fused_ops)}-{abs(hash(matmul.name))}.onnx")
        session = ort.InferenceSession(single.SerializeToString(), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {q_x.input[0]: x})[0]
        fused_ops |= {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
        x_scale, x_zp = initializers[q_x.input[1]], int(initializers[q_x.input[2]])
        w_q, w_scale, w_zp = (initializers[name] for name in dq_w.input[:3])
        acc = int_matmul(quantize_u8(x, x_scale, x_zp) - x_zp, w_q.astype(np.int64) - w_zp.astype(np.int64))
        expected = acc.astype(np.float64) * (np.float64(x_scale) * w_scale.astype(np.float64))
        error = float(np.abs(got.astype(np.float64) - expected).max() / max(np.abs(expected).max(), 1e-12))
        if error > 2e-5:
            mismatches.append(Mismatch(matmul.name, "QDQ MatMul", error))
    return len(chains), mismatches, fused_ops
