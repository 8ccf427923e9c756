"""Per-group INT8 sensitivity and per-scheme cost, measured on a calibration split.

The calibration split is the project's calibration sentences masked with their own seeds: neither
the validation corpus nor the demo head's fit sentences, so a plan chosen here is judged on
sentences it was not chosen on, and the head is no surer here than on new text. The reference is the
model's own fp32 graph as every plan builds its fp32 groups (`apply_plan(model, {})`: the
MultiHeadAttention fusion of the export with fp32 Q/K/V packed back into Attention, equal to PyTorch
to ~1e-4), run once (fp32_values); every candidate graph is run over the same batches and compared at
the [MASK] positions.
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
from bertforge.layer_prefix import LayerPrefix
from bertforge.optimizers.mixed_int8 import (
    SCHEMES,
    TIED_GROUP,
    Group,
    QuantizedWeights,
    apply_plan,
    group_input,
    input_channels,
)
from bertforge.validation.metrics import kl_to, log_softmax, ref_top1_in_top_k, top1_agrees, top_k
from bertforge.weight_file import WeightFile

CALIBRATION_SEEDS = (7, 8)
WARMUP_RUNS = 3


@dataclass
class CalibrationSplit:
    feeds: list[dict[str, np.ndarray]]
    rows: list[np.ndarray]
    cols: list[np.ndarray]
    # each batch's index in the split it was taken from (`every`): the one LayerPrefix stored its values by
    batch_ids: list[int] | None = None

    @property
    def positions(self) -> int:
        return int(sum(len(r) for r in self.rows))

    def batch_id(self, index: int) -> int:
        return index if self.batch_ids is None else self.batch_ids[index]

    def every(self, stride: int) -> tuple[CalibrationSplit, np.ndarray]:
        """Every `stride`-th batch (the first, then each stride-th after it), and the indices of its
        [MASK] positions among this split's (logits are concatenated in batch order). The batches are
        sorted by length, so the subset spans every length the split has."""
        keep = list(range(0, len(self.feeds), stride))
        starts = np.cumsum([0] + [len(r) for r in self.rows])
        positions = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in keep]) if keep else np.arange(0)
        return (CalibrationSplit([self.feeds[i] for i in keep], [self.rows[i] for i in keep],
                                 [self.cols[i] for i in keep], [self.batch_id(i) for i in keep]), positions)


def calibration_split(checkpoint: Path, corpus: str = "calibration", seeds: tuple[int, ...] = CALIBRATION_SEEDS,
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


def session_for(model: onnx.ModelProto, threads: int | None = None, profile_prefix: str | None = None,
                weight_file: WeightFile | None = None):
    """A session over `model`; with `weight_file`, its large base initializers are read from that file."""
    import onnxruntime as ort

    from bertforge.runtime import session_options

    options = session_options(threads, spinning=False)
    if weight_file is not None:
        weight_file.configure(options)
        model = weight_file.referencing(model)
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# Schemes whose arithmetic for one row does not depend on the other rows: int8-dynamic, -smooth and -outlier
# quantize the whole activation tensor with one scale (DynamicQuantizeMatMul), int8-blockwise per row.
ROW_LOCAL_SCHEMES = frozenset({"fp32", "int8-blockwise"})
HEAD_GROUPS = frozenset({"head.transform", TIED_GROUP})
GATHER_INDEX = "calibration_mask_index"


def head_reads_masked_rows_only(plan: dict[str, str]) -> bool:
    """Whether the head may run at the [MASK] rows only with every logit as in the full graph: true when
    no head group is quantized with one scale per tensor (a scale that the other rows would change)."""
    return all(plan.get(name, "fp32") in ROW_LOCAL_SCHEMES for name in HEAD_GROUPS)


def gathered_head(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with its MLM head run at the rows of a `calibration_mask_index` input ([n, 2]: batch,
    position) only. The head's decoder is about half of demo's compute at the calibration batches, and
    full [batch, seq, vocab] logits are copied out only to keep n rows of them."""
    import copy

    from onnx import helper

    from bertforge.optimizers.masked_head import gather_before_head

    gathered = copy.deepcopy(model)
    gathered.graph.input.append(helper.make_tensor_value_info(GATHER_INDEX, onnx.TensorProto.INT64, ["n", 2]))
    gather_before_head(gathered, GATHER_INDEX)
    logits = gathered.graph.output[0]
    vocab = logits.type.tensor_type.shape.dim[-1]
    del logits.type.tensor_type.shape.dim[:]
    logits.type.tensor_type.shape.dim.add().dim_param = "n"
    logits.type.tensor_type.shape.dim.add().CopyFrom(vocab)
    del gathered.graph.value_info[:]  # the head's shapes changed; ORT infers them at load
    return gathered


