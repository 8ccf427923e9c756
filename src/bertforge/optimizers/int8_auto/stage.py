"""INT8 auto stage: a scheme per group (fp32 or one of `int8_auto.schemes`), chosen to meet a target.

From the export fused with MultiHeadAttention (as int8-blockwise), this stage measures, on the
calibration split (its own sentences, never the validation corpus), each group quantized alone under
each scheme (the sensitivity table), then picks the fastest plan whose agreement with the fp32 graph
meets `int8_auto.target` (search.py), by each group's kernel time under each scheme (ORT profiler
at b1 x s128). The plan, the table, the costs and every evaluated plan go into manifest.json; the
pipeline then validates the variant on the validation corpus like any other.

The kernel times are a measurement of this machine, so they are an input of the stage, not a step
inside it (`key_inputs`): measured once per export, block size, CPU and thread count, kept in the
results cache, and part of the cache key. A rebuild on this machine plans from the same numbers and
writes the same bytes; other numbers give another key, so one key never names two artifacts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bertforge.artifact import MODEL_FILE, Artifact, owned_scratch
from bertforge.cache import cache_root
from bertforge.cpu_target import int8_target_record
from bertforge.onnx_files import copy_loader_files, model_config, save_model
from bertforge.optimizers.graph.op_counts import op_histogram
from bertforge.optimizers.graph.ort_fusion import mha_fused
from bertforge.optimizers.int8_auto.calibration import calibration_split
from bertforge.optimizers.int8_auto.config import Int8AutoConfig
from bertforge.optimizers.int8_auto.costs import machine_costs, modelled_costs
from bertforge.optimizers.int8_auto.groups import SCHEMES, quant_groups
from bertforge.optimizers.int8_auto.plans import apply_plan
from bertforge.optimizers.int8_auto.screen import local_errors, screened_out
from bertforge.optimizers.int8_auto.search import ordered_moves, search
from bertforge.optimizers.int8_auto.sensitivity import fp32_values, plan_agreement, sensitivity_table
from bertforge.optimizers.int8_auto.weight_file import WeightFile
from bertforge.optimizers.int8_auto.weights import QuantizedWeights
from bertforge.optimizers.int8_weights import saturating_pairs_in
from bertforge.progress import report

NAME = "int8-auto"
VERSION = "2"


def key_inputs(parent: Artifact, config: Int8AutoConfig) -> dict[str, Any]:
    """The calibration corpus's text and the measured per-group costs the plan is chosen by."""
    from bertforge.validation.corpus import corpus_digest

    return {"calibration_corpus": corpus_digest(config.calibration_corpus),
            "costs": machine_costs(parent, config.block_size, config.outlier_channels)}


