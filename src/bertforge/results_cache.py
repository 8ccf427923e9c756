"""Cached evaluation results: a variant's validation metrics and latency, keyed like stages.

A warm rebuild that changed one variant's config re-validates and re-times only that variant; the
others' results come from here. Keys: the variant's artifact key (which already chains its whole
lineage and the library versions), the source key, the section of the recipe that shapes the
result, a digest of the code that computes it (RESULT_CODE) and EVALUATION_VERSION; latency keys
(and int8-auto's per-group kernel times) add the CPU and thread count, since they are measurements of this machine;
those and the validation results add the CPU class (cpu_target.cpu_class: the instruction sets that pick the
int8 kernels), so a result measured on one class is never reused on another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bertforge.artifact import write_json_atomic
from bertforge.cache import cache_root, stage_key
from bertforge.environment import cpu_class, cpu_model, physical_cores

EVALUATION_VERSION = "1"


def _path(kind: str, key: str) -> Path:
    return cache_root() / "results" / f"{kind}-{key}.json"


# measurements of this machine: their keys add the CPU and the thread count
MACHINE_KINDS = ("latency", "int8-costs")
# results that depend on the CPU's instruction sets: their keys add its class
CPU_CLASS_KINDS = ("latency", "int8-costs", "validation")


# the code that computes each kind of result: a change to it is a new key, never a stale result
RESULT_CODE = {"reference": "bertforge.validation.validate", "validation": "bertforge.validation.validate",
               "latency": "bertforge.bench"}


def key_for(kind: str, parts: dict[str, Any]) -> str:
    if kind in MACHINE_KINDS:
        parts = {**parts, "cpu": cpu_model(), "threads": physical_cores()}
    if kind in CPU_CLASS_KINDS:
        parts = {**parts, "cpu_class": cpu_class()}
    if kind in RESULT_CODE:
        from bertforge.code_digest import code_digest

        parts = {**parts, "code": code_digest(RESULT_CODE[kind])}
    return stage_key(None, kind, EVALUATION_VERSION, parts)


def load(kind: str, key: str) -> dict[str, Any] | None:
    path = _path(kind, key)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a damaged entry is recomputed, never trusted


def store(kind: str, key: str, data: dict[str, Any]) -> None:
    write_json_atomic(_path(kind, key), data)
