"""The sensitivity table: each group quantized alone under each scheme, its KL to the fp32 graph and its
agreement at the calibration split's [MASK] positions; the reference and fp32 values it is measured against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bertforge.optimizers.int8_auto.calibration import (
    CalibrationSplit,
    gathered_head,
    head_reads_masked_rows_only,
    masked_logits,
    session_for,
)
from bertforge.optimizers.int8_auto.groups import (
    Group,
    group_input,
    group_schemes,
)
from bertforge.optimizers.int8_auto.plans import apply_plan
from bertforge.optimizers.int8_auto.prefix import LayerPrefix
from bertforge.optimizers.int8_auto.weight_file import WeightFile
from bertforge.optimizers.int8_auto.weights import QuantizedWeights
from bertforge.validation.metrics import kl_to, log_softmax, ref_top1_in_top_k, top1_agrees, top_k


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
