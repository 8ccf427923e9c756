"""Latency, throughput and memory of artifact directories, measured side by side.

Variants take turns in blocks (a few untimed calls, then five timed ones, round after round:
time_runners), so drift of a shared, noisy machine hits them alike; medians and p90s are reported,
never single times.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertforge.environment import physical_cores
from bertforge.errors import UsageError
from bertforge.onnx_files import model_bytes, model_config
from bertforge.runtime import feeds_for, open_session

INPUT_SEED = 0


@dataclass(frozen=True)
class InputSpec:
    """What valid inputs for a model are, read from its directory, never assumed to be bert-base's."""

    vocab_size: int
    cls_id: int
    sep_id: int
    mask_id: int
    max_positions: int  # max_position_embeddings, or the tokenizer's limit when lower

    @classmethod
    def of(cls, directory: Path) -> InputSpec:
        from transformers import AutoTokenizer

        from bertforge.validation.corpus import position_limit

        config = model_config(Path(directory))
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except Exception as exc:  # noqa: BLE001 - tokenizers' parse errors name no file
            raise UsageError(f"{Path(directory) / 'tokenizer.json'}: the tokenizer does not load "
                             f"({' '.join(str(exc).split())[:200]})") from None
        return cls(config.vocab_size, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id,
                   position_limit(tokenizer, config))

    def sequence(self, wanted: int) -> int:
        """`wanted`, or the model's limit when it takes fewer positions."""
        return min(wanted, self.max_positions)


