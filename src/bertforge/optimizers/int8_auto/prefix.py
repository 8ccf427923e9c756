"""Run a candidate graph from the first layer it changes: the fp32 layers before it are computed once.

A plan that quantizes only groups of layer L and later computes exactly what the fp32 graph does up
to layer L's input. The int8-auto search evaluates ~60 such graphs over the same calibration batches
(the sensitivity table: each group alone), so the tensors every later node reads from that fp32
prefix (the layer's input, the attention mask index) are computed once per batch from the all-fp32
plan, spilled to a scratch folder, and each candidate runs only its suffix with them as inputs.

The prefix values come from `apply_plan(model, {})`, the graph every plan's prefix is made of (its
fp32 layers packed back into Attention the same way), so a suffix sees the inputs its full graph
would compute; sensitivity.fp32_values stores them in the same run as the reference logits. A plan
that quantizes the tied table (its embeddings change) or whose cut is not among the stored tensors
runs whole.

onnx.utils.Extractor would find the same subgraph, but it runs shape inference over the whole model
for each extraction; here the cut is read off the graph order (ONNX graphs are topologically sorted).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from bertforge.optimizers.int8_auto.groups import Group, group_input

LAYER_GROUP = re.compile(r"^layer\.(\d+)\.")
HEAD_START = 1 << 30  # the head's transform starts after every layer


def start_of(group: str) -> int | None:
    """Where a group's changes begin: its layer, HEAD_START for the head's transform, None for the
    tied table (the embeddings read it: the whole graph changes)."""
    match = LAYER_GROUP.match(group)
    if match:
        return int(match.group(1))
    return HEAD_START if group == "head.transform" else None


def cut(model: onnx.ModelProto, tensor: str) -> tuple[int, list[str]]:
    """(index of the first node reading `tensor`, the tensors nodes from there on read that earlier
    nodes produce): the inputs a suffix graph starting at that node needs."""
    nodes = list(model.graph.node)
    first = next(i for i, node in enumerate(nodes) if tensor in node.input)
    produced = {name for node in nodes[:first] for name in node.output}
    return first, sorted({name for node in nodes[first:] for name in node.input if name in produced})


def suffix_model(model: onnx.ModelProto, first: int, inputs: dict[str, np.dtype]) -> onnx.ModelProto:
    """The graph from node `first` on, reading `inputs` ({tensor: dtype}) as graph inputs."""
    graph = model.graph
    nodes = list(graph.node)[first:]
    read = {name for node in nodes for name in node.input}
    graph_inputs = [value for value in graph.input if value.name in read]
    graph_inputs += [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), None)
                     for name, dtype in inputs.items()]
    suffix = helper.make_graph(nodes, f"{graph.name}-suffix", graph_inputs, list(graph.output),
                               initializer=[init for init in graph.initializer if init.name in read])
    return helper.make_model(suffix, opset_imports=list(model.opset_import), ir_version=model.ir_version)


@dataclass
class LayerPrefix:
    """The fp32 prefix's values at each start (a layer's input, the head's input), per calibration batch."""

    directory: Path
    starts: dict[int, str] = field(default_factory=dict)  # start -> the tensor its first node reads
    dtypes: dict[str, np.dtype] = field(default_factory=dict)

    @classmethod
    def for_groups(cls, model: onnx.ModelProto, groups: list[Group], directory: Path) -> LayerPrefix:
        """An empty prefix with a start per layer (its Q/K/V input) and for the head's transform."""
        prefix = cls(Path(directory))
        prefix.directory.mkdir(parents=True, exist_ok=True)
        for group in groups:
            start = start_of(group.name)
            if start is not None and (group.name.endswith(".qkv") or start == HEAD_START):
                prefix.starts[start] = group_input(model, group)
        return prefix

    def tensors(self, fp32: onnx.ModelProto) -> list[str]:
        """The tensors of the all-fp32 plan's graph (`apply_plan(model, {})`) that a suffix from any
        start reads from before it (graph inputs excluded): the values to `store` per batch."""
        wanted = sorted({name for tensor in self.starts.values() for name in cut(fp32, tensor)[1]})
        graph_inputs = {value.name for value in fp32.graph.input}
        return [name for name in wanted if name not in graph_inputs]

    def store(self, tensor: str, batch: int, value: np.ndarray) -> None:
        self.dtypes[tensor] = value.dtype
        np.save(self.path(tensor, batch), value)

    def path(self, tensor: str, batch: int) -> Path:
        return self.directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', tensor)}-{len(tensor)}-{batch}.npy"

    def start_of_plan(self, plan: dict[str, str]) -> int | None:
        """The earliest start among the plan's quantized groups, None if the plan must run whole."""
        changed = [start_of(group) for group, scheme in plan.items() if scheme != "fp32"]
        if not changed or any(start is None for start in changed):
            return None
        start = min(changed)  # type: ignore[type-var]
        return start if start in self.starts else None

    def suffix(self, graph: onnx.ModelProto, plan: dict[str, str]) -> onnx.ModelProto | None:
        """`graph` (the plan's) from its start on, or None when it must run whole."""
        start = self.start_of_plan(plan)
        if start is None:
            return None
        first, needed = cut(graph, self.starts[start])
        graph_inputs = {value.name for value in graph.graph.input}
        needed = [name for name in needed if name not in graph_inputs]
        if not set(needed) <= set(self.dtypes):
            return None
        return suffix_model(graph, first, {name: self.dtypes[name] for name in needed})

    def feeds(self, session, batch: int) -> dict[str, np.ndarray]:
        """The stored prefix values a suffix session reads, for one batch."""
        return {i.name: np.load(self.path(i.name, batch), mmap_mode="r")
                for i in session.get_inputs() if i.name in self.dtypes}
