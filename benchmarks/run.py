"""Side-by-side benchmark: PyTorch eager, optimum, Olive and every bertforge variant, in one process.

One process, one machine, variants interleaved. Writes benchmarks/RESULTS-<CPU class>.md from the
numbers it measures (nothing typed by hand) and benchmarks/results-<CPU class>.json, one pair per class
(int8 speed and the peers' presets depend on it), and the index benchmarks/RESULTS.md. Olive runs in its own environment
(`make bench` creates .venv-olive) and only produces its model; every model is timed here.

    python benchmarks/run.py [--models synthetic:bert-base-uncased,demo] [--repeats 15]
                             [--olive-python .venv-olive/bin/python]
"""

from __future__ import annotations

import os

# PyTorch's OpenMP threads spin after each call like ORT's do; passive waiting keeps one runner's idle
# threads from slowing the next one in the interleaved loop. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import bertforge  # noqa: F401  (sets the telemetry switches before onnxruntime loads)
from bertforge import bench
from bertforge.api import build
from bertforge.environment import (
    X86_CLASSES,
    cpu_class,
    cpu_flags,
    library_versions,
    machine_info,
    physical_cores,
)
from bertforge.progress import Progress
from bertforge.recipe import load_recipe
from bertforge.sources import resolve
from bertforge.stages import EXTRA_VARIANTS, VARIANTS
from bertforge.validation.config import ValidationConfig
from bertforge.validation.validate import run_validation

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "bench"
SHAPES = [(1, 128), (8, 128), (1, 32)]


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def optimum_preset() -> str:
    """The AutoQuantizationConfig preset a user of this CPU would pick (optimum-cli's --avx512_vnni etc.)."""
    flags = cpu_flags()
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    return "avx512" if "avx512f" in flags else "avx2"


def optimum_path(checkpoint: Path, out: Path, preset: str) -> dict[str, Path]:
    """optimum's documented path: export, ORTOptimizer O2, ORTQuantizer dynamic with the CPU's preset.

    Minimum workaround: ORTQuantizer on the O2 graph fails ("Unable to find data type for weight_name",
    optimum #2186) and exposes no option to fix it, so the quantizer runs on the plain export, which is
    what `optimum-cli onnxruntime quantize --avx512_vnni` does on an exported directory (per_channel
    False is that command's default too).
    """
    import shutil

    from optimum.onnxruntime import ORTModelForMaskedLM, ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig, AutoQuantizationConfig

    # files an earlier run made are reused only if the same libraries made them
    stamp = out / "made-with.json"
    versions = json.dumps(library_versions(), sort_keys=True)
    if out.is_dir() and (not stamp.is_file() or stamp.read_text() != versions):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(versions)
    int8_label = f"optimum-int8 ({preset})"
    files = {"optimum-fp32": out / "export" / "model.onnx", "optimum-O2": out / "o2" / "model_optimized.onnx",
             int8_label: out / f"int8-{preset}" / "model_quantized.onnx"}
    if not files["optimum-fp32"].is_file():
        model = ORTModelForMaskedLM.from_pretrained(checkpoint, export=True)
        model.save_pretrained(out / "export")
    if not files["optimum-O2"].is_file():
        model = ORTModelForMaskedLM.from_pretrained(out / "export")
        ORTOptimizer.from_pretrained(model).optimize(save_dir=out / "o2",
                                                     optimization_config=AutoOptimizationConfig.O2())
    if not files[int8_label].is_file():
        quantizer = ORTQuantizer.from_pretrained(out / "export", file_name="model.onnx")
        config = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=False)
        quantizer.quantize(save_dir=out / f"int8-{preset}", quantization_config=config)
    return files


