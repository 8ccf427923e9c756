"""Each group's int8 output error on its own fp32 inputs: which of its int8 schemes is worth measuring.

The sensitivity table measures a group at the [MASK] positions by running the graph from the group's
layer to the logits, once per scheme; on bert-base that is most of int8-auto's search. int8-smooth
(SmoothQuant before int8-dynamic) costs a Mul more than int8-dynamic, so it can only be chosen where it
is more accurate; where it does not cut the group's own output error, its table entry would only
confirm that. This measures, in one run of the fp32 graph over the calibration batches, each group's
MatMul outputs under int8-dynamic and int8-smooth against the fp32 ones:

    relative error = sum ||Y_int8 - Y||^2 / sum ||Y||^2   over the group's MatMuls and the batches' rows

with the same DynamicQuantizeMatMul kernels and quantized weights the plans use, fed the fp32 graph's
own inputs to the group (so every group is measured alone, like the table), over every row of the
batches as ORT runs them (padding rows too: they set the per-tensor activation scale as much as the
real ones). int8-smooth at the recipe's alpha; int8-auto screens only with one alpha (with several,
the table picks each group's, which this does not know). The tied table is not measured here: the
embeddings read it too, which no output of the decoder shows.

Where the errors tell the schemes apart, this order agrees with the table's (demo: int8-smooth cuts the
output error of the FFN-up and attention groups, whose KL it cuts 2-10x, and raises that of layer 0's
FFN-down, whose KL it doubles).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bertforge.onnx_files import import_microsoft_domain
from bertforge.optimizers.int8_auto.groups import TIED_GROUP, Group, group_input
from bertforge.optimizers.int8_auto.plans import apply_plan
from bertforge.optimizers.int8_auto.weights import QuantizedWeights

SCREENED = ("int8-dynamic", "int8-smooth")
# int8-smooth's error / int8-dynamic's: below SMOOTH_ONLY the table measures int8-smooth alone, from
# DYNAMIC_ONLY on int8-dynamic alone (cheaper, and not less accurate), between them both. Against the
# full table's KL (int8-smooth's / int8-dynamic's) on demo (real weights) and synthetic:bert-base-uncased:
# error ratios 0.11-0.79 went with KL ratios 0.10-0.99 (int8-smooth never the less accurate), error
# ratios 0.91-1.69 with KL ratios 0.99-1.98 (never 2% more accurate, for ~13% more kernel time).
SMOOTH_ONLY = 0.8
DYNAMIC_ONLY = 0.9


def screened_out(errors: dict[str, dict[str, float]]) -> dict[str, str]:
    """{group: the scheme the table need not measure}: int8-dynamic where int8-smooth's output error
    is under SMOOTH_ONLY times its own, int8-smooth where it is not under DYNAMIC_ONLY times it."""
    out = {}
    for group, found in errors.items():
        if found["int8-dynamic"] <= 0:  # exact already: int8-smooth cannot do better
            out[group] = "int8-smooth"
            continue
        ratio = found["int8-smooth"] / found["int8-dynamic"]
        if ratio < SMOOTH_ONLY:
            out[group] = "int8-dynamic"
        elif ratio >= DYNAMIC_ONLY:
            out[group] = "int8-smooth"
    return out


def error_graph(model: onnx.ModelProto, groups: list[Group], weights: QuantizedWeights) -> tuple[
        onnx.ModelProto, dict[str, list[tuple[str, str, str]]]]:
    """The fp32 graph (Q/K/V as separate MatMuls) with, beside each group's MatMuls, their int8-dynamic
    and int8-smooth versions reading the same input, and per MatMul the sums of squares of the fp32
    output and of each version's difference from it as outputs (its only ones). Returns the graph and, per group,
    (norm output, scheme, error output) for each MatMul and scheme."""
    graph_model = apply_plan(model, {}, groups, QuantizedWeights(), repack=False)
    graph = graph_model.graph
    initializers = {init.name: init for init in graph.initializer}
    by_name = {node.name: node for node in graph.node}
    added: list[onnx.NodeProto] = []
    outputs: dict[str, list[tuple[str, str, str]]] = {}
    for group in groups:
        if group.name == TIED_GROUP:
            continue
        tensor = group_input(model, group)
        matmuls = [by_name[name] for name in group.nodes]
        alpha = weights.alpha_of(group.name)
        smooth = weights.smoothing(tensor, [weights.read(initializers[n.input[1]]) for n in matmuls], alpha)
        inverse = numpy_helper.from_array((1.0 / smooth).astype(np.float32), f"{group.name}_error_smooth_inv")
        graph.initializer.append(inverse)
        smoothed = f"{group.name}_error_smoothed"
        added.append(helper.make_node("Mul", [tensor, inverse.name], [smoothed], name=f"{group.name}_error_smooth"))
        for node in matmuls:
            weight = initializers[node.input[1]]
            fp32_out = node.output[0]
            norm = f"{node.name}_error_norm"
            added.append(helper.make_node("ReduceSumSquare", [fp32_out], [norm], keepdims=0, name=norm))
            for scheme, source, extra in (("int8-dynamic", tensor, weights.dynamic(weight)),
                                          ("int8-smooth", smoothed, weights.dynamic(weight, smooth, alpha))):
                graph.initializer.extend(extra)
                stem = f"{node.name}_error_{scheme.replace('-', '_')}"
                added += [
                    helper.make_node("DynamicQuantizeMatMul", [source, *(t.name for t in extra)], [f"{stem}_y"],
                                     name=f"{stem}_y", domain="com.microsoft"),
                    helper.make_node("Sub", [f"{stem}_y", fp32_out], [f"{stem}_diff"], name=f"{stem}_diff"),
                    helper.make_node("ReduceSumSquare", [f"{stem}_diff"], [stem], keepdims=0, name=stem),
                ]
                outputs.setdefault(group.name, []).append((norm, scheme, stem))
    graph.node.extend(added)  # after every node: ONNX graphs stay topologically sorted
    names = sorted({name for entries in outputs.values() for entry in entries for name in (entry[0], entry[2])})
    del graph.output[:]  # the sums are all it is run for
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)  # typed by ORT at load
    import_microsoft_domain(graph_model)
    return graph_model, outputs


def local_errors(model: onnx.ModelProto, groups: list[Group], weights: QuantizedWeights, split,
                 weight_file=None) -> dict[str, dict[str, float]]:
    """{group: {scheme: relative output error}} over the split's batches (sensitivity.CalibrationSplit),
    for every group but the tied table; `weights` needs the calibration absmax (int8-smooth's scales)."""
    from bertforge.optimizers.int8_auto.calibration import session_for

    graph, outputs = error_graph(model, groups, weights)
    session = session_for(graph, weight_file=weight_file)
    names = [output.name for output in graph.graph.output]
    sums = dict.fromkeys(names, 0.0)
    for feeds in split.feeds:
        values = session.run(names, {i.name: feeds[i.name] for i in session.get_inputs()})
        for name, value in zip(names, values, strict=True):
            sums[name] += float(value)
    found: dict[str, dict[str, float]] = {}
    for group, entries in outputs.items():
        for scheme in SCREENED:
            error = sum(sums[stem] for _, s, stem in entries if s == scheme)
            norm = sum(sums[norm] for norm, s, _ in entries if s == scheme)
            found.setdefault(group, {})[scheme] = error / max(norm, 1e-30)
    return found
