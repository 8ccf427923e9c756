"""INT8 dynamic stage: onnxruntime.quantization.quantize_dynamic on the fused graph.

Trap handled: quantizing a fused graph fails with "Unable to find data type for weight_name"
(optimum #2186) because the contrib ops carry no type info; DefaultTensorType=FLOAT supplies it.
The fused EmbedLayerNormalization is quantized (QEmbedLayerNormalization, uint8 table) unless the
`embeddings` preset excludes it; the tied MLM decoder's MatMul is excluded by default (accuracy,
ORT #11286) and reads the same quantized table through a DequantizeLinear, so the 30522-row table is
stored once, in int8 (tied_quant.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from bertforge.optimizers.common import MODEL_FILE, copy_loader_files, excluded_nodes, node_names, op_histogram
from bertforge.optimizers.tied_quant import share_quantized_tables
from bertforge.recipe import Int8DynamicConfig

NAME = "int8-dynamic"
VERSION = "1"


def run(src: Path, out: Path, config: Int8DynamicConfig) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = node_names(src / MODEL_FILE)  # parsed once: the bert-base graph is ~440 MB
    exclude = excluded_nodes(names, config.exclude_presets, config.exclude_nodes)
    # ORT's quantizer never touches the tied decoder: its weight is a Transpose output, not an initializer,
    # so ORT would quantize it dynamically on every call. tied_quant.py handles it instead.
    keep_for_ort = excluded_nodes(names, ("mlm-decoder",), ())
    int8_decoder = not {"mlm-decoder", "mlm-head"} & set(config.exclude_presets)
    weight_type = QuantType.QInt8 if config.weight_type == "qint8" else QuantType.QUInt8
    quantize_dynamic(src / MODEL_FILE, out / MODEL_FILE, op_types_to_quantize=list(config.op_types),
                     per_channel=config.per_channel, reduce_range=config.reduce_range, weight_type=weight_type,
                     nodes_to_exclude=sorted(set(exclude) | set(keep_for_ort)),
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    copy_loader_files(src, out)
    quantized = onnx.load(str(out / MODEL_FILE))
    shared = share_quantized_tables(quantized, int8_decoder=int8_decoder)
    if shared:
        onnx.save(quantized, str(out / MODEL_FILE))
    return {"excluded_nodes": exclude, "tables_shared_after_quantization": shared,
            "op_types": op_histogram(quantized), "weight_type": config.weight_type,
            "per_channel": config.per_channel, "reduce_range": config.reduce_range}
