"""A README.md in every variant directory: what it is, how it was built, what it measured, how to load it.

Written after validation (the card carries the measurements) and listed in the variant's manifest, so
`bertforge verify` still holds the directory to exactly what bertforge wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bertforge.artifact import MANIFEST, read_manifest, sha256_file, write_json_atomic, write_text_atomic
from bertforge.report.weigh import fmt
from bertforge.stages import BY_NAME

CARD = "README.md"


def card_text(name: str, entry: dict[str, Any], report: dict[str, Any], manifest: dict[str, Any]) -> str:
    spec = BY_NAME.get(name)
    metrics, latency = entry.get("metrics", {}), entry.get("latency", {})
    span = entry.get("intervals", {}).get("top1_agreement")
    corpus = report["corpus"]
    lineage = " → ".join(f"{step['stage']} ({step['key']})" for step in manifest.get("lineage", []))
    section = manifest.get("recipe", {}).get(spec.section) if spec else None
    gates = ", ".join(f"{g['metric']} {g['op']} {g['threshold']:g}: {'pass' if g['passed'] else 'FAIL'}"
                      for g in entry.get("gates", [])) or "none"
    lines = [
        *card_metadata(name, entry, report, manifest),
        f"# {name}: {report['model']['spec']}",
        "",
        f"{spec.summary if spec else name}. Made by bertforge {report['bertforge_version']} from "
        f"{report['model']['description']}.",
        "",
        "## Measured against PyTorch fp32",
        "",
        f"On {corpus['masked_positions']} masked positions of {corpus['sentences']} sentences ({corpus['source']}), "
        f"{report['machine']['cpu']}:",
        "",
        "| metric | value |",
        "|---|---|",
        f"| top-1 agreement | {fmt(metrics.get('top1_agreement'), '{:.2%}')}"
        + (f" (95% interval {span[0]:.1%}–{span[1]:.1%})" if span else "") + " |",
        f"| PyTorch's top-1 in this variant's top-5 | {fmt(metrics.get('ref_top1_in_top5'), '{:.2%}')} |",
        f"| top-5 overlap | {fmt(metrics.get('top5_overlap'), '{:.2%}')} |",
        f"| KL mean | {fmt(metrics.get('kl_mean'), '{:.2e}')} |",
        f"| max abs logit difference | {fmt(metrics.get('max_abs'), '{:.2e}')} |",
        f"| size | {entry['size_bytes'] / 1e6:.1f} MB |",
    ]
    if latency:
        when = "this build's run" if latency.get("this_run", True) else "an earlier build's run on this machine"
        lines.append(f"| latency b{latency.get('batch', 1)}×s{latency.get('sequence', 128)} | p50 "
                     f"{latency['p50_ms']:.1f} ms, p90 {latency['p90_ms']:.1f} ms ({when}) |")
    lines += ["", f"Gates: {gates}.", ""]
    lines += runtimes(name, entry, report, manifest)
    lines += where_it_holds(manifest.get("metadata", {}).get("int8_target"), report["machine"])
    lines += ["## How it was built", "",
              f"Lineage: {lineage}. Recipe section `{spec.section if spec else '?'}`: "
              f"`{json.dumps(section, sort_keys=True)}`. Files and their sha256: `{MANIFEST}`.", "", "## Load it", ""]
    if spec is not None and spec.extra:
        lines += ["**Fill-mask only.** The MLM head runs at the [MASK] positions alone: `logits` [batch, seq, "
                  "vocab] holds its rows there and **zeros at every other position**, so `ORTModelForMaskedLM` "
                  "and optimum's fill-mask pipeline load it and fill masks correctly, but nothing that reads "
                  "the logits of other positions may use it. The same rows come compact as `mask_logits` "
                  "[n, vocab] with their (batch, position) in `mask_positions` [n, 2], row-major.", "",
                  "```python", "from optimum.pipelines import pipeline", "",
                  f'fill = pipeline("fill-mask", model="{name}", accelerator="ort")',
                  'fill("The capital of France is [MASK].")', "```", "",
                  f'Without torch: `bertforge fill-mask {name} "The capital of France is [MASK]."` (reads '
                  "`mask_logits`)."]
    else:
        lines += ["```python", "from optimum.onnxruntime import ORTModelForMaskedLM",
                  "from optimum.pipelines import pipeline", "",
                  f'model = ORTModelForMaskedLM.from_pretrained("{name}")',
                  f'fill = pipeline("fill-mask", model="{name}", accelerator="ort")',
                  'fill("The capital of France is [MASK].")', "```", "",
                  f'Without torch: `bertforge fill-mask {name} "The capital of France is [MASK]."`; plain '
                  f'onnxruntime: `onnxruntime.InferenceSession("{name}/model.onnx")`.']
    lines += ["", "JavaScript (transformers.js; `bertforge package` lays a build out as a hub repository it loads "
              "with no option):", "", "```js", "import { pipeline, env } from '@huggingface/transformers';", "",
              "env.localModelPath = './';", "env.allowLocalModels = true;  // off by default in the browser",
              "env.allowRemoteModels = false;",
              f"const fill = await pipeline('fill-mask', '{name}', {{ subfolder: '', dtype: 'fp32' }});",
              "await fill('The capital of France is [MASK].');", "```"]
    return "\n".join(lines) + "\n"


def runtimes(name: str, entry: dict[str, Any], report: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """Which runtime the file needs, and on which runtimes and CPU class its numbers were measured."""
    from bertforge.runtime_floor import RuntimeFloor

    floor = entry.get("needs")
    needs = RuntimeFloor.from_dict(floor).line() if floor else "not recorded"
    machine = report["machine"]
    web = entry.get("web")
    web_line = (f"on {web['runtime']} it gives native onnxruntime's top-1 at {web['top1_vs_native']:.2%} of "
                f"{web['positions']} positions" if web else
                "not measured on onnxruntime-web (`bertforge validate OUT --runtime web` measures it)")
    return ["## Runtimes", "",
            f"Needs {needs}. Measured with onnxruntime {report['libraries'].get('onnxruntime')} (Python) on "
            f"{machine.get('cpu_class', '?')} ({machine['cpu']}); {web_line}.", ""]


def card_metadata(name: str, entry: dict[str, Any], report: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """The YAML block a model hub reads from the top of a README.md (huggingface_hub.ModelCard parses it):
    the task, the base model where the source is a hub id, tags, and a model-index holding the measured
    agreement with PyTorch on the validation corpus."""
    import yaml

    metrics = entry.get("metrics", {})
    precision = "fp16" if name == "fp16" else "int8" if name.startswith("int8") else "fp32"
    target = manifest.get("metadata", {}).get("int8_target")
    data: dict[str, Any] = {"library_name": "onnx", "pipeline_tag": "fill-mask"}
    if report["model"].get("kind") == "hub":
        data["base_model"] = report["model"]["spec"]
    if report["model"].get("license"):
        data["license"] = report["model"]["license"]
    data["tags"] = ["onnx", "bertforge", precision] + ([f"int8-target-{target}"] if target else [])
    measured = [{"name": "top-1 agreement with PyTorch fp32", "type": "top1_agreement",
                 "value": metrics["top1_agreement"]},
                {"name": "PyTorch top-1 within the top-5", "type": "ref_top1_in_top5",
                 "value": metrics["ref_top1_in_top5"]}] if "top1_agreement" in metrics else []
    if measured:
        corpus = report["corpus"]
        data["model-index"] = [{"name": f"{report['model']['spec']} {name}", "results": [{
            "task": {"type": "fill-mask", "name": "Fill-Mask"},
            "dataset": {"type": "text", "name": f"{corpus['source']} ({corpus['masked_positions']} [MASK] positions)"},
            "metrics": measured}]}]
    return ["---", yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]


def where_it_holds(target: str | None, machine: dict[str, Any]) -> list[str]:
    """The card's lines on which CPUs compute the integers measured above (int8 variants only)."""
    if target is None:
        return []
    measured = f"Validated on {machine.get('cpu_class', '?')} ({machine['cpu']})."
    if target == "portable":
        text = ("int8 target `portable`: every same-sign pair of s8 weights adjacent along K sums to at most 128 in "
                "magnitude (each output channel's scale widened only as far as its own pairs need), so no u8 x s8 "
                "pair sum can saturate: every int8 node computes the same integers from the same inputs on every CPU "
                "(AVX2, AVX-512, VNNI, AMX, ARM64) and in onnxruntime-web's wasm. The float ops around them "
                "(LayerNorm, softmax) differ between kernels by ~1e-6, which a quantized activation can round "
                "differently, moving a near-tie: the Runtimes section above gives what was measured on "
                f"onnxruntime-web. {measured}")
    else:
        text = (f"int8 target `{target}`: full-range s8 weights, summed exactly only with VNNI or AMX, or on "
                "ARM64. On AVX2 and AVX-512 CPUs without VNNI the u8 x s8 pair sums saturate and the answers can "
                f"differ from those measured above (bertforge warns there). {measured}")
    return ["## Where these numbers hold", "", text, ""]


def write_cards(out: Path, report: dict[str, Any]) -> None:
    """README.md in each variant directory under `out`, added to its manifest's file list; an int8
    variant's manifest also records the CPU class it was validated on."""
    for name, entry in report["variants"].items():
        directory = Path(out) / name
        manifest = read_manifest(directory)
        if "int8_target" in manifest.get("metadata", {}):
            manifest["validated_on"] = {"cpu_class": report["machine"].get("cpu_class"),
                                        "cpu": report["machine"]["cpu"]}
        write_text_atomic(directory / CARD, card_text(name, entry, report, manifest))
        path = directory / CARD
        manifest["files"][CARD] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        write_json_atomic(directory / MANIFEST, manifest)
