"""The registry: every variant bertforge builds and its stage, declared once; all else derives from it.

A declaration names the stage module that builds the variant (its NAME, VERSION, run and optional
key_inputs live there), the variant it is built from, the recipe section that configures it, its
default gate and whether it is an extra (built only when asked for). The recipe's variant names and
default gates, the pipeline's stage table and build order, and the CLI's help all read this tuple.

The stage is named by module path, not imported: the registry is read by every command and stays
light, and a stage module pulls in onnx and onnxruntime's tools.

The default gates were set from measurements on `demo` (docs/gates-and-int8-auto.md):
431 sentences, 1405 masked positions, a fresh clone's `make demo` on an AMD EPYC (VNNI). fp32/fused
max abs 1.4e-4, top-1 100%; fp16 top-1 99.9%; int8-dynamic top-1 73.6%, top-5 overlap 77.3%,
reference top-1 inside its top-5 90.5% (the fast, lossy choice: activations quantized per tensor);
int8-static 69.6%, 73.4%, 90.4%; int8-blockwise (activations per block of 16 channels) 94.2%,
95.4%, 100%; int8-auto (plan for top-1 >= 95% on the calibration split) 96.7%, 96.3%, 100%. The
demo's fitted head has a median top-1/top-2 margin of 0.068 logits, so near-ties flip under int8.
Each int8 gate sits ~4 points under its variant's measurement: a regression fails, the demo passes.
Those were full-range int8 weights (now target vnni). The default target, portable (cpu_target.py),
measured top-1 72.95% (int8-dynamic), 68.04% (int8-static), 94.23% (int8-blockwise), 95.52% (int8-auto)
on the same corpus (AMD EPYC, AVX-512 VNNI; the same numbers on every CPU class): every gate still holds.
int8-weights (int8-blockwise computed in fp32) measured top-1 96.0%, top-5 overlap 96.7%, reference top-1 in
its top-5 100% (same corpus and machine); its gate sits ~4 points under, as the others'.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class VariantSpec:
    name: str
    stage: str  # the stage's module under bertforge/
    parent: str | None  # the variant it is built from; None: the source checkpoint
    section: str  # the recipe section configuring it
    gate: dict[str, float] = field(default_factory=dict)  # default gate (recipe.Gate's keys)
    extra: bool = False  # built only when asked for
    summary: str = ""  # what the variant is, for --help (extras) and each variant's README.md


INT8_DYNAMIC_GATE = {"top1_min": 0.70, "top5_overlap_min": 0.73, "ref_top1_in_top5_min": 0.88}
INT8_AUTO_GATE = {"top1_min": 0.92, "top5_overlap_min": 0.92, "ref_top1_in_top5_min": 0.99}

SPECS: tuple[VariantSpec, ...] = (
    VariantSpec("fp32", "exporter.export", None, "export", {"max_abs_max": 1e-3, "top1_min": 1.0},
                summary="the PyTorch model exported to ONNX by optimum, fp32"),
    VariantSpec("fused", "optimizers.fusion", "fp32", "fusion", {"max_abs_max": 1e-3, "top1_min": 1.0},
                summary="fp32 with ONNX Runtime's transformer fusions (attention, LayerNorm, GELU)"),
    VariantSpec("fp16", "optimizers.fp16", "fused", "fp16", {"top1_min": 0.99},
                summary="the fused graph in fp16, numerically sensitive ops and the MLM head kept fp32"),
    VariantSpec("int8-dynamic", "optimizers.int8_dynamic", "fused", "int8_dynamic", INT8_DYNAMIC_GATE,
                summary="the fast, lossy int8: weights per channel, activations quantized per tensor on each call"),
    VariantSpec("int8-static", "optimizers.int8_static", "fused", "int8_static",
                {"top1_min": 0.65, "top5_overlap_min": 0.69, "ref_top1_in_top5_min": 0.84},
                summary="int8 QDQ with activation scales calibrated once (MinMax)"),
    # from the export: their own fusion keeps Q/K/V as separate MatMuls (MultiHeadAttention)
    VariantSpec("int8-blockwise", "optimizers.int8_blockwise", "fp32", "int8_blockwise",
                {"top1_min": 0.90, "top5_overlap_min": 0.92, "ref_top1_in_top5_min": 0.99},
                summary="every MatMul as 8-bit MatMulNBits: activations and weights quantized per block of channels"),
    # the same stage as int8-blockwise, fp32 compute: the int8 that answers alike on every runtime (the web's too)
    VariantSpec("int8-weights", "optimizers.int8_blockwise", "fp32", "int8_weights",
                {"top1_min": 0.92, "top5_overlap_min": 0.92, "ref_top1_in_top5_min": 0.99},
                summary="8-bit weights per block of 16 (MatMulNBits) computed in fp32: a quarter of fp32's size, "
                        "and the same answers on onnxruntime-web as native"),
    VariantSpec("int8-auto", "optimizers.int8_auto.stage", "fp32", "int8_auto", INT8_AUTO_GATE,
                summary="a scheme per layer group (fp32 or an int8 scheme), the fastest plan meeting an agreement "
                        "target on a calibration split"),
    VariantSpec("int8-dynamic-masked", "optimizers.masked_head", "int8-dynamic", "masked_head", INT8_DYNAMIC_GATE,
                extra=True, summary="MLM head at [MASK] rows only"),
    VariantSpec("int8-auto-masked", "optimizers.masked_head", "int8-auto", "masked_head", INT8_AUTO_GATE,
                extra=True, summary="int8-auto with its MLM head at [MASK] rows only"),
)

BY_NAME = {spec.name: spec for spec in SPECS}
VARIANTS = tuple(spec.name for spec in SPECS if not spec.extra)  # built by default
EXTRA_VARIANTS = tuple(spec.name for spec in SPECS if spec.extra)
