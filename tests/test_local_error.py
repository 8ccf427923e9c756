"""int8-auto's scheme screen: each group's int8 output error on its own fp32 inputs."""

import numpy as np
import onnx
import onnxruntime as ort

from test_smooth_quant import mha_graph


def matmul_outputs(graph: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]) -> list[list]:
    """Per batch, the outputs `names` of `graph` (added as graph outputs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(graph)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(names, {i.name: batch[i.name] for i in session.get_inputs()}) for batch in feeds]


def test_the_output_error_is_what_the_group_quantized_alone_computes_on_fp32_inputs(tiny_variants, tmp_path):
    from bertforge.optimizers.int8_auto.calibration import calibration_split
    from bertforge.optimizers.int8_auto.groups import TIED_GROUP, quant_groups
    from bertforge.optimizers.int8_auto.plans import apply_plan
    from bertforge.optimizers.int8_auto.screen import local_errors
    from bertforge.optimizers.int8_auto.sensitivity import fp32_values
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model = mha_graph(tiny_variants)
    groups = quant_groups(model)
    split = calibration_split(tiny_variants["fp32"], seeds=(7,))
    weights = QuantizedWeights(activation_absmax=fp32_values(model, groups, split, tmp_path).absmax)
    errors = local_errors(model, groups, weights, split)
    assert set(errors) == {g.name for g in groups if g.name != TIED_GROUP}
    for name in ("layer.0.qkv", "layer.1.ffn-down"):
        group = next(g for g in groups if g.name == name)
        # the group's MatMul outputs keep their names in a plan; every node before them is fp32, so in the
        # plan's graph they are the int8 outputs on the fp32 graph's inputs
        outputs = [next(n for n in model.graph.node if n.name == node).output[0] for node in group.nodes]
        fp32 = matmul_outputs(apply_plan(model, {}, groups, weights, repack=False), outputs, split.feeds)
        for scheme in ("int8-dynamic", "int8-smooth"):
            quantized = matmul_outputs(apply_plan(model, {name: scheme}, groups, weights, repack=False), outputs,
                                       split.feeds)
            error = sum(float(np.sum((q - y).astype(np.float64) ** 2))
                        for q_batch, y_batch in zip(quantized, fp32, strict=True)
                        for q, y in zip(q_batch, y_batch, strict=True))
            norm = sum(float(np.sum(y.astype(np.float64) ** 2)) for batch in fp32 for y in batch)
            assert error > 0
            assert np.isclose(errors[name][scheme], error / norm, rtol=1e-3), (name, scheme)


def test_the_screen_keeps_the_scheme_the_output_error_favours_and_both_when_close():
    from bertforge.optimizers.int8_auto.screen import screened_out

    errors = {"a": {"int8-dynamic": 1.0, "int8-smooth": 0.3},  # smooth clearly better: dynamic not measured
              "b": {"int8-dynamic": 1.0, "int8-smooth": 0.85},  # close: both measured
              "c": {"int8-dynamic": 1.0, "int8-smooth": 0.95},  # smooth no better: it costs a Mul more
              "d": {"int8-dynamic": 0.0, "int8-smooth": 0.0}}   # exact either way: the cheaper one
    assert screened_out(errors) == {"a": "int8-dynamic", "c": "int8-smooth", "d": "int8-smooth"}


def test_the_report_says_what_the_screen_left_out():
    from bertforge.report.content import screen_note

    note = screen_note({"screened_out": {"a": "int8-smooth", "b": "int8-dynamic", "c": "int8-dynamic"}})
    assert "int8-dynamic where int8-smooth's error was under 0.8× its own (2 groups)" in note
    assert "not under 0.9× int8-dynamic's (1 group)" in note
    assert screen_note({}) == screen_note({"screened_out": {}}) == ""  # older manifests: no screen
