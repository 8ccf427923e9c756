"""FP16 stage: float16 weights and compute, fp32 inputs/outputs, sensitive ops kept fp32.

Uses onnxruntime.transformers' float16 conversion (OnnxModel.convert_float_to_float16), which knows
the typed inputs of ORT's fused contrib ops. onnxconverter-common's convert_float_to_float16 does not:
on a fused BERT graph it leaves Attention and EmbedLayerNormalization with mixed fp16/fp32 inputs and
the session refuses to load (seen here with onnxconverter-common 1.16).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from bertforge.artifact import MODEL_FILE
from bertforge.errors import UsageError
from bertforge.onnx_files import copy_loader_files, save_model
from bertforge.optimizers import ort_config
from bertforge.optimizers.config import Fp16Config
from bertforge.optimizers.graph.exclusions import excluded_nodes

NAME = "fp16"
VERSION = "1"


def run(src: Path, out: Path, config: Fp16Config) -> dict[str, Any]:
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src / MODEL_FILE)))
    names = {node.name for node in model.model.graph.node}
    unknown = [name for name in config.node_block_list if name not in names]
    if unknown:  # misspelt, a name blocked nothing
        raise UsageError(f"fp16.node_block_list: no node named {unknown[0]!r} in the graph")
    blocked_nodes = list(config.node_block_list)
    if config.keep_mlm_head_fp32:
        blocked_nodes += excluded_nodes(model.model, ("mlm-head",), ())  # the head, by structure
    model.convert_float_to_float16(keep_io_types=config.keep_io_types, op_block_list=list(config.op_block_list),
                                   node_block_list=blocked_nodes)
    kept = Counter(node.op_type for node in model.model.graph.node
                   if node.op_type in config.op_block_list or node.name in blocked_nodes)
    initializers = Counter(onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name
                           for i in model.model.graph.initializer)
    model.topological_sort()  # the converter appends its Casts at the end; onnx.checker wants graph order
    save_model(model.model, out)
    ort_config.write(out, model.model, parent=src, fp16=True)
    copy_loader_files(src, out)
    return {"ops_kept_fp32": dict(sorted(kept.items())), "nodes_kept_fp32": blocked_nodes,
            "initializer_dtypes": dict(sorted(initializers.items())),
            "keep_io_types": config.keep_io_types}
