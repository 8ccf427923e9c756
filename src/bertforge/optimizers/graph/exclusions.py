"""The nodes a quantizer leaves out: the recipe's presets, found by the graph's structure, and the
user's regular expressions over node names."""

from __future__ import annotations

import re
from pathlib import Path

import onnx

from bertforge.errors import UsageError

GELU_OPS = frozenset({"Gelu", "BiasGelu", "FastGelu"})


def is_weight_matmul(node: onnx.NodeProto | None, initializers: set[str] | dict[str, onnx.TensorProto]) -> bool:
    """A MatMul whose B is a constant of the graph: a layer's weight."""
    return node is not None and node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in initializers


def graph_only(model_path: Path) -> onnx.ModelProto:
    """The model without its external data: what the presets and patterns are matched on."""
    return onnx.load(str(model_path), load_external_data=False)


DECODER_OPS = frozenset({"MatMul", "DynamicQuantizeMatMul", "MatMulNBits"})


def decoder_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes computing the logits (the first graph output) from the head's last hidden state, in
    graph order: a SmoothQuant Mul before the decoder if there is one, the decoder (the exporter's
    MatMul over the transposed table, or tied_quant's DynamicQuantizeMatMul, bias fused), its bias Add."""
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {init.name for init in model.graph.initializer}
    last = producers.get(model.graph.output[0].name)
    if last is None:
        return []
    chain = [last]
    if last.op_type == "Add":
        compute = next((producers[name] for name in last.input if name in producers), None)
        if compute is None:
            return []
        chain.insert(0, compute)
    if chain[0].op_type not in DECODER_OPS:
        return []
    before = producers.get(chain[0].input[0])
    if before is not None and before.op_type == "Mul" and any(name in initializers for name in before.input):
        chain.insert(0, before)
    return chain


def preset_nodes(model: onnx.ModelProto, preset: str) -> set[str]:
    """The node names a preset names, by what the nodes do (the fused graph's, as the int8 stages see it):
    `embeddings` the embedding lookups (a fused EmbedLayerNormalization, or Gathers of a table);
    `mlm-decoder` the MatMul computing the logits and its bias Add (the tied decoder); `mlm-head` the
    whole prediction head, the decoder back to the head's transform MatMul; `ffn-output` each layer's
    FFN down-projection (the MatMul reading a Gelu)."""
    nodes = model.graph.node
    initializers = {init.name for init in model.graph.initializer}
    producers = {out: node for node in nodes for out in node.output}

    def weight_matmul(node: onnx.NodeProto | None) -> bool:
        return is_weight_matmul(node, initializers)

    if preset == "embeddings":
        return {n.name for n in nodes if n.op_type == "EmbedLayerNormalization"
                or (n.op_type == "Gather" and n.input[0] in initializers)}
    if preset == "ffn-output":
        return {n.name for n in nodes if weight_matmul(n) and getattr(producers.get(n.input[0]), "op_type", "")
                in GELU_OPS}
    decoder = decoder_nodes(model)
    if preset == "mlm-decoder":
        return {n.name for n in decoder}
    if preset == "mlm-head":
        head, node = list(decoder), producers.get(decoder[0].input[0]) if decoder else None
        while node is not None:  # back from the decoder through the head's transform (LayerNorm, Gelu)
            head.append(node)
            if weight_matmul(node):
                break
            node = producers.get(node.input[0])
        return {n.name for n in head} if head and weight_matmul(head[-1]) else {n.name for n in decoder}
    raise ValueError(f"unknown exclusion preset {preset!r}")


def excluded_nodes(model: onnx.ModelProto, presets: tuple[str, ...], patterns: tuple[str, ...],
                   setting: str = "exclude_nodes") -> list[str]:
    """In graph order, the nodes the presets name and those whose names the user's regular expressions
    match. A pattern that matches no node is refused, naming `setting`: misspelt, it excluded nothing."""
    named = set().union(*(preset_nodes(model, preset) for preset in presets)) if presets else set()
    compiled = [re.compile(p) for p in patterns]
    for pattern in compiled:
        if not any(pattern.search(n.name) for n in model.graph.node):
            example = next((n.name for n in model.graph.node if n.op_type == "MatMul"), model.graph.node[0].name)
            raise UsageError(f"{setting}: {pattern.pattern!r} matches no node of the graph (names look like "
                             f"{example!r}; `bertforge inspect` lists the op types)")
    return [n.name for n in model.graph.node if n.name in named or any(p.search(n.name) for p in compiled)]
