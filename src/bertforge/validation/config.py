"""The validation section of the recipe: corpus, masking, probes, and each variant's gates."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, StrictInt, field_validator

from bertforge.section import Section
from bertforge.stages import SPECS

# every variant name and default gate comes from the one declaration in stages.py
VariantName = Literal[tuple(spec.name for spec in SPECS)]  # type: ignore[valid-type]


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
    seed: StrictInt = Field(0, ge=0)  # numpy's generators take no negative seed
    mask_fraction: float = Field(0.15, gt=0, le=1)
    max_sentences: StrictInt | None = Field(None, ge=1)
    batch_size: StrictInt = Field(16, ge=1, le=256)
    # batches per validation shard: the reference's logits of one shard are held at a time (bert-base's
    # vocabulary: ~120 kB a [MASK] position, ~0.3 GB for 64 batches of 16); the metrics do not change
    shard_batches: StrictInt = Field(64, ge=1)
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
