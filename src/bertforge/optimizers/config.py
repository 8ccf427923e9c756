"""The recipe sections of the stages in this folder: fusion, fp16, int8-dynamic, int8-static,
int8-blockwise and the masked head (int8-auto's is in int8_auto/config.py)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StrictInt, field_validator

from bertforge.cpu_target import Target
from bertforge.section import Section


class FusionConfig(Section):
    opt_level: Literal[0, 1, 2, 99] = 0  # 0: the transformers optimizer's fusions only (portable file)
    require_full_fusion: bool = True
    # SkipLayerNormalization as Add + Add(bias) + LayerNormalization: ORT's CPU SkipLayerNorm kernel is
    # scalar; bert-base int8-dynamic b1xs128 31.1 -> 28.1 ms (profiler), same outputs to ~1e-6
    split_skip_layer_norm: bool = True


class Fp16Config(Section):
    keep_io_types: bool = True
    # numerically sensitive ops kept fp32 (ORT #6060, PR #13639)
    # Add: the residual sums, which SkipLayerNormalization computed in fp32 before the fusion stage split it
    op_block_list: tuple[str, ...] = ("SkipLayerNormalization", "LayerNormalization", "EmbedLayerNormalization",
                                      "Softmax", "Pow", "ReduceMean", "Add")
    node_block_list: tuple[str, ...] = ()

    @field_validator("op_block_list")
    @classmethod
    def _known_op_types(cls, ops: tuple[str, ...]) -> tuple[str, ...]:
        """A misspelt op type used to be accepted and silently block nothing."""
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        known = {schema.name for schema in ort_state.get_all_operator_schema()}  # ONNX's and ORT's contrib ops
        unknown = [op for op in ops if op not in known]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not an ONNX or onnxruntime op type")
        return ops

    # The MLM head (transform, gelu, LayerNorm, tied decoder) kept fp32: on demo, converting it cut
    # top-1 agreement from 99.7% to 97.1% (the logits path is where fp16 rounding shows).
    keep_mlm_head_fp32: bool = True


ExcludePreset = Literal["embeddings", "mlm-decoder", "mlm-head", "ffn-output"]


def _a_regular_expression(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
    return pattern


# checked when the recipe is read, not inside the stage after export and fusion have run
NodePattern = Annotated[str, AfterValidator(_a_regular_expression)]


class Int8DynamicConfig(Section):
    # the CPUs whose int8 sums this variant computes exactly (cpu_target.py); set by the recipe's `target`
    cpu_target: Target = "portable"
    weight_type: Literal["qint8", "quint8"] = "qint8"
    per_channel: bool = True
    # 7-bit weights ([-64, 64]): exact on every CPU too, but not needed for it (portable makes the weights
    # pair-safe, int8_weights.make_pair_safe) and it halves every channel's grid
    reduce_range: bool = False
    # ORT's op types to quantize. The word-embedding table is not among them: it is tied to the MLM
    # decoder and stored once as per-row int8 by the stage itself (tied_quant.py).
    op_types: tuple[Literal["MatMul", "Attention"], ...] = ("MatMul", "Attention")
    # The tied decoder is an int8 GEMM by default: on demo (b1xs128) 3.2 ms against 12.9 ms in fp32,
    # top-1 agreement 98.1% vs 98.3% with the encoder kept fp32. "mlm-decoder" keeps its arithmetic fp32;
    # "embeddings" keeps the whole table fp32 (and so the decoder too: +3x the table's int8 size).
    exclude_presets: tuple[ExcludePreset, ...] = ()
    exclude_nodes: tuple[NodePattern, ...] = ()  # regular expressions matched against node names


class Int8StaticConfig(Section):
    cpu_target: Target = "portable"  # as int8_dynamic's
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_samples: StrictInt = Field(64, ge=1, le=4096)
    calibration_corpus: str = "calibration"
    per_channel: bool = True
    reduce_range: bool = False  # as int8_dynamic's
    # ffn-output: the FFN down-projections read GELU outputs with outliers; per-tensor static
    # activation scales ruin them (demo top-1 agreement 39% with them quantized, 65% without).
    exclude_presets: tuple[ExcludePreset, ...] = ("embeddings", "mlm-decoder", "ffn-output")
    exclude_nodes: tuple[NodePattern, ...] = ()


class Int8BlockwiseConfig(Section):
    cpu_target: Target = "portable"  # the tied table's decoder; MatMulNBits is exact at either
    # MatMulNBits, 8 bits. Measured on demo (431 sentences, b1xs128, tied decoder fp32 in this sweep):
    # top-1 agreement 95.2% (block 16), 93.2% (32), 91.1% (64), 89.9% (128); smaller blocks are slower.
    block_size: Literal[16, 32, 64, 128, 256] = 16
    symmetric: bool = True  # asymmetric: +0.5 MB on demo, within noise on agreement
    # 4: int8 compute with activations quantized per block; 0: weight-only, fp32 compute (slower still)
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    exclude_presets: tuple[ExcludePreset, ...] = ()
    exclude_nodes: tuple[NodePattern, ...] = ()


class Int8WeightsConfig(Int8BlockwiseConfig):
    """int8-weights: int8-blockwise's 8-bit MatMulNBits with fp32 compute (accuracy_level 0). No activation
    is quantized inside the encoder, so float noise between runtimes is never amplified into a different
    integer: on demo (431 sentences) onnxruntime-web (wasm) gave native onnxruntime's top-1 at 1404 of
    1405 positions, against 1340 for accuracy_level 4 and 1384 for int8-auto (web_runtime.py measures it);
    top-1 agreement with PyTorch 96.0%. The tied decoder is the tied table's (int8 with dynamic activations)."""

    accuracy_level: Literal[0] = 0


class MaskedHeadConfig(Section):
    mask_token_id: StrictInt | None = Field(None, ge=0)  # None: read [MASK]'s id from tokenizer.json
