"""The nodes a quantizer leaves out: the recipe's presets and patterns over the exporter's node names,
and the MLM head's nodes."""

from __future__ import annotations

from pathlib import Path

# Node-name patterns (from the exporter's module paths) behind each exclusion preset.
EXCLUDE_PRESET_PATTERNS = {
    # The embeddings' Gathers are not MatMuls anyway; this also keeps a fused EmbedLayerNormalization out.
    "embeddings": (r"^/bert/embeddings/", r"^EmbedLayerNormalization"),
    # The tied decoder: its weight is the word-embedding table, transposed at run time.
    "mlm-decoder": (r"^/cls/predictions/decoder/",),
    # The whole prediction head: transform dense + decoder.
    "mlm-head": (r"^/cls/predictions/",),
    # Each layer's FFN down-projection (not attention/output/dense).
    "ffn-output": (r"/layer\.\d+/output/dense/",),
}


def node_names(model_path: Path) -> list[str]:
    import onnx

    return [node.name for node in onnx.load(str(model_path), load_external_data=False).graph.node]


def excluded_nodes(names: list[str], presets: tuple[str, ...], patterns: tuple[str, ...]) -> list[str]:
    """The node names matched by the presets' and the user's regular expressions."""
    import re

    compiled = [re.compile(p) for preset in presets for p in EXCLUDE_PRESET_PATTERNS[preset]]
    compiled += [re.compile(p) for p in patterns]
    return [name for name in names if any(p.search(name) for p in compiled)]


def mlm_head_nodes(model) -> list[str]:
    """Nodes of the prediction head, by name or (for fused nodes named by ORT) by output name."""
    return [node.name for node in model.graph.node
            if node.name.startswith("/cls/") or any(o.startswith("/cls/") for o in node.output)]
