"""Quantize a MultiHeadAttention-fused BERT group by group, each group with its own scheme.

A group is a set of MatMuls that play one role in one layer (the Q/K/V projections, the attention
output, the FFN up- and down-projections), the head's transform, or the tied word-embedding table
(embeddings + decoder). Schemes:

- `fp32`: left as it is;
- `int8-dynamic`: com.microsoft DynamicQuantizeMatMul, int8 weights with one scale per output
  channel, activations quantized per tensor on every call (what ORT's quantize_dynamic makes, once
  ORT has fused its MatMulInteger pattern at load);
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

from bertforge.optimizers.tied_quant import share_tied_table, symmetric_int8, tied_table

SCHEMES = ("fp32", "int8-dynamic", "int8-blockwise")
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


@dataclass
class QuantizedWeights:
    """Per MatMul and scheme, the initializers its quantized node needs, computed once."""

    block_size: int = 16
    cache: dict[tuple[str, str], list[onnx.TensorProto]] = field(default_factory=dict)

    def dynamic(self, weight: onnx.TensorProto) -> list[onnx.TensorProto]:
        key = (weight.name, "int8-dynamic")
        if key not in self.cache:
            q, scale = symmetric_int8(numpy_helper.to_array(weight), axis=1)  # one scale per output column
            self.cache[key] = [numpy_helper.from_array(q, f"{weight.name}_s8"),
                               numpy_helper.from_array(scale, f"{weight.name}_s8_scale"),
                               numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{weight.name}_s8_zp")]
        return self.cache[key]

    def blockwise(self, weight: onnx.TensorProto) -> list[onnx.TensorProto]:
        key = (weight.name, "int8-blockwise")
        if key not in self.cache:
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                DefaultWeightOnlyQuantizer,
            )

            quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
                block_size=self.block_size, is_symmetric=True, accuracy_level=4, bits=8))
            packed, scales, _ = quantizer.qbits_block_quant(numpy_helper.to_array(weight).astype(np.float32))
            self.cache[key] = [numpy_helper.from_array(packed, f"{weight.name}_q8_blocks"),
                               numpy_helper.from_array(scales.astype(np.float32), f"{weight.name}_q8_block_scales")]
        return self.cache[key]


def apply_plan(model: onnx.ModelProto, plan: dict[str, str], groups: list[Group],
               weights: QuantizedWeights) -> onnx.ModelProto:
    """A copy of `model` with each group in its planned scheme (groups not in `plan` stay fp32)."""
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
        for node_name in group.nodes:
            node = by_name[node_name]
            weight = initializers[node.input[1]]
            if scheme == "int8-dynamic":
                extra = weights.dynamic(weight)
                new = helper.make_node("DynamicQuantizeMatMul", [node.input[0]] + [t.name for t in extra],
                                       list(node.output), name=f"{node.name}_int8_dynamic", domain="com.microsoft")
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
    if plan.get(TIED_GROUP, "fp32") != "fp32":
        share_tied_table(result, int8_decoder=True)
    if not any(o.domain == "com.microsoft" for o in result.opset_import):
        result.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return result
