"""The tied word-embedding table, stored once in int8, fast for both of its readers.

BERT's MLM decoder is tied to the word embeddings: the exported graph reads one table `W`
[vocab, hidden] in the embeddings (Gather, or a fused EmbedLayerNormalization) and, transposed, in
the decoder MatMul. No ORT or optimum function quantizes a tied table, so we rewrite it by hand:

- `W` becomes `W_q8` (int8, symmetric, one scale per vocabulary row) + `W_scale` [vocab];
- the embeddings read `Mul(Cast(W_q8), W_scale[:, None])`. ORT's constant folding (any optimization
  level above "disabled", the default everywhere) computes it once at session load, so the embedding
  ops and their fusions run on fp32 as before; only the file holds the int8 table;
- the decoder becomes com.microsoft `DynamicQuantizeMatMul(x, Transpose(W_q8), W_scale, 0, bias)`:
  the Transpose of an initializer is folded at load too, so B is a constant that the kernel prepacks
  (s8 weights: the u8 x s8 VNNI path), the per-row scales are exactly the per-output-channel scales
  of the decoder, and the decoder's bias Add is fused into the op. Measured on demo (b1 x s128):
  the decoder took 3.2 ms this way, 9.4 + 1.4 ms reading ORT's per-tensor uint8 table through a
  runtime Transpose, 11.5 + 1.4 ms in fp32.
- `int8_decoder=False` keeps the decoder an fp32 MatMul over the dequantized table (folded at load:
  no per-call cost, fp32 accuracy for the logits).

Per-row scales matter for accuracy: ORT's QEmbedLayerNormalization quantizes the whole table with one
uint8 scale, which alone cost the demo 22 points of top-1 agreement; per-row int8 costs about 2.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bertforge.onnx_files import import_microsoft_domain
from bertforge.optimizers.graph.edit import insert_at, insert_before, remove, replace
from bertforge.optimizers.int8_weights import symmetric_int8

DECODER_NODE = "/cls/predictions/decoder/DynamicQuantizeMatMul"


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if name in node.input]


def tied_table(graph: onnx.GraphProto) -> tuple[str, onnx.NodeProto, onnx.NodeProto, onnx.NodeProto | None] | None:
    """(table, Transpose, decoder MatMul, bias Add or None) when the graph has the exporter's tied decoder."""
    initializers = {init.name for init in graph.initializer}
    for transpose in (n for n in graph.node if n.op_type == "Transpose" and n.input[0] in initializers):
        readers = _consumers(graph, transpose.output[0])
        if len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].input[1] != transpose.output[0]:
            continue
        matmul = readers[0]
        after = _consumers(graph, matmul.output[0])
        add = after[0] if len(after) == 1 and after[0].op_type == "Add" else None
        if add is not None:
            other = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
            if other not in initializers:
                add = None
        return transpose.input[0], transpose, matmul, add
    return None


def dequantized_table_decoder(graph: onnx.GraphProto) -> onnx.NodeProto | None:
    """The fp32 decoder MatMul over a tied table that share_tied_table stored as int8 and the graph
    dequantizes at load (int8_decoder off: the Transpose reads that node output, not an initializer)."""
    initializers = {init.name for init in graph.initializer}
    for transpose in (n for n in graph.node if n.op_type == "Transpose" and f"{n.input[0]}_q8" in initializers):
        readers = _consumers(graph, transpose.output[0])
        if len(readers) == 1 and readers[0].op_type == "MatMul" and readers[0].input[1] == transpose.output[0]:
            return readers[0]
    return None


