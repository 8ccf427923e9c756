"""Each optimization pass on the tiny model: graph properties, not only that it ran."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bertforge.artifact import read_manifest
from conftest import INT8_LOGIT_ERROR, tiny_feeds

FLOAT, FLOAT16, INT8, UINT8 = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
                               onnx.TensorProto.UINT8)


def load(path):
    return onnx.load(str(path / "model.onnx"))


def logits(path):
    return ort.InferenceSession(str(path / "model.onnx")).run(None, tiny_feeds())[0]


def test_fusion_counts_recorded_and_complete(tiny_variants):
    meta = read_manifest(tiny_variants["fused"])["metadata"]
    ops = Counter(n.op_type for n in load(tiny_variants["fused"]).graph.node)
    assert meta["fully_fused"] is True
    assert ops["Attention"] == 2 and meta["fused_operators"]["Attention"] == 2
    assert ops["EmbedLayerNormalization"] == 1
    assert meta["fused_operators"]["SkipLayerNormalization"] == 4
    # ... then split again: Add + Add(bias) + LayerNormalization (4 + the head's own LayerNorm)
    assert meta["skip_layer_norms_split"] == 4 and ops["SkipLayerNormalization"] == 0
    assert ops["LayerNormalization"] == 5 and ops["Add"] >= 8
    assert ops["BiasGelu"] == 3  # two layers + the MLM head's transform
    assert np.abs(logits(tiny_variants["fused"]) - logits(tiny_variants["fp32"])).max() < 1e-4


def test_split_skip_layer_norms_stay_split_when_ort_loads_them(tiny_variants, tmp_path):
    """ORT's SkipLayerNormFusion runs at session load; the split form must not match it."""
    optimized = tmp_path / "as-loaded.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    for variant in ("fused", "int8-dynamic", "int8-auto"):
        ort.InferenceSession(str(tiny_variants[variant] / "model.onnx"), options, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
        assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 5, (variant, ops)


def test_fusion_reports_what_did_not_fuse():
    from bertforge.optimizers.fusion import missing_fusions

    stats = {"Attention": 0, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 24, "BiasGelu": 13}
    assert missing_fusions(stats, 12) == ["Attention 0/12"]


def test_fp16_weights_with_fp32_io_and_blocked_ops(tiny_variants):
    model = load(tiny_variants["fp16"])
    graph = model.graph
    assert all(i.type.tensor_type.elem_type in (onnx.TensorProto.INT64,) for i in graph.input)
    assert graph.output[0].type.tensor_type.elem_type == FLOAT
    dtypes = Counter(i.data_type for i in graph.initializer)
    assert dtypes[FLOAT16] > 0
    # the blocked ops keep fp32 weights (their gamma/beta initializers stay float)
    by_name = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type in ("SkipLayerNormalization", "LayerNormalization"):
            assert by_name[node.input[2]].data_type == FLOAT, node.name
        if node.op_type == "MatMul" and node.input[1] in by_name:
            expected = FLOAT if node.name.startswith("/cls/") else FLOAT16  # the MLM head stays fp32
            assert by_name[node.input[1]].data_type == expected, node.name
    meta = read_manifest(tiny_variants["fp16"])["metadata"]
    # the split SkipLayerNormalization stays fp32, its residual Adds included
    assert meta["ops_kept_fp32"]["LayerNormalization"] == 5 and meta["ops_kept_fp32"]["Add"] >= 8
    assert "/cls/predictions/decoder/MatMul" in meta["nodes_kept_fp32"]
    ref = logits(tiny_variants["fp32"])
    assert np.abs(logits(tiny_variants["fp16"]) - ref).max() < 0.05


def tied_tables(model):
    return [(i.name, i.data_type) for i in model.graph.initializer if sorted(i.dims) == [32, 30522]]


def test_int8_dynamic_quantizes_weights_and_shares_the_tied_table(tiny_variants):
    model = load(tiny_variants["int8-dynamic"])
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QAttention"] == 2 and ops["MatMulInteger"] >= 6
    assert ops["EmbedLayerNormalization"] == 1 and ops["QEmbedLayerNormalization"] == 0
    # the tied table is stored once, int8 per row; no fp32 or per-tensor uint8 copy beside it
    assert tied_tables(model) == [("bert.embeddings.word_embeddings.weight_q8", INT8)]
    scales = [i for i in model.graph.initializer if i.name == "bert.embeddings.word_embeddings.weight_scale"]
    assert list(scales[0].dims) == [30522]
    # the decoder is one int8 GEMM over the transposed table, its bias fused in
    decoder = [n for n in model.graph.node if n.name.startswith("/cls/predictions/decoder/")]
    assert [n.op_type for n in decoder] == ["DynamicQuantizeMatMul"] and len(decoder[0].input) == 5
    producers = {o: n for n in model.graph.node for o in n.output}
    transpose = producers[decoder[0].input[1]]
    assert transpose.op_type == "Transpose" and transpose.input[0] == tied_tables(model)[0][0]
    assert decoder[0].output[0] == model.graph.output[0].name
    # the embeddings read the same table, dequantized (ORT folds this at load)
    embed = next(n for n in model.graph.node if n.op_type == "EmbedLayerNormalization")
    assert producers[embed.input[2]].op_type == "Mul"
    fp32_size = (tiny_variants["fused"] / "model.onnx").stat().st_size
    int8_size = (tiny_variants["int8-dynamic"] / "model.onnx").stat().st_size
    assert int8_size < 0.35 * fp32_size  # tiny hidden size: the per-row scales weigh 1/8 of the int8 table
    ref = logits(tiny_variants["fp32"])
    assert np.abs(logits(tiny_variants["int8-dynamic"]) - ref).max() < INT8_LOGIT_ERROR


def test_int8_dynamic_decoder_preset_keeps_decoder_arithmetic_fp32(tiny_variants, tmp_path):
    from bertforge.optimizers import int8_dynamic
    from bertforge.optimizers.config import Int8DynamicConfig

    out = tmp_path / "q"
    out.mkdir()
    meta = int8_dynamic.run(tiny_variants["fused"], out, Int8DynamicConfig(exclude_presets=("mlm-decoder",)))
    model = load(out)
    decoder = [n for n in model.graph.node if n.name == "/cls/predictions/decoder/MatMul"]
    assert len(decoder) == 1 and decoder[0].op_type == "MatMul", "the excluded decoder stays an fp32 MatMul"
    assert meta["tied_table"] == {
        "bert.embeddings.word_embeddings.weight": "fp32 MatMul over the table dequantized at load"}
    assert tied_tables(model) == [("bert.embeddings.word_embeddings.weight_q8", INT8)], "still one table, int8"
    ref = logits(tiny_variants["fp32"])
    assert np.abs(logits(out) - ref).max() < INT8_LOGIT_ERROR


def test_int8_dynamic_embeddings_preset_keeps_embeddings_fp32(tiny_variants, tmp_path):
    from bertforge.optimizers import int8_dynamic
    from bertforge.optimizers.config import Int8DynamicConfig

    out = tmp_path / "q"
    out.mkdir()
    meta = int8_dynamic.run(tiny_variants["fused"], out, Int8DynamicConfig(exclude_presets=("embeddings",
                                                                                             "mlm-head")))
    model = load(out)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["EmbedLayerNormalization"] == 1 and ops["QEmbedLayerNormalization"] == 0
    assert tied_tables(model) == [("bert.embeddings.word_embeddings.weight", FLOAT)]
    assert meta["tied_table"] == {}
    assert {n.op_type for n in model.graph.node if n.name.startswith("/cls/predictions/")} <= {"MatMul", "Add",
                                                                                             "LayerNormalization"}
    assert "/cls/predictions/transform/dense/MatMul" in meta["excluded_nodes"]


def test_tied_table_decoder_matches_fp32_on_a_hand_built_graph():
    """share_tied_table on the exporter's pattern: Gather(W), MatMul(x, Transpose(W)) + b."""
    from onnx import TensorProto, helper, numpy_helper

    from bertforge.optimizers.tied_quant import share_tied_table

    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 16)).astype(np.float32) * rng.uniform(0.1, 3, size=(50, 1)).astype(np.float32)
    bias = rng.normal(size=50).astype(np.float32)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["emb"]),
             helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["emb", "Wt"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, 50])],
                              [numpy_helper.from_array(table, "W"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ids = np.array([1, 7, 42], dtype=np.int64)
    expected = table[ids] @ table.T + bias
    how = share_tied_table(model, int8_decoder=True, target="portable")
    assert how == {"W": "int8 DynamicQuantizeMatMul, constant per-row int8 B, bias fused"}
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("Add") == 0
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})[0]
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_int8_blockwise_is_matmulnbits_over_separate_projections(tiny_variants):
    model = load(tiny_variants["int8-blockwise"])
    ops = Counter(n.op_type for n in model.graph.node)
    # 2 layers x (Q, K, V, attention output, FFN up, FFN down) + the head's transform
    assert ops["MultiHeadAttention"] == 2 and ops["MatMulNBits"] == 13 and ops["MatMul"] == 0
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["bits"] == 8 and attrs["block_size"] == 16 and attrs["accuracy_level"] == 4
    assert tied_tables(model) == [("bert.embeddings.word_embeddings.weight_q8", INT8)]
    assert [n.op_type for n in model.graph.node if n.name.startswith("/cls/predictions/decoder/")] == [
        "DynamicQuantizeMatMul"]
    meta = read_manifest(tiny_variants["int8-blockwise"])["metadata"]
    assert meta["block_size"] == 16 and meta["fused_operators"]["MultiHeadAttention"] == 2
    assert (tiny_variants["int8-blockwise"] / "model.onnx").stat().st_size < 0.4 * (
        tiny_variants["fused"] / "model.onnx").stat().st_size
    ref = logits(tiny_variants["fp32"])
    blockwise_error = np.abs(logits(tiny_variants["int8-blockwise"]) - ref).max()
    assert blockwise_error < np.abs(logits(tiny_variants["int8-dynamic"]) - ref).max()


