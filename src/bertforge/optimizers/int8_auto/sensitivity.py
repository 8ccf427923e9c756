"""The sensitivity table: each group quantized alone under each scheme, its KL to the fp32 graph and its
agreement at the calibration split's [MASK] positions; the reference and fp32 values it is measured against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bertforge.fanout import Folder, mapper
from bertforge.optimizers.int8_auto.calibration import (
    CalibrationSplit,
    masked_logit_batches,
    masked_logits,
    session_for,
)
from bertforge.optimizers.int8_auto.groups import (
    Group,
    group_input,
    group_schemes,
)
from bertforge.optimizers.int8_auto.masked_rows import (
    GATHER_INDEX,
    decoder_at_masked_rows,
    mask_index,
    masked_rows_graph,
)
from bertforge.optimizers.int8_auto.plans import apply_plan
from bertforge.optimizers.int8_auto.prefix import LayerPrefix
from bertforge.optimizers.int8_auto.weight_file import WeightFile
from bertforge.optimizers.int8_auto.weights import QuantizedWeights
from bertforge.validation.metrics import kl_to, ref_top1_in_top_k, softmax_terms, top1_agrees, top_k


def plan_graph(model: onnx.ModelProto, plan: dict[str, str], groups: list[Group], weights: QuantizedWeights,
               prefix: LayerPrefix | None = None, weight_file: WeightFile | None = None
               ) -> tuple[onnx.ModelProto, LayerPrefix | None]:
    """(the graph a plan's logits at the [MASK] rows are computed with, the prefix it reads or None): the
    rows gathered as early as changes no logit (masked_rows); with `prefix`, only the graph from the
    plan's first changed layer; with `weight_file` (written from `model`), the graph's base weights are
    read from it (`model` may be its `referencing` copy, with `weights.weight_file` that file)."""
    graph = apply_plan(model, plan, groups, weights)
    if weight_file is not None:
        graph = weight_file.referencing(graph)  # the copies below then skip the large weights
    graph = masked_rows_graph(graph, model, plan, groups)
    suffix = prefix.suffix(graph, plan) if prefix is not None else None
    return (graph, None) if suffix is None else (suffix, prefix)


def plan_logits(model: onnx.ModelProto, plan: dict[str, str], groups: list[Group], weights: QuantizedWeights,
                split: CalibrationSplit, prefix: LayerPrefix | None = None,
                weight_file: WeightFile | None = None) -> np.ndarray:
    """The logits of a plan's graph (plan_graph) at the split's [MASK] positions, all batches at once."""
    graph, reads = plan_graph(model, plan, groups, weights, prefix, weight_file)
    return masked_logits(graph, split, masked_rows_only=True, prefix=reads, weight_file=weight_file)


def plan_agreement(model: onnx.ModelProto, plan: dict[str, str], groups: list[Group], weights: QuantizedWeights,
                   split: CalibrationSplit, reference: SpilledReference, prefix: LayerPrefix | None = None,
                   weight_file: WeightFile | None = None) -> dict[str, float]:
    """A plan's agreement with the reference over the split, a batch at a time: one batch's logits in
    memory, whatever the calibration corpus's size. The per-position values are those of one pass over
    every position at once (each is a function of its own row), and so are their means."""
    graph, reads = plan_graph(model, plan, groups, weights, prefix, weight_file)
    columns = [agreement_columns(reference.batch(split.batch_id(index)), logits)
               for index, logits in masked_logit_batches(graph, split, masked_rows_only=True, prefix=reads,
                                                         weight_file=weight_file)]
    return {key: float(np.mean(np.concatenate([column[key] for column in columns]))) for key in columns[0]}


@dataclass(frozen=True)
class Reference:
    """The fp32 graph at some [MASK] positions, as every comparison reads it, computed once: ~60 graphs
    are compared with the same reference."""

    top: np.ndarray  # top_k
    p: np.ndarray  # softmax, float64
    p_log_p: np.ndarray  # sum p log p per row

    @classmethod
    def of(cls, logits: np.ndarray) -> Reference:
        return cls(top_k(logits), *softmax_terms(logits))


@dataclass
class SpilledReference:
    """The reference of each calibration batch, in a folder (`batch` reads one back): the search's memory
    holds one batch of it, not the split's [positions x vocab] probabilities (float64: 185 MB on demo's
    756 positions, and growing with `int8_auto.calibration_corpus`)."""

    directory: Path

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def store(self, batch_id: int, logits: np.ndarray) -> None:
        reference = Reference.of(logits)
        for name in ("top", "p", "p_log_p"):
            np.save(self.directory / f"{name}-{batch_id}.npy", getattr(reference, name))

    def batch(self, batch_id: int) -> Reference:
        return Reference(*(np.load(self.directory / f"{name}-{batch_id}.npy") for name in ("top", "p", "p_log_p")))

    @classmethod
    def of(cls, directory: Path, split: CalibrationSplit, logits: np.ndarray) -> SpilledReference:
        """From logits at every position of `split`, in its batch order (masked_logits)."""
        spilled = cls(directory)
        start = 0
        for index, rows in enumerate(split.rows):
            spilled.store(split.batch_id(index), logits[start:start + len(rows)])
            start += len(rows)
        return spilled


@dataclass
class Fp32Values:
    """What the search reads of the all-fp32 plan's graph, from one run over the calibration split."""

    reference: SpilledReference  # at the split's [MASK] positions: what every plan is compared with
    absmax: dict[str, np.ndarray]  # max |x| per channel of each group's input: int8-smooth's scales
    prefix: LayerPrefix  # each layer's input: where a plan's suffix graph starts


