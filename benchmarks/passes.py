"""Wall time and peak RSS of each pass, each in a fresh process, on one model.

    python benchmarks/passes.py [--model synthetic:bert-base-uncased]

Parents come from the stage cache (built first if needed); every pass then runs again, uncached,
into a temporary directory inside a child process whose peak RSS (VmHWM; ru_maxrss would carry
the parent's peak across fork+exec) is the pass's own.
Writes benchmarks/passes-<model>.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import bertforge  # noqa: F401
from bertforge.pipeline import VARIANT_PLAN, build_variants, source_artifact
from bertforge.progress import Progress
from bertforge.recipe import VARIANTS, Recipe
from bertforge.sources import resolve

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, sys, time
from pathlib import Path
from bertforge.environment import peak_rss_mb
from bertforge.artifact import Artifact
from bertforge.pipeline import STAGES, stage_inputs
from bertforge.recipe import Recipe
stage, section, src, parent_key, parent_stage, out, recipe = sys.argv[1:8]
config = getattr(Recipe.model_validate(json.loads(recipe)), section)
module = STAGES[stage]
# as pipeline.run_stage calls it: a stage that declares inputs (int8-static's calibration text,
# int8-auto's kernel costs) gets them, measured outside the timing as a warm cache would have them
extra = ()
if hasattr(module, "key_inputs"):
    extra = (stage_inputs(stage, Artifact(Path(src), parent_key, parent_stage, None), config),)
start = time.perf_counter()
module.run(Path(src), Path(out), config, *extra)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                  "size_mb": (Path(out) / "model.onnx").stat().st_size / 1e6}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:bert-base-uncased")
    args = parser.parse_args(argv)
    recipe = Recipe(model=args.model)
    source = resolve(args.model)
    state = build_variants(recipe, source, Progress("plain"))
    rows = []
    for variant in VARIANTS:
        stage, parent, section = VARIANT_PLAN[variant]
        built_from = source_artifact(source) if parent is None else state.artifacts[parent].artifact
        with tempfile.TemporaryDirectory(prefix="bertforge-pass-") as out:
            done = subprocess.run([sys.executable, "-c", CHILD, stage, section, str(built_from.path), built_from.key,
                                   built_from.stage, out, recipe.model_dump_json()],
                                  capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((variant, stage, result))
        print(f"{variant:<14} {result['seconds']:7.1f} s  peak RSS {result['peak_rss_mb']:7.0f} MB  "
              f"{result['size_mb']:7.1f} MB", flush=True)
    lines = [f"# Pass timings: {args.model}", "",
             "Written by `python benchmarks/passes.py`; each pass in a fresh process (peak RSS includes the "
             "Python interpreter and the libraries it imports).", "",
             "| variant | stage | wall s | peak RSS MB | output MB |", "|---|---|---|---|---|"]
    lines += [f"| {v} | {s} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['size_mb']:.1f} |" for v, s, r in rows]
    (ROOT / "benchmarks" / f"passes-{args.model.replace(':', '-')}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
