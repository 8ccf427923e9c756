"""Warnings a user would thank us for, given before the long work starts."""

from __future__ import annotations

from bertforge.cpu_target import exact_here
from bertforge.environment import cpu_class
from bertforge.recipe import Recipe
from bertforge.stages import BY_NAME

# opset 18 reworked the Reduce* ops (axes an input, not an attribute); every opset from it on keeps them
FIRST_OPSET_WITH_FUSION_BUGS = 18


def warnings_for(recipe: Recipe) -> list[str]:
    found = []
    if "fp16" in recipe.variants:
        found.append("fp16 targets the CPU execution provider here: with fp32 kept around LayerNorm/Softmax it adds "
                     "Casts and is often slower than fp32 on CPUs; the report measures both")
    vnni_int8 = [v for v in recipe.variants if v.startswith("int8") and int8_target(recipe, v) == "vnni"]
    if vnni_int8 and not exact_here("vnni"):
        found.append(f"{', '.join(vnni_int8)}: int8 target vnni on a CPU without VNNI/AMX ({cpu_class()}): their "
                     "u8 x s8 sums saturate here, so this build validates numbers a VNNI CPU will not compute; "
                     "target: portable is exact on every CPU")
    if recipe.export.opset >= FIRST_OPSET_WITH_FUSION_BUGS:
        found.append(f"export.opset {recipe.export.opset}: from opset 18 the Reduce* ops take their axes as an "
                     "input, and ORT's LayerNorm fusion and fp16 LayerNorm have had bugs there (ORT #16341); "
                     "17 is the tested default")
    return found


def int8_target(recipe: Recipe, variant: str) -> str:
    """The int8 target a variant computes with: its own section's, or, for a masked head (whose section
    has none), the target of the variant it is built from."""
    while variant is not None:
        target = getattr(getattr(recipe, BY_NAME[variant].section), "cpu_target", None)
        if target is not None:
            return target
        variant = BY_NAME[variant].parent
    return recipe.target