def masked_logits(model: onnx.ModelProto, split: CalibrationSplit, masked_rows_only: bool = False,
                  prefix: LayerPrefix | None = None, weight_file: WeightFile | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Logits at the split's [MASK] positions. `masked_rows_only`: `model` is a gathered_head graph
    (exact only where head_reads_masked_rows_only holds for the graph's plan). `prefix`: `model` is a
    suffix graph reading the prefix's stored values. `weight_file`: the base graph's weight file.

    `out`: a [positions, vocab] array to write them into and return, for a caller comparing many
    graphs: a fresh array of that size per graph (92 MB on demo) is new memory each time, whose first
    touch cost int8-auto's search 0.24 s per evaluated graph here, more than demo's suffix runs."""
    session = session_for(model, weight_file=weight_file)
    wanted = [i.name for i in session.get_inputs()]
    parts = []
    start = 0
    for index, (feeds, rows, cols) in enumerate(zip(split.feeds, split.rows, split.cols, strict=True)):
        available = {**feeds, GATHER_INDEX: np.stack([rows, cols], axis=1).astype(np.int64)}
        if prefix is not None:
            available.update(prefix.feeds(session, split.batch_id(index)))
        logits = session.run(None, {name: available[name] for name in wanted})[0]
        logits = logits if masked_rows_only else logits[rows, cols]
        if out is None:
            parts.append(logits)
        else:
            out[start:start + len(logits)] = logits
        start += len(logits)
    if out is None:
        return np.concatenate(parts)
    if start != len(out):
        raise ValueError(f"{start} [MASK] positions for an output of {len(out)} rows")
    return out


def plan_logits(model: onnx.ModelProto, plan: dict[str, str], groups: list[Group], weights: QuantizedWeights,
                split: CalibrationSplit, prefix: LayerPrefix | None = None,
                weight_file: WeightFile | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """The logits of a plan's graph at the split's [MASK] positions, the head at those rows only when
    that changes no logit; with `prefix`, only the graph from the plan's first changed layer runs;
    with `weight_file` (written from `model`), the graph's base weights are read from it (`model` may be
    its `referencing` copy, with `weights.weight_file` that file); written into `out` when given
    (masked_logits)."""
    graph = apply_plan(model, plan, groups, weights)
    if weight_file is not None:
        graph = weight_file.referencing(graph)  # the copies below then skip the large weights
    rows_only = head_reads_masked_rows_only(plan)
    if rows_only:
        graph = gathered_head(graph)
    suffix = prefix.suffix(graph, plan) if prefix is not None else None
    if suffix is not None:
        return masked_logits(suffix, split, masked_rows_only=rows_only, prefix=prefix, weight_file=weight_file,
                             out=out)
    return masked_logits(graph, split, masked_rows_only=rows_only, weight_file=weight_file, out=out)


@dataclass
class Fp32Values:
    """What the search reads of the all-fp32 plan's graph, from one run over the calibration split."""

    logits: np.ndarray  # at the split's [MASK] positions: the reference every plan is compared with
    absmax: dict[str, np.ndarray]  # max |x| per channel of each group's input: int8-smooth's scales
    prefix: LayerPrefix  # each layer's input: where a plan's suffix graph starts


def fp32_values(model: onnx.ModelProto, groups: list[Group], split: CalibrationSplit, directory: Path,
                weight_file: WeightFile | None = None) -> Fp32Values:
    """One run of `apply_plan(model, {})` (the graph every plan's fp32 groups are made of) with every
    group's input and the prefix's tensors as extra outputs. absmax is over the real (unpadded) tokens,
    the tied table's too (so the head runs at every row here). Three runs of it (reference, absmax,
    prefix) cost bert-base's search ~10 s."""
    fp32 = apply_plan(model, {}, groups, QuantizedWeights())
    if weight_file is not None:
        weight_file.add(fp32)  # its packed Q/K/V weights: every plan whose layer stays fp32 holds the same
    prefix = LayerPrefix.for_groups(model, groups, directory)
    stored = prefix.tensors(fp32)
    inputs = sorted({group_input(model, group) for group in groups})
    probe = weight_file.referencing(fp32) if weight_file is not None else fp32
    extra = sorted(set(stored) | set(inputs))
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra)  # typed by ORT at load
    session = session_for(probe, weight_file=weight_file)
    names = [probe.graph.output[0].name, *extra]
    logits, absmax = [], {}
    for index, (feeds, rows, cols) in enumerate(zip(split.feeds, split.rows, split.cols, strict=True)):
        found, *values = session.run(names, {i.name: feeds[i.name] for i in session.get_inputs()})
        logits.append(found[rows, cols])
        real = feeds["attention_mask"].astype(bool)
        for name, value in zip(extra, values, strict=True):
            if name in stored:
                prefix.store(name, split.batch_id(index), value)
            if name in inputs:
                channel_max = np.abs(value[real]).max(axis=0)
                absmax[name] = channel_max if name not in absmax else np.maximum(absmax[name], channel_max)
    return Fp32Values(np.concatenate(logits), absmax, prefix)


