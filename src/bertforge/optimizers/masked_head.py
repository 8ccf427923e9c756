"""Masked-head stage (an extra variant): the MLM head runs only at the [MASK] positions.

A fill-mask user reads logits at the [MASK] positions only, while the standard graph computes the
full [batch, seq, 30522] logits: for bert-base at sequence 128 the decoder alone is ~6 of ~28 GFLOP.
This pass gathers the rows where input_ids == [MASK] at the tied decoder (gather_at_decoder):

    NonZero(Equal(input_ids, mask_id)) -> Transpose -> GatherND(decoder input) -> decoder -> mask_logits [n, vocab]

An int8 decoder's input is quantized over every row first, so each [MASK]'s logits are exactly its
parent's, whatever else the batch holds.

Outputs, so that optimum's ORTModelForMaskedLM and fill-mask pipeline load it and answer correctly,
and a runtime that knows it reads only what it needs:

- `logits` [batch, seq, vocab], optimum's interface: each position gathers its row of
  [mask_logits; one row of zeros], its own at a [MASK] (its place in the row-major order, a CumSum of
  the mask), the zero row elsewhere. Every other position's logits are 0, so it is a fill-mask
  artifact, not a general MLM one. The one Gather writes the full tensor once; the ScatterND into a
  ConstantOfShape of zeros it replaces wrote it three times (zeros, the copy ScatterND starts from,
  the rows): 4.1 ms of a bert-base b1 x s128 call here (ScatterND 2.2, zeros 1.9), where AMX had made
  the int8 decoder it spares cheaper than that;
- `mask_logits` [num_masks, vocab]: the same rows, compact, row-major (batch, then position);
- `mask_positions` [num_masks, 2]: their (batch, position).

No library offers this rewrite; it is a few standard ONNX nodes. ORT computes every output whichever
are fetched, so the compact ones are free beside `logits`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bertforge.artifact import MODEL_FILE, read_manifest
from bertforge.cpu_target import INT8_RECORD_KEYS
from bertforge.errors import StageError
from bertforge.onnx_files import copy_loader_files, model_config, save_model
from bertforge.optimizers.config import MaskedHeadConfig
from bertforge.optimizers.graph.edit import insert_at, position, remove
from bertforge.optimizers.tied_quant import DECODER_NODE, dequantized_table_decoder, tied_table
from bertforge.runtime import MASK_LOGITS

NAME = "masked-head"
VERSION = "5"
MASK_POSITIONS = "mask_positions"


def head_input(model: onnx.ModelProto) -> str:
    """The encoder's output, found from the decoder back: the head reads it through its transform and
    its own LayerNormalization, so it is the output of the second (Skip)LayerNormalization on the
    decoder's input path (the fusion stage may have split SkipLayerNormalization into Add + Add +
    LayerNormalization; an int8 transform quantizes its input first, on the same path)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    norms: list[onnx.NodeProto] = []
    node = producers.get(decoder_node(model).input[0])
    while node is not None and len(norms) < 2:
        if node.op_type in ("SkipLayerNormalization", "LayerNormalization"):
            norms.append(node)
        node = producers.get(node.input[0]) if node.input else None
    if len(norms) < 2:
        raise StageError("masked-head needs a fused graph (no encoder LayerNormalization before the head found)")
    return norms[1].output[0]


def mask_token_id(directory: Path) -> int:
    special = json.loads((directory / "tokenizer.json").read_text("utf-8"))["added_tokens"]
    ids = [token["id"] for token in special if token["content"] == "[MASK]"]
    if not ids:
        raise StageError(f"masked-head: no [MASK] token in {directory / 'tokenizer.json'}")
    return ids[0]


def gather_before_head(model: onnx.ModelProto, index: str, nodes_before: list[onnx.NodeProto] = ()) -> str:
    """Rewire the head to read the encoder's hidden states at `index` ([n, 2] int64: batch, position)
    only: GatherND(hidden, index) before the head's first node, `nodes_before` (what computes `index`)
    ahead of it. Returns the head input's name."""
    graph = model.graph
    hidden = head_input(model)
    gathered = f"{hidden}_at_masks"
    readers = [n for n in graph.node if hidden in n.input]
    for node in readers:
        for slot, name in enumerate(node.input):
            if name == hidden:
                node.input[slot] = gathered
    new_nodes = [*nodes_before, helper.make_node("GatherND", [hidden, index], [gathered], name="masked_head/GatherND")]
    insert_at(graph, min(position(graph, n) for n in readers), new_nodes)
    return hidden


