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
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bertforge.onnx_files import default_opset
from bertforge.optimizers.common import repack_fp32_attention, repack_int8_attention
from bertforge.optimizers.int8_weights import symmetric_int8
from bertforge.optimizers.tied_quant import share_tied_table, tied_table
from bertforge.weight_file import WeightFile

SCHEMES = ("fp32", "int8-dynamic", "int8-smooth", "int8-token", "int8-outlier", "int8-blockwise")
TOKEN_FLOOR = 1e-6  # a row of zeros (padding after LayerNorm is not, but a ReLU-like input could be)
SMOOTH_ALPHA = 0.8
OUTLIER_CHANNELS = 8
TIED_GROUP = "tied-table"
# role of a MatMul, from the exporter's module path (the same names the exclusion presets use)
ROLE_PATTERNS = (
    (re.compile(r"/layer\.(\d+)/attention/self/(query|key|value)/MatMul$"), "qkv"),
    (re.compile(r"/layer\.(\d+)/attention/output/dense/MatMul$"), "attn-out"),
    (re.compile(r"/layer\.(\d+)/intermediate/dense/MatMul$"), "ffn-up"),
    (re.compile(r"/layer\.(\d+)/output/dense/MatMul$"), "ffn-down"),
)
HEAD_TRANSFORM = re.compile(r"^/cls/predictions/transform/dense/MatMul$")


@dataclass(frozen=True)
class Group:
    name: str
    nodes: tuple[str, ...]  # MatMul node names; empty for the tied table
    macs_per_token: int


def quant_groups(model: onnx.ModelProto) -> list[Group]:
    """Groups of a MultiHeadAttention-fused graph, in graph order, the tied table last."""
    initializers = {init.name: init for init in model.graph.initializer}
    members: dict[str, list[str]] = {}
    macs: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        name = None
        for pattern, role in ROLE_PATTERNS:
            match = pattern.search(node.name)
            if match:
                name = f"layer.{match.group(1)}.{role}"
                break
        if name is None and HEAD_TRANSFORM.search(node.name):
            name = "head.transform"
        if name is None:
            continue
        members.setdefault(name, []).append(node.name)
        dims = initializers[node.input[1]].dims
        macs[name] = macs.get(name, 0) + int(dims[0]) * int(dims[1])
    groups = [Group(name, tuple(nodes), macs[name]) for name, nodes in members.items()]
    found = tied_table(model.graph)
    if found is not None:
        table = initializers[found[0]]
        groups.append(Group(TIED_GROUP, (), int(table.dims[0]) * int(table.dims[1])))
    return groups


def group_input(model: onnx.ModelProto, group: Group) -> str:
    """The tensor a group's MatMuls read (Q/K/V share one); for the tied table, the decoder's input."""
    if group.name == TIED_GROUP:
        found = tied_table(model.graph)
        assert found is not None
        return found[2].input[0]
    first = next(node for node in model.graph.node if node.name == group.nodes[0])
    return first.input[0]


def input_channels(model: onnx.ModelProto, group: Group) -> int:
    """The width of a group's input: its first MatMul's K, the hidden size for the tied table."""
    initializers = {init.name: init for init in model.graph.initializer}
    if group.name == TIED_GROUP:
        found = tied_table(model.graph)
        assert found is not None
        return int(initializers[found[0]].dims[1])
    first = next(node for node in model.graph.node if node.name == group.nodes[0])
    return int(initializers[first.input[1]].dims[0])