def fp32_values(model: onnx.ModelProto, groups: list[Group], split: CalibrationSplit, directory: Path,
                weight_file: WeightFile | None = None) -> Fp32Values:
    """One run of `apply_plan(model, {})` (the graph every plan's fp32 groups are made of) with every
    group's input and the prefix's tensors as extra outputs, written to `directory` (`prefix/`,
    `reference/`) a batch at a time. absmax is over the real (unpadded) tokens, the tied table's too (so
    the head's transform runs at every row here; the decoder at the [MASK] rows). Three runs of it
    (reference, absmax, prefix) cost bert-base's search ~10 s."""
    directory = Path(directory)
    fp32 = apply_plan(model, {}, groups, QuantizedWeights())
    if weight_file is not None:
        weight_file.add(fp32)  # its packed Q/K/V weights: every plan whose layer stays fp32 holds the same
    prefix = LayerPrefix.for_groups(model, groups, directory / "prefix")
    reference = SpilledReference(directory / "reference")
    stored = prefix.tensors(fp32)
    inputs = sorted({group_input(model, group) for group in groups})
    # the decoder at the [MASK] rows only (what is stored of it); its input is an extra output at every row
    probe = decoder_at_masked_rows(weight_file.referencing(fp32) if weight_file is not None else fp32)
    extra = sorted(set(stored) | set(inputs))
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra)  # typed by ORT at load
    session = session_for(probe, weight_file=weight_file)
    names = [probe.graph.output[0].name, *extra]
    absmax: dict[str, np.ndarray] = {}
    for index, (feeds, rows, cols) in enumerate(zip(split.feeds, split.rows, split.cols, strict=True)):
        available = {**feeds, GATHER_INDEX: mask_index(rows, cols)}
        found, *values = session.run(names, {i.name: available[i.name] for i in session.get_inputs()})
        reference.store(split.batch_id(index), found)
        real = feeds["attention_mask"].astype(bool)
        for name, value in zip(extra, values, strict=True):
            if name in stored:
                prefix.store(name, split.batch_id(index), value)
            if name in inputs:
                channel_max = np.abs(value[real]).max(axis=0)
                absmax[name] = channel_max if name not in absmax else np.maximum(absmax[name], channel_max)
    return Fp32Values(reference, absmax, prefix)


def agreement_columns(reference: Reference, logits: np.ndarray) -> dict[str, np.ndarray]:
    """Per position, the validation metrics a plan is judged by (their one definition,
    validation.metrics), and only those: the search evaluates ~60 graphs, and the rest of validation's
    metrics doubled its time."""
    top = top_k(logits)
    return {"top1_agreement": top1_agrees(reference.top, top),
            "ref_top1_in_top5": ref_top1_in_top_k(reference.top, top),
            "kl_mean": kl_to(reference.p, reference.p_log_p, logits)}


def agreement(reference: Reference, logits: np.ndarray) -> dict[str, float]:
    """agreement_columns' means."""
    return {key: float(np.mean(column)) for key, column in agreement_columns(reference, logits).items()}


