"""The typed recipe: what to build, loaded from YAML with one-line errors.

Each stage reads only its own frozen section; the pipeline hashes that section into the stage's
cache key. Defaults are data, here, and documented in the README.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from bertforge.cpu_target import Target
from bertforge.errors import UsageError
from bertforge.stages import SPECS, VARIANTS

# every variant name and default gate comes from the one declaration in stages.py
VariantName = Literal[tuple(spec.name for spec in SPECS)]  # type: ignore[valid-type]


class Section(BaseModel):
    # counts are StrictInt: in pydantic's lax mode YAML's `true` is read as 1; no float may be .inf or .nan
    # (a gate of .inf was accepted and wrote Infinity into report.json, which strict JSON parsers reject)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ExportConfig(Section):
    # 17: the first opset with a native LayerNormalization; ORT's BERT fusion is fully exercised on it
    # and it avoids opset 18's reworked Reduce* ops where LayerNorm fusion regressed (ORT #16341).
    opset: StrictInt = Field(17, ge=14, le=21)


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
    # 7-bit weights; cpu_target portable implies them, so this only matters with cpu_target vnni
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


class AgreementTarget(Section):
    top1_min: float = Field(0.95, ge=0, le=1)
    ref_top1_in_top5_min: float | None = Field(0.995, ge=0, le=1)
    kl_mean_max: float | None = Field(None, ge=0)


class Int8AutoConfig(Section):
    cpu_target: Target = "portable"  # as int8_dynamic's, for every int8 scheme of the plan and the tied table
    # Agreement with the fp32 graph at the [MASK] positions of the calibration split (not the validation
    # corpus); the validation gates then judge the chosen plan on the validation corpus.
    target: AgreementTarget = AgreementTarget()
    # Fail (one line, with the best agreement reached within it) when the plan that meets the target is
    # slower than this fraction of the fp32 graph's latency (b1 x s128, ORT profiler).
    max_latency_ratio: float | None = Field(None, gt=0)
    # int8-smooth was opt-in while the calibration split was the demo head's fit sentences (its plan met
    # the target there and kept 93.7% on the validation corpus). On sentences the head never saw, demo's
    # plan with it: 95.2% on the calibration split, 96.7% on the validation corpus, at 0.65x fused.
    # int8-outlier is opt-in: alone it cuts the KL of demo's FFN down-projections 2-20x, but demo's plan
    # that meets 95% keeps those fp32 anyway (its head's margins leave room for ~5 int8 groups), so it
    # only made the search 40% longer there (same plan).
    # int8-token is opt-in too: alone it lifts demo's FFN down-projections by 4-10 points of top-1 over
    # int8-dynamic, and the whole encoder in it keeps 83% against 72%; but the 95% plan it finds is as
    # fast (predicted 0.701x the fp32 graph, against 0.698x without it, from the same measured costs),
    # and the search takes 1.5x as long (112 s against 74 s)
    schemes: tuple[Literal["int8-dynamic", "int8-smooth", "int8-token", "int8-outlier", "int8-blockwise"], ...] = (
        "int8-dynamic", "int8-smooth", "int8-blockwise")
    # int8-outlier: how many input channels (those of largest max|x| on the calibration split) stay fp32
    outlier_channels: StrictInt = Field(8, ge=1, le=64)
    block_size: Literal[16, 32, 64, 128, 256] = 16  # for int8-blockwise groups
    # SmoothQuant's migration strengths tried for each int8-smooth group, which keeps the one of lowest
    # KL: 0 leaves x as it is, 1 moves all of its per-channel range into the weights. Each value costs
    # one more evaluation per group. On demo, [0.5, 0.65, 0.8] took the search from 103 s to 195 s for
    # a plan at 0.627x fused instead of 0.644x (validation top-1 96.4% and 96.7%): not the default.
    smooth_alphas: tuple[Annotated[float, Field(ge=0, le=1)], ...] = Field((0.8,), min_length=1)
    calibration_corpus: str = "calibration"
    # The sensitivity table (each group alone) is measured on every n-th calibration batch (batches
    # sorted by length, so each share spans all lengths); the bisection and the chosen plan's agreement
    # use every batch. The table is most of the search (about 100 evaluations on bert-base, each over
    # the batches), and it only orders the moves: on demo the even and the odd half of the batches gave
    # the plan all batches give (same 6 groups int8); on synthetic:bert-base-uncased 27 and 28 int8
    # groups against 28. Every 4th batch moved demo's plan by a group and bert-base's from 28 to 23 or 31.
    sensitivity_stride: StrictInt = Field(2, ge=1, le=8)
    # Where int8-dynamic and int8-smooth are both schemes, the table measures for each group only the one
    # its output error on its own fp32 inputs favours (optimizers/int8_auto/screen.py; both where they are within 10-20%
    # of each other): one run of the fp32 graph instead of one table evaluation per group. Off: both;
    # off too with several smooth_alphas (the screen knows the last alpha only, the table picks one).
    screen_schemes: bool = True
    # Where the tied table's decoder is int8, what the embeddings read: `int8`, the decoder's per-row
    # int8 table, stored once, or `fp16`, their own fp16 copy (+2 bytes per weight: +23 MB on demo, +47 MB
    # on bert-base). On demo the tied table alone keeps 96.6% top-1 with int8 embeddings, 98.7% with
    # fp16 ones (calibration split), but the plan for a 95% target was the same (same speed) and
    # validated at 97.3% instead of 96.7%: accuracy for size, so opt-in.
    embedding_table: Literal["int8", "fp16"] = "int8"


class MaskedHeadConfig(Section):
    mask_token_id: StrictInt | None = Field(None, ge=0)  # None: read [MASK]'s id from tokenizer.json


class Gate(Section):
    max_abs_max: float | None = Field(None, ge=0)
    top1_min: float | None = Field(None, ge=0, le=1)
    top5_overlap_min: float | None = Field(None, ge=0, le=1)
    ref_top1_in_top5_min: float | None = Field(None, ge=0, le=1)
    kl_mean_max: float | None = Field(None, ge=0)


def default_gates() -> dict[str, Gate]:
    """Each variant's declared gate (stages.py says how they were set)."""
    return {spec.name: Gate(**spec.gate) for spec in SPECS}


