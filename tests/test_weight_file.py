"""The int8-auto search's sessions read the base graph's weights from one file written once."""

import numpy as np
import onnx
from onnx import numpy_helper

from conftest import tiny_feeds
from test_smooth_quant import mha_graph


def derived_graphs(model, groups, weights):
    from bertforge.optimizers.int8_auto.groups import SCHEMES, TIED_GROUP, group_schemes
    from bertforge.optimizers.int8_auto.masked_rows import gathered_after_last_attention, gathered_head
    from bertforge.optimizers.int8_auto.plans import apply_plan

    for scheme in SCHEMES:
        plan = {g.name: scheme for g in groups if scheme in group_schemes(g)}
        yield scheme, apply_plan(model, plan, groups, weights)
        yield f"{scheme} (head at [MASK] rows)", gathered_head(apply_plan(model, plan, groups, weights))
    yield "last layer at [MASK] rows", gathered_after_last_attention(apply_plan(model, {}, groups, weights), model,
                                                                     groups)
    yield "tied table only", apply_plan(model, {TIED_GROUP: "int8-dynamic"}, groups, weights)


def test_derived_graphs_never_rewrite_a_base_initializer_under_its_name(tiny_variants):
    """What makes a reference into the base weights exact: a derived graph that still holds a base
    initializer's name holds its data."""
    from bertforge.optimizers.int8_auto.groups import group_input, input_channels, quant_groups
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model = mha_graph(tiny_variants)
    groups = quant_groups(model)
    base = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    absmax = {group_input(model, g): np.linspace(0.5, 4.0, input_channels(model, g), dtype=np.float32)
              for g in groups}
    weights = QuantizedWeights(activation_absmax=absmax)
    for label, graph in derived_graphs(model, groups, weights):
        shared = [init for init in graph.graph.initializer if init.name in base]
        assert shared, label
        for init in shared:
            assert np.array_equal(numpy_helper.to_array(init), base[init.name]), (label, init.name)


def test_sessions_over_the_weight_file_give_the_same_logits_from_far_smaller_graphs(tiny_variants, tmp_path):
    from bertforge.optimizers.int8_auto.calibration import session_for
    from bertforge.optimizers.int8_auto.groups import quant_groups
    from bertforge.optimizers.int8_auto.plans import apply_plan
    from bertforge.optimizers.int8_auto.weight_file import WeightFile
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model = mha_graph(tiny_variants)
    groups = quant_groups(model)
    weight_file = WeightFile.write(model, tmp_path, min_bytes=1024)
    assert (tmp_path / "weights.bin").stat().st_size >= sum(len(r.raw_data) for r in model.graph.initializer
                                                            if len(r.raw_data) >= 1024)
    plan = {"layer.0.qkv": "int8-dynamic", "layer.1.ffn-up": "int8-blockwise"}  # the fp32 table stays
    graph = apply_plan(model, plan, groups, QuantizedWeights())
    light = weight_file.referencing(graph)
    assert len(light.SerializeToString()) < len(graph.SerializeToString()) / 2
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in light.graph.initializer)
    feeds = tiny_feeds()
    plain = session_for(graph).run(None, feeds)[0]
    referenced = session_for(graph, weight_file=weight_file).run(None, feeds)[0]
    assert np.array_equal(plain, referenced)
    # a derived graph's own initializer of another shape under a base name is kept as it is
    renamed = next(init for init in light.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL)
    other = onnx.helper.make_tensor(renamed.name, onnx.TensorProto.FLOAT, [1], [0.0])
    graph.graph.initializer.append(other)
    kept = [init for init in weight_file.referencing(graph).graph.initializer if init.name == renamed.name]
    assert any(list(init.dims) == [1] and init.data_location != onnx.TensorProto.EXTERNAL for init in kept)


