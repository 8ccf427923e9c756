"""Pair-safe int8 weights (optimizers/int8_weights.py): no same-sign K-adjacent pair past 128, the full
grid kept wherever that already holds."""

import numpy as np
import pytest

from bertforge.optimizers.int8_weights import PAIR_SUM_MAX, saturating_pairs, symmetric_int8


@pytest.mark.parametrize("axis", [0, 1])
def test_portable_weights_have_no_saturating_pair_and_lose_no_more_than_they_must(axis):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((96, 64)).astype(np.float32) * rng.uniform(0.1, 2, (1, 64)).astype(np.float32)
    weight = weight if axis == 1 else weight.T  # scales along `axis`, K the other
    full, full_scale = symmetric_int8(weight, axis, "vnni")
    safe, safe_scale = symmetric_int8(weight, axis, "portable")
    assert saturating_pairs(full, axis) > 0  # Gaussian weights at the full grid have such pairs
    assert saturating_pairs(safe, axis) == 0
    absmax = np.abs(weight).max(axis=1 - axis)
    assert np.allclose(full_scale, absmax / 127)
    # each channel's scale only as wide as its own pairs need: between the full grid's and reduce_range's
    assert (safe_scale >= full_scale * (1 - 1e-6)).all() and (safe_scale <= absmax / 64 * 1.01).all()
    # closer to the float weights than reduce_range's halved grid
    reduced_scale = absmax / 64
    reduced = np.clip(np.rint(weight / np.expand_dims(reduced_scale, 1 - axis)), -64, 64)
    error_safe = np.abs(safe * np.expand_dims(safe_scale, 1 - axis) - weight).mean()
    error_reduced = np.abs(reduced * np.expand_dims(reduced_scale, 1 - axis) - weight).mean()
    assert error_safe < 0.8 * error_reduced, (error_safe, error_reduced)


def test_a_channel_with_no_same_sign_big_pair_keeps_the_full_grid():
    weight = np.zeros((8, 2), np.float32)
    weight[:, 0] = [1.0, -1.0, 1.0, -1.0, 0.5, -0.5, 0.2, -0.2]  # every pair of opposite signs
    weight[:, 1] = [1.0, 0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0]  # one same-sign pair: 127 + 114 > 128
    q, scale = symmetric_int8(weight, 1, "portable")
    assert q[0, 0] == 127 and scale[0] == pytest.approx(1 / 127)
    assert abs(int(q[0, 1])) + abs(int(q[1, 1])) <= PAIR_SUM_MAX and scale[1] > 1 / 127


@pytest.mark.parametrize("axis, refused", [(1, False), (0, True)])
def test_a_square_qdq_weight_is_rewritten_only_along_the_axis_its_scales_run(axis, refused):
    """A 4 x 4 weight's 4 scales fit either axis: the rewrite reads DequantizeLinear's axis, and refuses
    rather than widen the wrong channels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bertforge.optimizers.int8_weights import requantize_pair_safe

    weight = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    scale = np.abs(weight).max(axis=1 - axis) / 127
    quantized = np.rint(weight / (scale[None, :] if axis == 1 else scale[:, None])).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w_quantized", "w_scale", "w_zero_point"], ["w"], axis=axis),
         helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(quantized, "w_quantized"), numpy_helper.from_array(scale, "w_scale"),
         numpy_helper.from_array(np.zeros(4, np.int8), "w_zero_point")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if refused:
        with pytest.raises(ValueError, match="axis 0"):
            requantize_pair_safe(model, {"w": weight})
    else:
        assert requantize_pair_safe(model, {"w": weight}) == ["w"]
        onnx.checker.check_model(model)
