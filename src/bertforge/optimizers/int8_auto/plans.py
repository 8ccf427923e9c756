"""Quantize a MultiHeadAttention-fused BERT group by group, each group with its own scheme.

A group is a set of MatMuls that play one role in one layer (the Q/K/V projections, the attention
output, the FFN up- and down-projections), the head's transform, or the tied word-embedding table
(embeddings + decoder). Schemes:

- `fp32`: left as it is;
- `int8-dynamic`: com.microsoft DynamicQuantizeMatMul, int8 weights with one scale per output
  channel, activations quantized per tensor on every call (what ORT's quantize_dynamic makes, once
  ORT has fused its MatMulInteger pattern at load);
- `int8-smooth`: int8-dynamic after a SmoothQuant scale migration (Xiao et al. 2023): the group's
  input x is divided per channel by s = max|x|^alpha / max|W|^(1 - alpha) (max|x| measured on the
  calibration split) and W's rows multiplied by s, so an outlier channel of x (a trained encoder's
  LayerNorm outputs have a few, up to 15x the median) no longer sets the per-tensor activation scale
  alone. One Mul per group (Q/K/V share it); for the tied table the embeddings' side folds at load;
- `int8-outlier`: int8-dynamic for all but the group input's `outlier_channels` channels of largest
  max|x| on the calibration split, which stay fp32 (the mixed-precision decomposition of Dettmers et
  al. 2022, LLM.int8()): x's outlier channels are gathered into a small fp32 MatMul with W's rows of
  them, zeroed in x for the int8 one (whose per-tensor scale they no longer set), and the two added.
  It does what int8-smooth cannot for the FFN down-projections (GELU outputs; demo layer 0 alone:
  top-1 78.6% int8-dynamic, 65.1% int8-smooth, 92.7% int8-outlier with 8 channels); one Gather and one
  Mul per group, a [tokens x 8] MatMul and an Add per MatMul;
- `int8-token`: int8-dynamic with one activation scale per token instead of per tensor: each row of x
  is divided by its max|x| before the DynamicQuantizeMatMul and each output row multiplied back (Abs,
  ReduceMax, Max, Div once per group, a Mul per MatMul: plain ONNX ops around the fast kernel, about
  10% of its time). A few tokens of a trained encoder ([CLS], [SEP], punctuation) have activations far
  above the rest, and with one scale per tensor they leave the other tokens a few int8 levels (demo,
  alone, calibration split: layer 1's FFN down-projection 87.6% top-1 int8-dynamic, 95.2% int8-token;
  layer 0's FFN up-projection 89.9% and 95.1%). ORT has no per-row dynamic quantization kernel;
  MatMulNBits' int8 path quantizes per block but runs at under half of DynamicQuantizeMatMul's speed;
- `int8-blockwise`: com.microsoft MatMulNBits, 8 bits, symmetric, int8 compute (accuracy_level 4),
  activations and weights quantized per block of `block_size` input channels; packed by ORT's own
  DefaultWeightOnlyQuantizer.

Each MatMul's quantized weights are computed once and reused by every plan (`QuantizedWeights`): the
int8-auto search assembles many plans, and re-running ORT's quantizers for each would cost a full
quantization pass per plan. That is why this module writes the nodes itself instead of calling
quantize_dynamic / MatMulNBitsQuantizer per plan.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bertforge.onnx_files import default_opset, import_microsoft_domain
from bertforge.optimizers.graph.attention import repack_fp32_attention, repack_int8_attention
from bertforge.optimizers.graph.edit import insert_before, replace
from bertforge.optimizers.int8_auto.groups import (
    SCHEMES,
    TIED_GROUP,
    TOKEN_FLOOR,
    Group,
    group_input,
    input_channels,
)
from bertforge.optimizers.int8_auto.weights import QuantizedWeights
from bertforge.optimizers.tied_quant import share_tied_table, tied_table


def apply_plan(model: onnx.ModelProto, plan: dict[str, str], groups: list[Group],
               weights: QuantizedWeights, repack: bool = True) -> onnx.ModelProto:
    """A copy of `model` with each group in its planned scheme (groups not in `plan` stay fp32).

    repack: layers whose Q/K/V stay fp32 go back to the packed Attention node, int8 ones (int8-dynamic,
    int8-smooth) to QAttention (faster); off only to time each projection's MatMul on its own
    (sensitivity.scheme_costs)."""
    result = copy.deepcopy(model)
    graph = result.graph
    initializers = {init.name: init for init in graph.initializer}
    by_name = {node.name: node for node in graph.node}
    used: set[str] = set()
    for group in groups:
        scheme = plan.get(group.name, "fp32")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r} for group {group.name}")
        if group.name == TIED_GROUP or scheme == "fp32":
            continue
        smooth, alpha = None, weights.alpha_of(group.name)
        if scheme == "int8-smooth":
            tensor = group_input(model, group)
            smooth = weights.smoothing(tensor, [weights.read(initializers[by_name[n].input[1]])
                                                for n in group.nodes], alpha)
            inverse = numpy_helper.from_array((1.0 / smooth).astype(np.float32), f"{group.name}_smooth_inv")
            graph.initializer.append(inverse)
            insert_before(graph, by_name[group.nodes[0]], [helper.make_node(
                "Mul", [tensor, inverse.name], [f"{group.name}_smoothed"], name=f"{group.nodes[0]}_smooth")])
        if scheme in ("int8-token", "int8-outlier"):  # the group's MatMuls become a small subgraph each
            tensor = group_input(model, group)
            if scheme == "int8-token":
                new_nodes = token_scaled_nodes(result, group, tensor, weights, initializers, by_name)
            else:
                new_nodes = outlier_split_nodes(graph, group, tensor, input_channels(model, group), weights,
                                                initializers, by_name)
            replace(graph, [by_name[n] for n in group.nodes], new_nodes)
            used.update(by_name[n].input[1] for n in group.nodes)
            continue
        for node_name in group.nodes:
            node = by_name[node_name]
            weight = initializers[node.input[1]]
            if scheme in ("int8-dynamic", "int8-smooth"):
                extra = weights.dynamic(weight, smooth, alpha)
                source = node.input[0] if smooth is None else f"{group.name}_smoothed"
                new = helper.make_node("DynamicQuantizeMatMul", [source] + [t.name for t in extra],
                                       list(node.output), name=f"{node.name}_{scheme.replace('-', '_')}",
                                       domain="com.microsoft")
            else:
                extra = weights.blockwise(weight)
                k, n = (int(d) for d in weight.dims)
                new = helper.make_node("MatMulNBits", [node.input[0]] + [t.name for t in extra], list(node.output),
                                       name=f"{node.name}_int8_blockwise", domain="com.microsoft", K=k, N=n, bits=8,
                                       block_size=weights.block_size, accuracy_level=4)
            graph.initializer.extend(extra)
            used.add(weight.name)
            replace(graph, [node], [new])
    still_read = {name for node in graph.node for name in node.input}
    for name in used - still_read:
        graph.initializer.remove(initializers[name])
    tied_scheme = plan.get(TIED_GROUP, "fp32")
    if tied_scheme != "fp32":
        smooth, alpha = None, None  # alpha: int8-smooth's, the key of the table's kept int8 rows
        if tied_scheme == "int8-smooth":
            tied = next(g for g in groups if g.name == TIED_GROUP)
            table = weights.read(initializers[tied_table(graph)[0]])
            alpha = weights.alpha_of(TIED_GROUP)
            smooth = weights.smoothing(group_input(model, tied), [table.T], alpha)
        share_tied_table(result, int8_decoder=True, target=weights.target, smooth=smooth,
                         fp16_embeddings=weights.fp16_embeddings, read=weights.read,
                         quantize=lambda table: weights.tied_rows(table, alpha))
    if repack:
        repack_fp32_attention(result, read=weights.read, reuse=weights.stored)
        repack_int8_attention(result)
    import_microsoft_domain(result)
    return result


def outlier_split_nodes(graph: onnx.GraphProto, group: Group, tensor: str, width: int,
                        weights: QuantizedWeights, initializers: dict[str, onnx.TensorProto],
                        by_name: dict[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
    """int8-outlier for one group (its initializers added to `graph`): x's outlier channels through fp32,
    the rest through int8-dynamic."""
    channels = weights.outliers(tensor)
    keep = np.ones(width, dtype=np.float32)
    keep[channels] = 0.0
    index = numpy_helper.from_array(channels, f"{group.name}_outlier_channels")
    mask = numpy_helper.from_array(keep, f"{group.name}_outlier_mask")
    graph.initializer.extend([index, mask])
    outliers, rest = f"{group.name}_outliers", f"{group.name}_without_outliers"
    new_nodes = [helper.make_node("Gather", [tensor, index.name], [outliers], axis=-1,
                                  name=f"{group.nodes[0]}_outlier_gather"),
                 helper.make_node("Mul", [tensor, mask.name], [rest], name=f"{group.nodes[0]}_outlier_mask")]
    for node_name in group.nodes:
        node = by_name[node_name]
        fp32_rows, *int8 = weights.split_outliers(initializers[node.input[1]], channels)
        graph.initializer.extend([fp32_rows, *int8])
        prefix = f"{node.name}_int8_outlier"
        new_nodes += [
            helper.make_node("DynamicQuantizeMatMul", [rest] + [i.name for i in int8], [f"{prefix}_int8"],
                             name=prefix, domain="com.microsoft"),
            helper.make_node("MatMul", [outliers, fp32_rows.name], [f"{prefix}_fp32"], name=f"{prefix}_fp32"),
            helper.make_node("Add", [f"{prefix}_int8", f"{prefix}_fp32"], list(node.output), name=f"{prefix}_add"),
        ]
    return new_nodes


def token_scaled_nodes(model: onnx.ModelProto, group: Group, tensor: str, weights: QuantizedWeights,
                       initializers: dict[str, onnx.TensorProto],
                       by_name: dict[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
    """int8-token for one group (its initializers added to `model`): x / rowmax|x| through int8-dynamic,
    each output row times rowmax|x|."""
    graph = model.graph
    floor = numpy_helper.from_array(np.array(TOKEN_FLOOR, dtype=np.float32), f"{group.name}_token_floor")
    graph.initializer.append(floor)
    first = group.nodes[0]
    absolute, raw_max, row_max, scaled = (f"{group.name}_token_{part}" for part in ("abs", "rawmax", "max", "x"))
    if (default_opset(model) or 17) >= 18:  # ReduceMax's axes became an input in opset 18
        axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{group.name}_token_axes")
        graph.initializer.append(axes)
        reduce = helper.make_node("ReduceMax", [absolute, axes.name], [raw_max], keepdims=1, name=f"{first}_token_max")
    else:
        reduce = helper.make_node("ReduceMax", [absolute], [raw_max], axes=[-1], keepdims=1, name=f"{first}_token_max")
    new_nodes = [helper.make_node("Abs", [tensor], [absolute], name=f"{first}_token_abs"), reduce,
                 helper.make_node("Max", [raw_max, floor.name], [row_max], name=f"{first}_token_floor"),
                 helper.make_node("Div", [tensor, row_max], [scaled], name=f"{first}_token_div")]
    for node_name in group.nodes:
        node = by_name[node_name]
        extra = weights.dynamic(initializers[node.input[1]])
        graph.initializer.extend(extra)
        unscaled = f"{node.name}_int8_token_unscaled"
        new_nodes += [helper.make_node("DynamicQuantizeMatMul", [scaled] + [t.name for t in extra], [unscaled],
                                       name=f"{node.name}_int8_token", domain="com.microsoft"),
                      helper.make_node("Mul", [unscaled, row_max], list(node.output),
                                       name=f"{node.name}_int8_token_rescale")]
    return new_nodes
