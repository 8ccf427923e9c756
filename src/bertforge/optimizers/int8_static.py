"""INT8 static stage: QDQ quantization of the fused graph, calibrated on masked sentences.

Calibration feeds sentences from the project's calibration corpus (kept apart from the validation
and head-fit sentences) masked the way the model is used, one sentence at a time, at most `calibration_samples`
of them: MinMax keeps two numbers per tensor; Entropy/Percentile keep histograms whose memory grows
with the sample count (ORT #10503), which is why the count is bounded.
quant_pre_process (symbolic shape inference) runs first: without the activations' types the
quantizer silently quantizes weights only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bertforge.artifact import MODEL_FILE, Artifact
from bertforge.cpu_target import int8_target_record
from bertforge.onnx_files import copy_loader_files, save_model, uses_external_data
from bertforge.optimizers import ort_config
from bertforge.optimizers.config import Int8StaticConfig
from bertforge.optimizers.graph.exclusions import excluded_nodes, graph_only
from bertforge.optimizers.graph.op_counts import op_histogram, require_quantized
from bertforge.optimizers.int8_weights import make_pair_safe, saturating_pairs_in

NAME = "int8-static"
VERSION = "2"


def calibration_feeds(src: Path, config: Int8StaticConfig) -> list[dict[str, np.ndarray]]:
    from bertforge.validation.corpus import calibration_examples

    tokenizer, examples = calibration_examples(src, config.calibration_corpus, seeds=(7,),
                                               limit=config.calibration_samples)
    # One common length: ORT's Entropy/Percentile calibrators stack every sample's activations and
    # fail on ragged shapes ("inhomogeneous shape"); padding is masked out as in batched inference.
    length = max(len(example.input_ids) for example in examples)
    feeds = []
    for example in examples:
        ids = np.full((1, length), tokenizer.pad_token_id or 0, dtype=np.int64)
        mask = np.zeros((1, length), dtype=np.int64)
        ids[0, :len(example.input_ids)] = example.input_ids
        mask[0, :len(example.input_ids)] = 1
        feeds.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    return feeds


def key_inputs(parent: Artifact, config: Int8StaticConfig) -> dict[str, Any]:
    """The calibration corpus's text: an edited corpus file is a new artifact, never the old one reused."""
    from bertforge.validation.corpus import corpus_digest

    return {"calibration_corpus": corpus_digest(config.calibration_corpus)}


def run(src: Path, out: Path, config: Int8StaticConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds = calibration_feeds(src, config)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._iter = iter(feeds)

        def get_next(self):
            return next(self._iter, None)

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.calibration_method]
    exclude = excluded_nodes(graph_only(src / MODEL_FILE), config.exclude_presets, config.exclude_nodes,
                             "int8_static.exclude_nodes")

    with tempfile.TemporaryDirectory(prefix="bertforge-calib-", dir=out) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        external = uses_external_data(src)
        quant_pre_process(str(src / MODEL_FILE), str(prepared), skip_optimization=True,
                          save_as_external_data=external)
        written = Path(scratch) / "quantized" / MODEL_FILE  # read back and written through the one save path
        written.parent.mkdir()
        quantize_static(prepared, written, Reader(), quant_format=QuantFormat.QDQ,
                        use_external_data_format=external,
                        op_types_to_quantize=["MatMul", "Attention"], per_channel=config.per_channel,
                        reduce_range=config.reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=exclude, calibrate_method=method,
                        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        quantized = onnx.load(str(written))
    pair_safe = make_pair_safe(quantized, src, config)
    histogram = op_histogram(quantized)
    # read before saving: a model saved with external data keeps references, not the weights
    record = int8_target_record(config.cpu_target, saturating_pairs_in(quantized))
    save_model(quantized, out)
    ort_config.write(out, quantized, parent=src, quantizer=ort_config.quantization(
        static=True, per_channel=config.per_channel, reduce_range=config.reduce_range, weight_type="qint8",
        operators=["MatMul", "Attention"], nodes_to_exclude=exclude))
    copy_loader_files(src, out)
    # QDQ: every quantized MatMul's activation goes through a QuantizeLinear
    require_quantized(NAME, histogram, ("QuantizeLinear",),
                      f"int8_static.exclude_presets {list(config.exclude_presets)} and exclude_nodes "
                      f"{list(config.exclude_nodes)}")
    return {"excluded_nodes": exclude, "op_types": histogram,
            "calibration_method": config.calibration_method, "calibration_samples": len(feeds),
            "per_channel": config.per_channel, "reduce_range": config.reduce_range,
            "pair_safe_weights": len(pair_safe),
            **record}
