"""Run a candidate graph at the calibration split's [MASK] rows only, from wherever that changes no logit.

The search compares graphs at the [MASK] positions only (~12% of a batch's rows), so every row-local
node computed at the other rows is wasted, and so is copying out full [batch, seq, vocab] logits to
keep n rows of them. Where a plan's graph starts computing at those rows only:

- right after the last layer's attention core (`gathered_after_last_attention`), where every later
  node computes each row from that row alone: that spares three quarters of the last layer's GEMMs
  at the other rows, ~11% of a sensitivity row's work on bert-base, averaged over its layers;
- else before the MLM head (`gathered_head`): the decoder is about half of demo's compute at the
  calibration batches;
- else at the tied decoder (`decoder_at_masked_rows`), an int8 one after quantizing its input over
  every row: any plan, the int8 tied table's included (most of the bisection's).

Exact only where each node after the gather computes a row from that row alone: fp32 and
int8-blockwise (per-row blocks) do; the other int8 schemes quantize their input with one scale over
the whole tensor (DynamicQuantizeMatMul), which the other rows set. MLAS's GEMMs split rows and
columns, never a sum, so a row's values do not depend on how many rows there are (tests hold them
equal to the bit, on bert-base too).
"""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bertforge.optimizers.graph.edit import replace
from bertforge.optimizers.int8_auto.groups import TIED_GROUP, Group, group_input

# Schemes whose arithmetic for one row does not depend on the other rows: int8-dynamic, -smooth and -outlier
# quantize the whole activation tensor with one scale (DynamicQuantizeMatMul), int8-blockwise per row.
ROW_LOCAL_SCHEMES = frozenset({"fp32", "int8-blockwise"})
HEAD_GROUPS = frozenset({"head.transform", TIED_GROUP})
GATHER_INDEX = "calibration_mask_index"
LAYER = re.compile(r"^layer\.(\d+)\.")