def synthetic_inputs(batch: int, sequence: int, spec: InputSpec) -> dict[str, np.ndarray]:
    """[CLS] random word pieces [SEP], one [MASK] in the middle; the values don't change the speed.

    Word pieces are drawn above the special and reserved ids (from 1000 on a vocabulary large enough,
    as bert-base's [unused] block ends there), so every id indexes the model's own table."""
    if sequence > spec.max_positions:
        raise ValueError(f"sequence {sequence} is longer than the model takes ({spec.max_positions} positions)")
    rng = np.random.default_rng(INPUT_SEED)
    if spec.vocab_size > 2000:
        ids = rng.integers(1000, spec.vocab_size, size=(batch, sequence), dtype=np.int64)
    else:  # a small vocabulary may keep its special tokens anywhere, the top included: draw around them
        words = np.setdiff1d(np.arange(spec.vocab_size, dtype=np.int64), [spec.cls_id, spec.sep_id, spec.mask_id])
        ids = rng.choice(words, size=(batch, sequence))
    ids[:, 0], ids[:, -1], ids[:, sequence // 2] = spec.cls_id, spec.sep_id, spec.mask_id
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


BLOCK = 5  # timed calls of one runner in a row
SETTLE = 2  # untimed calls that open each block


def time_runners(runners: dict[str, Callable[[], object]], warmup: int, repeats: int,
                 block: int = BLOCK, settle: int = SETTLE) -> dict[str, list[float]]:
    """Call each runner `repeats` times (rounded up to whole blocks); return seconds per call per runner.

    Runners take turns in blocks: `settle` untimed calls, then `block` timed ones, round after round, so
    drift of a shared, noisy machine still hits them alike. Each session keeps onnxruntime's default
    spinning pool, as a user's own session does: a session's pool spins for a moment after its last
    call, which would slow another session run right behind it (1.6x seen here), and a model switched
    out after every call runs from cold caches. Both hit the settling calls only. Timed one call each in
    turn instead (and, to keep them from stealing each other's cores, without spinning), demo's
    int8-auto read 0.64x fused; in blocks 0.58x, as in two processes that each run one of them alone."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(-(-repeats // block)):
        for name, run in runners.items():
            for _ in range(settle):
                run()
            for _ in range(block):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return times


# a latency whose round medians spread wider than this (slowest / fastest round), and by more than the
# timer and scheduler's own jitter (BUSY_FLOOR_MS: a 1 ms tiny model's rounds move by 0.1-0.3 ms on a
# quiet machine), was taken on a busy machine: reported, but never reused from the cache by a later build
BUSY_SPREAD = 1.25
BUSY_FLOOR_MS = 1.0


def summarize(seconds: list[float], batch: int, block: int = BLOCK) -> dict[str, Any]:
    """p50/p90 and, per round of time_runners (one block of `block` calls), that round's median: the
    rounds of variants timed together pair up, and their ratios give the interval of a p50 ratio
    (report/recommend.py's ties)."""
    values = np.array(seconds)
    p50 = float(np.median(values))
    rounds = [round(float(np.median(values[i:i + block])) * 1e3, 4) for i in range(0, len(values), block)]
    return {"p50_ms": p50 * 1e3, "p90_ms": float(np.percentile(values, 90)) * 1e3,
            "throughput_seq_s": batch / p50, "repeats": len(values), "round_ms": rounds,
            "spread": round(max(rounds) / min(rounds), 4) if rounds and min(rounds) > 0 else None}


def busy(stats: dict[str, Any]) -> bool:
    """Whether a latency's own spread says the machine was busy while it was measured."""
    rounds = stats.get("round_ms")
    if not rounds or stats.get("spread") is None:
        return True
    return stats["spread"] > BUSY_SPREAD and max(rounds) - min(rounds) > BUSY_FLOOR_MS


def onnx_runner(session, inputs: dict[str, np.ndarray]) -> Callable[[], object]:
    feeds = feeds_for(session, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    return lambda: session.run(None, feeds)


def latency(variants: dict[str, Path], batch: int = 1, sequence: int = 128, warmup: int = 3,
            repeats: int = 20, threads: int | None = None,
            spec: InputSpec | None = None) -> dict[str, dict[str, float]]:
    """p50/p90 per variant at batch x sequence, in turns of blocks (time_runners), the sequence cut to
    what the model takes (each result says the sequence it was measured at); `spec`: the variants'
    InputSpec where the caller has it already (read from the first variant otherwise)."""
    spec = spec or InputSpec.of(next(iter(variants.values())))  # variants of one build share config and tokenizer
    sequence = spec.sequence(sequence)
    inputs = synthetic_inputs(batch, sequence, spec)
    runners = {name: onnx_runner(open_session(path, threads), inputs) for name, path in variants.items()}
    return {name: {**summarize(times, batch), "batch": batch, "sequence": sequence}
            for name, times in time_runners(runners, warmup, repeats).items()}


def peak_rss_mb(directory: Path, batch: int = 1, sequence: int = 128, runs: int = 3,
                inputs_from: Path | None = None) -> float:
    """Peak RSS of a fresh process that loads the artifact and runs it: memory is per process.

    inputs_from: the directory whose config and tokenizer shape the inputs (default: the artifact's
    own; a peer's output, e.g. Olive's, may hold the model alone)."""
    code = ("import sys;from pathlib import Path;import bertforge.bench as b;"
            "from bertforge.runtime import open_session;from bertforge.environment import peak_rss_mb;"
            "d=Path(sys.argv[1]);p=b.InputSpec.of(Path(sys.argv[5]));s=open_session(d);"
            "r=b.onnx_runner(s,b.synthetic_inputs(int(sys.argv[2]),p.sequence(int(sys.argv[3])),p));"
            "[r() for _ in range(int(sys.argv[4]))];"
            "print(peak_rss_mb())")
    done = subprocess.run([sys.executable, "-c", code, str(directory), str(batch), str(sequence), str(runs),
                           str(inputs_from or directory)],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def bench_directories(variants: dict[str, Path], shapes: list[tuple[int, int]], warmup: int, repeats: int,
                      with_memory: bool = True, progress=None) -> dict[str, Any]:
    """Every shape timed over all variants interleaved, then each variant's size and peak RSS; each
    shape and each RSS measurement is a step of `progress` (a bertforge.progress.Progress), if given."""
    from contextlib import nullcontext

    def step(name: str):
        return progress.step(name) if progress is not None else nullcontext({})

    threads = physical_cores()
    results: dict[str, Any] = {"threads": threads, "shapes": {}, "memory_mb": {}, "size_bytes": {}}
    spec = InputSpec.of(next(iter(variants.values())))
    # each shape named by the sequence it is timed at: a model taking fewer positions is timed once at its
    # limit, not once per asked length under a label it was not timed at
    measured = list(dict.fromkeys((batch, spec.sequence(sequence)) for batch, sequence in shapes))
    for batch, sequence in measured:
        with step(f"time b{batch}xs{sequence}") as info:
            timed = latency(variants, batch, sequence, warmup, repeats, threads, spec)
            results["shapes"][f"b{batch}xs{sequence}"] = timed
            fastest = min(timed, key=lambda name: timed[name]["p50_ms"])
            info["note"] = (f"{len(variants)} variants x {timed[fastest]['repeats']} repeats; fastest {fastest} "
                            f"{timed[fastest]['p50_ms']:.1f} ms")
    for name, path in variants.items():
        results["size_bytes"][name] = model_bytes(Path(path))
        if with_memory:
            with step(f"peak RSS {name}") as info:
                results["memory_mb"][name] = peak_rss_mb(Path(path))
                info["note"] = f"{results['memory_mb'][name]:.0f} MB"
    return results


def dump(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, sort_keys=True)