def test_plans_made_from_the_referencing_graph_are_the_plans_made_from_the_base_graph(tiny_variants, tmp_path):
    """The search applies its plans to the base graph with its weights as references (read back through
    WeightFile.array), and adds the all-fp32 plan's packed Q/K/V weights to the file: every plan's
    graph, once referenced, is the same as the one made from the base graph itself."""
    from bertforge.optimizers.int8_auto.groups import group_input, input_channels, quant_groups
    from bertforge.optimizers.int8_auto.plans import apply_plan
    from bertforge.optimizers.int8_auto.weight_file import WeightFile
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model = mha_graph(tiny_variants)
    groups = quant_groups(model)
    weight_file = WeightFile.write(model, tmp_path, min_bytes=1024)
    before = len(weight_file.references)
    fp32 = apply_plan(model, {}, groups, QuantizedWeights())
    weight_file.add(fp32)
    added = [name for name in weight_file.references if name.endswith("_qkv_weight")]
    assert len(added) == len(weight_file.references) - before == 2  # each layer's packed Q/K/V weight
    # what the file holds for them, read back, is what the all-fp32 plan made
    made_fp32 = {init.name: numpy_helper.to_array(init) for init in fp32.graph.initializer}
    for name in added:
        assert np.array_equal(weight_file.array(weight_file.references[name]), made_fp32[name])
    base = weight_file.referencing(model)
    absmax = {group_input(model, g): np.linspace(0.5, 4.0, input_channels(model, g), dtype=np.float32)
              for g in groups}
    from_base = QuantizedWeights(activation_absmax=absmax)
    from_file = QuantizedWeights(activation_absmax=absmax, weight_file=weight_file)
    # a plan made from the referencing graph references the packed Q/K/V the file holds (not rebuilt);
    # one made from the base graph itself (the artifact int8-auto writes) holds its own bytes
    packed = {init.name: init for init in apply_plan(base, {}, groups, from_file).graph.initializer}
    assert all(packed[name].data_location == onnx.TensorProto.EXTERNAL for name in added)
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL
                   for init in apply_plan(model, {}, groups, from_file).graph.initializer)
    made = dict(derived_graphs(model, groups, from_base))
    for label, graph in derived_graphs(base, groups, from_file):
        light = weight_file.referencing(graph)
        assert light.SerializeToString() == weight_file.referencing(made[label]).SerializeToString(), label
        # and before the references: every initializer the plan made itself (from weights read back
        # through the file) holds what the plan made from the base graph holds
        own = {init.name: init for init in made[label].graph.initializer}
        for init in graph.graph.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL:
                assert np.array_equal(numpy_helper.to_array(init), numpy_helper.to_array(own[init.name])), (
                    label, init.name)


def test_plans_with_an_int8_tied_table_quantize_it_once_per_alpha_and_equal_fresh_ones(tiny_variants):
    """QuantizedWeights.tied_rows keeps the tied table's int8 rows per int8-smooth alpha: every plan
    built from the kept rows is the plan built from nothing kept."""
    from bertforge.optimizers.int8_auto.groups import TIED_GROUP, group_input, input_channels, quant_groups
    from bertforge.optimizers.int8_auto.plans import apply_plan
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model = mha_graph(tiny_variants)
    groups = quant_groups(model)
    absmax = {group_input(model, g): np.linspace(0.5, 4.0, input_channels(model, g), dtype=np.float32)
              for g in groups}
    kept = QuantizedWeights(activation_absmax=absmax)
    for scheme, alpha in [("int8-dynamic", None), ("int8-smooth", 0.5), ("int8-smooth", 0.8),
                          ("int8-dynamic", None), ("int8-smooth", 0.5)]:
        if alpha is not None:
            kept.alphas[TIED_GROUP] = alpha
        fresh = QuantizedWeights(activation_absmax=absmax, alphas=dict(kept.alphas))
        plan = {TIED_GROUP: scheme, "layer.0.qkv": "int8-dynamic"}
        built = apply_plan(model, plan, groups, kept)
        assert built.SerializeToString() == apply_plan(model, plan, groups, fresh).SerializeToString(), (scheme, alpha)
    assert sorted(kept.tied_cache, key=str) == sorted([None, 0.5, 0.8], key=str)
