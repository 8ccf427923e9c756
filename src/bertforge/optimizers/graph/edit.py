"""Node edits that keep the graph's order: new nodes take the place of the nodes they replace, so a
rewritten graph stays topologically sorted without a sort (which would move every node after the edit
and change the artifact's bytes from one version of a pass to the next), and every pass edits the
same way. ORT's OnnxModel has lookups and removal but only appends new nodes, hence these."""

from __future__ import annotations

from collections.abc import Iterable

import onnx


def position(graph: onnx.GraphProto, node: onnx.NodeProto) -> int:
    return list(graph.node).index(node)


def insert_at(graph: onnx.GraphProto, index: int, nodes: Iterable[onnx.NodeProto]) -> None:
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)


def insert_before(graph: onnx.GraphProto, anchor: onnx.NodeProto, nodes: Iterable[onnx.NodeProto]) -> None:
    insert_at(graph, position(graph, anchor), nodes)


def remove(graph: onnx.GraphProto, nodes: Iterable[onnx.NodeProto]) -> None:
    for node in nodes:
        graph.node.remove(node)


def replace(graph: onnx.GraphProto, old: list[onnx.NodeProto], new: Iterable[onnx.NodeProto]) -> None:
    """`old` removed, `new` in order where the first of `old` stood."""
    at = min(position(graph, node) for node in old)
    remove(graph, old)
    insert_at(graph, at, new)