@dataclass
class QuantizedWeights:
    """Per MatMul and scheme, the initializers its quantized node needs, computed once.

    activation_absmax: {tensor: max |x| per channel on the calibration split}, for int8-smooth;
    alphas: {group: its SmoothQuant alpha} where it is not `alpha` (the sensitivity table picks them);
    outlier_channels: how many input channels int8-outlier keeps fp32."""

    block_size: int = 16
    activation_absmax: dict[str, np.ndarray] = field(default_factory=dict)
    alpha: float = SMOOTH_ALPHA
    # (weight, scheme, what else its initializers depend on: int8-smooth's alpha, int8-outlier's channels)
    cache: dict[tuple[str, str, float | tuple[int, ...] | None], list[onnx.TensorProto]] = field(
        default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    outlier_channels: int = OUTLIER_CHANNELS
    # an int8 tied table: the embeddings read an fp16 copy (tied_quant.share_tied_table), or the int8 one
    fp16_embeddings: bool = False
    # where the graph apply_plan is given holds references into a weight file (WeightFile.referencing:
    # the search's plans, which then copy no large weights), that file: base weights are read from it,
    # and a derived initializer it already holds (the fp32 packed Q/K/V) is referenced, not rebuilt
    weight_file: WeightFile | None = None
    # the int8 target (cpu_target.py): how int8_weights.symmetric_int8 bounds every int8-dynamic-family weight
    target: str = "portable"

    def alpha_of(self, group: str) -> float:
        return self.alphas.get(group, self.alpha)

    def read(self, init: onnx.TensorProto) -> np.ndarray:
        """An initializer's values, from the weight file where `init` is one of its references."""
        return numpy_helper.to_array(init) if self.weight_file is None else self.weight_file.array(init)

    def stored(self, name: str) -> onnx.TensorProto | None:
        """The weight file's reference for a derived initializer of that name, if it holds one."""
        return None if self.weight_file is None else self.weight_file.references.get(name)

    def smoothing(self, tensor: str, weights: list[np.ndarray], alpha: float) -> np.ndarray:
        """SmoothQuant's s [in channels] for `tensor`, read by `weights` ([in, out] each)."""
        if tensor not in self.activation_absmax:
            raise ValueError(f"int8-smooth needs the calibration absmax of {tensor}")
        x_max = np.maximum(self.activation_absmax[tensor].astype(np.float64), 1e-5)
        w_max = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64), 1e-5)
        return (x_max ** alpha / w_max ** (1 - alpha)).astype(np.float32)

    def dynamic(self, weight: onnx.TensorProto, smooth: np.ndarray | None = None,
                alpha: float | None = None) -> list[onnx.TensorProto]:
        """`smooth`: int8-smooth's factors, computed with `alpha` (part of the cache key)."""
        key = (weight.name, "int8-dynamic", None) if smooth is None else (weight.name, "int8-smooth", alpha)
        if key not in self.cache:
            array = self.read(weight)
            if smooth is not None:
                array = array * smooth[:, None]
            q, scale = symmetric_int8(array, axis=1, target=self.target)  # one scale per output column
            suffix = "_s8" if smooth is None else "_sq8"
            self.cache[key] = [numpy_helper.from_array(q, f"{weight.name}{suffix}"),
                               numpy_helper.from_array(scale, f"{weight.name}{suffix}_scale"),
                               numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8),
                                                       f"{weight.name}{suffix}_zp")]
        return self.cache[key]

    def outliers(self, tensor: str) -> np.ndarray:
        """The input channels int8-outlier keeps fp32: those of largest max|x|, ascending."""
        if tensor not in self.activation_absmax:
            raise ValueError(f"int8-outlier needs the calibration absmax of {tensor}")
        absmax = self.activation_absmax[tensor]
        return np.sort(np.argsort(-absmax, kind="stable")[: self.outlier_channels]).astype(np.int64)

    def split_outliers(self, weight: onnx.TensorProto, channels: np.ndarray) -> list[onnx.TensorProto]:
        """[W's outlier rows (fp32), then int8-dynamic's three initializers of W with those rows zeroed]."""
        key = (weight.name, "int8-outlier", tuple(channels.tolist()))
        if key not in self.cache:
            array = self.read(weight)
            main = array.copy()
            main[channels] = 0.0
            q, scale = symmetric_int8(main, axis=1, target=self.target)
            self.cache[key] = [numpy_helper.from_array(np.ascontiguousarray(array[channels]), f"{weight.name}_o32"),
                               numpy_helper.from_array(q, f"{weight.name}_o8"),
                               numpy_helper.from_array(scale, f"{weight.name}_o8_scale"),
                               numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{weight.name}_o8_zp")]
        return self.cache[key]

    def blockwise(self, weight: onnx.TensorProto) -> list[onnx.TensorProto]:
        key = (weight.name, "int8-blockwise", None)
        if key not in self.cache:
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                DefaultWeightOnlyQuantizer,
            )

            quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
                block_size=self.block_size, is_symmetric=True, accuracy_level=4, bits=8))
            packed, scales, _ = quantizer.qbits_block_quant(self.read(weight).astype(np.float32))
            self.cache[key] = [numpy_helper.from_array(packed, f"{weight.name}_q8_blocks"),
                               numpy_helper.from_array(scales.astype(np.float32), f"{weight.name}_q8_block_scales")]
        return self.cache[key]


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
            first = list(graph.node).index(by_name[group.nodes[0]])
            graph.node.insert(first, helper.make_node("Mul", [tensor, inverse.name], [f"{group.name}_smoothed"],
                                                      name=f"{group.nodes[0]}_smooth"))
        if scheme in ("int8-token", "int8-outlier"):  # the group's MatMuls become a small subgraph each
            tensor = group_input(model, group)
            if scheme == "int8-token":
                new_nodes = token_scaled_nodes(result, group, tensor, weights, initializers, by_name)
            else:
                new_nodes = outlier_split_nodes(graph, group, tensor, input_channels(model, group), weights,
                                                initializers, by_name)
            splice_group(graph, group, by_name, new_nodes)
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
            index = list(graph.node).index(node)
            graph.node.remove(node)
            graph.node.insert(index, new)
    still_read = {name for node in graph.node for name in node.input}
    for name in used - still_read:
        graph.initializer.remove(initializers[name])
    tied_scheme = plan.get(TIED_GROUP, "fp32")
    if tied_scheme != "fp32":
        smooth = None
        if tied_scheme == "int8-smooth":
            tied = next(g for g in groups if g.name == TIED_GROUP)
            table = weights.read(initializers[tied_table(graph)[0]])
            smooth = weights.smoothing(group_input(model, tied), [table.T], weights.alpha_of(TIED_GROUP))
        share_tied_table(result, int8_decoder=True, target=weights.target, smooth=smooth,
                         fp16_embeddings=weights.fp16_embeddings, read=weights.read)
    if repack:
        repack_fp32_attention(result, read=weights.read, reuse=weights.stored)
        repack_int8_attention(result)
    if not any(o.domain == "com.microsoft" for o in result.opset_import):
        result.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return result


def splice_group(graph: onnx.GraphProto, group: Group, by_name: dict[str, onnx.NodeProto],
                 new_nodes: list[onnx.NodeProto]) -> None:
    """Remove the group's MatMuls and put `new_nodes`, in order, where the first of them was."""
    at = min(list(graph.node).index(by_name[n]) for n in group.nodes)
    for node_name in group.nodes:
        graph.node.remove(by_name[node_name])
    for offset, node in enumerate(new_nodes):
        graph.node.insert(at + offset, node)


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
