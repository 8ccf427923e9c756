"""Attention repacks: a MultiHeadAttention whose Q/K/V projections are three MatMuls (fp32) or three
DynamicQuantizeMatMuls (int8) back into ORT's packed Attention or QAttention."""

from __future__ import annotations

from bertforge.optimizers.graph.edit import remove, replace


def graph_maps(graph) -> tuple[dict, dict, dict[str, int]]:
    """(initializers by name, the node producing each tensor, how many node inputs read each tensor)."""
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    return initializers, producers, readers


def packable_attentions(graph, producers: dict, readers: dict[str, int], op_type: str, accept):
    """(MultiHeadAttention, its Q/K/V projections) for each one with a packed bias and a mask index whose
    Q/K/V are `op_type` nodes of one shared input, read only by it, that `accept(node)` takes."""
    for mha in [n for n in graph.node if n.op_type == "MultiHeadAttention"]:
        if len(mha.input) != 5 or not mha.input[3] or not mha.input[4]:
            continue
        projections = [producers.get(name) for name in mha.input[:3]]
        if any(p is None or p.op_type != op_type or readers[p.output[0]] != 1 or not accept(p)
               for p in projections) or len({p.input[0] for p in projections}) != 1:
            continue
        yield mha, projections


def replace_attention(graph, mha, projections: list, new_nodes: list, initializers: dict,
                      readers: dict[str, int]) -> None:
    """Put `new_nodes` where `mha` was, remove its projections, and the initializers only they read."""
    replace(graph, [mha], new_nodes)
    remove(graph, projections)
    for projection in projections:
        for name in projection.input[1:]:
            readers[name] -= 1
            if readers[name] == 0 and name in initializers:
                graph.initializer.remove(initializers.pop(name))


def repack_int8_attention(model) -> int:
    """Turn each MultiHeadAttention whose Q/K/V are int8 DynamicQuantizeMatMuls of one input (symmetric,
    per-column scales) into ORT's packed QAttention, in place; returns how many.

    The same arithmetic: the three kernels each quantized that input with one u8 scale, exactly as the
    one DynamicQuantizeLinear before QAttention does, and the bias MultiHeadAttention added QAttention
    adds after its GEMM. But one quantization and one [hidden, 3 x hidden] GEMM instead of three of
    each, and QAttention's kernel instead of MultiHeadAttention's layout copies: 0.68 against 0.83 ms a
    layer at bert-base's b1 x s128 here."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    initializers, producers, readers = graph_maps(graph)

    def is_symmetric_int8(projection) -> bool:
        names = projection.input[1:4]
        return (len(projection.input) == 4 and all(name in initializers for name in names)
                and initializers[names[0]].data_type == TensorProto.INT8
                and not numpy_helper.to_array(initializers[names[2]]).any())

    repacked = 0
    for mha, projections in list(packable_attentions(graph, producers, readers, "DynamicQuantizeMatMul",
                                                     is_symmetric_int8)):
        weights = [numpy_helper.to_array(initializers[p.input[1]]) for p in projections]
        scale = np.concatenate([np.broadcast_to(numpy_helper.to_array(initializers[p.input[2]]), (w.shape[1],))
                                for p, w in zip(projections, weights, strict=True)]).astype(np.float32)
        names = {part: f"{mha.name}_qkv_{part}" for part in ("weight_s8", "weight_scale", "weight_zp", "input")}
        graph.initializer.extend([numpy_helper.from_array(np.concatenate(weights, axis=1), names["weight_s8"]),
                                  numpy_helper.from_array(scale, names["weight_scale"]),
                                  numpy_helper.from_array(np.array(0, dtype=np.int8), names["weight_zp"])])
        quantized, input_scale, input_zp = (f"{names['input']}_{part}" for part in ("u8", "scale", "zp"))
        attributes = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
        replace_attention(graph, mha, projections, [
            helper.make_node("DynamicQuantizeLinear", [projections[0].input[0]], [quantized, input_scale, input_zp],
                             name=f"{mha.name}_quantize_input"),
            helper.make_node("QAttention", [quantized, names["weight_s8"], mha.input[3], input_scale,
                                            names["weight_scale"], mha.input[4], input_zp, names["weight_zp"]],
                             list(mha.output), name=mha.name, domain="com.microsoft", **attributes),
        ], initializers, readers)
        repacked += 1
    return repacked


def repack_fp32_attention(model, read=None, reuse=None) -> int:
    """Turn each MultiHeadAttention whose Q/K/V are fp32 MatMuls of one input back into ORT's packed
    Attention (one [hidden, 3 x hidden] GEMM, what the fusion stage makes), in place; returns how many.

    Why: int8-auto plans on the MultiHeadAttention fusion, where Q/K/V are separate MatMuls so each
    can be quantized; but a layer whose Q/K/V stay fp32 runs three GEMMs and MultiHeadAttention's
    layout copies, measurably slower than the packed Attention node (demo, b1 x s128).

    read: how a weight's values are read (int8_auto.weights.QuantizedWeights.read); numpy_helper.to_array.
    reuse: name -> an initializer already made for that packed weight, or None (QuantizedWeights.stored:
    the weight file's reference), asked only where the graph's Q/K/V weights are references themselves
    (a graph made to be referenced): concatenating bert-base's Q/K/V again for every plan cost 65 ms."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    read = read or numpy_helper.to_array
    graph = model.graph
    initializers, producers, readers = graph_maps(graph)
    repacked = 0
    for mha, projections in list(packable_attentions(graph, producers, readers, "MatMul",
                                                     lambda p: p.input[1] in initializers)):
        weight_name = f"{mha.name}_qkv_weight"
        referenced = all(initializers[p.input[1]].data_location == onnx.TensorProto.EXTERNAL for p in projections)
        made = reuse(weight_name) if reuse is not None and referenced else None
        if made is None:
            made = numpy_helper.from_array(np.concatenate([read(initializers[p.input[1]]) for p in projections],
                                                          axis=1), weight_name)
        graph.initializer.append(made)
        attributes = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
        replace_attention(graph, mha, projections, [
            helper.make_node("Attention", [projections[0].input[0], weight_name, mha.input[3], mha.input[4]],
                             list(mha.output), name=mha.name, domain="com.microsoft", **attributes),
        ], initializers, readers)
        repacked += 1
    return repacked
