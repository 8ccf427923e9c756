"""Per-group INT8 sensitivity and per-scheme cost, measured on a calibration split.

The calibration split is the project's head-fit sentences masked with their own seeds: never the
validation corpus, so a plan chosen here is judged on sentences it was not chosen on. The reference is
the model's own fp32 graph (the MultiHeadAttention fusion of the export, equal to PyTorch to ~1e-4),
run once; every candidate graph is run over the same batches and compared at the [MASK] positions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bertforge.artifact import Artifact
from bertforge.bench import InputSpec
from bertforge.optimizers.mixed_int8 import (
    SCHEMES,
    SMOOTH_ALPHA,
    TIED_GROUP,
    Group,
    QuantizedWeights,
    apply_plan,
    group_input,
)
from bertforge.validation.corpus import NO_LABEL
from bertforge.validation.metrics import Accumulator

CALIBRATION_SEEDS = (7, 8)


@dataclass
class CalibrationSplit:
    feeds: list[dict[str, np.ndarray]]
    rows: list[np.ndarray]
    cols: list[np.ndarray]

    @property
    def positions(self) -> int:
        return int(sum(len(r) for r in self.rows))


def calibration_split(checkpoint: Path, corpus: str = "head-fit", seeds: tuple[int, ...] = CALIBRATION_SEEDS,
                      batch_size: int = 32) -> CalibrationSplit:
    from transformers import AutoTokenizer

    from bertforge.optimizers.common import model_config
    from bertforge.validation.corpus import batches, input_limit, load_lines, mask_sentences

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    lines = load_lines(corpus)
    limit = input_limit(tokenizer, model_config(checkpoint))
    examples = [example for seed in seeds for example in mask_sentences(lines, tokenizer, seed=seed, max_length=limit)]
    examples.sort(key=lambda e: len(e.input_ids))
    split = CalibrationSplit([], [], [])
    for batch in batches(examples, batch_size, pad_id=tokenizer.pad_token_id or 0):
        split.feeds.append({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                            "token_type_ids": batch.token_type_ids})
        rows, cols, _ = batch.masked_index()
        split.rows.append(rows)
        split.cols.append(cols)
    return split


def session_for(model: onnx.ModelProto, threads: int | None = None, profile_prefix: str | None = None):
    import onnxruntime as ort

    from bertforge.runtime import session_options

    options = session_options(threads, spinning=False)
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def masked_logits(model: onnx.ModelProto, split: CalibrationSplit) -> np.ndarray:
    from bertforge.runtime import feeds_for

    session = session_for(model)
    out = []
    for feeds, rows, cols in zip(split.feeds, split.rows, split.cols, strict=True):
        logits = session.run(None, feeds_for(session, feeds["input_ids"], feeds["attention_mask"],
                                             feeds["token_type_ids"]))[0]
        out.append(logits[rows, cols])
    return np.concatenate(out)


def activation_absmax(model: onnx.ModelProto, groups: list[Group], split: CalibrationSplit) -> dict[str, np.ndarray]:
    """max |x| per channel of every group's input over the calibration split's real (unpadded) tokens,
    from the fp32 graph: what int8-smooth's scales are computed from."""
    import copy

    from onnx import helper

    from bertforge.runtime import feeds_for

    tensors = sorted({group_input(model, group) for group in groups})
    probe = copy.deepcopy(model)
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    session = session_for(probe)
    found: dict[str, np.ndarray] = {}
    for feeds in split.feeds:
        values = session.run(tensors, feeds_for(session, feeds["input_ids"], feeds["attention_mask"],
                                                feeds["token_type_ids"]))
        real = feeds["attention_mask"].astype(bool)
        for name, value in zip(tensors, values, strict=True):
            absmax = np.abs(value[real]).max(axis=0)
            found[name] = absmax if name not in found else np.maximum(found[name], absmax)
    return found


