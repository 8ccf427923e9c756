"""Olive's default BERT workflow for CPU INT8, run in its own environment (.venv-olive, `make bench`).

OnnxConversion -> OrtTransformersOptimization -> OnnxDynamicQuantization, each pass with Olive's
defaults, on a local Hugging Face checkpoint; prints one JSON line last: the resulting model's path and
the versions of the libraries that made it. Kept out of the project's environment: olive-ai pins its
own dependency ranges.

    .venv-olive/bin/python benchmarks/olive_int8.py CHECKPOINT_DIR OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path


def main(argv: list[str]) -> int:
    checkpoint, out = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    from olive.workflows import run as olive_run

    config = {
        "input_model": {"type": "HfModel", "model_path": str(checkpoint), "task": "fill-mask"},
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": {
            "conversion": {"type": "OnnxConversion"},
            "transformers_optimization": {"type": "OrtTransformersOptimization", "model_type": "bert"},
            "quantization": {"type": "OnnxDynamicQuantization"},
        },
        "host": "local_system",
        "target": "local_system",
        "evaluate_input_model": False,
        "cache_dir": str(out / "cache"),
        "output_dir": str(out / "output"),
        "log_severity_level": 3,
    }
    olive_run(config)
    models = sorted((out / "output").rglob("*.onnx"))
    if not models:
        print(f"Olive wrote no .onnx under {out / 'output'}", file=sys.stderr)
        return 1
    versions = {name: metadata.version(name) for name in ("olive-ai", "onnxruntime", "onnx", "torch", "transformers")}
    print(json.dumps({"model": str(models[0]), "versions": versions}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