@dataclass(frozen=True)
class Reference:
    """The fp32 graph's logits at the split's [MASK] positions, with what every comparison reads of
    them computed once: ~60 graphs are compared with the same reference."""

    logits: np.ndarray
    top: np.ndarray
    p: np.ndarray  # softmax
    p_log_p: np.ndarray  # sum p log p per row

    @classmethod
    def of(cls, logits: np.ndarray) -> Reference:
        log_p = log_softmax(logits)
        p = np.exp(log_p)
        return cls(logits, top_k(logits), p, (p * log_p).sum(axis=-1))

    def at(self, positions: np.ndarray) -> Reference:
        """The reference at some of its positions (CalibrationSplit.every's)."""
        return Reference(self.logits[positions], self.top[positions], self.p[positions], self.p_log_p[positions])


def agreement(reference: Reference, logits: np.ndarray) -> dict[str, float]:
    """The validation metrics a plan is judged by (their one definition, validation.metrics), and only
    those: the search evaluates ~60 graphs, and the rest of validation's metrics doubled its time."""
    top = top_k(logits)
    return {"top1_agreement": float(np.mean(top1_agrees(reference.top, top))),
            "ref_top1_in_top5": float(np.mean(ref_top1_in_top_k(reference.top, top))),
            "kl_mean": float(np.mean(kl_to(reference.p, reference.p_log_p, logits)))}


def group_schemes(group: Group) -> tuple[str, ...]:
    """The tied table is int8 per row (its decoder a DynamicQuantizeMatMul, smoothed or not) or fp32."""
    return ("fp32", "int8-dynamic", "int8-smooth") if group.name == TIED_GROUP else SCHEMES


def sensitivity_table(model: onnx.ModelProto, groups: list[Group], weights: QuantizedWeights,
                      split: CalibrationSplit, reference: Reference, skip: dict[str, set[str]] | None = None,
                      progress: Callable[[str], None] | None = None,
                      smooth_alphas: tuple[float, ...] | None = None,
                      prefix: LayerPrefix | None = None,
                      weight_file: WeightFile | None = None) -> list[dict[str, Any]]:
    """Each group quantized alone under each int8 scheme: agreement with the fp32 reference.

    `skip`: {group: schemes not to measure} (int8-auto skips schemes slower than fp32 for a group).
    `smooth_alphas`: int8-smooth is measured at each, and the group keeps the one of lowest KL (in
    `weights.alphas`, recorded in its row): SmoothQuant's best alpha differs by layer (demo, alone:
    the tied table's top-1 97.9% at 0.5 against 96.6% at 0.8; layer 0's FFN-up 95.8% at 0.8, 93.1% at
    0.5). Default: `weights.alpha` alone."""
    alphas = smooth_alphas or (weights.alpha,)
    buffer = np.empty_like(reference.logits)  # every graph's logits, in turn (masked_logits)
    rows = []
    for index, group in enumerate(groups):
        row: dict[str, Any] = {"group": group.name, "macs_per_token": group.macs_per_token}
        for scheme in group_schemes(group):
            if scheme == "fp32":
                continue
            if skip and scheme in skip.get(group.name, set()):
                row[scheme] = None
                continue
            if scheme != "int8-smooth":
                row[scheme] = agreement(reference, plan_logits(model, {group.name: scheme}, groups, weights, split,
                                                               prefix, weight_file, buffer))
                continue
            tried = []
            for alpha in alphas:
                weights.alphas[group.name] = alpha
                found = agreement(reference, plan_logits(model, {group.name: scheme}, groups, weights, split, prefix,
                                                         weight_file, buffer))
                tried.append({**found, "alpha": alpha})
            row[scheme] = min(tried, key=lambda result: result["kl_mean"])  # the first of equal KLs
            weights.alphas[group.name] = row[scheme]["alpha"]
        rows.append(row)
        if progress:
            progress(f"sensitivity: group {index + 1}/{len(groups)}")
    return rows


