"""The search's suffix graphs (the fp32 prefix computed once) and the fp16 embedding table."""

import numpy as np
import onnxruntime as ort
from onnx import TensorProto

from conftest import tiny_feeds
from test_smooth_quant import logits, mha_graph


def test_a_plan_runs_from_its_first_changed_layer_with_the_logits_of_its_whole_graph(tiny_variants, tmp_path):
    from bertforge.optimizers.int8_auto.calibration import calibration_split, masked_logits
    from bertforge.optimizers.int8_auto.groups import quant_groups
    from bertforge.optimizers.int8_auto.prefix import HEAD_START
    from bertforge.optimizers.int8_auto.sensitivity import Reference, fp32_values, plan_logits
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model = mha_graph(tiny_variants)
    groups = quant_groups(model)
    split = calibration_split(tiny_variants["fp32"], seeds=(7,))
    # one run gives the reference logits, the activation ranges and the prefix
    values = fp32_values(model, groups, split, tmp_path)
    # the reference, spilled a batch at a time: the fp32 graph's own, to float32 rounding
    whole, start = masked_logits(model, split), 0
    for index, rows in enumerate(split.rows):
        expected, spilled = Reference.of(whole[start:start + len(rows)]), values.reference.batch(index)
        start += len(rows)
        assert spilled.p.shape == (len(rows), 30522)
        assert np.abs(spilled.p - expected.p).max() < 1e-5 and np.abs(spilled.p_log_p - expected.p_log_p).max() < 1e-3
    assert start == split.positions
    weights = QuantizedWeights(activation_absmax=values.absmax)
    prefix = values.prefix
    assert sorted(prefix.starts) == [0, 1, HEAD_START]
    assert len(list((tmp_path / "prefix").glob("*.npy"))) == len(prefix.dtypes) * len(split.feeds)

    for plan, start in (({"layer.1.ffn-down": "int8-dynamic"}, 1), ({"layer.0.qkv": "int8-smooth"}, 0),
                        ({"layer.1.attn-out": "int8-blockwise", "head.transform": "int8-dynamic"}, 1),
                        ({"head.transform": "int8-blockwise"}, HEAD_START),
                        # gathered at the [MASK] rows after the last layer's attention core (masked_rows)
                        ({"layer.1.ffn-up": "int8-blockwise"}, 1), ({"layer.0.ffn-up": "int8-dynamic"}, 0)):
        assert prefix.start_of_plan(plan) == start
        whole = plan_logits(model, plan, groups, weights, split)
        from_prefix = plan_logits(model, plan, groups, weights, split, prefix)
        assert from_prefix.shape == whole.shape == (split.positions, 30522)
        # not bitwise: the prefix's fp32 values come from the all-fp32 graph, whose nodes ORT may
        # optimize a little differently at load; float32 rounding only
        assert np.abs(from_prefix - whole).max() < 1e-4, plan

    # the tied table changes the embeddings, so such a plan runs whole; so does an all-fp32 one
    assert prefix.start_of_plan({"tied-table": "int8-dynamic", "layer.1.qkv": "int8-dynamic"}) is None
    assert prefix.start_of_plan({"layer.0.qkv": "fp32"}) is None

    # int8-auto's table runs on every n-th batch: from the prefix of the whole split, the logits of the
    # whole split at those positions
    plan = {"layer.1.ffn-down": "int8-dynamic"}
    whole = plan_logits(model, plan, groups, weights, split, prefix)
    share, positions = split.every(2)
    assert len(split.feeds) >= 3 and share.batch_ids == list(range(0, len(split.feeds), 2))
    assert share.positions == len(positions) < split.positions
    assert np.array_equal(plan_logits(model, plan, groups, weights, share, prefix), whole[positions])


def test_fp16_embeddings_keep_the_decoder_int8_and_read_their_own_fp16_table(tiny_variants):
    from bertforge.optimizers.int8_auto.groups import quant_groups
    from bertforge.optimizers.int8_auto.plans import apply_plan
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model = mha_graph(tiny_variants)
    groups = quant_groups(model)
    reference = logits(model)
    errors = {}
    for fp16 in (False, True):
        quantized = apply_plan(model, {"tied-table": "int8-dynamic"}, groups, QuantizedWeights(fp16_embeddings=fp16))
        tables = {i.data_type for i in quantized.graph.initializer if list(i.dims) == [30522, 32]}
        assert tables == ({TensorProto.INT8, TensorProto.FLOAT16} if fp16 else {TensorProto.INT8})
        assert sum(n.op_type == "DynamicQuantizeMatMul" for n in quantized.graph.node) == 1  # the decoder
        session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
        errors[fp16] = float(np.abs(session.run(None, tiny_feeds())[0] - reference).mean())
    # the embeddings' int8 error is gone; the decoder's stays
    assert errors[True] < errors[False], errors
