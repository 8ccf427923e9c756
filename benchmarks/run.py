"""Side-by-side benchmark: PyTorch eager, optimum's documented path, every bertforge variant.

One process, one machine, variants interleaved. Writes benchmarks/RESULTS.md from the numbers it
measures (nothing typed by hand) and benchmarks/results.json.

    python benchmarks/run.py [--models synthetic:bert-base-uncased,demo] [--repeats 15]
"""

from __future__ import annotations

import os

# PyTorch's OpenMP threads spin after each call like ORT's do; passive waiting keeps one runner's idle
# threads from slowing the next one in the interleaved loop. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import bertforge  # noqa: F401  (sets the telemetry switches before onnxruntime loads)
from bertforge import bench
from bertforge.api import build
from bertforge.environment import library_versions, machine_info, physical_cores
from bertforge.progress import Progress
from bertforge.recipe import EXTRA_VARIANTS, VARIANTS, ValidationConfig, load_recipe
from bertforge.sources import resolve
from bertforge.validation.validate import run_validation

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "bench"
SHAPES = [(1, 128), (8, 128), (1, 32)]


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def optimum_path(checkpoint: Path, out: Path) -> dict[str, Path]:
    """optimum's documented path: export, ORTOptimizer O2, ORTQuantizer avx2 dynamic.

    Minimum workaround: ORTQuantizer on the O2 graph fails ("Unable to find data type for weight_name",
    optimum #2186) and exposes no option to fix it, so the quantizer runs on the plain export, which is
    what `optimum-cli onnxruntime quantize --avx2` does on an exported directory.
    """
    from optimum.onnxruntime import ORTModelForMaskedLM, ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig, AutoQuantizationConfig

    files = {"optimum-fp32": out / "export" / "model.onnx", "optimum-O2": out / "o2" / "model_optimized.onnx",
             "optimum-int8": out / "int8" / "model_quantized.onnx"}
    if all(path.is_file() for path in files.values()):
        return files
    model = ORTModelForMaskedLM.from_pretrained(checkpoint, export=True)
    model.save_pretrained(out / "export")
    ORTOptimizer.from_pretrained(model).optimize(save_dir=out / "o2",
                                                 optimization_config=AutoOptimizationConfig.O2())
    quantizer = ORTQuantizer.from_pretrained(out / "export", file_name="model.onnx")
    quantizer.quantize(save_dir=out / "int8",
                       quantization_config=AutoQuantizationConfig.avx2(is_static=False, per_channel=False))
    return files


def bert_flops(config: dict, batch: int, seq: int) -> float:
    """Multiply-adds x2 of BertForMaskedLM's matrix products (full-sequence logits)."""
    h, i, layers, vocab = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], \
        config["vocab_size"]
    per_layer = 2 * seq * (4 * h * h + 2 * h * i) + 2 * 2 * seq * seq * h
    head = 2 * seq * (h * h + h * vocab)
    return float(batch * (layers * per_layer + head))


def sgemm_gflops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / float(np.median(times)) / 1e9


def torch_runner(checkpoint: Path, inputs: dict[str, np.ndarray]):
    import torch

    from bertforge.exporter.export import load_reference

    model, _ = load_reference(checkpoint)
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def run():
        with torch.no_grad():
            return model(**tensors).logits

    return run