def test_int8_static_is_qdq_calibrated(tiny_variants):
    model = load(tiny_variants["int8-static"])
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    meta = read_manifest(tiny_variants["int8-static"])["metadata"]
    assert meta["calibration_samples"] == 8 and meta["calibration_method"] == "minmax"
    assert "/bert/encoder/layer.1/output/dense/MatMul" in meta["excluded_nodes"]  # ffn-output preset
    assert "/bert/encoder/layer.1/attention/output/dense/MatMul" not in meta["excluded_nodes"]
    decoder_inputs = [n.input for n in model.graph.node if n.name == "/cls/predictions/decoder/MatMul"][0]
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert all(producers.get(i) != "DequantizeLinear" for i in decoder_inputs), "decoder excluded"
    ref = logits(tiny_variants["fp32"])
    assert np.abs(logits(tiny_variants["int8-static"]) - ref).max() < INT8_LOGIT_ERROR


@pytest.mark.parametrize("parent", ["fused", "int8-dynamic", "int8-auto"])
def test_masked_head_matches_the_full_head_at_mask_positions(tiny_checkpoint, tiny_variants, tmp_path, parent):
    """The masked variants that ship are built from int8 parents, whose decoder quantizes its input with
    one scale per tensor: the masked head must give the parent's logits at every [MASK] whatever else the
    batch holds (gathered before the head it did not: its scale spanned the [MASK] rows only)."""
    from bertforge.optimizers import masked_head
    from bertforge.optimizers.config import MaskedHeadConfig

    out = tmp_path / "masked"
    out.mkdir()
    meta = masked_head.run(tiny_variants[parent], out, MaskedHeadConfig())
    assert meta["mask_token_id"] == 103
    feeds = tiny_feeds()
    feeds["input_ids"][1, 7] = 103  # a second [MASK] in the second row
    full = ort.InferenceSession(str(tiny_variants[parent] / "model.onnx")).run(None, feeds)[0]
    session = ort.InferenceSession(str(out / "model.onnx"))
    assert [o.name for o in session.get_outputs()] == ["logits", "mask_logits", "mask_positions"]
    logits, masked, positions = session.run(None, feeds)
    assert positions.tolist() == [[0, 3], [1, 3], [1, 7]]
    assert masked.shape == (3, 30522)
    at_masks = full[positions[:, 0], positions[:, 1]]
    assert np.abs(at_masks - masked).max() <= 1e-6 * np.abs(at_masks).max(), parent
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert ("MatMulInteger" in ops) == (parent != "fused")  # the int8 decoder over the gathered int8 rows
    # optimum's shape, the head's rows at the [MASK] positions and zeros everywhere else
    assert logits.shape == full.shape
    assert np.array_equal(logits[positions[:, 0], positions[:, 1]], masked)
    elsewhere = np.ones(logits.shape[:2], dtype=bool)
    elsewhere[positions[:, 0], positions[:, 1]] = False
    assert not logits[elsewhere].any()


