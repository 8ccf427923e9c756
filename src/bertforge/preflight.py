"""Warnings a user would thank us for, given before the long work starts."""

from __future__ import annotations

from bertforge.environment import has_vnni
from bertforge.recipe import Recipe

OPSETS_WITH_FUSION_BUGS = {18: "opset 18 has had LayerNorm fusion and fp16 LayerNorm bugs in ORT (#16341)"}


def warnings_for(recipe: Recipe) -> list[str]:
    found = []
    if "fp16" in recipe.variants:
        found.append("fp16 targets the CPU execution provider here: with fp32 kept around LayerNorm/Softmax it adds "
                     "Casts and is often slower than fp32 on CPUs; the report measures both")
    int8 = [v for v in recipe.variants if v.startswith("int8")]
    reduce_range = recipe.int8_dynamic.reduce_range and recipe.int8_static.reduce_range
    if int8 and not has_vnni() and not reduce_range:
        found.append("this CPU has no VNNI: int8 u8s8 products can saturate (ORT #6004); if int8 agreement is low "
                     "set int8_dynamic.reduce_range / int8_static.reduce_range: true")
    if recipe.export.opset in OPSETS_WITH_FUSION_BUGS:
        found.append(f"export.opset {recipe.export.opset}: {OPSETS_WITH_FUSION_BUGS[recipe.export.opset]}")
    return found
