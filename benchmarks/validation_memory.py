"""Validation at corpus sizes where its memory used to grow: wall time and peak RSS of whole builds.

    python benchmarks/validation_memory.py [--sentences 20000 60000] [--rounds 1] [--json FILE]

The measurement behind docs/memory.md: a 2-layer, hidden-64 BERT with bert-base-uncased's vocabulary
(seeded random weights, random LayerNorm parameters; made once under the cache), so that the work is
validation's per-position metrics over a 30,522-word vocabulary rather than the model; a corpus of N
lines of 10-20 words drawn with a fixed seed from the words of the builtin and calibration sentences;
and per size and round one `bertforge build --variants fp32,int8-dynamic --no-latency --corpus FILE`
from an empty cache of its own, under `/usr/bin/time -v`. Sizes run interleaved, round after round.
Printed and, with --json, written: wall seconds and peak RSS (GB) of each build, and the CPU class.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "src" / "bertforge" / "validation" / "data"
MODEL = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
             max_position_embeddings=128)
SEED = 0
CORPUS_SEED = 20


def checkpoint(path: Path) -> Path:
    """The model above, made once: BertForMaskedLM at SEED, LayerNorm parameters moved by 0.1 N(0, 1)."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    from bertforge.sources.demo import demo_package_dir

    torch.manual_seed(SEED)
    model = BertForMaskedLM(BertConfig(**MODEL)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    BertTokenizerFast(vocab_file=str(demo_package_dir() / "vocab.txt"), do_lower_case=True,
                      model_max_length=128).save_pretrained(tmp)
    tmp.rename(path)
    return path


def corpus(path: Path, sentences: int) -> Path:
    words = re.findall(r"[a-z']+", ((DATA / "sentences.txt").read_text("utf-8")
                                    + (DATA / "calibration_sentences.txt").read_text("utf-8")).lower())
    rng = random.Random(CORPUS_SEED)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 20))) + "." for _ in range(sentences)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def timed_build(model: Path, corpus_file: Path, work: Path) -> dict:
    """One cold build under /usr/bin/time -v: its exit code, wall seconds and peak RSS."""
    cache, out = work / "cache", work / "out"
    env = {**os.environ, "BERTFORGE_CACHE": str(cache)}
    command = ["/usr/bin/time", "-v", str(Path(sys.executable).with_name("bertforge")), "build", "--model",
               str(model), "--out", str(out), "--variants", "fp32,int8-dynamic", "--no-latency", "--corpus",
               str(corpus_file), "-q"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if wall is None or rss is None:
        raise SystemExit(f"no /usr/bin/time -v figures (exit {done.returncode}):\n{done.stderr[-2000:]}")
    hours, minutes, seconds = int(wall.group(1) or 0), int(wall.group(2)), float(wall.group(3))
    return {"exit_code": done.returncode, "wall_s": round(hours * 3600 + minutes * 60 + seconds, 1),
            "peak_rss_gb": round(int(rss.group(1)) / 1e6, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, nargs="+", default=[20000, 60000])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not Path("/usr/bin/time").is_file():
        raise SystemExit("needs /usr/bin/time (GNU time: apt-get install time) for the peak RSS")
    from bertforge.cache import cache_root
    from bertforge.environment import cpu_class, cpu_model

    model = checkpoint(cache_root() / "sources" / "validation-memory-2x64-seed0")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bertforge-validation-memory-") as folder:
        work = Path(folder)
        files = {n: corpus(work / f"corpus-{n}.txt", n) for n in args.sentences}
        for round_ in range(1, args.rounds + 1):
            for sentences, corpus_file in files.items():
                found = {"round": round_, "sentences": sentences, **timed_build(model, corpus_file, work)}
                print(json.dumps(found), flush=True)
                runs.append(found)
    result = {"cpu_class": cpu_class(), "cpu": cpu_model(), "model": MODEL, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0 if all(run["exit_code"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
