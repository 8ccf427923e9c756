"""What every pass shares: copying the loader files beside the model, reading the model config."""

from __future__ import annotations

import shutil
from pathlib import Path

from bertforge.artifact import MODEL_FILE  # noqa: F401  (re-exported for the passes)
from bertforge.json_files import read_json

# Files optimum's ORTModelForMaskedLM and the fill-mask pipeline need beside model.onnx.
LOADER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def copy_loader_files(src: Path, dst: Path) -> None:
    for name in LOADER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def model_config(directory: Path) -> dict:
    return read_json(directory / "config.json")


# Node-name patterns (from the exporter's module paths) behind each exclusion preset.
EXCLUDE_PRESET_PATTERNS = {
    # The embeddings' Gathers are not MatMuls anyway; this also keeps a fused EmbedLayerNormalization out.
    "embeddings": (r"^/bert/embeddings/", r"^EmbedLayerNormalization"),
    # The tied decoder: its weight is the word-embedding table, transposed at run time.
    "mlm-decoder": (r"^/cls/predictions/decoder/",),
    # The whole prediction head: transform dense + decoder.
    "mlm-head": (r"^/cls/predictions/",),
    # Each layer's FFN down-projection (not attention/output/dense).
    "ffn-output": (r"/layer\.\d+/output/dense/",),
}


def node_names(model_path: Path) -> list[str]:
    import onnx

    return [node.name for node in onnx.load(str(model_path), load_external_data=False).graph.node]


def excluded_nodes(names: list[str], presets: tuple[str, ...], patterns: tuple[str, ...]) -> list[str]:
    """The node names matched by the presets' and the user's regular expressions."""
    import re

    compiled = [re.compile(p) for preset in presets for p in EXCLUDE_PRESET_PATTERNS[preset]]
    compiled += [re.compile(p) for p in patterns]
    return [name for name in names if any(p.search(name) for p in compiled)]


def mlm_head_nodes(model) -> list[str]:
    """Nodes of the prediction head, by name or (for fused nodes named by ORT) by output name."""
    return [node.name for node in model.graph.node
            if node.name.startswith("/cls/") or any(o.startswith("/cls/") for o in node.output)]


def ort_fuse(model_path: Path, hf_config: dict, opt_level: int, multi_head_attention: bool = False):
    """ORT's transformers optimizer on a BERT export: (ModelProto in topological order, fused-operator
    counts).

    multi_head_attention: fuse attention as MultiHeadAttention, which keeps the Q/K/V projections as
    separate MatMuls (block-wise quantization needs them), instead of one Attention with packed QKV.

    The optimizer leaves copies of the model (its shape-inference passes) in reference cycles; they are
    collected here, before the caller serializes: on bert-base that is 3.1 GB resident down to 0.8 GB.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from bertforge.memory import release_freed_memory

    options = FusionOptions("bert")
    options.use_multi_head_attention = multi_head_attention
    optimized = optimize_model(str(model_path), model_type="bert", num_heads=hf_config["num_attention_heads"],
                               hidden_size=hf_config["hidden_size"], opt_level=opt_level, use_gpu=False,
                               optimization_options=options)
    stats = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    optimized.topological_sort()  # what OnnxModel.save_model_to_file does before it writes
    model = optimized.model
    del optimized
    release_freed_memory()
    return model, stats


# Why SkipLayerNormalization is split again after fusion: ORT's CPU kernel for it
# (contrib_ops/cpu/skip_layer_norm.cc, float path) normalizes each row in a scalar loop whose running
# sums cannot vectorize. Measured here at 128 x 768: 0.24 ms per node, against 0.07 ms for
# Add + Add + LayerNormalization (ORT's vectorized LayerNorm kernel), so bert-base's 24 of them were
# 6 of int8-dynamic's 31 ms. The order Add(input, skip) -> Add(bias) -> LayerNormalization matches
# none of the three patterns ORT's SkipLayerNormFusion fuses back at session load (the bias Add must
# come first, or the last Add must have two 3-D inputs), so every loader keeps the fast form.
SPLIT_SUFFIXES = ("/add_skip", "/add_bias", "/layer_norm")


def split_skip_layer_norms(model) -> int:
    """Rewrite each SkipLayerNormalization that has a bias and only its first output read (all of
    BERT's) as Add(input, skip) -> Add(bias) -> LayerNormalization, in place; returns how many."""
    from onnx import helper

    graph = model.graph
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    split = 0
    for node in list(graph.node):
        if node.op_type != "SkipLayerNormalization" or len(node.input) < 5 or not node.input[4]:
            continue
        if any(name and name in read for name in node.output[1:]):
            continue
        data, skip, gamma, beta, bias = node.input[:5]
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        add_skip, add_bias, norm = (f"{node.name}{suffix}" for suffix in SPLIT_SUFFIXES)
        replacement = [
            helper.make_node("Add", [data, skip], [f"{add_skip}_output"], name=add_skip),
            helper.make_node("Add", [f"{add_skip}_output", bias], [f"{add_bias}_output"], name=add_bias),
            helper.make_node("LayerNormalization", [f"{add_bias}_output", gamma] + ([beta] if beta else []),
                             [node.output[0]], name=norm, axis=-1, epsilon=epsilon),
        ]
        index = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(replacement):
            graph.node.insert(index + offset, new)
        split += 1
    return split


def mha_fused(model_path: Path, hf_config: dict, who: str):
    """The export fused with MultiHeadAttention (Q/K/V kept as MatMuls), SkipLayerNormalization split
    as in the fusion stage: (ModelProto, fused-op counts)."""
    from bertforge.errors import StageError

    model, stats = ort_fuse(model_path, hf_config, opt_level=0, multi_head_attention=True)
    found, layers = stats.get("MultiHeadAttention", 0), hf_config["num_hidden_layers"]
    if found != layers:
        raise StageError(f"{who}: MultiHeadAttention fused {found}/{layers} layers of {model_path} "
                         "(was the model exported with SDPA attention?)")
    split_skip_layer_norms(model)
    return model, stats


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
    index = list(graph.node).index(mha)
    graph.node.remove(mha)
    for offset, node in enumerate(new_nodes):
        graph.node.insert(index + offset, node)
    for projection in projections:
        graph.node.remove(projection)
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


def require_quantized(variant: str, histogram: dict[str, int], int8_ops: tuple[str, ...], config_keys: str,
                      tied_table_shared: bool = False) -> None:
    """An "int8" variant that is all float32 would pass every gate and mislead whoever ships it: a
    UsageError naming the config keys that left nothing to quantize."""
    if tied_table_shared or any(histogram.get(op) for op in int8_ops):
        return
    from bertforge.errors import UsageError

    raise UsageError(f"{variant} quantized nothing: {config_keys} leave no node to quantize")


def op_histogram(model) -> dict[str, int]:
    from collections import Counter

    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def repack_fp32_attention(model, read=None, reuse=None) -> int:
    """Turn each MultiHeadAttention whose Q/K/V are fp32 MatMuls of one input back into ORT's packed
    Attention (one [hidden, 3 x hidden] GEMM, what the fusion stage makes), in place; returns how many.

    Why: int8-auto plans on the MultiHeadAttention fusion, where Q/K/V are separate MatMuls so each
    can be quantized; but a layer whose Q/K/V stay fp32 runs three GEMMs and MultiHeadAttention's
    layout copies, measurably slower than the packed Attention node (demo, b1 x s128).

    read: how a weight's values are read (mixed_int8.QuantizedWeights.read); numpy_helper.to_array.
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
