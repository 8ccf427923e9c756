"""The README.md of a packaged repository (hub_repo.py): hub metadata, every file with its measurements
and the runtime it needs, how to load each from JavaScript and Python."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bertforge.runtime_floor import RuntimeFloor, floor_of_file
from bertforge.stages import BY_NAME

JS_DTYPES = {"model.onnx": "fp32", "model_fp16.onnx": "fp16", "model_quantized.onnx": "q8"}


def floor_of(out: Path, report: dict[str, Any], variant: str) -> RuntimeFloor:
    """The variant's runtime floor as report.json records it (read from its graph for a report older than
    that record)."""
    needs = report["variants"][variant].get("needs")
    return RuntimeFloor.from_dict(needs) if needs else floor_of_file(out / variant / "model.onnx")


def repo_metadata(report: dict[str, Any], files: dict[str, str]) -> list[str]:
    import yaml

    corpus = report["corpus"]
    data: dict[str, Any] = {"library_name": "transformers.js", "pipeline_tag": "fill-mask"}
    if report["model"].get("kind") == "hub":
        data["base_model"] = report["model"]["spec"]
    if report["model"].get("license"):
        data["license"] = report["model"]["license"]
    precisions = sorted({"fp16" if v == "fp16" else "int8" if v.startswith("int8") else "fp32" for v in files.values()})
    data["tags"] = ["onnx", "transformers.js", "bertforge", *precisions]
    # one model, one task and corpus; each file's metrics carry its path as their `config` (the hub merges
    # results of one task and dataset, so a per-file split has to live in the metrics)
    measured = [(path, report["variants"][variant]["metrics"]) for path, variant in files.items()
                if "top1_agreement" in report["variants"][variant]["metrics"]]
    data["model-index"] = [{
        "name": f"{report['model']['spec']} (ONNX, bertforge)",
        "results": [{"task": {"type": "fill-mask", "name": "Fill-Mask"},
                     "dataset": {"type": "text",
                                 "name": f"{corpus['source']} ({corpus['masked_positions']} [MASK] positions)"},
                     "metrics": [metric for path, metrics in measured for metric in (
                         {"name": f"top-1 agreement with PyTorch fp32, {path}", "type": "top1_agreement",
                          "value": metrics["top1_agreement"], "config": path},
                         {"name": f"PyTorch top-1 within the top-5, {path}", "type": "ref_top1_in_top5",
                          "value": metrics["ref_top1_in_top5"], "config": path})]}]}]
    return ["---", yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]


def how_to_select(path: str) -> str:
    name = path.removeprefix("onnx/")
    if name in JS_DTYPES:
        return f"`{{dtype: '{JS_DTYPES[name]}'}}`" + (" (the default on CPU)" if name == "model.onnx" else "")
    return f"`{{model_file_name: '{name.removesuffix('.onnx')}'}}`"


def web_cell(entry: dict[str, Any]) -> str:
    web = entry.get("web")
    if not web:
        return "not measured"
    return f"{web['top1_vs_native']:.2%} of {web['positions']}"


def repo_card(out: Path, report: dict[str, Any], result: Any) -> str:
    corpus, machine = report["corpus"], report["machine"]
    rows = []
    for path, variant in result.files.items():
        entry = report["variants"][variant]
        metrics = entry["metrics"]
        floor = floor_of(out, report, variant)
        rows.append(f"| `{path}` | {variant} | {how_to_select(path)} | {entry['size_bytes'] / 1e6:.1f} MB | "
                    f"{metrics.get('top1_agreement', float('nan')):.2%} | "
                    f"{metrics.get('ref_top1_in_top5', float('nan')):.2%} | {web_cell(entry)} | "
                    f">= {floor.onnxruntime} |")
    extras = [v for v in result.files.values() if BY_NAME[v].extra]
    quantized = ("`onnx/model_quantized.onnx` is " + result.quantized_because + "." if result.quantized
                 else f"No `onnx/model_quantized.onnx`: {result.quantized_because}.")
    lines = [
        *repo_metadata(report, result.files),
        f"# {report['model']['spec']}: ONNX for fill-mask",
        "",
        f"Made by bertforge {report['bertforge_version']} from {report['model']['description']}. Every file was "
        "validated against the PyTorch model at the [MASK] positions of "
        f"{corpus['sentences']} sentences ({corpus['source']}, {corpus['masked_positions']} positions) on "
        f"{machine['cpu']} ({machine.get('cpu_class', '?')}), onnxruntime {report['libraries'].get('onnxruntime')}.",
        "",
        "| file | variant | transformers.js option | size | top-1 agreement | PyTorch top-1 in top-5 | "
        "same top-1 on onnxruntime-web (wasm) as native | onnxruntime |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        quantized,
        "",
    ]
    if extras:
        lines += [f"{', '.join(extras)}: **fill-mask only**; the logits are zeros except at the [MASK] positions.", ""]
    lines += ["## What each file needs", ""]
    lines += [f"- `{path}`: {floor_of(out, report, variant).line()}"
              for path, variant in result.files.items()]
    lines += ["", "`quantize_config.json` says how each file was made; `bertforge-report.json` is the full report.",
              ""]
    lines += [
        "## Load it",
        "",
        "JavaScript (transformers.js, Node or the browser):",
        "",
        "```js",
        "import { pipeline } from '@huggingface/transformers';",
        "",
        "const fill = await pipeline('fill-mask', 'THIS_REPO', { dtype: 'q8' });  // or 'fp32', 'fp16'",
        "console.log(await fill('The capital of France is [MASK].'));",
        "```",
        "",
        "Python (optimum, or plain onnxruntime):",
        "",
        "```python",
        "from optimum.onnxruntime import ORTModelForMaskedLM",
        "",
        'model = ORTModelForMaskedLM.from_pretrained("THIS_REPO", subfolder="onnx", file_name="model_quantized.onnx")',
        "```",
        "",
        "Replace THIS_REPO with the hub id once uploaded (`huggingface-cli upload ID .`), or a local path "
        "(transformers.js reads a local folder with `env.localModelPath`, `env.allowLocalModels = true`, off by "
        "default in the browser, and `env.allowRemoteModels = false`). In the browser the default dtype is 'q8'.",
        "",
        "License: " + (f"`{report['model']['license']}`, as the source's model card declares (check that it "
                       "covers these files before uploading)." if report["model"].get("license")
                       else "the source declares none that bertforge could read; add a `license:` line to the "
                       "metadata above before uploading."),
    ]
    return "\n".join(lines) + "\n"
