"""ORT's transformers optimizer on a BERT export, and the SkipLayerNormalization split every fused
graph gets after it."""

from __future__ import annotations

from pathlib import Path

from bertforge.onnx_files import ModelConfig
from bertforge.optimizers.graph.edit import replace


def ort_fuse(model_path: Path, hf_config: ModelConfig, opt_level: int, multi_head_attention: bool = False):
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
    optimized = optimize_model(str(model_path), model_type="bert", num_heads=hf_config.num_attention_heads,
                               hidden_size=hf_config.hidden_size, opt_level=opt_level, use_gpu=False,
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
        replace(graph, [node], replacement)
        split += 1
    return split


def mha_fused(model_path: Path, hf_config: ModelConfig, who: str):
    """The export fused with MultiHeadAttention (Q/K/V kept as MatMuls), SkipLayerNormalization split
    as in the fusion stage: (ModelProto, fused-op counts)."""
    from bertforge.errors import StageError

    model, stats = ort_fuse(model_path, hf_config, opt_level=0, multi_head_attention=True)
    found, layers = stats.get("MultiHeadAttention", 0), hf_config.num_hidden_layers
    if found != layers:
        raise StageError(f"{who}: MultiHeadAttention fused {found}/{layers} layers of {model_path} "
                         "(was the model exported with SDPA attention?)")
    split_skip_layer_norms(model)
    return model, stats
