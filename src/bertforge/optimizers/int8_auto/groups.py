"""The groups int8-auto gives a scheme each: the MatMuls of one role in one layer (Q/K/V, attention
output, FFN up, FFN down), the head's transform, and the tied word-embedding table; and the schemes
(plans.py says what each computes)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx

from bertforge.optimizers.tied_quant import tied_table

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


def group_schemes(group: Group) -> tuple[str, ...]:
    """The tied table is int8 per row (its decoder a DynamicQuantizeMatMul, smoothed or not) or fp32."""
    return ("fp32", "int8-dynamic", "int8-smooth") if group.name == TIED_GROUP else SCHEMES


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
