"""Keep the tied word-embedding table stored once after quantization.

When the embeddings are quantized (QEmbedLayerNormalization reads `W_quantized`), the tied MLM decoder
still reads the fp32 `W` through its Transpose, so the file holds both copies: the quantized model
grows instead of shrinking (the re-inflation optimum PR #1326 fixed for its own path). No ORT or
optimum function handles this for a fused graph, so we rewire by hand. Two ways:

- `int8` decoder: Transpose(W_quantized) feeds a com.microsoft DynamicQuantizeMatMul (activations
  quantized per call, the table's own scale and zero point). ORT folds the Transpose of the
  initializer once at load, so each call is one integer GEMM.
- `fp32` decoder: the readers of `W` read DequantizeLinear(W_quantized, W_scale, W_zero_point); the
  decoder's arithmetic stays fp32, but the table is dequantized on every call (ORT does not
  constant-fold DequantizeLinear), which costs time.
"""

from __future__ import annotations

import onnx
from onnx import helper


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if name in node.input]


def _int8_decoder(graph: onnx.GraphProto, name: str) -> bool:
    """Rewire Transpose(W) -> MatMul into Transpose(W_quantized) -> DynamicQuantizeMatMul."""
    readers = _consumers(graph, name)
    transposes = [n for n in readers if n.op_type == "Transpose"]
    if len(transposes) != 1 or len(readers) != 1:
        return False
    transpose = transposes[0]
    matmuls = _consumers(graph, transpose.output[0])
    if not matmuls or any(m.op_type != "MatMul" or m.input[1] != transpose.output[0] for m in matmuls):
        return False
    transpose.input[0] = f"{name}_quantized"
    transpose.output[0] = f"{name}_quantized_transposed"
    for matmul in matmuls:
        index = list(graph.node).index(matmul)
        replacement = helper.make_node(
            "DynamicQuantizeMatMul", [matmul.input[0], transpose.output[0], f"{name}_scale", f"{name}_zero_point"],
            list(matmul.output), name=f"{matmul.name}_DynamicQuantize", domain="com.microsoft")
        graph.node.remove(matmul)
        graph.node.insert(index, replacement)
    return True


def _dequantized_readers(graph: onnx.GraphProto, name: str) -> None:
    readers = _consumers(graph, name)
    dequantized = f"{name}_dequantized"
    dequantize = helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                                  [dequantized], name=f"{name}_DequantizeLinear_shared")
    for node in readers:
        for index, value in enumerate(node.input):
            if value == name:
                node.input[index] = dequantized
    first = min(list(graph.node).index(node) for node in readers)
    graph.node.insert(first, dequantize)


def share_quantized_tables(model: onnx.ModelProto, int8_decoder: bool) -> dict[str, str]:
    """Drop fp32 tables that also exist quantized; return {table: how its other readers now read it}."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    shared = {}
    for name in list(initializers):
        if not all(f"{name}{suffix}" in initializers for suffix in ("_quantized", "_scale", "_zero_point")):
            continue
        if not _consumers(graph, name):
            continue
        if int8_decoder and _int8_decoder(graph, name):
            shared[name] = "int8 DynamicQuantizeMatMul"
        else:
            _dequantized_readers(graph, name)
            shared[name] = "fp32 via DequantizeLinear"
        graph.initializer.remove(initializers[name])
    if any(how.startswith("int8") for how in shared.values()) and not any(
            o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return shared
