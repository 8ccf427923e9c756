"""optimum's ort_config.json beside the variants optimum has a vocabulary for.

optimum's ORTOptimizer and ORTQuantizer save an ORTConfig describing what they did; writing the same
file here lets a user (or optimum tooling) read a bertforge variant's fusion and quantization settings
in optimum's terms. Written with optimum's own classes. Only what optimum can express goes in: the
fusion stage's SkipLayerNormalization split and the shared int8 table (tied_quant) have no field,
and int8-blockwise, int8-auto and the masked head have no ORTConfig form at all, so they get none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ORT_CONFIG_FILE = "ort_config.json"


def fusion(opt_level: int):
    """The fusion stage's settings: the transformers optimizer with its BERT defaults (FusionOptions
    "bert": EmbedLayerNormalization fused, which OptimizationConfig disables by default)."""
    from optimum.onnxruntime.configuration import OptimizationConfig

    return OptimizationConfig(optimization_level=opt_level, enable_transformers_specific_optimizations=True,
                              disable_embed_layer_norm_fusion=False)


def quantization(*, static: bool, per_channel: bool, reduce_range: bool, weight_type: str,
                 operators: list[str], nodes_to_exclude: list[str]):
    from onnxruntime.quantization import QuantFormat, QuantizationMode, QuantType
    from optimum.onnxruntime.configuration import QuantizationConfig

    return QuantizationConfig(
        is_static=static, format=QuantFormat.QDQ if static else QuantFormat.QOperator,
        mode=QuantizationMode.QLinearOps if static else QuantizationMode.IntegerOps,
        activations_dtype=QuantType.QUInt8,
        weights_dtype=QuantType.QInt8 if weight_type == "qint8" else QuantType.QUInt8,
        per_channel=per_channel, reduce_range=reduce_range, operators_to_quantize=list(operators),
        nodes_to_exclude=sorted(nodes_to_exclude))


def write(out: Path, model, optimization: Any = None, quantizer: Any = None, parent: Path | None = None,
          fp16: bool = False) -> None:
    """out/ort_config.json for `model` (a ModelProto: its opset; whether out stores external data).
    `parent`: a variant directory whose ort_config.json's optimization this one inherits (fp16 set when
    `fp16`), as optimum's quantizer records the optimized graph it started from."""
    import json

    from optimum.onnxruntime.configuration import ORTConfig

    from bertforge.onnx_files import default_opset, uses_external_data

    if optimization is None and parent is not None and (Path(parent) / ORT_CONFIG_FILE).is_file():
        inherited = json.loads((Path(parent) / ORT_CONFIG_FILE).read_text("utf-8")).get("optimization")
        if inherited:
            optimization = {**inherited, "fp16": inherited.get("fp16", False) or fp16}
    ORTConfig(opset=default_opset(model), use_external_data_format=uses_external_data(out), one_external_file=True,
              optimization=optimization, quantization=quantizer).save_pretrained(str(out))
