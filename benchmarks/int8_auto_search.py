"""int8-auto's search alone, on a model's fp32 export: where its time goes and its peak memory.

    python benchmarks/int8_auto_search.py [--model synthetic:bert-base-uncased] [--calibration-corpus calibration]

The export is taken from the stage cache (built first where it is not there); then int8-auto's kernel
costs (cached too) and the search run in a child process, whose wall time, peak RSS and phases are
printed: the fp32 run (reference, activation ranges, layer inputs), the output-error screen, the
sensitivity rows (the part `--executor ray` spreads over the cluster, one task a row), and the
bisection over plans. The numbers behind docs/SCALING.md's search paragraph.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def search(export: Path, key: str, corpus: str) -> dict:
    """In this (child) process: the stage's own run, its progress messages timed."""
    from bertforge.artifact import Artifact
    from bertforge.optimizers.int8_auto import stage
    from bertforge.optimizers.int8_auto.config import Int8AutoConfig
    from bertforge.progress import reporting

    config = Int8AutoConfig(calibration_corpus=corpus)
    inputs = stage.key_inputs(Artifact(export, key, "export", None), config)  # kernel costs: cached after once
    marks: list[tuple[float, str]] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as out, reporting(lambda text: marks.append((time.monotonic() - start, text))):
        found = stage.run(export, Path(out), config, inputs)
    wall = time.monotonic() - start
    def first(prefix: str) -> float:
        return next(at for at, text in marks if text.startswith(prefix))

    screen = first(("int8 output error", "sensitivity rows"))
    rows = first("sensitivity rows")
    done = [at for at, text in marks if text.startswith("sensitivity:")][-1]
    return {"calibration_positions": found["calibration_positions"], "groups": len(found["sensitivity"]),
            "plans_evaluated": len(found["evaluations"]), "search_s": round(wall, 1),
            "fp32_run_s": round(screen, 1), "screen_s": round(rows - screen, 1), "rows_s": round(done - rows, 1),
            "bisection_s": round(wall - done, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:bert-base-uncased")
    parser.add_argument("--calibration-corpus", default="calibration")
    parser.add_argument("--child", nargs=2, metavar=("EXPORT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(search(Path(args.child[0]), args.child[1], args.calibration_corpus)))
        return 0
    from bertforge.environment import cpu_class
    from bertforge.pipeline import run_stage, source_artifact
    from bertforge.recipe import Recipe
    from bertforge.sources import resolve

    recipe = Recipe(model=args.model)
    export = run_stage("export", source_artifact(resolve(recipe.model)), recipe.export).artifact
    child = subprocess.run([sys.executable, __file__, "--child", str(export.path), export.key,
                            "--calibration-corpus", args.calibration_corpus], capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(child.stderr[-3000:])
    found = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps({"model": args.model, "cpu_class": cpu_class(), **found}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
