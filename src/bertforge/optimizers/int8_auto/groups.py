"""The groups int8-auto gives a scheme each: the MatMuls of one role in one layer (Q/K/V, attention
output, FFN up, FFN down), the head's transform, and the tied word-embedding table; and the schemes
(plans.py says what each computes)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from bertforge.optimizers.graph.exclusions import GELU_OPS, is_weight_matmul
from bertforge.optimizers.tied_quant import tied_table

SCHEMES = ("fp32", "int8-dynamic", "int8-smooth", "int8-token", "int8-outlier", "int8-blockwise")
TOKEN_FLOOR = 1e-6  # a row of zeros (padding after LayerNorm is not, but a ReLU-like input could be)
SMOOTH_ALPHA = 0.8
OUTLIER_CHANNELS = 8
TIED_GROUP = "tied-table"


@dataclass(frozen=True)
class Group:
    name: str
    nodes: tuple[str, ...]  # MatMul node names; empty for the tied table
    macs_per_token: int


def quant_groups(model: onnx.ModelProto) -> list[Group]:
    """Groups of a MultiHeadAttention-fused graph, in graph order, the tied table last.

    Found by the graph's structure, not by the exporter's node names: layer i's Q/K/V are the MatMuls
    feeding the i-th MultiHeadAttention, its attention output the MatMul reading it; its FFN up the first
    weight MatMul downstream of that, and its FFN down the first after the FFN up; the head's transform
    the first weight MatMul after the last layer's FFN down, when a Gelu follows it."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    graph = OnnxModel(model)
    initializers = {init.name: init for init in model.graph.initializer}
    # a node's first output names it (SSA); protobuf hands out a new Python object per access
    order = {node.output[0]: index for index, node in enumerate(model.graph.node)}
    readers = graph.input_name_to_nodes()

    def weight_matmul(node: onnx.NodeProto | None) -> bool:
        return is_weight_matmul(node, initializers)

    def next_weight_matmul(node: onnx.NodeProto) -> onnx.NodeProto | None:
        """The first weight MatMul (fewest nodes away, then graph order) reading what `node` computes."""
        frontier, seen = [node], {node.output[0]}
        while frontier:
            after = sorted({c.output[0]: c for n in frontier for out in n.output for c in readers.get(out, [])
                            if c.output[0] not in seen}.values(), key=lambda c: order[c.output[0]])
            found = [c for c in after if weight_matmul(c)]
            if found:
                return found[0]
            seen.update(c.output[0] for c in after)
            frontier = [c for c in after if c.op_type != "MatMul"]
        return None

    members: list[tuple[str, list[onnx.NodeProto]]] = []
    last = None
    for layer, attention in enumerate(n for n in model.graph.node if n.op_type == "MultiHeadAttention"):
        qkv = [graph.get_parent(attention, i) for i in range(3)]
        out = next((c for c in readers.get(attention.output[0], []) if weight_matmul(c)), None)
        up = next_weight_matmul(out) if out is not None else None
        down = next_weight_matmul(up) if up is not None else None
        if not all(weight_matmul(n) for n in (*qkv, out, up, down)):
            continue  # not the layer pattern int8-auto plans over: left as it is
        members += [(f"layer.{layer}.qkv", sorted(qkv, key=lambda n: order[n.output[0]])),
                    (f"layer.{layer}.attn-out", [out]), (f"layer.{layer}.ffn-up", [up]),
                    (f"layer.{layer}.ffn-down", [down])]
        last = down
    transform = next_weight_matmul(last) if last is not None else None
    if transform is not None and any(c.op_type in GELU_OPS for c in readers.get(transform.output[0], [])):
        members.append(("head.transform", [transform]))
    groups = [Group(name, tuple(n.name for n in nodes),
                    sum(int(initializers[n.input[1]].dims[0]) * int(initializers[n.input[1]].dims[1]) for n in nodes))
              for name, nodes in sorted(members, key=lambda member: order[member[1][0].output[0]])]
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