class ValidationConfig(Section):
    corpus: str = "builtin"  # or a path to a UTF-8 text file, one sentence a line
    seed: StrictInt = 0
    mask_fraction: float = Field(0.15, gt=0, le=1)
    max_sentences: StrictInt | None = Field(None, ge=1)
    batch_size: StrictInt = Field(16, ge=1, le=256)
    # sentences with [MASK] whose top-5 the report shows for every variant beside PyTorch's, after the
    # model card's three ("The capital of France is [MASK].", "The man/woman worked as a [MASK].")
    probes: tuple[str, ...] = ()
    gates: dict[VariantName, Gate] = Field(
        default_factory=default_gates)

    @field_validator("gates", mode="before")
    @classmethod
    def _over_the_defaults(cls, given: Any) -> Any:
        """A recipe's gates are merged over the defaults per variant and per key: setting fp16's top1_min
        keeps every other variant's gates and fp16's other keys; `key: null` switches one key off."""
        if not isinstance(given, dict):
            return given  # pydantic reports the type error
        merged: dict[str, Any] = {name: gate.model_dump() for name, gate in default_gates().items()}
        for variant, gate in given.items():
            fields = gate.model_dump(exclude_unset=True) if isinstance(gate, Gate) else gate
            if not isinstance(fields, dict):
                merged[variant] = fields  # pydantic reports the type error, naming the variant
                continue
            merged[variant] = {**merged.get(variant, {}), **fields}
        return merged


class BenchConfig(Section):
    enabled: bool = True
    repeats: StrictInt = Field(20, ge=3)
    warmup: StrictInt = Field(3, ge=0)
    sequence_length: StrictInt = Field(128, ge=8, le=512)


INT8_SECTIONS = ("int8_dynamic", "int8_static", "int8_blockwise", "int8_auto")


class Recipe(Section):
    model: str = "bert-base-uncased"
    variants: tuple[VariantName, ...] = VARIANTS
    # Where the int8 variants compute the integers they were validated with (cpu_target.py): `portable`,
    # every CPU (s8 weights in [-64, 64]); `vnni`, full-range s8 weights, exact only on VNNI, AMX and ARM64
    # (elsewhere they saturate and warn). Sets each int8 section's cpu_target that the recipe leaves unset.
    target: Target = "portable"
    export: ExportConfig = ExportConfig()
    fusion: FusionConfig = FusionConfig()
    fp16: Fp16Config = Fp16Config()
    int8_dynamic: Int8DynamicConfig = Int8DynamicConfig()
    int8_static: Int8StaticConfig = Int8StaticConfig()
    int8_blockwise: Int8BlockwiseConfig = Int8BlockwiseConfig()
    int8_auto: Int8AutoConfig = Int8AutoConfig()
    masked_head: MaskedHeadConfig = MaskedHeadConfig()
    validation: ValidationConfig = ValidationConfig()
    bench: BenchConfig = BenchConfig()

    @model_validator(mode="before")
    @classmethod
    def _target_into_int8_sections(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "target" not in data:
            return data
        data = dict(data)
        for section in INT8_SECTIONS:
            given = data.get(section)
            if given is None:
                data[section] = {"cpu_target": data["target"]}
            elif isinstance(given, dict) and "cpu_target" not in given:
                data[section] = {**given, "cpu_target": data["target"]}
        return data

    @field_validator("variants")
    @classmethod
    def _some_variants_each_once(cls, variants: tuple[str, ...]) -> tuple[str, ...]:
        if not variants:
            raise ValueError("names no variant: list at least one (e.g. [fused, int8-auto])")
        repeated = sorted({v for v in variants if variants.count(v) > 1})
        if repeated:
            raise ValueError(f"names {', '.join(repeated)} more than once")
        return variants


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "literal_error":
        message = f"not allowed; {message[0].lower()}{message[1:]}"
    return f"'{key}': {message}"


def parse_recipe(data: dict[str, Any], origin: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise UsageError(f"{origin}: {_describe(first)}{more}") from exc


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Recipe:
    data: dict[str, Any] = {}
    origin = "command line"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise UsageError(f"recipe {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text("utf-8"))
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        if loaded is not None and not isinstance(loaded, dict):
            kind = type(loaded).__name__
            raise UsageError(f"{path}: a recipe is a mapping of keys (model, variants, ...), got {kind}")
        data = loaded or {}
    return parse_recipe(merged(data, {k: v for k, v in (overrides or {}).items() if v is not None}), origin)


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid on `base` key by key, mappings merged all the way down (one field given for a section
    keeps the section's other fields), anything else replaced."""
    result = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result