def bench_model(spec: str, repeats: int) -> dict:
    import torch

    from bertforge.runtime import open_session

    name = spec.replace(":", "-")
    threads = physical_cores()
    torch.set_num_threads(threads)
    recipe = load_recipe(None, {"model": spec, "bench": {"enabled": False},
                                "variants": list(VARIANTS + EXTRA_VARIANTS)})
    log(f"{spec}: bertforge build")
    report = build(recipe, OUT / name, Progress("plain")).report
    source = resolve(spec)
    log(f"{spec}: optimum's documented path")
    optimum_files = optimum_path(source.path, OUT / f"{name}-optimum")
    log(f"{spec}: agreement of optimum's outputs on the validation corpus")
    optimum_validation = run_validation(source.path, optimum_files, ValidationConfig())["variants"]
    candidates = {f"bertforge {v}": OUT / name / v for v in report["variants"]}
    candidates.update(optimum_files)
    config = json.loads((source.path / "config.json").read_text())
    rows: dict[str, dict] = {}
    for label, path in candidates.items():
        file = path / "model.onnx" if path.is_dir() else path
        metrics = (report["variants"][label.split(" ", 1)[1]]["metrics"] if label.startswith("bertforge")
                   else optimum_validation[label])
        rows[label] = {"size_mb": file.stat().st_size / 1e6, "top1_agreement": metrics["top1_agreement"],
                       "top5_overlap": metrics["top5_overlap"], "latency": {}}
    rows["pytorch eager fp32"] = {"size_mb": None, "top1_agreement": 1.0, "top5_overlap": 1.0, "latency": {}}
    for batch, seq in SHAPES:
        log(f"{spec}: latency b{batch}xs{seq}, {repeats} interleaved repeats")
        inputs = bench.synthetic_inputs(batch, seq)
        runners = {label: bench.onnx_runner(open_session(path, threads, spinning=False), inputs)
                   for label, path in candidates.items()}
        runners["pytorch eager fp32"] = torch_runner(source.path, inputs)
        shape_repeats = repeats if batch == 1 else max(5, repeats // 3)
        for label, times in bench.time_runners(runners, 2, shape_repeats).items():
            stats = bench.summarize(times, batch)
            stats["gflops_effective"] = bert_flops(config, batch, seq) / (stats["p50_ms"] / 1e3) / 1e9
            rows[label]["latency"][f"b{batch}xs{seq}"] = stats
    log(f"{spec}: peak RSS per variant (a fresh process each)")
    for label, path in candidates.items():
        rows[label]["peak_rss_mb"] = bench.peak_rss_mb(path)
    auto = report["variants"].get("int8-auto", {}).get("metadata", {})
    plan = {k: auto[k] for k in ("plan", "calibration", "predicted_latency_ratio", "search_seconds", "target")
            if k in auto}
    return {"spec": spec, "description": source.description, "rows": rows,
            "flops_b1xs128": bert_flops(config, 1, 128), "reference": report["reference"], "int8_auto": plan}


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def render(results: dict) -> str:
    machine = results["machine"]
    lines = ["# Benchmark results", "",
             "Written by `make bench` (benchmarks/run.py) from its own measurements; do not edit by hand.", "",
             f"Machine: {machine['cpu']}; {machine['physical_cores']} physical / {machine['logical_cores']} logical "
             "cores; ISA " + ", ".join(k for k, v in machine["isa"].items() if v) + f". Threads: "
             f"{results['threads']}. Session options: " + json.dumps(results["session_options"])
             + ". Libraries: " + ", ".join(f"{k} {v}" for k, v in results["libraries"].items())
             + ".", "",
             f"Roofline: measured sgemm (torch, 2048^3, {results['threads']} threads) = "
             f"**{results['sgemm_gflops']:.1f} GFLOP/s**. Effective GFLOP/s below = the model's fp32 matrix-product "
             "FLOPs (full-sequence logits) / p50 latency, so int8 variants can exceed the sgemm line.", ""]
    for model in results["models"]:
        rows = model["rows"]
        torch_ms = rows["pytorch eager fp32"]["latency"]["b1xs128"]["p50_ms"]
        opt_ms = rows["optimum-int8"]["latency"]["b1xs128"]["p50_ms"]
        dyn_ms = rows.get("bertforge int8-dynamic", {}).get("latency", {}).get("b1xs128", {}).get("p50_ms")
        lines += [f"## {model['spec']}", "", f"{model['description']}. FLOPs per sequence at b1×s128: "
                  f"{model['flops_b1xs128'] / 1e9:.1f} GFLOP. Agreement: at the [MASK] positions of the "
                  f"validation corpus, against PyTorch fp32 eager.", ""]
        if model["reference"].get("degenerate"):
            lines += ["The reference is degenerate (random weights predict one token almost everywhere): "
                      "agreement numbers for this model say little; speed and size are what it is for.", ""]
        lines += ["| runtime | size MB | p50 ms b1×s128 | p90 ms | p50 ms b8×s128 | p50 ms b1×s32 | seq/s b8×s128 | "
                  "GFLOP/s b1×s128 | peak RSS MB | top-1 agr. | top-5 overlap | vs PyTorch | vs optimum int8 | "
                  "vs int8-dynamic |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, row in sorted(rows.items(), key=lambda kv: kv[1]["latency"]["b1xs128"]["p50_ms"]):
            lat = row["latency"]
            b1 = lat["b1xs128"]["p50_ms"]
            size = f"{row['size_mb']:.1f}" if row["size_mb"] else "-"
            rss = f"{row['peak_rss_mb']:.0f}" if row.get("peak_rss_mb") else "-"
            lines.append(f"| {label} | {size} | {b1:.1f} | {lat['b1xs128']['p90_ms']:.1f} | "
                         f"{lat['b8xs128']['p50_ms']:.1f} | {lat['b1xs32']['p50_ms']:.1f} | "
                         f"{lat['b8xs128']['throughput_seq_s']:.1f} | {lat['b1xs128']['gflops_effective']:.1f} | "
                         f"{rss} | {row['top1_agreement']:.2%} | {row['top5_overlap']:.2%} | "
                         f"{ratio(torch_ms, b1)} | {ratio(opt_ms, b1)} | {ratio(dyn_ms, b1)} |")
        lines.append("")
        auto = model.get("int8_auto")
        if auto:
            quantized = sorted(group for group, scheme in auto["plan"].items() if scheme != "fp32")
            kept = sorted(group for group, scheme in auto["plan"].items() if scheme == "fp32")
            named = (f"int8: {', '.join(quantized)}; the rest fp32" if len(quantized) <= len(kept)
                     else f"fp32: {', '.join(kept) or 'none'}; the rest int8")
            lines += [f"int8-auto plan (target {json.dumps(auto['target'])} on the calibration split): "
                      f"{len(quantized)} of {len(auto['plan'])} groups int8 ({named}); calibration top-1 "
                      f"{auto['calibration']['top1_agreement']:.2%}; predicted latency "
                      f"{auto['predicted_latency_ratio']:.2f}x the fp32 graph; search {auto['search_seconds']:.0f} s.",
                      ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="synthetic:bert-base-uncased,demo")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    threads = physical_cores()
    results = {"machine": machine_info(), "libraries": library_versions(), "threads": threads,
               "session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                                   "graph_optimization_level": "ORT_ENABLE_ALL", "allow_spinning": 0,
                                   "torch": "eager, fp32, OMP_WAIT_POLICY=" + os.environ["OMP_WAIT_POLICY"]},
               "sgemm_gflops": sgemm_gflops(threads), "models": []}
    for spec in args.models.split(","):
        results["models"].append(bench_model(spec.strip(), args.repeats))
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (ROOT / "benchmarks" / "RESULTS.md").write_text(render(results) + "\n")
    log("wrote benchmarks/RESULTS.md and benchmarks/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
