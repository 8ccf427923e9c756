"""The base of every recipe section: frozen, no unknown keys, no infinite or NaN floats."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # counts are StrictInt: in pydantic's lax mode YAML's `true` is read as 1; no float may be .inf or .nan
    # (a gate of .inf was accepted and wrote Infinity into report.json, which strict JSON parsers reject)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
