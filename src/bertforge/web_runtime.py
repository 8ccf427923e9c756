"""Does a variant answer the same on onnxruntime-web (wasm) as on native onnxruntime?

`bertforge validate DIR --runtime web` runs every variant on the validation corpus twice, one sentence at a
time: with native onnxruntime here, and with onnxruntime-web's wasm backend in Node (web/top1.mjs), and
counts the [MASK] positions where both give the same top-1 token. That is the agreement a browser user
gets with the numbers the report measured natively. onnxruntime-web is installed with npm on first use
into the cache's node/ folder (its version: ONNXRUNTIME_WEB_VERSION below, or $BERTFORGE_ONNXRUNTIME_WEB);
ONNXRUNTIME_NODE_INSTALL=skip keeps onnxruntime-node's install script from downloading anything.
$BERTFORGE_ONNXRUNTIME_WEB_DIR names a folder of your own where `import "onnxruntime-web"` resolves instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from bertforge.cache_dir import cache_root
from bertforge.errors import UsageError

ONNXRUNTIME_WEB_VERSION = "1.31.1"
SCRIPT = "top1.mjs"


def node_dir(version: str | None = None) -> Path:
    """A folder where `import "onnxruntime-web"` resolves, installed with npm when absent."""
    own = os.environ.get("BERTFORGE_ONNXRUNTIME_WEB_DIR")
    if own:
        if not (Path(own) / "node_modules" / "onnxruntime-web" / "package.json").is_file():
            raise UsageError(f"BERTFORGE_ONNXRUNTIME_WEB_DIR={own}: no node_modules/onnxruntime-web there")
        return Path(own)
    version = version or os.environ.get("BERTFORGE_ONNXRUNTIME_WEB") or ONNXRUNTIME_WEB_VERSION
    target = cache_root() / "node" / f"onnxruntime-web-{version}"
    if (target / "node_modules" / "onnxruntime-web" / "package.json").is_file():
        return target
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise UsageError(f"--runtime web needs Node.js and npm ({tool} is not on PATH)")
    target.mkdir(parents=True, exist_ok=True)
    (target / "package.json").write_text('{"private": true, "type": "module"}\n')
    run = subprocess.run(["npm", "install", "--no-audit", "--no-fund", f"onnxruntime-web@{version}"], cwd=target,
                         env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}, capture_output=True, text=True)
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["no message"])[-1]
        raise UsageError(f"npm could not install onnxruntime-web@{version} into {target}: {tail}")
    return target


def native_top1(model: Path, examples: list[dict[str, Any]]) -> list[int]:
    from bertforge.runtime import feeds_for, open_session

    session = open_session(model)
    top = []
    for example in examples:
        ids = np.asarray([example["ids"]], dtype=np.int64)
        feeds = feeds_for(session, ids, np.ones_like(ids), np.zeros_like(ids))
        logits = session.run(["logits"], feeds)[0][0]
        top.extend(int(np.argmax(logits[position])) for position in example["pos"])
    return top


def web_top1(models: list[Path], examples: list[dict[str, Any]], version: str | None = None) -> dict[str, Any]:
    directory = node_dir(version)
    (cache_root() / "tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root() / "tmp") as work:
        # the script runs from this scratch folder, never written into the node folder (it may be yours):
        # `import "onnxruntime-web"` resolves through a node_modules link to that folder's
        shutil.copyfile(Path(str(resources.files("bertforge.web").joinpath(SCRIPT))), Path(work) / SCRIPT)
        (Path(work) / "node_modules").symlink_to((directory / "node_modules").resolve(), target_is_directory=True)
        inputs, output = Path(work) / "inputs.json", Path(work) / "top1.json"
        inputs.write_text(json.dumps(examples))
        run = subprocess.run(["node", SCRIPT, str(inputs), str(output), *(str(m) for m in models)], cwd=work,
                             capture_output=True, text=True)
        if run.returncode != 0:
            tail = (run.stderr.strip().splitlines() or ["no message"])[-1]
            raise UsageError(f"onnxruntime-web could not run the variants: {tail}")
        return json.loads(output.read_text())


def web_agreement(checkpoint: Path, variants: dict[str, Path], config: Any,
                  version: str | None = None) -> dict[str, dict[str, Any]]:
    """Per variant: the share of the validation corpus's [MASK] positions where wasm's top-1 equals native
    onnxruntime's, their count, and the runtime that measured it."""
    from transformers import AutoTokenizer

    from bertforge.validation.corpus import validation_examples

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    masked = validation_examples(Path(checkpoint), tokenizer, config)
    examples = [{"ids": list(e.input_ids), "pos": list(e.masked_positions)} for e in masked]
    models = {name: Path(path) / "model.onnx" for name, path in variants.items()}
    web = web_top1(list(models.values()), examples, version)
    found = {}
    for name, model in models.items():
        native = native_top1(model, examples)
        wasm = web["top1"][str(model)]
        same = sum(a == b for a, b in zip(native, wasm, strict=True))
        found[name] = {"top1_vs_native": same / len(native), "positions": len(native), "differ": len(native) - same,
                       "runtime": web["runtime"]}
    return found
