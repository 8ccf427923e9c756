"""INT8 dynamic stage: onnxruntime.quantization.quantize_dynamic on the fused graph.

Trap handled: quantizing a fused graph fails with "Unable to find data type for weight_name"
(optimum #2186) because the contrib ops carry no type info; DefaultTensorType=FLOAT supplies it.
ORT quantizes the encoder's MatMuls and Attentions (int8 weights, activations quantized per tensor on
every call). The tied word-embedding table is not left to ORT (its QEmbedLayerNormalization would
quantize the table per tensor and keep the fp32 copy for the decoder): tied_quant.py stores it once,
int8 per row, read by the embeddings and by an int8 decoder GEMM.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx

from bertforge.artifact import MODEL_FILE
from bertforge.cpu_target import int8_target_record
from bertforge.onnx_files import copy_loader_files, save_model, uses_external_data
from bertforge.optimizers import ort_config
from bertforge.optimizers.config import Int8DynamicConfig
from bertforge.optimizers.graph.exclusions import excluded_nodes, graph_only
from bertforge.optimizers.graph.op_counts import op_histogram, require_quantized
from bertforge.optimizers.int8_weights import make_pair_safe, saturating_pairs_in
from bertforge.optimizers.tied_quant import share_tied_table_per_presets

# what quantize_dynamic writes for MatMul (before ORT fuses it at load) and for Attention
INT8_COMPUTE_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention")
NAME = "int8-dynamic"
VERSION = "3"


def run(src: Path, out: Path, config: Int8DynamicConfig) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = graph_only(src / MODEL_FILE)  # parsed once: the bert-base graph is ~440 MB
    exclude = excluded_nodes(graph, config.exclude_presets, config.exclude_nodes, "int8_dynamic.exclude_nodes")
    # The embeddings and the tied decoder are never ORT's: share_tied_table quantizes their table.
    keep_for_ort = excluded_nodes(graph, ("embeddings", "mlm-decoder"), ())
    del graph
    not_for_ort = sorted(set(exclude) | set(keep_for_ort))
    weight_type = QuantType.QInt8 if config.weight_type == "qint8" else QuantType.QUInt8
    # quantize_dynamic writes its own file (its external data named its way); it is read back and
    # written through the one save path, after the tied table is shared
    with tempfile.TemporaryDirectory(prefix="bertforge-int8-dynamic-") as scratch:
        written = Path(scratch) / MODEL_FILE
        quantize_dynamic(src / MODEL_FILE, written, op_types_to_quantize=list(config.op_types),
                         per_channel=config.per_channel, reduce_range=config.reduce_range, weight_type=weight_type,
                         nodes_to_exclude=not_for_ort, use_external_data_format=uses_external_data(src),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        quantized = onnx.load(str(written))
    pair_safe = make_pair_safe(quantized, src, config)
    copy_loader_files(src, out)
    shared = share_tied_table_per_presets(quantized, config.exclude_presets, config.cpu_target)
    histogram = op_histogram(quantized)
    require_quantized(NAME, histogram, INT8_COMPUTE_OPS,
                      f"int8_dynamic.op_types {list(config.op_types)}, exclude_presets {list(config.exclude_presets)} "
                      f"and exclude_nodes {list(config.exclude_nodes)}", bool(shared))
    # read before saving: a model saved with external data keeps references, not the weights
    record = int8_target_record(config.cpu_target, saturating_pairs_in(quantized))
    save_model(quantized, out)
    ort_config.write(out, quantized, parent=src, quantizer=ort_config.quantization(
        static=False, per_channel=config.per_channel, reduce_range=config.reduce_range,
        weight_type=config.weight_type, operators=list(config.op_types),
        nodes_to_exclude=not_for_ort))
    return {"excluded_nodes": exclude, "tied_table": shared,
            "op_types": histogram, "weight_type": config.weight_type,
            "per_channel": config.per_channel, "reduce_range": config.reduce_range,
            "pair_safe_weights": len(pair_safe),
            **record}
