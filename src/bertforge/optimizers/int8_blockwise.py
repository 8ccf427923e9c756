"""INT8 block-wise stage: every encoder and head MatMul as com.microsoft MatMulNBits, 8 bits, int8 compute.

Why: int8-dynamic quantizes each activation tensor with one scale, and a trained encoder's outlier
channels then swamp the rest (Bondarenko et al. 2021). MatMulNBits with accuracy_level 4 quantizes the
activations per block of `block_size` input channels of each row, and the weights per block too.

The graph it starts from: the export fused by ORT's transformers optimizer with MultiHeadAttention
instead of Attention, so the Q/K/V projections stay separate MatMuls the quantizer can replace
(a fused Attention node's packed QKV weight is not a MatMul). The tied word-embedding table is
stored once as per-row int8 (tied_quant.py): the decoder is an int8 GEMM over it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bertforge.artifact import MODEL_FILE
from bertforge.cpu_target import int8_target_record
from bertforge.onnx_files import copy_loader_files, model_config, save_model
from bertforge.optimizers.config import Int8BlockwiseConfig
from bertforge.optimizers.graph.exclusions import excluded_nodes
from bertforge.optimizers.graph.op_counts import op_histogram, require_quantized
from bertforge.optimizers.graph.ort_fusion import mha_fused
from bertforge.optimizers.int8_weights import saturating_pairs_in
from bertforge.optimizers.tied_quant import share_tied_table_per_presets

NAME = "int8-blockwise"
VERSION = "2"


def run(src: Path, out: Path, config: Int8BlockwiseConfig) -> dict[str, Any]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    hf = model_config(src)
    model, stats = mha_fused(src / MODEL_FILE, hf, NAME)
    exclude = excluded_nodes(model, config.exclude_presets, config.exclude_nodes, "int8_blockwise.exclude_nodes")
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=config.block_size, is_symmetric=config.symmetric,
                                     accuracy_level=config.accuracy_level, op_types_to_quantize=("MatMul",),
                                     nodes_to_exclude=exclude)
    quantizer.process()
    model = quantizer.model.model
    shared = share_tied_table_per_presets(model, config.exclude_presets, config.cpu_target)
    histogram = op_histogram(model)
    require_quantized(NAME, histogram, ("MatMulNBits",),
                      f"int8_blockwise.exclude_presets {list(config.exclude_presets)} and exclude_nodes "
                      f"{list(config.exclude_nodes)}", bool(shared))
    # read before saving: a model saved with external data keeps references, not the weights
    record = int8_target_record(config.cpu_target, saturating_pairs_in(model))
    save_model(model, out)
    copy_loader_files(src, out)
    return {"fused_operators": stats, "excluded_nodes": exclude, "tied_table": shared, "bits": 8,
            "block_size": config.block_size, "symmetric": config.symmetric,
            "accuracy_level": config.accuracy_level, "op_types": histogram,
            **record}