@pytest.mark.parametrize("presets", [("mlm-decoder",), ("mlm-head",)])
def test_a_masked_head_builds_over_an_int8_parent_whose_decoder_stayed_fp32(tiny_variants, tmp_path, presets):
    """Excluding the decoder keeps the shared int8 table, dequantized at load: the decoder's Transpose reads
    a node output, and the masked head found no tied decoder ('no tied MLM decoder found')."""
    from bertforge import pipeline
    from bertforge.artifact import Artifact
    from bertforge.optimizers import masked_head
    from bertforge.optimizers.config import Int8DynamicConfig, MaskedHeadConfig

    fused = Artifact(tiny_variants["fused"], tiny_variants["fused"].name.split("-", 1)[1], "fusion", None)
    parent = pipeline.run_stage("int8-dynamic", fused, Int8DynamicConfig(exclude_presets=presets)).artifact.path
    out = tmp_path / "masked"
    out.mkdir()
    meta = masked_head.run(parent, out, MaskedHeadConfig())
    from bertforge.artifact import read_manifest

    parent_meta = read_manifest(parent)["metadata"]  # the same int8 weights: the parent's int8 record
    assert {k: meta[k] for k in ("int8_target", "int8_weights", "built_on")} == {
        k: parent_meta[k] for k in ("int8_target", "int8_weights", "built_on")}
    feeds = tiny_feeds()
    full = ort.InferenceSession(str(parent / "model.onnx")).run(None, feeds)[0]
    _, masked, positions = ort.InferenceSession(str(out / "model.onnx")).run(None, feeds)
    at_masks = full[positions[:, 0], positions[:, 1]]
    assert len(positions) == 2 and np.abs(at_masks - masked).max() <= 1e-5 * np.abs(at_masks).max()