def scheme_costs(model: onnx.ModelProto, groups: list[Group], weights: QuantizedWeights,
                 spec: InputSpec, sequence: int = 128, runs: int = 20,
                 weight_file: WeightFile | None = None) -> dict[str, Any]:
    """Measured ms per group and scheme at b1 x `sequence` (ORT profiler, one graph per scheme)."""
    import os
    import tempfile

    from bertforge.bench import synthetic_inputs
    from bertforge.runtime import feeds_for

    sequence = spec.sequence(sequence)
    inputs = synthetic_inputs(1, sequence, spec)
    # timing does not depend on the calibration's values: a unit absmax per input channel stands in
    timing = QuantizedWeights(weights.block_size, {group_input(model, g): np.ones(input_channels(model, g), np.float32)
                                                   for g in groups},
                              weights.alpha, dict(weights.cache), outlier_channels=weights.outlier_channels,
                              fp16_embeddings=weights.fp16_embeddings, weight_file=weights.weight_file)
    per_scheme: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bertforge-profile-") as scratch:
        sessions = {}
        for scheme in SCHEMES:
            plan = {g.name: scheme for g in groups if scheme in group_schemes(g)}
            session = session_for(apply_plan(model, plan, groups, timing, repack=False),
                                  profile_prefix=f"{scratch}/{scheme}", weight_file=weight_file)
            sessions[scheme] = (session, feeds_for(session, inputs["input_ids"], inputs["attention_mask"],
                                                   inputs["token_type_ids"]))
        # the schemes' runs interleaved: timed one scheme after another, a busy spell or a clock change
        # on this shared machine fell on one scheme (int8-smooth's kernels measured 1.5x int8-dynamic's,
        # against 1.02x for the two graphs run alternately)
        for _ in range(WARMUP_RUNS + runs):
            for session, feeds in sessions.values():
                session.run(None, feeds)
        for scheme, (session, _) in sessions.items():
            path = session.end_profiling()
            events = json.loads(Path(path).read_text())
            os.remove(path)
            durations: dict[str, list[float]] = {}
            for event in events:
                if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                    durations.setdefault(event["name"][: -len("_kernel_time")], []).append(event["dur"] / 1000)
            # the median of the timed runs (warm-up runs dropped): one preempted run on a busy machine
            # must not reorder the plan (a mean let it, on the tiny test model)
            node_ms = {name: float(np.median(times[WARMUP_RUNS:] or times)) for name, times in durations.items()}
            totals[scheme] = sum(node_ms.values())
            per_scheme[scheme] = {g.name: group_ms(g, scheme, node_ms) for g in groups if scheme in group_schemes(g)}
    return {"ms": per_scheme, "model_ms": totals, "sequence": sequence}


