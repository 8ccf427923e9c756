"""The typed recipe: what to build, loaded from YAML with one-line errors.

The recipe composes one frozen section per stage, each declared beside its stage (exporter/config.py,
optimizers/config.py, optimizers/int8_auto/config.py, validation/config.py); each stage reads only
its own, and the pipeline hashes it into the stage's cache key. The full reference: docs/recipes.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from bertforge.cpu_target import Target
from bertforge.errors import UsageError
from bertforge.exporter.config import ExportConfig
from bertforge.optimizers.config import (
    Fp16Config,
    FusionConfig,
    Int8BlockwiseConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    Int8WeightsConfig,
    MaskedHeadConfig,
)
from bertforge.optimizers.int8_auto.config import Int8AutoConfig
from bertforge.section import Section
from bertforge.stages import VARIANTS
from bertforge.validation.config import ValidationConfig, VariantName


class BenchConfig(Section):
    enabled: bool = True
    repeats: StrictInt = Field(20, ge=3)
    warmup: StrictInt = Field(3, ge=0)
    sequence_length: StrictInt = Field(128, ge=8, le=512)


INT8_SECTIONS = ("int8_dynamic", "int8_static", "int8_blockwise", "int8_weights", "int8_auto")


class Recipe(Section):
    model: str = "bert-base-uncased"
    variants: tuple[VariantName, ...] = VARIANTS
    # Where the int8 variants compute the integers they were validated with (cpu_target.py): `portable`,
    # every CPU (s8 weights whose same-sign K-adjacent pairs sum to at most 128); `vnni`, full-range s8
    # weights, exact only on VNNI, AMX and ARM64 (elsewhere they saturate and warn). Sets each int8
    # section's cpu_target that the recipe leaves unset.
    target: Target = "portable"
    export: ExportConfig = ExportConfig()
    fusion: FusionConfig = FusionConfig()
    fp16: Fp16Config = Fp16Config()
    int8_dynamic: Int8DynamicConfig = Int8DynamicConfig()
    int8_static: Int8StaticConfig = Int8StaticConfig()
    int8_blockwise: Int8BlockwiseConfig = Int8BlockwiseConfig()
    int8_weights: Int8WeightsConfig = Int8WeightsConfig()
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


def overridden(recipe: Recipe, given: dict[str, Any]) -> Recipe:
    """`recipe` with the fields in `given` laid on it (merged), as a YAML file's keys under its overrides.
    Each int8 section's cpu_target that holds the recipe's `target` came from it (or said the same): a new
    `target` in `given` replaces it, as it would have in the YAML."""
    base = recipe.model_dump(mode="json", exclude_unset=True)
    if "target" in given:
        for section in INT8_SECTIONS:
            if isinstance(base.get(section), dict) and base[section].get("cpu_target") == recipe.target:
                base[section] = {k: v for k, v in base[section].items() if k != "cpu_target"}
    return parse_recipe(merged(base, given))


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