@dataclass
class TableInputs:
    """What a row of the sensitivity table reads. It pickles (the large parts are files: the weight file,
    the prefix, the spilled reference), so a row may run in another process (fanout)."""

    model: onnx.ModelProto
    groups: list[Group]
    weights: QuantizedWeights
    split: CalibrationSplit
    reference: SpilledReference
    skip: dict[str, set[str]]
    alphas: tuple[float, ...]
    prefix: LayerPrefix | None
    weight_file: WeightFile | None
    folder: Folder | None = None  # the search's scratch, holding the three folders above

    def moved_to(self, root: Path) -> None:
        """Read the files from a copy of `folder` at `root` (a row run on another machine: ray_fanout)."""
        assert self.folder is not None
        for holder in (self.reference, self.prefix, self.weight_file):
            if holder is not None:
                holder.directory = Path(root) / holder.directory.relative_to(self.folder.root)
        self.folder = None

    def __getstate__(self) -> dict[str, Any]:
        # the graph as bytes (protobuf's own pickling copies it field by field); the weights without their
        # caches of quantized initializers (pure caches: each row fills what it needs)
        state = dict(self.__dict__, model=self.model.SerializeToString())
        state["weights"] = replace(self.weights, cache={}, tied_cache={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # the weights' weight_file stays this weight_file (one pickle: one object), so moved_to moves both
        self.__dict__.update(state, model=onnx.load_from_string(state["model"]))


def sensitivity_row(inputs: TableInputs, index: int) -> tuple[dict[str, Any], float | None]:
    """Group `index` quantized alone under each of its schemes; with int8-smooth, the alpha of lowest KL
    (else None)."""
    group, weights = inputs.groups[index], inputs.weights
    row: dict[str, Any] = {"group": group.name, "macs_per_token": group.macs_per_token}

    def measured(scheme: str) -> dict[str, float]:
        return plan_agreement(inputs.model, {group.name: scheme}, inputs.groups, weights, inputs.split,
                              inputs.reference, inputs.prefix, inputs.weight_file)

    chosen = None
    for scheme in group_schemes(group):
        if scheme == "fp32":
            continue
        if scheme in inputs.skip.get(group.name, set()):
            row[scheme] = None
        elif scheme != "int8-smooth":
            row[scheme] = measured(scheme)
        else:
            tried = []
            for alpha in inputs.alphas:
                weights.alphas[group.name] = alpha
                tried.append({**measured(scheme), "alpha": alpha})
            row[scheme] = min(tried, key=lambda result: result["kl_mean"])  # the first of equal KLs
            chosen = weights.alphas[group.name] = row[scheme]["alpha"]
    return row, chosen


def sensitivity_table(model: onnx.ModelProto, groups: list[Group], weights: QuantizedWeights,
                      split: CalibrationSplit, reference: SpilledReference, skip: dict[str, set[str]] | None = None,
                      progress: Callable[[str], None] | None = None,
                      smooth_alphas: tuple[float, ...] | None = None,
                      prefix: LayerPrefix | None = None,
                      weight_file: WeightFile | None = None, scratch: Path | None = None) -> list[dict[str, Any]]:
    """Each group quantized alone under each int8 scheme: agreement with the fp32 reference. The rows
    are independent: they run where `fanout.mapper()` puts them (`scratch`: the folder that holds the
    reference's, the prefix's and the weight file's, for rows elsewhere), and come back in graph order.

    `skip`: {group: schemes not to measure} (int8-auto skips schemes slower than fp32 for a group).
    `smooth_alphas`: int8-smooth is measured at each, and the group keeps the one of lowest KL (in
    `weights.alphas`, recorded in its row): SmoothQuant's best alpha differs by layer (demo, alone:
    the tied table's top-1 97.9% at 0.5 against 96.6% at 0.8; layer 0's FFN-up 95.8% at 0.8, 93.1% at
    0.5). Default: `weights.alpha` alone."""
    inputs = TableInputs(model, groups, weights, split, reference, skip or {}, smooth_alphas or (weights.alpha,),
                         prefix, weight_file, Folder.marked(scratch) if scratch is not None else None)
    finished = [0]

    def done(index: int) -> None:
        finished[0] += 1
        if progress:
            progress(f"sensitivity: group {finished[0]}/{len(groups)}")

    rows = []
    for row, alpha in mapper()(sensitivity_row, inputs, len(groups), done):
        if alpha is not None:
            weights.alphas[row["group"]] = alpha
        rows.append(row)
    return rows