def machine_costs(export: Artifact, block_size: int) -> dict[str, Any]:
    """scheme_costs for an fp32 export on this machine, measured once and then read from the results
    cache (keyed by the export, the block size, this module's code, the libraries, CPU and threads)."""
    from bertforge import results_cache
    from bertforge.artifact import owned_scratch
    from bertforge.cache import cache_root, file_lock
    from bertforge.code_digest import code_digest
    from bertforge.optimizers.common import MODEL_FILE, mha_fused, model_config
    from bertforge.optimizers.mixed_int8 import quant_groups
    from bertforge.progress import report

    key = results_cache.key_for("int8-costs", {"export": export.key, "block_size": block_size,
                                               "code": code_digest(__name__)})
    with file_lock(cache_root() / "locks" / f"int8-costs-{key}.lock"):  # two builds measure once
        found = results_cache.load("int8-costs", key)
        if found is not None:
            return found
        report("measuring per-group kernel times (once per export and machine)")
        hf = model_config(export.path)
        model, _ = mha_fused(export.path / MODEL_FILE, hf, "int8-auto")
        with owned_scratch(cache_root() / "tmp", "int8-costs-") as scratch:
            costs = scheme_costs(model, quant_groups(model), QuantizedWeights(block_size=block_size),
                                 InputSpec.of(export.path), weight_file=WeightFile.write(model, scratch))
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
    if scheme == "int8-outlier":  # each MatMul's int8 part, fp32 part and Add; the group's Gather and Mul
        names = [f"{name}{suffix}{part}" for name in group.nodes for part in ("", "_fp32", "_add")]
        names += [f"{group.nodes[0]}_outlier_gather", f"{group.nodes[0]}_outlier_mask"]
        return sum(node_ms.get(name, 0.0) for name in names)
    if scheme == "int8-token":  # each MatMul's kernel and rescale Mul; the group's row-max and Div
        names = [f"{name}{suffix}{part}" for name in group.nodes for part in ("", "_rescale")]
        names += [f"{group.nodes[0]}_token_{part}" for part in ("abs", "max", "floor", "div")]
        return sum(node_ms.get(name, 0.0) for name in names)
    ms = sum(node_ms.get(f"{name}{suffix}", 0.0) for name in group.nodes)
    return ms + (node_ms.get(f"{group.nodes[0]}_smooth", 0.0) if scheme == "int8-smooth" else 0.0)


def analyze(export_dir: Path, block_size: int = 16, corpus: str = "calibration",
            smooth_alphas: tuple[float, ...] | None = None,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The full table for an fp32 export directory: every group alone under every scheme, with costs
    (int8-smooth at each of `smooth_alphas`, int8-auto's by default, keeping the lowest KL)."""
    from bertforge.artifact import owned_scratch
    from bertforge.cache import cache_root
    from bertforge.optimizers.common import MODEL_FILE, mha_fused, model_config
    from bertforge.optimizers.mixed_int8 import quant_groups
    from bertforge.recipe import Int8AutoConfig

    alphas = tuple(smooth_alphas or Int8AutoConfig().smooth_alphas)
    hf = model_config(export_dir)
    model, _ = mha_fused(export_dir / MODEL_FILE, hf, "sensitivity")
    groups = quant_groups(model)
    split = calibration_split(export_dir, corpus)
    with owned_scratch(cache_root() / "tmp", "sensitivity-") as scratch:
        weight_file = WeightFile.write(model, scratch / "weights")
        fp32 = fp32_values(model, groups, split, scratch / "prefix", weight_file)
        reference = Reference.of(fp32.logits)
        weights = QuantizedWeights(block_size=block_size, alpha=alphas[-1], activation_absmax=fp32.absmax,
                                   weight_file=weight_file)
        costs = scheme_costs(model, groups, weights, InputSpec.of(export_dir), weight_file=weight_file)
        table = sensitivity_table(weight_file.referencing(model), groups, weights, split, reference,
                                  progress=progress, smooth_alphas=alphas, prefix=fp32.prefix, weight_file=weight_file)
    return {"calibration_corpus": corpus, "calibration_positions": split.positions, "block_size": block_size,
            "smooth_alphas": list(alphas), "groups": table, "costs_ms": costs}


def render_markdown(result: dict[str, Any]) -> str:
    from bertforge.report.content import SENSITIVITY_HEADER, sensitivity_cells
    from bertforge.report.markdown import table_lines

    ms = result["costs_ms"]["ms"]
    rows = []
    for row in result["groups"]:
        group = row["group"]
        by_scheme = {scheme: ms[scheme][group] for scheme in ms if group in ms[scheme]}
        rows.append([group, *sensitivity_cells(row, by_scheme)])
    lines = table_lines(["group", *SENSITIVITY_HEADER], rows)
    lines.append("")
    lines.append(f"Each group quantized alone, compared with the fp32 graph at {result['calibration_positions']} "
                 f"[MASK] positions of the calibration split ({result['calibration_corpus']}); ms: the group's "
                 "kernel time at b1×s128 with every group in that scheme (ORT profiler). Whole graph: "
                 + ", ".join(f"{s} {v:.1f} ms" for s, v in result["costs_ms"]["model_ms"].items()) + ".")
    return "\n".join(lines) + "\n"