def decoder_node(model: onnx.ModelProto) -> onnx.NodeProto:
    """The tied decoder: tied_quant's int8 DynamicQuantizeMatMul, the exporter's MatMul over the
    transposed table, or that MatMul over the int8 table dequantized at load (the decoder excluded from
    int8: exclude_presets mlm-decoder or mlm-head)."""
    found = next((n for n in model.graph.node if n.name == DECODER_NODE), None)
    if found is not None:
        return found
    tied = tied_table(model.graph)
    decoder = tied[2] if tied is not None else dequantized_table_decoder(model.graph)
    if decoder is None:
        raise StageError("masked-head: no tied MLM decoder found (MatMul over the transposed word embeddings)")
    return decoder


def gather_at_decoder(model: onnx.ModelProto, index: str, nodes_before: list[onnx.NodeProto]) -> str:
    """Rewire the decoder to compute the rows at `index` ([n, 2] int64: batch, position) only, with the
    numbers the whole graph gives there: the head's transform still runs on every row (its cost is a
    hidden x hidden GEMM; the decoder's, hidden x vocab, is what gathering saves), and an int8 decoder's
    activations are quantized over every row before the rows are gathered, so their one per-tensor scale
    is the full graph's (gathered first, it changed with the other [MASK]s of the batch: tiny model,
    int8-dynamic 97.6% top-1, its masked head 86.8%). Returns the decoder input's name."""
    graph = model.graph
    decoder = decoder_node(model)
    source = decoder.input[0]
    at = position(graph, decoder)
    if decoder.op_type == "DynamicQuantizeMatMul":
        weight, weight_scale, weight_zero = decoder.input[1:4]
        bias = decoder.input[4] if len(decoder.input) > 4 and decoder.input[4] else None
        output = decoder.output[0]
        p = "masked_head/decoder"
        new = [
            # the decoder's own quantization of its input (DynamicQuantizeMatMul's), over every row
            helper.make_node("DynamicQuantizeLinear", [source], [f"{p}/x_q", f"{p}/x_scale", f"{p}/x_zero"],
                             name=f"{p}/DynamicQuantizeLinear"),
            helper.make_node("GatherND", [f"{p}/x_q", index], [f"{p}/x_q_rows"], name=f"{p}/GatherND"),
            helper.make_node("MatMulInteger", [f"{p}/x_q_rows", weight, f"{p}/x_zero", weight_zero], [f"{p}/acc"],
                             name=f"{p}/MatMulInteger"),
            helper.make_node("Cast", [f"{p}/acc"], [f"{p}/acc_float"], name=f"{p}/Cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}/x_scale", weight_scale], [f"{p}/scale"], name=f"{p}/Scale"),
            helper.make_node("Mul", [f"{p}/acc_float", f"{p}/scale"], [f"{p}/product" if bias else output],
                             name=f"{p}/Dequantize"),
        ]
        if bias:
            new.append(helper.make_node("Add", [f"{p}/product", bias], [output], name=f"{p}/Bias"))
        remove(graph, [decoder])
    else:  # fp32: every row is computed alone, so gathering first changes nothing
        gathered = f"{source}_at_masks"
        decoder.input[0] = gathered
        new = [helper.make_node("GatherND", [source, index], [gathered], name="masked_head/GatherND")]
    insert_at(graph, at, new)
    insert_at(graph, 0, nodes_before)
    return source