def olive_path(checkpoint: Path, out: Path, python: str) -> tuple[dict[str, Path], dict[str, str]]:
    """Olive's default BERT INT8 workflow (benchmarks/olive_int8.py), run by Olive's own interpreter."""
    done = subprocess.run([python, str(ROOT / "benchmarks" / "olive_int8.py"), str(checkpoint), str(out)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"Olive's workflow failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"olive-int8": Path(result["model"])}, result["versions"]


def gemm_peaks(threads: int, m: int = 512, k: int = 1024, n: int = 4096, repeats: int = 15) -> dict[str, float]:
    """This CPU's measured GEMM rates through onnxruntime's own kernels, in GOP/s (2 ops per multiply-add):
    fp32 MatMul, and int8 DynamicQuantizeMatMul (u8 activations x s8 constant weights, prepacked: the
    kernel every int8-dynamic MatMul here runs). Measured, not taken from a datasheet."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from bertforge.runtime import session_options

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
    graphs = {
        "fp32": helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "fp32", [a], [y],
                                  [numpy_helper.from_array(weight, "w")]),
        "int8": helper.make_graph(
            [helper.make_node("DynamicQuantizeMatMul", ["a", "q", "s", "z"], ["y"], domain="com.microsoft")],
            "int8", [a], [y], [numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "q"),
                               numpy_helper.from_array(np.full(n, 0.01, np.float32), "s"),
                               numpy_helper.from_array(np.zeros(n, np.int8), "z")]),
    }
    feeds = {"a": rng.standard_normal((m, k)).astype(np.float32)}
    peaks = {}
    for name, graph in graphs.items():
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        session = ort.InferenceSession(model.SerializeToString(), session_options(threads, spinning=False),
                                       providers=["CPUExecutionProvider"])
        times = bench.time_runners({name: lambda s=session: s.run(None, feeds)}, 3, repeats)[name]
        peaks[f"{name}_gops"] = 2 * m * k * n / float(np.median(times)) / 1e9
    peaks["shape"] = f"{m}x{k} @ {k}x{n}"
    return peaks


def bert_flops(config: dict, batch: int, seq: int) -> float:
    """Multiply-adds x2 of BertForMaskedLM's matrix products (full-sequence logits)."""
    h, i, layers, vocab = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], \
        config["vocab_size"]
    per_layer = 2 * seq * (4 * h * h + 2 * h * i) + 2 * 2 * seq * seq * h
    head = 2 * seq * (h * h + h * vocab)
    return float(batch * (layers * per_layer + head))


def torch_runner(checkpoint: Path, inputs: dict[str, np.ndarray]):
    import torch

    from bertforge.exporter.export import load_reference

    model, _ = load_reference(checkpoint)
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def run():
        with torch.no_grad():
            return model(**tensors).logits

    return run


def bench_model(spec: str, repeats: int, olive_python: str | None) -> dict:
    import torch

    from bertforge.runtime import open_session

    name = spec.replace(":", "-")
    threads = physical_cores()
    torch.set_num_threads(threads)
    recipe = load_recipe(None, {"model": spec, "bench": {"enabled": False},
                                "variants": list(VARIANTS + EXTRA_VARIANTS)})
    log(f"{spec}: bertforge build")
    outcome = build(recipe, OUT / name, Progress("plain"))
    # a rebuild whose gates fail goes beside the last one (OUT/name.rejected): time this build's files,
    # where they are, beside this build's numbers; the gates are the report's to say
    report, built = outcome.report, outcome.out
    source = resolve(spec)
    preset = optimum_preset()
    log(f"{spec}: optimum's documented path, {preset} preset")
    peer_files = optimum_path(source.path, OUT / f"{name}-optimum", preset)
    olive_versions = None
    if olive_python:
        log(f"{spec}: Olive's BERT workflow ({olive_python})")
        olive_files, olive_versions = olive_path(source.path, OUT / f"{name}-olive", olive_python)
        peer_files.update(olive_files)
    log(f"{spec}: agreement of the peers' outputs on the validation corpus")
    peer_validation = run_validation(source.path, peer_files, ValidationConfig())["variants"]
    candidates = {f"bertforge {v}": built / v for v in report["variants"]}
    candidates.update(peer_files)
    config = json.loads((source.path / "config.json").read_text())
    rows: dict[str, dict] = {}
    for label, path in candidates.items():
        file = path / "model.onnx" if path.is_dir() else path
        metrics = (report["variants"][label.split(" ", 1)[1]]["metrics"] if label.startswith("bertforge")
                   else peer_validation[label])
        rows[label] = {"size_mb": file.stat().st_size / 1e6, "top1_agreement": metrics["top1_agreement"],
                       "top5_overlap": metrics["top5_overlap"], "latency": {}}
    rows["pytorch eager fp32"] = {"size_mb": None, "top1_agreement": 1.0, "top5_overlap": 1.0, "latency": {}}
    for batch, seq in SHAPES:
        log(f"{spec}: latency b{batch}xs{seq}, {repeats} repeats in turns of blocks")
        inputs = bench.synthetic_inputs(batch, seq, bench.InputSpec.of(source.path))
        runners = {label: bench.onnx_runner(open_session(path, threads), inputs)
                   for label, path in candidates.items()}
        runners["pytorch eager fp32"] = torch_runner(source.path, inputs)
        shape_repeats = repeats if batch == 1 else max(5, repeats // 3)
        for label, times in bench.time_runners(runners, 2, shape_repeats).items():
            stats = bench.summarize(times, batch)
            stats["gflops_effective"] = bert_flops(config, batch, seq) / (stats["p50_ms"] / 1e3) / 1e9
            rows[label]["latency"][f"b{batch}xs{seq}"] = stats
    log(f"{spec}: peak RSS per variant (a fresh process each)")
    for label, path in candidates.items():
        rows[label]["peak_rss_mb"] = bench.peak_rss_mb(path, inputs_from=source.path)
    auto = report["variants"].get("int8-auto", {}).get("metadata", {})
    plan = {k: auto[k] for k in ("plan", "calibration", "predicted_latency_ratio", "search_seconds", "target")
            if k in auto}
    return {"spec": spec, "description": source.description, "rows": rows, "optimum_preset": preset,
            "olive_versions": olive_versions, "flops_b1xs128": bert_flops(config, 1, 128),
            "reference": report["reference"], "int8_auto": plan}


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def render(results: dict) -> str:
    machine = results["machine"]
    lines = ["# Benchmark results", "",
             "Written by `make bench` (benchmarks/run.py) from its own measurements; do not edit by hand.", "",
             f"Machine: {machine['cpu']} (CPU class {machine.get('cpu_class', '?')}); bertforge's int8 variants "
             "built for their default target, portable (the same integers on every class); "
             f"{machine['physical_cores']} physical / {machine['logical_cores']} logical "
             "cores; ISA " + ", ".join(k for k, v in machine["isa"].items() if v) + f". Threads: "
             f"{results['threads']}. Session options: " + json.dumps(results["session_options"])
             + ". Libraries: " + ", ".join(f"{k} {v}" for k, v in results["libraries"].items())
             + ".", "",
             "Roofline: this CPU's GEMM rates measured through onnxruntime's own kernels "
             f"({results['peaks']['shape']}, {results['threads']} threads): fp32 MatMul "
             f"**{results['peaks']['fp32_gops']:.0f} GOP/s**, int8 DynamicQuantizeMatMul (u8 x s8, prepacked "
             f"weights) **{results['peaks']['int8_gops']:.0f} GOP/s**. "
             "Effective GOP/s below = the model's matrix-product operations (2 per multiply-add, full-sequence "
             "logits) / p50 latency; \"% int8 peak\" = that over the measured int8 rate, the distance to this "
             "machine's int8 GEMM.", ""]
    for model in results["models"]:
        rows = model["rows"]
        torch_ms = rows["pytorch eager fp32"]["latency"]["b1xs128"]["p50_ms"]
        opt_label = f"optimum-int8 ({model['optimum_preset']})"

        def b1_ms(label: str, rows: dict = rows) -> float | None:
            return rows.get(label, {}).get("latency", {}).get("b1xs128", {}).get("p50_ms")

        def b8_ms(label: str, rows: dict = rows) -> float | None:
            return rows.get(label, {}).get("latency", {}).get("b8xs128", {}).get("p50_ms")

        opt_ms, olive_ms, dyn_ms = b1_ms(opt_label), b1_ms("olive-int8"), b1_ms("bertforge int8-dynamic")
        peers = (f"Peers: optimum with the `{model['optimum_preset']}` preset (chosen from this CPU's flags, "
                 "`optimum-cli onnxruntime quantize --" + model["optimum_preset"] + "`)")
        if model.get("olive_versions"):
            peers += (", and Olive's default BERT workflow (OnnxConversion → OrtTransformersOptimization → "
                      "OnnxDynamicQuantization, each with Olive's defaults; made in its own environment with "
                      + ", ".join(f"{k} {v}" for k, v in model["olive_versions"].items()) + ", timed here)")
        else:
            peers += "; Olive was not run (benchmarks/run.py without --olive-python; `make bench` runs it)"
        lines += [f"## {model['spec']}", "", f"{model['description']}. Operations per sequence at b1×s128: "
                  f"{model['flops_b1xs128'] / 1e9:.1f} GOP. Agreement: at the [MASK] positions of the "
                  f"validation corpus, against PyTorch fp32 eager. {peers}.", ""]
        if model["reference"].get("degenerate"):
            lines += ["The reference is degenerate (random weights predict one token almost everywhere): "
                      "agreement numbers for this model say little; speed and size are what it is for.", ""]
        lines += ["| runtime | size MB | p50 ms b1×s128 | p90 ms | p50 ms b8×s128 | p50 ms b1×s32 | seq/s b8×s128 | "
                  "GOP/s b1×s128 | % int8 peak | peak RSS MB | top-1 agr. | top-5 overlap | vs PyTorch | "
                  "vs optimum int8 | vs Olive int8 | vs int8-dynamic |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, row in sorted(rows.items(), key=lambda kv: kv[1]["latency"]["b1xs128"]["p50_ms"]):
            lat = row["latency"]
            b1 = lat["b1xs128"]["p50_ms"]
            size = f"{row['size_mb']:.1f}" if row["size_mb"] else "-"
            rss = f"{row['peak_rss_mb']:.0f}" if row.get("peak_rss_mb") else "-"
            lines.append(f"| {label} | {size} | {b1:.1f} | {lat['b1xs128']['p90_ms']:.1f} | "
                         f"{lat['b8xs128']['p50_ms']:.1f} | {lat['b1xs32']['p50_ms']:.1f} | "
                         f"{lat['b8xs128']['throughput_seq_s']:.1f} | {lat['b1xs128']['gflops_effective']:.0f} | "
                         f"{lat['b1xs128']['gflops_effective'] / results['peaks']['int8_gops']:.0%} | "
                         f"{rss} | {row['top1_agreement']:.2%} | {row['top5_overlap']:.2%} | "
                         f"{ratio(torch_ms, b1)} | {ratio(opt_ms, b1)} | {ratio(olive_ms, b1)} | "
                         f"{ratio(dyn_ms, b1)} |")
        lines.append("")
        if olive_ms:
            lines += ["Speed against Olive's INT8 (p50, same run): " + "; ".join(
                f"{label} {ratio(olive_ms, b1_ms(label))} at b1×s128, "
                f"{ratio(b8_ms('olive-int8'), b8_ms(label))} at b8×s128"
                for label in ("bertforge int8-dynamic", "bertforge int8-dynamic-masked", opt_label)
                if b1_ms(label)) + ".", ""]
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
    parser.add_argument("--olive-python", help="Olive's interpreter (make bench: .venv-olive/bin/python); "
                        "without it Olive is left out and RESULTS.md says so")
    args = parser.parse_args(argv)
    threads = physical_cores()
    results = {"machine": machine_info(), "libraries": library_versions(), "threads": threads,
               "session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                                   "graph_optimization_level": "ORT_ENABLE_ALL", "allow_spinning": 1,
                                   "timing": f"runtimes in turns of {bench.SETTLE} untimed + {bench.BLOCK} timed calls",
                                   "torch": "eager, fp32, OMP_WAIT_POLICY=" + os.environ["OMP_WAIT_POLICY"]},
               "peaks": gemm_peaks(threads), "models": []}
    for spec in args.models.split(","):
        results["models"].append(bench_model(spec.strip(), args.repeats, args.olive_python))
    klass = cpu_class()
    if "(CPUID masked" in results["machine"]["cpu"]:  # tools/as-cpu: that class's kernels on another CPU
        klass += "-masked"
    (ROOT / "benchmarks" / f"results-{klass}.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (ROOT / "benchmarks" / f"RESULTS-{klass}.md").write_text(render(results) + "\n")
    (ROOT / "benchmarks" / "RESULTS.md").write_text(index() + "\n")
    log(f"wrote benchmarks/RESULTS-{klass}.md, benchmarks/results-{klass}.json and the index RESULTS.md")
    return 0


def index() -> str:
    """RESULTS.md: one line per CPU class measured, its machine and libraries, from the lowest class up
    (a fixed order: a clone's file times say nothing of when a run was made)."""
    lines = ["# Benchmark results, per CPU class", "",
             "Written by `make bench` (benchmarks/run.py); one file per CPU class, since int8 kernels, their speed",
             "and the peers' presets depend on it. Each was measured on one machine of that class, in one run.", ""]
    order = [name for _, name in reversed(X86_CLASSES)]

    def rank(path: Path) -> tuple[int, str]:
        klass = path.stem.removeprefix("results-").removesuffix("-masked")
        return (order.index(klass) if klass in order else len(order), path.stem)

    found = sorted((ROOT / "benchmarks").glob("results-*.json"), key=rank)
    for path in found:
        klass = path.stem.removeprefix("results-")
        data = json.loads(path.read_text("utf-8"))
        machine = data["machine"]
        lines.append(f"- [{klass}](RESULTS-{klass}.md): {machine['cpu']}, {machine['physical_cores']} cores, "
                     f"onnxruntime {data['libraries'].get('onnxruntime', '?')}, models "
                     + ", ".join(model["spec"] for model in data["models"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