def agreement(reference: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """The validation metrics (one definition, validation.metrics) that a plan is judged by."""
    accumulator = Accumulator()
    accumulator.add(reference, logits, np.full(len(reference), NO_LABEL))
    summary = accumulator.summary()
    return {key: summary[key] for key in ("top1_agreement", "ref_top1_in_top5", "kl_mean")}


def group_schemes(group: Group) -> tuple[str, ...]:
    """The tied table is int8 per row (its decoder a DynamicQuantizeMatMul, smoothed or not) or fp32."""
    return ("fp32", "int8-dynamic", "int8-smooth") if group.name == TIED_GROUP else SCHEMES


def sensitivity_table(model: onnx.ModelProto, groups: list[Group], weights: QuantizedWeights,
                      split: CalibrationSplit, reference: np.ndarray, skip: dict[str, set[str]] | None = None,
                      progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Each group quantized alone under each int8 scheme: agreement with the fp32 reference.

    `skip`: {group: schemes not to measure} (int8-auto skips schemes slower than fp32 for a group)."""
    rows = []
    for index, group in enumerate(groups):
        row: dict[str, Any] = {"group": group.name, "macs_per_token": group.macs_per_token}
        for scheme in group_schemes(group):
            if scheme == "fp32":
                continue
            if skip and scheme in skip.get(group.name, set()):
                row[scheme] = None
                continue
            logits = masked_logits(apply_plan(model, {group.name: scheme}, groups, weights), split)
            row[scheme] = agreement(reference, logits)
        rows.append(row)
        if progress:
            progress(f"sensitivity {index + 1}/{len(groups)}")
    return rows


def scheme_costs(model: onnx.ModelProto, groups: list[Group], weights: QuantizedWeights,
                 spec: InputSpec, sequence: int = 128, runs: int = 10) -> dict[str, Any]:
    """Measured ms per group and scheme at b1 x `sequence` (ORT profiler, one graph per scheme)."""
    import os
    import tempfile

    from bertforge.bench import synthetic_inputs
    from bertforge.runtime import feeds_for

    sequence = spec.sequence(sequence)
    inputs = synthetic_inputs(1, sequence, spec)
    # timing does not depend on the smoothing factors' values: unit absmax stands in for calibration
    timing = QuantizedWeights(weights.block_size, {group_input(model, g): np.ones(1, np.float32) for g in groups},
                              weights.alpha, dict(weights.cache))  # own smooth entries
    per_scheme: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bertforge-profile-") as scratch:
        for scheme in SCHEMES:
            plan = {g.name: scheme for g in groups if scheme in group_schemes(g)}
            session = session_for(apply_plan(model, plan, groups, timing, repack=False),
                                  profile_prefix=f"{scratch}/{scheme}")
            feeds = feeds_for(session, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
            for _ in range(3):
                session.run(None, feeds)
            for _ in range(runs):
                session.run(None, feeds)
            path = session.end_profiling()
            events = json.loads(Path(path).read_text())
            os.remove(path)
            durations: dict[str, list[float]] = {}
            for event in events:
                if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                    durations.setdefault(event["name"][: -len("_kernel_time")], []).append(event["dur"] / 1000)
            # the median of the timed runs (warm-up runs dropped): one preempted run on a busy machine
            # must not reorder the plan (a mean let it, on the tiny test model)
            node_ms = {name: float(np.median(times[3:] or times)) for name, times in durations.items()}
            totals[scheme] = sum(node_ms.values())
            per_scheme[scheme] = {g.name: group_ms(g, scheme, node_ms) for g in groups if scheme in group_schemes(g)}
    return {"ms": per_scheme, "model_ms": totals, "sequence": sequence}


def machine_costs(export: Artifact, block_size: int) -> dict[str, Any]:
    """scheme_costs for an fp32 export on this machine, measured once and then read from the results
    cache (keyed by the export, the block size, this module's code, the libraries, CPU and threads)."""
    from bertforge import results_cache
    from bertforge.cache import cache_root, file_lock
    from bertforge.code_digest import code_digest
    from bertforge.optimizers.common import MODEL_FILE, mha_fused, model_config
    from bertforge.optimizers.mixed_int8 import quant_groups

    key = results_cache.key_for("int8-costs", {"export": export.key, "block_size": block_size,
                                               "code": code_digest(__name__)})
    with file_lock(cache_root() / "locks" / f"int8-costs-{key}.lock"):  # two builds measure once
        found = results_cache.load("int8-costs", key)
        if found is not None:
            return found
        hf = model_config(export.path)
        model, _ = mha_fused(export.path / MODEL_FILE, hf, "int8-auto")
        costs = scheme_costs(model, quant_groups(model), QuantizedWeights(block_size=block_size),
                             InputSpec.of(export.path))
        results_cache.store("int8-costs", key, costs)
        return costs


def modelled_costs(groups: list[Group], costs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """ms per group and scheme for planning: encoder groups at their scheme's measured ms per MAC
    (rounded to 2 significant digits), the tied table at its own measured ms (same rounding).

    Ordering plans by raw per-group profiler times would let run-to-run noise reorder near-equal
    groups; the per-scheme rate keeps the measurement and makes the plan repeatable."""
    def two_digits(value: float) -> float:
        return float(f"{value:.2g}")

    modelled: dict[str, dict[str, float]] = {g.name: {} for g in groups}
    for scheme, per_group in costs["ms"].items():
        encoder = [g for g in groups if g.name != TIED_GROUP and g.name in per_group]
        macs = sum(g.macs_per_token for g in encoder)
        rate = two_digits(sum(per_group[g.name] for g in encoder) / macs) if macs else 0.0
        for group in encoder:
            modelled[group.name][scheme] = rate * group.macs_per_token
        if TIED_GROUP in per_group:
            modelled[TIED_GROUP][scheme] = two_digits(per_group[TIED_GROUP])
    return modelled


def group_ms(group: Group, scheme: str, node_ms: dict[str, float]) -> float:
    """The kernel time of a group's nodes in a profile (the decoder and its bias for the tied table)."""
    if group.name == TIED_GROUP:
        return sum(ms for name, ms in node_ms.items() if name.startswith("/cls/predictions/decoder/"))
    suffix = "" if scheme == "fp32" else "_" + scheme.replace("-", "_")
    ms = sum(node_ms.get(f"{name}{suffix}", 0.0) for name in group.nodes)
    return ms + (node_ms.get(f"{group.nodes[0]}_smooth", 0.0) if scheme == "int8-smooth" else 0.0)


def analyze(export_dir: Path, block_size: int = 16, corpus: str = "head-fit", alpha: float = SMOOTH_ALPHA,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The full table for an fp32 export directory: every group alone under every scheme, with costs."""
    from bertforge.optimizers.common import MODEL_FILE, mha_fused, model_config
    from bertforge.optimizers.mixed_int8 import quant_groups

    hf = model_config(export_dir)
    model, _ = mha_fused(export_dir / MODEL_FILE, hf, "sensitivity")
    groups = quant_groups(model)
    split = calibration_split(export_dir, corpus)
    reference = masked_logits(model, split)
    weights = QuantizedWeights(block_size=block_size, activation_absmax=activation_absmax(model, groups, split),
                               alpha=alpha)
    costs = scheme_costs(model, groups, weights, InputSpec.of(export_dir))
    table = sensitivity_table(model, groups, weights, split, reference, progress=progress)
    return {"calibration_corpus": corpus, "calibration_positions": split.positions, "block_size": block_size,
            "smooth_alpha": alpha,
            "groups": table, "costs_ms": costs}


def render_markdown(result: dict[str, Any]) -> str:
    lines = ["| group | int8-dynamic top-1 | KL | int8-smooth top-1 | KL | int8-blockwise top-1 | KL | ms fp32 | "
             "ms int8-dynamic | ms int8-smooth | ms int8-blockwise |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    from bertforge.report.content import sensitivity_cells

    ms = result["costs_ms"]["ms"]
    for row in result["groups"]:
        group = row["group"]
        by_scheme = {scheme: ms[scheme][group] for scheme in ms if group in ms[scheme]}
        lines.append("| " + " | ".join([group] + sensitivity_cells(row, by_scheme)) + " |")
    lines.append("")
    lines.append(f"Each group quantized alone, compared with the fp32 graph at {result['calibration_positions']} "
                 f"[MASK] positions of the calibration split ({result['calibration_corpus']}); ms: the group's "
                 "kernel time at b1×s128 with every group in that scheme (ORT profiler). Whole graph: "
                 + ", ".join(f"{s} {v:.1f} ms" for s, v in result["costs_ms"]["model_ms"].items()) + ".")
    return "\n".join(lines) + "\n"