def run(src: Path, out: Path, config: MaskedHeadConfig) -> dict[str, Any]:
    model = onnx.load(str(src / MODEL_FILE))
    graph = model.graph
    mask_id = config.mask_token_id if config.mask_token_id is not None else mask_token_id(src)
    hidden = gather_at_decoder(model, MASK_POSITIONS, [
        helper.make_node("Constant", [], ["mask_token_id"], name="masked_head/mask_id",
                         value=helper.make_tensor("mask_id", TensorProto.INT64, [], [mask_id])),
        helper.make_node("Equal", ["input_ids", "mask_token_id"], ["is_mask"], name="masked_head/Equal"),
        helper.make_node("NonZero", ["is_mask"], ["mask_index"], name="masked_head/NonZero"),
        helper.make_node("Transpose", ["mask_index"], [MASK_POSITIONS], name="masked_head/Transpose", perm=[1, 0]),
    ])
    logits = graph.output[0]
    logits_name = logits.name
    vocab = logits.type.tensor_type.shape.dim[-1]
    vocab_size = vocab.dim_value or model_config(src).vocab_size
    for node in graph.node:  # the head now ends in the compact rows
        node.output[:] = [MASK_LOGITS if name == logits_name else name for name in node.output]
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "masked_head/flat"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "masked_head/axis0"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "masked_head/one"),
        numpy_helper.from_array(np.array([1, vocab_size], dtype=np.int64), "masked_head/zero_row_shape"),
    ])
    graph.node.extend([  # each position's row of [mask_logits; zeros]: its own if it is a [MASK], else zeros
        helper.make_node("Cast", ["is_mask"], ["masked_head/is_mask_int"], name="masked_head/Cast",
                         to=TensorProto.INT64),
        helper.make_node("Reshape", ["masked_head/is_mask_int", "masked_head/flat"], ["masked_head/is_mask_flat"],
                         name="masked_head/Flatten"),
        helper.make_node("CumSum", ["masked_head/is_mask_flat", "masked_head/axis0"], ["masked_head/count_flat"],
                         name="masked_head/CumSum"),
        helper.make_node("Sub", ["masked_head/count_flat", "masked_head/one"], ["masked_head/row_flat"],
                         name="masked_head/RowOfMask"),
        helper.make_node("Shape", ["input_ids"], ["masked_head/ids_shape"], name="masked_head/Shape"),
        helper.make_node("Reshape", ["masked_head/row_flat", "masked_head/ids_shape"], ["masked_head/row"],
                         name="masked_head/Unflatten"),
        helper.make_node("ReduceSum", ["masked_head/is_mask_flat"], ["masked_head/num_masks"],
                         name="masked_head/NumMasks", keepdims=0),
        helper.make_node("Where", ["is_mask", "masked_head/row", "masked_head/num_masks"], ["masked_head/rows"],
                         name="masked_head/Where"),
        helper.make_node("ConstantOfShape", ["masked_head/zero_row_shape"], ["masked_head/zero_row"],
                         name="masked_head/ZeroRow", value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("Concat", [MASK_LOGITS, "masked_head/zero_row"], ["masked_head/rows_and_zeros"],
                         name="masked_head/Concat", axis=0),
        helper.make_node("Gather", ["masked_head/rows_and_zeros", "masked_head/rows"], [logits_name],
                         name="masked_head/Gather", axis=0),
    ])
    graph.output.remove(logits)
    graph.output.extend([
        helper.make_tensor_value_info(logits_name, TensorProto.FLOAT, ["batch_size", "sequence_length", vocab_size]),
        helper.make_tensor_value_info(MASK_LOGITS, TensorProto.FLOAT, ["num_masks", vocab_size]),
        helper.make_tensor_value_info(MASK_POSITIONS, TensorProto.INT64, ["num_masks", 2]),
    ])
    del graph.value_info[:]  # shapes of the head changed; ORT re-infers them at load
    save_model(model, out)
    onnx.checker.check_model(str(out / MODEL_FILE))  # by path: a model with external data
    copy_loader_files(src, out)
    # the int8 parent's target and the class it was built on: the same weights, so the same CPUs compute them
    parent_metadata = read_manifest(src).get("metadata", {})
    inherited = {key: parent_metadata[key] for key in INT8_RECORD_KEYS if key in parent_metadata}
    return {"mask_token_id": mask_id, "decoder_input": hidden, "parent_stage_dir": src.name, **inherited}