def mask_index(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The `calibration_mask_index` feed of a batch: its [MASK] positions' (row, column) pairs, [n, 2]."""
    return np.stack([rows, cols], axis=1).astype(np.int64)


def head_reads_masked_rows_only(plan: dict[str, str]) -> bool:
    """Whether the head may run at the [MASK] rows only with every logit as in the full graph: true when
    no head group is quantized with one scale per tensor (a scale that the other rows would change)."""
    return all(plan.get(name, "fp32") in ROW_LOCAL_SCHEMES for name in HEAD_GROUPS)


def last_layer_groups(groups: list[Group]) -> tuple[Group, list[Group]]:
    """(the last layer's Q/K/V group, its groups after the attention core)."""
    last = max(int(match.group(1)) for group in groups if (match := LAYER.match(group.name)))
    layer = [group for group in groups if group.name.startswith(f"layer.{last}.")]
    qkv = next(group for group in layer if group.name.endswith(".qkv"))
    return qkv, [group for group in layer if group is not qkv]


def rows_after_last_attention(plan: dict[str, str], groups: list[Group]) -> bool:
    """Whether everything after the last layer's attention core may run at the [MASK] rows only: its
    groups row-local, the head's fp32 (a quantized head.transform is a plan whose suffix graph starts
    at the head's input, stored at every row: LayerPrefix)."""
    _, after = last_layer_groups(groups)
    return (all(plan.get(name, "fp32") == "fp32" for name in HEAD_GROUPS)
            and all(plan.get(group.name, "fp32") in ROW_LOCAL_SCHEMES for group in after))


def masked_rows_graph(graph: onnx.ModelProto, base: onnx.ModelProto, plan: dict[str, str],
                      groups: list[Group]) -> onnx.ModelProto:
    """`graph` (the plan's, made from `base`) at the rows of a `calibration_mask_index` input only, from
    as early as is exact: after the last layer's attention core, else before the head, else at the
    tied decoder (every plan's graph can start there)."""
    if rows_after_last_attention(plan, groups):
        gathered = gathered_after_last_attention(graph, base, groups)
        if gathered is not None:
            return gathered
    if head_reads_masked_rows_only(plan):
        return gathered_head(graph)
    return decoder_at_masked_rows(graph)


def gathered_head(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with its MLM head run at the rows of a `calibration_mask_index` input ([n, 2]: batch,
    position) only."""
    from bertforge.optimizers.masked_head import gather_before_head

    gathered = copy.deepcopy(model)
    gather_before_head(gathered, GATHER_INDEX)
    return with_row_logits(gathered)


def decoder_at_masked_rows(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with only its tied decoder run at the rows of a `calibration_mask_index` input; the head's
    transform still runs at every row (the search's fp32 run reads the decoder's input there). An int8
    decoder (tied_quant's DynamicQuantizeMatMul) quantizes its input over every row first, as the whole
    graph's does, and multiplies the gathered rows in MatMulIntegerToFloat: the kernel and output step
    DynamicQuantizeMatMul runs (ORT fuses DynamicQuantizeLinear + MatMulIntegerToFloat into it), so
    each row's logits are its own to the bit. The decoder is ~22% of bert-base's work per token, and
    the full [batch, seq, vocab] logits were copied out to keep n rows of them."""
    from bertforge.optimizers.masked_head import decoder_node, gather_at_decoder

    gathered = copy.deepcopy(model)
    decoder = decoder_node(gathered)
    if decoder.op_type != "DynamicQuantizeMatMul":
        gather_at_decoder(gathered, GATHER_INDEX, [])  # fp32: each row computed alone
        return with_row_logits(gathered)
    x, weight, weight_scale, weight_zero, *bias = decoder.input
    p = "masked_rows/decoder"
    replace(gathered.graph, [decoder], [
        helper.make_node("DynamicQuantizeLinear", [x], [f"{p}/x_q", f"{p}/x_scale", f"{p}/x_zero"],
                         name=f"{p}/DynamicQuantizeLinear"),
        helper.make_node("GatherND", [f"{p}/x_q", GATHER_INDEX], [f"{p}/x_q_rows"], name=f"{p}/GatherND"),
        helper.make_node("MatMulIntegerToFloat",
                         [f"{p}/x_q_rows", weight, f"{p}/x_scale", weight_scale, f"{p}/x_zero", weight_zero, *bias],
                         list(decoder.output), name=f"{p}/MatMulIntegerToFloat", domain="com.microsoft"),
    ])
    return with_row_logits(gathered)


def gathered_after_last_attention(graph: onnx.ModelProto, base: onnx.ModelProto,
                                  groups: list[Group]) -> onnx.ModelProto | None:
    """The graph with every node after the last layer's attention core run at the rows of a
    `calibration_mask_index` input only: the two tensors that cross that point (the attention's output,
    the layer's input read again by the first residual Add) are gathered there. None where other
    values of the rows cross it, or it is not found (the caller then gathers before the head)."""
    qkv, after = last_layer_groups(groups)
    context, layer_input = group_input(base, after[0]), group_input(base, qkv)
    gathered = copy.deepcopy(graph)
    nodes = list(gathered.graph.node)
    first = next((i for i, node in enumerate(nodes) if context in node.input), None)
    if first is None:
        return None
    constant = {init.name for init in gathered.graph.initializer}
    produced = {value.name for value in gathered.graph.input}
    for node in nodes[:first]:  # values of the rows; constants (the tied decoder's transposed table) are not
        outputs = constant if all(name in constant for name in node.input) else produced
        outputs.update(node.output)
    crossing = {name for node in nodes[first:] for name in node.input if name in produced}
    if crossing != {context, layer_input}:
        return None
    renamed = {name: f"{name}_at_masks" for name in crossing}
    for node in nodes[first:]:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    # gathered as [1, n, hidden], not [n, hidden]: at load ORT fuses a 2-D MatMul and the Add after it
    # (the residual) into a Gemm, which adds them in another order (bert-base's logits moved by ~1e-6)
    index_3d = f"{GATHER_INDEX}_3d"
    gathers = [helper.make_node("Unsqueeze", [GATHER_INDEX, "masked_rows/axis0"], [index_3d],
                                name="masked_rows/Unsqueeze")]
    gathers += [helper.make_node("GatherND", [name, index_3d], [renamed[name]], name=f"masked_rows/GatherND_{i}")
                for i, name in enumerate(sorted(crossing))]
    for offset, node in enumerate(gathers):
        gathered.graph.node.insert(first + offset, node)
    logits = gathered.graph.output[0].name
    for node in gathered.graph.node:
        node.output[:] = [f"{logits}_3d" if name == logits else name for name in node.output]
    gathered.graph.node.append(helper.make_node("Squeeze", [f"{logits}_3d", "masked_rows/axis0"], [logits],
                                                name="masked_rows/Squeeze"))
    gathered.graph.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "masked_rows/axis0"))
    return with_row_logits(gathered)


def with_row_logits(gathered: onnx.ModelProto) -> onnx.ModelProto:
    """A gathered graph finished: its `calibration_mask_index` input ([n, 2]: batch, position; mask_index)
    declared, its logits output declared [n, vocab], the shapes after the gather left to ORT to infer at
    load."""
    gathered.graph.input.append(helper.make_tensor_value_info(GATHER_INDEX, onnx.TensorProto.INT64, ["n", 2]))
    logits = gathered.graph.output[0]
    vocab = logits.type.tensor_type.shape.dim[-1]
    del logits.type.tensor_type.shape.dim[:]
    logits.type.tensor_type.shape.dim.add().dim_param = "n"
    logits.type.tensor_type.shape.dim.add().CopyFrom(vocab)
    del gathered.graph.value_info[:]
    return gathered
