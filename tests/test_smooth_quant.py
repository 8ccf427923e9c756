"""int8-smooth (SmoothQuant before int8-dynamic), int8-outlier (outlier channels kept fp32), the
packed-attention repack of int8-auto's graphs, and the search's head at the [MASK] rows."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import INT8_LOGIT_ERROR, tiny_feeds

QKV = [f"/bert/encoder/layer.0/attention/self/{p}/MatMul" for p in ("query", "key", "value")]


def projections_with_an_outlier_channel(rng) -> tuple[onnx.ModelProto, np.ndarray]:
    """Q/K/V projections (named as the exporter names them) of one input whose channel 3 is 40x the rest."""
    hidden = 32
    weights = [numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32) * 0.1, f"w{i}")
               for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=name) for i, name in enumerate(QKV)]
    graph = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, hidden])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(3)],
                              weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, 64, hidden)).astype(np.float32)
    x[..., 3] *= 40.0
    return model, x


def qkv_group(model: onnx.ModelProto) -> list:
    """The hand-built graph's one group: its three projections as int8-auto's layer.0.qkv (the graph has
    no attention around them for quant_groups to find a layer by)."""
    from bertforge.optimizers.int8_auto.groups import Group

    width = model.graph.initializer[0].dims
    return [Group("layer.0.qkv", tuple(QKV), 3 * int(width[0]) * int(width[1]))]


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def qkv_error(model: onnx.ModelProto, x: np.ndarray, weights, scheme: str) -> float:
    """Mean abs error of the Q/K/V outputs with layer.0.qkv in `scheme`, against the fp32 graph."""
    from bertforge.optimizers.int8_auto.plans import apply_plan

    quantized = apply_plan(model, {"layer.0.qkv": scheme}, qkv_group(model), weights)
    return float(np.mean([np.abs(a - b).mean() for a, b in zip(run(quantized, x), run(model, x), strict=True)]))


def test_smoothing_moves_an_outlier_channel_into_the_weights_and_cuts_the_int8_error():
    from bertforge.optimizers.int8_auto.plans import apply_plan
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model, x = projections_with_an_outlier_channel(np.random.default_rng(0))
    groups = qkv_group(model)
    assert [g.name for g in groups] == ["layer.0.qkv"]
    weights = QuantizedWeights(activation_absmax={"x": np.abs(x[0]).max(axis=0)})

    smoothed = apply_plan(model, {"layer.0.qkv": "int8-smooth"}, groups, weights)
    ops = Counter(node.op_type for node in smoothed.graph.node)
    assert ops == {"Mul": 1, "DynamicQuantizeMatMul": 3}  # Q/K/V share one smoothing Mul
    plain, smooth = (qkv_error(model, x, weights, scheme) for scheme in ("int8-dynamic", "int8-smooth"))
    # mean abs error, measured here: 0.104 plain, 0.022 smoothed (seeds 1, 2: the same 4-5x); the
    # outlier channel no longer sets the activation's one scale alone
    assert smooth < plain / 2.5, (plain, smooth)



def test_outlier_channels_stay_fp32_and_the_rest_is_int8():
    from bertforge.optimizers.int8_auto.plans import apply_plan
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model, x = projections_with_an_outlier_channel(np.random.default_rng(0))
    groups = qkv_group(model)
    weights = QuantizedWeights(activation_absmax={"x": np.abs(x[0]).max(axis=0)}, outlier_channels=1)
    assert weights.outliers("x").tolist() == [3]

    split = apply_plan(model, {"layer.0.qkv": "int8-outlier"}, groups, weights)
    ops = Counter(node.op_type for node in split.graph.node)
    assert ops == {"Gather": 1, "Mul": 1, "DynamicQuantizeMatMul": 3, "MatMul": 3, "Add": 3}
    outlier_rows = [i for i in split.graph.initializer if i.name.endswith("_o32")]
    assert [list(i.dims) for i in outlier_rows] == [[1, 32]] * 3
    plain, kept = (qkv_error(model, x, weights, scheme) for scheme in ("int8-dynamic", "int8-outlier"))
    # mean abs error, measured here: 0.104 plain, 0.0038 with channel 3 in fp32
    assert kept < plain / 4, (plain, kept)

@pytest.mark.parametrize("opset", [17, 18])  # ReduceMax's axes: an attribute, then an input from opset 18
def test_int8_token_gives_each_token_its_own_activation_scale(opset):
    from bertforge.optimizers.int8_auto.plans import apply_plan
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    rng = np.random.default_rng(0)
    model, x = projections_with_an_outlier_channel(rng)
    model.opset_import[0].version = opset
    x = rng.standard_normal(x.shape).astype(np.float32)
    x[0, 5] *= 40.0  # one token far above the rest, as [SEP] and punctuation are in a trained BERT
    groups = qkv_group(model)
    weights = QuantizedWeights()
    scaled = apply_plan(model, {"layer.0.qkv": "int8-token"}, groups, weights)
    ops = Counter(node.op_type for node in scaled.graph.node)
    assert ops == {"Abs": 1, "ReduceMax": 1, "Max": 1, "Div": 1, "DynamicQuantizeMatMul": 3, "Mul": 3}
    from bertforge.optimizers.int8_auto.costs import group_ms  # the cost model finds every node the scheme adds

    assert group_ms(groups[0], "int8-token", {node.name: 1.0 for node in scaled.graph.node}) == 10.0
    plain, per_token = (qkv_error(model, x, weights, scheme) for scheme in ("int8-dynamic", "int8-token"))
    # mean abs error, measured here: 0.060 per tensor, 0.0051 per token (the other 63 tokens get the
    # whole int8 range instead of 1/40 of it)
    assert per_token < plain / 5, (plain, per_token)
    zeros = np.zeros_like(x)
    assert all(np.isfinite(y).all() and not y.any() for y in run(scaled, zeros))  # max|x| = 0 is floored


def test_int8_smooth_needs_the_calibration_absmax():
    import pytest

    from bertforge.optimizers.int8_auto.plans import apply_plan
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model, _ = projections_with_an_outlier_channel(np.random.default_rng(1))
    with pytest.raises(ValueError, match="calibration absmax of x"):
        apply_plan(model, {"layer.0.qkv": "int8-smooth"}, qkv_group(model), QuantizedWeights())


def mha_graph(tiny_variants):
    from bertforge.artifact import MODEL_FILE
    from bertforge.onnx_files import model_config
    from bertforge.optimizers.graph.ort_fusion import mha_fused

    source = tiny_variants["fp32"]
    model, _ = mha_fused(source / MODEL_FILE, model_config(source), "test")
    return model


def logits(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, tiny_feeds())[0]


def test_fp32_layers_go_back_to_packed_attention_and_every_smooth_plan_runs(tiny_variants, tmp_path):
    from bertforge.optimizers.int8_auto.groups import TIED_GROUP, group_input, quant_groups
    from bertforge.optimizers.int8_auto.plans import apply_plan
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model = mha_graph(tiny_variants)
    groups = quant_groups(model)
    reference = logits(model)
    fp32 = apply_plan(model, {}, groups, QuantizedWeights())
    ops = Counter(node.op_type for node in fp32.graph.node)
    assert ops["Attention"] == 2 and ops["MultiHeadAttention"] == 0
    assert np.abs(logits(fp32) - reference).max() < 1e-4  # the same arithmetic, packed
    kept = apply_plan(model, {}, groups, QuantizedWeights(), repack=False)
    assert Counter(node.op_type for node in kept.graph.node)["MultiHeadAttention"] == 2

    # a layer whose Q/K/V are int8 goes to QAttention (one quantized input, one packed int8 GEMM);
    # the fp32 one to Attention
    from bertforge.optimizers.int8_auto.calibration import calibration_split
    from bertforge.optimizers.int8_auto.sensitivity import fp32_values

    absmax = fp32_values(model, groups, calibration_split(tiny_variants["fp32"], seeds=(7,)), tmp_path).absmax
    assert set(absmax) == {group_input(model, g) for g in groups}
    assert all(v.ndim == 1 and (v > 0).all() for v in absmax.values())
    weights = QuantizedWeights(activation_absmax=absmax)
    plan = {g.name: "int8-smooth" for g in groups if g.name != "layer.1.qkv"}
    smooth = apply_plan(model, plan, groups, weights)
    ops = Counter(node.op_type for node in smooth.graph.node)
    assert ops["Attention"] == 1 and ops["QAttention"] == 1 and ops["MultiHeadAttention"] == 0
    assert ops["DynamicQuantizeLinear"] == 1  # QAttention's input, once for Q, K and V
    assert not any(init.name.endswith("embeddings.word_embeddings.weight") for init in smooth.graph.initializer)
    assert plan[TIED_GROUP] == "int8-smooth"
    # the tied table is stored once, as int8 (the embeddings read it through the folded dequantization)
    int8_tables = [i for i in smooth.graph.initializer
                   if i.data_type == TensorProto.INT8 and list(i.dims) == [30522, 32]]
    assert len(int8_tables) == 1
    assert np.abs(logits(smooth) - reference).max() < INT8_LOGIT_ERROR


def test_int8_qkv_packed_into_qattention_computes_what_the_three_kernels_did(tiny_variants):
    from bertforge.optimizers.graph.attention import repack_fp32_attention
    from bertforge.optimizers.int8_auto.groups import quant_groups
    from bertforge.optimizers.int8_auto.plans import apply_plan
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model = mha_graph(tiny_variants)
    groups = quant_groups(model)
    plan = {g.name: "int8-dynamic" for g in groups if g.name.endswith(".qkv")}
    packed = apply_plan(model, plan, groups, QuantizedWeights())
    separate = apply_plan(model, plan, groups, QuantizedWeights(), repack=False)
    repack_fp32_attention(separate)  # nothing: both layers' Q/K/V are int8
    ops = Counter(node.op_type for node in packed.graph.node)
    assert ops["QAttention"] == 2 and ops["MultiHeadAttention"] == 0
    assert Counter(node.op_type for node in separate.graph.node)["MultiHeadAttention"] == 2
    # the same u8 input scale, int32 sums and per-column dequantization, then the same attention kernel
    assert np.abs(logits(packed) - logits(separate)).max() < 1e-5


def test_a_plan_runs_at_the_mask_rows_only_from_where_that_changes_no_logit(tiny_variants):
    from bertforge.optimizers.int8_auto.calibration import calibration_split
    from bertforge.optimizers.int8_auto.groups import group_input, input_channels, quant_groups
    from bertforge.optimizers.int8_auto.masked_rows import head_reads_masked_rows_only
    from bertforge.optimizers.int8_auto.sensitivity import plan_graph, plan_logits
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model = mha_graph(tiny_variants)
    groups = quant_groups(model)
    split = calibration_split(tiny_variants["fp32"], seeds=(7,))
    absmax = {group_input(model, g): np.linspace(0.5, 4.0, input_channels(model, g), dtype=np.float32)
              for g in groups}
    weights = QuantizedWeights(activation_absmax=absmax)
    # where the rows are gathered: after the last layer's (layer 1's) attention core while every later
    # group is row-local and the head fp32; else before the head while the head is row-local; else at the
    # tied decoder (an int8 one quantizes its input over every row first)
    for plan, gathered_at in (({}, "layer"), ({"layer.0.ffn-up": "int8-dynamic"}, "layer"),
                              ({"layer.1.qkv": "int8-dynamic"}, "layer"),
                              ({"layer.1.ffn-up": "int8-blockwise"}, "layer"),
                              ({"layer.1.ffn-down": "int8-dynamic"}, "head"),
                              ({"head.transform": "int8-blockwise"}, "head"),
                              ({"head.transform": "int8-dynamic"}, "decoder"),
                              ({"tied-table": "int8-dynamic"}, "decoder"),
                              ({"tied-table": "int8-smooth", "head.transform": "int8-smooth"}, "decoder")):
        assert head_reads_masked_rows_only(plan) == (gathered_at != "decoder")
        graph, _ = plan_graph(model, plan, groups, weights)
        gathers = [node.name for node in graph.graph.node if node.op_type == "GatherND"]
        assert gathers == {"layer": ["masked_rows/GatherND_0", "masked_rows/GatherND_1"],
                           "head": ["masked_head/GatherND"],
                           "decoder": ["masked_rows/decoder/GatherND" if "tied-table" in plan
                                       else "masked_head/GatherND"]}[gathered_at], plan
        gathered = plan_logits(model, plan, groups, weights, split)
        full = np.concatenate([logits_of(model, plan, groups, weights, feeds)[rows, cols]
                               for feeds, rows, cols in zip(split.feeds, split.rows, split.cols, strict=True)])
        assert gathered.shape == full.shape == (split.positions, 30522)
        assert np.array_equal(gathered, full), plan
        if gathered_at == "layer":  # ORT optimizes the gathered rows as the full graph's: no MatMul + Add fused
            # into a Gemm, which adds in another order (bert-base's logits moved by 1e-6; the tiny model's
            # sums are one block long, so the bits above cannot show it)
            assert "Gemm" not in ort_optimized_ops(graph), plan


def ort_optimized_ops(model: onnx.ModelProto) -> set[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.optimized_model_filepath = f"{folder}/optimized.onnx"
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}


def logits_of(model, plan, groups, weights, feeds) -> np.ndarray:
    from bertforge.optimizers.int8_auto.plans import apply_plan

    session = ort.InferenceSession(apply_plan(model, plan, groups, weights).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {name: value for name, value in feeds.items() if name in wanted})[0]


def test_each_group_keeps_the_smoothquant_alpha_of_lowest_kl(tiny_variants, tmp_path):
    from bertforge.optimizers.int8_auto.calibration import calibration_split, masked_logits
    from bertforge.optimizers.int8_auto.groups import quant_groups
    from bertforge.optimizers.int8_auto.sensitivity import (
        Reference,
        SpilledReference,
        agreement,
        fp32_values,
        plan_logits,
        sensitivity_table,
    )
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model = mha_graph(tiny_variants)
    groups = quant_groups(model)
    split = calibration_split(tiny_variants["fp32"], seeds=(7,))
    whole = masked_logits(model, split)
    reference = Reference.of(whole)
    absmax = fp32_values(model, groups, split, tmp_path / "fp32").absmax
    weights = QuantizedWeights(activation_absmax=absmax)
    skip = {g.name: {"int8-dynamic", "int8-blockwise"} for g in groups}
    # the table reads the reference a batch at a time; the plans below are measured over all batches at once
    spilled = SpilledReference.of(tmp_path / "reference", split, whole)
    table = sensitivity_table(model, groups, weights, split, spilled, skip=skip, smooth_alphas=(0.3, 0.9))
    for row in table:
        chosen = row["int8-smooth"]
        assert weights.alphas[row["group"]] == chosen["alpha"]
        kls = {}
        for alpha in (0.3, 0.9):
            alone = QuantizedWeights(activation_absmax=absmax, alpha=alpha)
            kls[alpha] = agreement(reference, plan_logits(model, {row["group"]: "int8-smooth"}, groups, alone,
                                                          split))["kl_mean"]
        assert chosen["kl_mean"] == min(kls.values()), (row["group"], kls)
        assert kls[chosen["alpha"]] == chosen["kl_mean"]
    assert len({row["int8-smooth"]["alpha"] for row in table}) == 2, "both alphas win somewhere on the tiny model"


def test_groups_are_found_by_the_graphs_structure_not_the_exporters_node_names(tiny_variants):
    from bertforge.optimizers.int8_auto.groups import quant_groups

    model = mha_graph(tiny_variants)
    expected = quant_groups(model)
    assert [g.name for g in expected] == [f"layer.{i}.{role}" for i in range(2)
                                          for role in ("qkv", "attn-out", "ffn-up", "ffn-down")] + [
        "head.transform", "tied-table"]
    renamed = {node.name: f"n{index}" for index, node in enumerate(model.graph.node)}
    for node in model.graph.node:  # another exporter's names: nothing of "/layer.0/attention/..." left
        node.name = renamed[node.name]
    found = quant_groups(model)
    assert [(g.name, g.macs_per_token) for g in found] == [(g.name, g.macs_per_token) for g in expected]
    assert [g.nodes for g in found] == [tuple(renamed[n] for n in g.nodes) for g in expected]


def test_exclusion_presets_are_found_by_the_graphs_structure_not_the_exporters_node_names(tiny_variants):
    from bertforge.artifact import MODEL_FILE
    from bertforge.optimizers.graph.exclusions import excluded_nodes

    model = onnx.load(str(tiny_variants["fused"] / MODEL_FILE))
    presets = ("embeddings", "mlm-decoder", "mlm-head", "ffn-output")
    expected = {p: excluded_nodes(model, (p,), ()) for p in presets}
    ops = {n.name: n.op_type for n in model.graph.node}
    assert [ops[n] for n in expected["embeddings"]] == ["EmbedLayerNormalization"]
    assert [ops[n] for n in expected["mlm-decoder"]] == ["MatMul", "Add"]
    assert [ops[n] for n in expected["mlm-head"]] == ["MatMul", "BiasGelu", "LayerNormalization", "MatMul", "Add"]
    assert [ops[n] for n in expected["ffn-output"]] == ["MatMul", "MatMul"]  # one per layer
    renamed = {node.name: f"n{index}" for index, node in enumerate(model.graph.node)}
    for node in model.graph.node:
        node.name = renamed[node.name]
    for preset in presets:
        assert excluded_nodes(model, (preset,), ()) == [renamed[n] for n in expected[preset]], preset
    some = model.graph.node[len(model.graph.node) // 2].name
    assert excluded_nodes(model, (), (f"^{some}$",)) == [some]  # the user's own patterns still match names
