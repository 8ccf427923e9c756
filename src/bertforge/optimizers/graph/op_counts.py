"""Op counts of a graph, and the check that an "int8" variant quantized something."""

from __future__ import annotations


def require_quantized(variant: str, histogram: dict[str, int], int8_ops: tuple[str, ...], config_keys: str,
                      tied_table_shared: bool = False) -> None:
    """An "int8" variant that is all float32 would pass every gate and mislead whoever ships it: a
    UsageError naming the config keys that left nothing to quantize."""
    if tied_table_shared or any(histogram.get(op) for op in int8_ops):
        return
    from bertforge.errors import UsageError

    raise UsageError(f"{variant} quantized nothing: {config_keys} leave no node to quantize")


def op_histogram(model) -> dict[str, int]:
    from collections import Counter

    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))
