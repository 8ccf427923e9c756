"""Cold builds with the local executor and with `--executor ray`, interleaved: the measurement behind
docs/SCALING.md.

    python benchmarks/executors.py [--model synthetic:bert-base-uncased] [--rounds 1] [--ray-first] [--json FILE]
                                   [-- BUILD FLAGS]

Each round runs `bertforge build` once per executor (local first, then ray, or ray first with
--ray-first; the next round the other way round), each from an empty cache of its own, under
/usr/bin/time -v where it exists (peak RSS), with --progress jsonl. Printed and, with --json, written:
wall time, peak RSS, every progress step's seconds (the stages, validation, latency), each variant's
stage seconds from report.json, and the variants whose metrics differ between the runs. The
checkpoint is resolved once, before the first round: a synthetic model's weights are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(model: str, executor: str, work: Path, extra: list[str]) -> dict:
    cache = work / f"cache-{executor}"
    out = work / f"out-{executor}"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "bertforge", "build", "--model", model, "--out", str(out),
               "--executor", executor, "--progress", "jsonl", *extra]
    timed = ["/usr/bin/time", "-v", *command] if Path("/usr/bin/time").exists() else command
    env = {**os.environ, "BERTFORGE_CACHE": str(cache)}
    start = time.monotonic()
    done = subprocess.run(timed, capture_output=True, text=True, env=env)
    wall = time.monotonic() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"{executor} build failed ({done.returncode}):\n{done.stderr[-3000:]}")
    steps: dict[str, float] = {}
    for line in done.stderr.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "step_end":
                steps[event["step"]] = event["seconds"]
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    report = json.loads((out / "report.json").read_text())
    return {"executor": executor, "wall_s": round(wall, 1),
            "peak_rss_gb": round(int(rss.group(1)) / 1e6, 2) if rss else None,
            "steps_s": steps, "stage_seconds": {n: v["stage_seconds"] for n, v in report["variants"].items()},
            "metrics": {n: v["metrics"] for n, v in report["variants"].items()}, "exit_code": done.returncode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:bert-base-uncased")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--ray-first", action="store_true", help="start each pair with the Ray build")
    parser.add_argument("extra", nargs="*", help="more build flags, after --")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bertforge-executors-"))
    source_cache = work / "source-cache"
    env = {**os.environ, "BERTFORGE_CACHE": str(source_cache)}
    resolved = subprocess.run([sys.executable, "-m", "bertforge", "resolve", args.model], capture_output=True,
                              text=True, env=env, check=True).stdout.strip().splitlines()[-1]
    runs = []
    for index in range(args.rounds):
        order = ("local", "ray") if (index + args.ray_first) % 2 == 0 else ("ray", "local")
        for executor in order:
            runs.append(build(resolved, executor, work, args.extra))
            print(f"round {index + 1}: {executor} {runs[-1]['wall_s']} s, {runs[-1]['peak_rss_gb']} GB", flush=True)
    by = {e: [r for r in runs if r["executor"] == e] for e in ("local", "ray")}
    walls = {e: statistics.median(r["wall_s"] for r in found) for e, found in by.items()}
    # int8-auto's plan follows kernel costs measured in each cold build: on a noisy machine two cold builds
    # may plan differently whatever the executor, so the variants are compared one by one
    differ = sorted({n for r in runs for n, m in r["metrics"].items() if m != by["local"][0]["metrics"][n]})
    print(f"median wall: local {walls['local']} s, ray {walls['ray']} s, "
          f"ray/local {walls['ray'] / walls['local']:.3f}; "
          f"variants whose metrics differ between runs: {', '.join(differ) or 'none'}")
    for run in runs:
        print(run["executor"], json.dumps(run["steps_s"]))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "runs": runs, "median_wall_s": walls,
                                         "metrics_differ": differ}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