def share_tied_table(model: onnx.ModelProto, int8_decoder: bool, target: str,
                     smooth: np.ndarray | None = None, fp16_embeddings: bool = False,
                     read: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array,
                     quantize: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, str]:
    """Store the tied table once as per-row int8; return {table: how the decoder reads it} ({} if untied).

    smooth: SmoothQuant factors s [hidden] for the int8 decoder: the table is stored as W * s (each
    hidden column scaled) and the decoder reads x / s, so x's outlier channels move into the weights,
    where per-row scales absorb them. The embeddings read W * s / s, folded at load like the rest of
    their dequantization, so smoothing costs them nothing.

    fp16_embeddings: the embeddings read their own fp16 copy of the table (cast to fp32 once at load),
    and the int8 table is the decoder's alone: 3x the int8 table's bytes, for embeddings as accurate as
    fp32. On demo the per-row int8 embeddings alone cost 2.4 points of
    top-1 (calibration split, PyTorch with only the embedding table quantized); fp16 ones 0.3.

    target: the int8 target (cpu_target.py), which bounds the table's int8 values.
    read: how the table's values are read (int8_auto.weights.QuantizedWeights.read).
    quantize: the (smoothed) table -> its per-row int8 and scales, where the caller keeps them
    (QuantizedWeights.tied_rows: int8-auto's plans quantize the same table again and again)."""
    graph = model.graph
    found = tied_table(graph)
    if found is None:
        return {}
    name, transpose, matmul, add = found
    initializer = next(init for init in graph.initializer if init.name == name)
    original = read(initializer)
    table = original if smooth is None else original * smooth[None, :].astype(np.float32)
    if quantize is None:
        quantized, scale = symmetric_int8(table, axis=0, target=target)  # one scale per vocabulary row
    else:
        quantized, scale = quantize(table)
    q_name, scale_name = f"{name}_q8", f"{name}_scale"
    graph.initializer.remove(initializer)
    graph.initializer.extend([numpy_helper.from_array(quantized, q_name), numpy_helper.from_array(scale, scale_name)])
    if fp16_embeddings:
        if not int8_decoder:
            raise ValueError("fp16_embeddings: the int8 table is the decoder's, so the decoder must be int8")
        graph.initializer.append(numpy_helper.from_array(original.astype(np.float16), f"{name}_fp16"))
        if smooth is not None:
            graph.initializer.append(numpy_helper.from_array((1.0 / smooth).astype(np.float32),
                                                             f"{name}_smooth_inv"))
        # Output named like the old initializer, so every other reader (embeddings) is unchanged.
        dequantize = [helper.make_node("Cast", [f"{name}_fp16"], [name], to=TensorProto.FLOAT, name=f"{name}/Cast")]
    else:
        dequantize = dequantized_table(graph, name, smooth)
    how = "fp32 MatMul over the table dequantized at load"
    if int8_decoder:
        if smooth is not None:
            smoothed_input = f"{matmul.input[0]}_smoothed"
            insert_before(graph, matmul, [helper.make_node(
                "Mul", [matmul.input[0], f"{name}_smooth_inv"], [smoothed_input], name=f"{DECODER_NODE}/Smooth")])
            matmul.input[0] = smoothed_input
        graph.initializer.append(numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), f"{name}_zero_point"))
        transpose.input[0] = q_name
        transpose.output[0] = f"{q_name}_transposed"  # a new name: value_info typed the old one float
        inputs = [matmul.input[0], transpose.output[0], scale_name, f"{name}_zero_point"]
        outputs = list(matmul.output)
        if add is not None:
            inputs.append(add.input[1] if add.input[0] == matmul.output[0] else add.input[0])
            outputs = list(add.output)
            remove(graph, [add])
        replace(graph, [matmul], [helper.make_node("DynamicQuantizeMatMul", inputs, outputs, name=DECODER_NODE,
                                                   domain="com.microsoft")])
        how = "int8 DynamicQuantizeMatMul, constant per-row int8 B, bias fused" + (
            ", SmoothQuant-scaled input" if smooth is not None else "")
        import_microsoft_domain(model)
    insert_at(graph, 0, dequantize)
    if fp16_embeddings:
        how += "; the embeddings read an fp16 copy of the table"
    return {name: how}


def dequantized_table(graph: onnx.GraphProto, name: str, smooth: np.ndarray | None) -> list[onnx.NodeProto]:
    """Nodes computing the fp32 table `name` from its per-row int8 (and unsmoothing it), folded at load."""
    q_name, scale_name = f"{name}_q8", f"{name}_scale"
    graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), f"{name}_row_axis"))
    nodes = [
        helper.make_node("Cast", [q_name], [f"{name}_q8_float"], to=TensorProto.FLOAT, name=f"{name}/Cast"),
        helper.make_node("Unsqueeze", [scale_name, f"{name}_row_axis"], [f"{name}_scale_column"],
                         name=f"{name}/Unsqueeze"),
        # Output named like the old initializer, so every other reader (embeddings) is unchanged.
        helper.make_node("Mul", [f"{name}_q8_float", f"{name}_scale_column"],
                         [name if smooth is None else f"{name}_smoothed"], name=f"{name}/Dequantize"),
    ]
    if smooth is not None:
        graph.initializer.append(numpy_helper.from_array((1.0 / smooth).astype(np.float32), f"{name}_smooth_inv"))
        nodes.append(helper.make_node("Mul", [f"{name}_smoothed", f"{name}_smooth_inv"], [name],
                                      name=f"{name}/Unsmooth"))
    return nodes


def share_tied_table_per_presets(model: onnx.ModelProto, exclude_presets: tuple[str, ...],
                                 target: str) -> dict[str, str]:
    """The stages' common rule: `embeddings` keeps the table (and so the decoder) fp32; `mlm-decoder` or
    `mlm-head` keep the decoder's arithmetic fp32 over the int8 table."""
    if "embeddings" in exclude_presets:
        return {}
    return share_tied_table(model, int8_decoder=not {"mlm-decoder", "mlm-head"} & set(exclude_presets),
                            target=target)
