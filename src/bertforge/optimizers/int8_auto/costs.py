"""Each group's kernel time under each scheme (ORT profiler at b1 x s128), measured once per export, block
size, CPU and thread count and kept in the results cache; and the cost model the search reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bertforge.artifact import Artifact
from bertforge.bench import InputSpec
from bertforge.optimizers.graph.exclusions import decoder_nodes
from bertforge.optimizers.int8_auto.calibration import (
    WARMUP_RUNS,
    session_for,
)
from bertforge.optimizers.int8_auto.groups import (
    OUTLIER_CHANNELS,
    SCHEMES,
    TIED_GROUP,
    Group,
    group_input,
    group_schemes,
    input_channels,
    quant_groups,
)
from bertforge.optimizers.int8_auto.plans import apply_plan
from bertforge.optimizers.int8_auto.weight_file import WeightFile
from bertforge.optimizers.int8_auto.weights import QuantizedWeights


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
        sessions, decoders = {}, {}
        for scheme in SCHEMES:
            plan = {g.name: scheme for g in groups if scheme in group_schemes(g)}
            graph = apply_plan(model, plan, groups, timing, repack=False)
            decoders[scheme] = frozenset(node.name for node in decoder_nodes(graph))
            session = session_for(graph, profile_prefix=f"{scratch}/{scheme}", weight_file=weight_file)
            del graph
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
            per_scheme[scheme] = {g.name: group_ms(g, scheme, node_ms, decoders[scheme]) for g in groups
                                  if scheme in group_schemes(g)}
    return {"ms": per_scheme, "model_ms": totals, "sequence": sequence}


def machine_costs(export: Artifact, block_size: int, outlier_channels: int = OUTLIER_CHANNELS) -> dict[str, Any]:
    """scheme_costs for an fp32 export on this machine, measured once and then read from the results
    cache (keyed by the export, the block size, int8-outlier's fp32 channels, this module's code, the
    libraries, CPU and threads)."""
    import bertforge.results_cache as results_cache
    from bertforge.artifact import MODEL_FILE, owned_scratch
    from bertforge.cache import cache_root, file_lock
    from bertforge.code_digest import code_digest
    from bertforge.onnx_files import model_config
    from bertforge.optimizers.graph.ort_fusion import mha_fused
    from bertforge.progress import report

    key = results_cache.key_for("int8-costs", {"export": export.key, "block_size": block_size,
                                               "outlier_channels": outlier_channels, "code": code_digest(__name__)})
    with file_lock(cache_root() / "locks" / f"int8-costs-{key}.lock"):  # two builds measure once
        found = results_cache.load("int8-costs", key)
        if found is not None:
            return found
        report("measuring per-group kernel times (once per export and machine)")
        hf = model_config(export.path)
        model, _ = mha_fused(export.path / MODEL_FILE, hf, "int8-auto")
        with owned_scratch(cache_root() / "tmp", "int8-costs-") as scratch:
            costs = scheme_costs(model, quant_groups(model),
                                 QuantizedWeights(block_size=block_size, outlier_channels=outlier_channels),
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


def group_ms(group: Group, scheme: str, node_ms: dict[str, float], decoder: frozenset[str] = frozenset()) -> float:
    """The kernel time of a group's nodes in a profile (for the tied table, the `decoder` nodes: the
    decoder, its bias and its smoothing, exclusions.decoder_nodes of the profiled graph)."""
    if group.name == TIED_GROUP:
        return sum(ms for name, ms in node_ms.items() if name in decoder)
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
