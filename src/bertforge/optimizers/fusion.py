"""Fusion stage: onnxruntime's transformers optimizer (model_type bert).

Records the fused-operator counts and fails when the graph is not fully fused for this model:
one Attention per layer, one EmbedLayerNormalization, two SkipLayerNormalization per layer and a
fused Gelu per layer. (ORT's own is_fully_optimized() expects as many Gelus as attentions and so
rejects a masked-LM, whose prediction head adds one more Gelu.)

Then, with `split_skip_layer_norm` (the default), each SkipLayerNormalization is written back as
Add + Add + LayerNormalization, which ORT runs 3x faster on CPU (common.split_skip_layer_norms).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bertforge.artifact import MODEL_FILE
from bertforge.errors import StageError
from bertforge.onnx_files import copy_loader_files, model_config, save_model
from bertforge.optimizers import ort_config
from bertforge.optimizers.config import FusionConfig
from bertforge.optimizers.graph.ort_fusion import ort_fuse, split_skip_layer_norms

NAME = "fusion"
VERSION = "1"


def expected_counts(num_layers: int) -> dict[str, int]:
    return {"Attention": num_layers, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 2 * num_layers,
            "Gelu": num_layers}


def missing_fusions(stats: dict[str, int], num_layers: int) -> list[str]:
    found = dict(stats)
    found["Attention"] = found.get("Attention", 0) + found.get("MultiHeadAttention", 0)
    found["Gelu"] = sum(found.get(op, 0) for op in ("Gelu", "BiasGelu", "FastGelu", "GemmFastGelu"))
    problems = []
    for op, want in expected_counts(num_layers).items():
        have = found.get(op, 0)
        if have < want:
            problems.append(f"{op} {have}/{want}")
    return problems


def run(src: Path, out: Path, config: FusionConfig) -> dict[str, Any]:
    hf = model_config(src)
    model, stats = ort_fuse(src / MODEL_FILE, hf, opt_level=config.opt_level)
    problems = missing_fusions(stats, hf.num_hidden_layers)
    if problems and config.require_full_fusion:
        raise StageError("fusion incomplete: " + ", ".join(problems) + " (was the model exported with SDPA "
                         "attention? set fusion.require_full_fusion: false to accept a partial fusion)")
    split = split_skip_layer_norms(model) if config.split_skip_layer_norm else 0
    save_model(model, out)
    ort_config.write(out, model, optimization=ort_config.fusion(config.opt_level))
    copy_loader_files(src, out)
    return {"fused_operators": stats, "fully_fused": not problems, "missing_fusions": problems,
            "opt_level": config.opt_level, "skip_layer_norms_split": split}
