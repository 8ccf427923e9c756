"""`bertforge sensitivity`: the full table of an fp32 export, every group alone under every scheme, with
its costs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bertforge.bench import InputSpec
from bertforge.optimizers.int8_auto.calibration import (
    calibration_split,
)
from bertforge.optimizers.int8_auto.config import Int8AutoConfig
from bertforge.optimizers.int8_auto.costs import scheme_costs
from bertforge.optimizers.int8_auto.groups import (
    quant_groups,
)
from bertforge.optimizers.int8_auto.sensitivity import (
    fp32_values,
    sensitivity_table,
)
from bertforge.optimizers.int8_auto.weight_file import WeightFile
from bertforge.optimizers.int8_auto.weights import QuantizedWeights


def analyze(export_dir: Path, config: Int8AutoConfig | None = None,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The full table for an fp32 export directory: every group alone under every scheme, with costs,
    on the calibration corpus and block size of int8-auto's section `config` (int8-smooth at each of its
    smooth alphas, keeping the lowest KL)."""
    from bertforge.artifact import MODEL_FILE, owned_scratch
    from bertforge.cache import cache_root
    from bertforge.onnx_files import model_config
    from bertforge.optimizers.graph.ort_fusion import mha_fused

    config = config or Int8AutoConfig()
    alphas, block_size, corpus = config.smooth_alphas, config.block_size, config.calibration_corpus
    hf = model_config(export_dir)
    model, _ = mha_fused(export_dir / MODEL_FILE, hf, "sensitivity")
    groups = quant_groups(model)
    split = calibration_split(export_dir, corpus)
    with owned_scratch(cache_root() / "tmp", "sensitivity-") as scratch:
        weight_file = WeightFile.write(model, scratch / "weights")
        fp32 = fp32_values(model, groups, split, scratch, weight_file)
        reference = fp32.reference
        # the quantization int8-auto builds for this section: its outlier channels, tied table and target
        weights = QuantizedWeights(block_size=block_size, alpha=alphas[-1], activation_absmax=fp32.absmax,
                                   outlier_channels=config.outlier_channels,
                                   fp16_embeddings=config.embedding_table == "fp16", weight_file=weight_file,
                                   target=config.cpu_target)
        costs = scheme_costs(model, groups, weights, InputSpec.of(export_dir), weight_file=weight_file)
        table = sensitivity_table(weight_file.referencing(model), groups, weights, split, reference,
                                  progress=progress, smooth_alphas=alphas, prefix=fp32.prefix, weight_file=weight_file)
    return {"calibration_corpus": corpus, "calibration_positions": split.positions, "block_size": block_size,
            "smooth_alphas": list(alphas), "groups": table, "costs_ms": costs}
