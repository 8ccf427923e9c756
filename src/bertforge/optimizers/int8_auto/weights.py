"""Each MatMul's quantized weights under each scheme, computed once and reused by every plan: the
search assembles many plans, and re-running ORT's quantizers for each would cost a full quantization
pass per plan."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from bertforge.optimizers.int8_auto.groups import (
    OUTLIER_CHANNELS,
    SMOOTH_ALPHA,
)
from bertforge.optimizers.int8_auto.weight_file import WeightFile
from bertforge.optimizers.int8_weights import symmetric_int8


@dataclass
class QuantizedWeights:
    """Per MatMul and scheme, the initializers its quantized node needs, computed once.

    activation_absmax: {tensor: max |x| per channel on the calibration split}, for int8-smooth;
    alphas: {group: its SmoothQuant alpha} where it is not `alpha` (the sensitivity table picks them);
    outlier_channels: how many input channels int8-outlier keeps fp32."""

    block_size: int = 16
    activation_absmax: dict[str, np.ndarray] = field(default_factory=dict)
    alpha: float = SMOOTH_ALPHA
    # (weight, scheme, what else its initializers depend on: int8-smooth's alpha, int8-outlier's channels)
    cache: dict[tuple[str, str, float | tuple[int, ...] | None], list[onnx.TensorProto]] = field(
        default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    outlier_channels: int = OUTLIER_CHANNELS
    # an int8 tied table: the embeddings read an fp16 copy (tied_quant.share_tied_table), or the int8 one
    fp16_embeddings: bool = False
    # where the graph apply_plan is given holds references into a weight file (WeightFile.referencing:
    # the search's plans, which then copy no large weights), that file: base weights are read from it,
    # and a derived initializer it already holds (the fp32 packed Q/K/V) is referenced, not rebuilt
    weight_file: WeightFile | None = None
    # the int8 target (cpu_target.py): how int8_weights.symmetric_int8 bounds every int8-dynamic-family weight
    target: str = "portable"
    # the tied table's per-row int8 and scales by int8-smooth alpha (None: unsmoothed), from tied_rows
    tied_cache: dict[float | None, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def alpha_of(self, group: str) -> float:
        return self.alphas.get(group, self.alpha)

    def read(self, init: onnx.TensorProto) -> np.ndarray:
        """An initializer's values, from the weight file where `init` is one of its references."""
        return numpy_helper.to_array(init) if self.weight_file is None else self.weight_file.array(init)

    def stored(self, name: str) -> onnx.TensorProto | None:
        """The weight file's reference for a derived initializer of that name, if it holds one."""
        return None if self.weight_file is None else self.weight_file.references.get(name)

    def smoothing(self, tensor: str, weights: list[np.ndarray], alpha: float) -> np.ndarray:
        """SmoothQuant's s [in channels] for `tensor`, read by `weights` ([in, out] each)."""
        if tensor not in self.activation_absmax:
            raise ValueError(f"int8-smooth needs the calibration absmax of {tensor}")
        x_max = np.maximum(self.activation_absmax[tensor].astype(np.float64), 1e-5)
        w_max = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64), 1e-5)
        return (x_max ** alpha / w_max ** (1 - alpha)).astype(np.float32)

    def dynamic(self, weight: onnx.TensorProto, smooth: np.ndarray | None = None,
                alpha: float | None = None) -> list[onnx.TensorProto]:
        """`smooth`: int8-smooth's factors, computed with `alpha` (part of the cache key)."""
        key = (weight.name, "int8-dynamic", None) if smooth is None else (weight.name, "int8-smooth", alpha)
        if key not in self.cache:
            array = self.read(weight)
            if smooth is not None:
                array = array * smooth[:, None]
            q, scale = symmetric_int8(array, axis=1, target=self.target)  # one scale per output column
            suffix = "_s8" if smooth is None else "_sq8"
            self.cache[key] = [numpy_helper.from_array(q, f"{weight.name}{suffix}"),
                               numpy_helper.from_array(scale, f"{weight.name}{suffix}_scale"),
                               numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8),
                                                       f"{weight.name}{suffix}_zp")]
        return self.cache[key]

    def tied_rows(self, table: np.ndarray, alpha: float | None) -> tuple[np.ndarray, np.ndarray]:
        """The tied table's per-row int8 and scales (tied_quant.share_tied_table's), `table` smoothed with
        `alpha` or not (None), computed once: every plan with an int8 tied group needs them, and the
        pair-safe quantization of bert-base's 30,522 x 768 table took 0.66 s a plan."""
        if alpha not in self.tied_cache:
            self.tied_cache[alpha] = symmetric_int8(table, axis=0, target=self.target)
        return self.tied_cache[alpha]

    def outliers(self, tensor: str) -> np.ndarray:
        """The input channels int8-outlier keeps fp32: those of largest max|x|, ascending."""
        if tensor not in self.activation_absmax:
            raise ValueError(f"int8-outlier needs the calibration absmax of {tensor}")
        absmax = self.activation_absmax[tensor]
        return np.sort(np.argsort(-absmax, kind="stable")[: self.outlier_channels]).astype(np.int64)

    def split_outliers(self, weight: onnx.TensorProto, channels: np.ndarray) -> list[onnx.TensorProto]:
        """[W's outlier rows (fp32), then int8-dynamic's three initializers of W with those rows zeroed]."""
        key = (weight.name, "int8-outlier", tuple(channels.tolist()))
        if key not in self.cache:
            array = self.read(weight)
            main = array.copy()
            main[channels] = 0.0
            q, scale = symmetric_int8(main, axis=1, target=self.target)
            self.cache[key] = [numpy_helper.from_array(np.ascontiguousarray(array[channels]), f"{weight.name}_o32"),
                               numpy_helper.from_array(q, f"{weight.name}_o8"),
                               numpy_helper.from_array(scale, f"{weight.name}_o8_scale"),
                               numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{weight.name}_o8_zp")]
        return self.cache[key]

    def blockwise(self, weight: onnx.TensorProto) -> list[onnx.TensorProto]:
        key = (weight.name, "int8-blockwise", None)
        if key not in self.cache:
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                DefaultWeightOnlyQuantizer,
            )

            quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
                block_size=self.block_size, is_symmetric=True, accuracy_level=4, bits=8))
            packed, scales, _ = quantizer.qbits_block_quant(self.read(weight).astype(np.float32))
            self.cache[key] = [numpy_helper.from_array(packed, f"{weight.name}_q8_blocks"),
                               numpy_helper.from_array(scales.astype(np.float32), f"{weight.name}_q8_block_scales")]
        return self.cache[key]
