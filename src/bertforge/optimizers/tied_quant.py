"""Keep the tied word-embedding table stored once after quantization.

When the embeddings are quantized (QEmbedLayerNormalization reads `W_quantized`), the tied MLM decoder
still reads the fp32 `W` through its Transpose, so the file holds both copies: the quantized model
grows instead of shrinking (the re-inflation optimum PR #1326 fixed for its own path). No ORT or
optimum function handles this for a fused graph, so we rewire by hand: the remaining readers of `W`
read DequantizeLinear(W_quantized, W_scale, W_zero_point) instead, and `W` is dropped.
"""

from __future__ import annotations

import onnx
from onnx import helper


def share_quantized_tables(model: onnx.ModelProto) -> list[str]:
    """Rewire fp32 readers of tables that also exist quantized; return the tables shared."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    shared = []
    for name in list(initializers):
        quantized = f"{name}_quantized"
        scale, zero_point = f"{name}_scale", f"{name}_zero_point"
        if not all(n in initializers for n in (quantized, scale, zero_point)):
            continue
        readers = [node for node in graph.node if name in node.input]
        if not readers:
            continue
        dequantized = f"{name}_dequantized"
        dequantize = helper.make_node("DequantizeLinear", [quantized, scale, zero_point], [dequantized],
                                      name=f"{name}_DequantizeLinear_shared")
        for node in readers:
            for index, value in enumerate(node.input):
                if value == name:
                    node.input[index] = dequantized
        first = min(list(graph.node).index(node) for node in readers)
        graph.node.insert(first, dequantize)
        graph.initializer.remove(initializers[name])
        shared.append(name)
    return shared