def run(src: Path, out: Path, config: Int8AutoConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    hf = model_config(src)
    model, stats = mha_fused(src / MODEL_FILE, hf, NAME)
    groups = quant_groups(model)
    split = calibration_split(src, config.calibration_corpus)
    costs = inputs["costs"]
    allowed = {"fp32", *config.schemes}
    group_costs = {name: {s: ms for s, ms in by_scheme.items() if s in allowed}
                   for name, by_scheme in modelled_costs(groups, costs).items()}
    # a scheme slower than fp32 for a group, or not in the recipe's schemes, can never be chosen: its
    # sensitivity is not measured
    skip = {name: {s for s in SCHEMES if s not in allowed} | {s for s, ms in by_scheme.items()
                                                               if s != "fp32" and ms >= by_scheme["fp32"]}
            for name, by_scheme in group_costs.items()}
    with owned_scratch(cache_root() / "tmp", "int8-auto-search-") as scratch:
        report("fp32 reference, activation ranges and layer inputs")
        weight_file = WeightFile.write(model, scratch / "weights")
        fp32 = fp32_values(model, groups, split, scratch, weight_file)
        reference, prefix = fp32.reference, fp32.prefix
        weights = QuantizedWeights(block_size=config.block_size, activation_absmax=fp32.absmax,
                                   alpha=config.smooth_alphas[-1], outlier_channels=config.outlier_channels,
                                   fp16_embeddings=config.embedding_table == "fp16", weight_file=weight_file,
                                   target=config.cpu_target)
        # every candidate graph is made from the base graph with its large weights as references into the
        # weight file: copying 440 MB of bert-base weights into each of ~110 plans cost ~20 s
        base = weight_file.referencing(model)
        table_split, _ = split.every(config.sensitivity_stride)
        errors: dict[str, dict[str, float]] = {}
        screened: dict[str, str] = {}
        if config.screen_schemes and {"int8-dynamic", "int8-smooth"} <= allowed and len(config.smooth_alphas) == 1:
            report("int8 output error per group")
            errors = local_errors(base, groups, weights, table_split, weight_file)
            screened = {name: scheme for name, scheme in screened_out(errors).items()
                        if not skip[name] & {"int8-dynamic", "int8-smooth"}}  # both measurable: the screen decides
            for name, scheme in screened.items():
                skip[name].add(scheme)
        report(f"sensitivity rows: {len(groups)} groups")
        table = sensitivity_table(base, groups, weights, table_split, reference, skip=skip,
                                  smooth_alphas=config.smooth_alphas, prefix=prefix, weight_file=weight_file,
                                  progress=report, scratch=scratch)
        kl = {row["group"]: {s: row[s]["kl_mean"] for s in allowed if row.get(s) is not None} for row in table}
        group_costs = {name: {s: ms for s, ms in by_scheme.items() if s == "fp32" or s in kl[name]}
                       for name, by_scheme in group_costs.items()}
        names = [g.name for g in groups]
        start, moves = ordered_moves(names, group_costs, kl)
        fp32_ms = costs["model_ms"]["fp32"]
        fixed_ms = fp32_ms - sum(group_costs[name]["fp32"] for name in names)

        def latency_ratio(plan: dict[str, str]) -> float:
            return (fixed_ms + sum(group_costs[name][plan[name]] for name in names)) / fp32_ms

        def evaluate(plan: dict[str, str]) -> dict[str, float]:
            return plan_agreement(base, plan, groups, weights, split, reference, prefix, weight_file)

        target = {"top1_agreement": config.target.top1_min, "ref_top1_in_top5": config.target.ref_top1_in_top5_min,
                  "kl_mean": config.target.kl_mean_max}
        found = search(start, moves, evaluate, target, latency_ratio, config.max_latency_ratio)
    chosen = apply_plan(model, found["plan"], groups, weights)
    # read before saving: a model saved with external data keeps references, not the weights
    record = int8_target_record(config.cpu_target, saturating_pairs_in(chosen))
    save_model(chosen, out)
    copy_loader_files(src, out)
    return {**found, "target": config.target.model_dump(), "max_latency_ratio": config.max_latency_ratio,
            "calibration_corpus": config.calibration_corpus, "calibration_positions": split.positions,
            "sensitivity_positions": table_split.positions, "sensitivity_stride": config.sensitivity_stride,
            "sensitivity": table,
            # each group's int8 output error on its own fp32 inputs, and the scheme it kept the table from
            "output_error": errors,
            "screened_out": screened,
            "costs_ms": {"per_group": group_costs, "measured_per_group": costs["ms"],
                         # fp32_graph, int8_dynamic_graph, ...: each scheme's whole graph, every group in it
                         **{f"{scheme.replace('-', '_')}_graph": round(ms, 3)
                            for scheme, ms in costs["model_ms"].items()}},
            "block_size": config.block_size, "schemes": list(config.schemes),
            "smooth_alphas": list(config.smooth_alphas),
            "smooth_alpha_by_group": {g: weights.alpha_of(g) for g, s in found["plan"].items() if s == "int8-smooth"},
            "outlier_channels": config.outlier_channels, "embedding_table": config.embedding_table,
            "fused_operators": stats,
            "op_types": op_histogram(chosen),
            "search_seconds": round(time.monotonic() - started, 1),
            **record}
