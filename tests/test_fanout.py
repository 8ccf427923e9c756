"""Where a stage's pieces run on one machine (fanout.side_by_side): two at a time on threads that share the
cores, each piece's sessions on its share, with the same results as one after another."""

from __future__ import annotations

import threading

import pytest

from test_smooth_quant import mha_graph


def table_inputs(tiny_variants, scratch):
    """int8-auto's sensitivity rows' inputs on the tiny model, every weight read from the search's weight file."""
    from bertforge.fanout import Folder
    from bertforge.optimizers.int8_auto.calibration import calibration_split
    from bertforge.optimizers.int8_auto.groups import quant_groups
    from bertforge.optimizers.int8_auto.sensitivity import TableInputs, fp32_values
    from bertforge.optimizers.int8_auto.weight_file import WeightFile
    from bertforge.optimizers.int8_auto.weights import QuantizedWeights

    model = mha_graph(tiny_variants)
    groups = quant_groups(model)
    split = calibration_split(tiny_variants["fp32"], seeds=(7,))
    weight_file = WeightFile.write(model, scratch / "weights", min_bytes=1)  # every weight read from the file
    fp32 = fp32_values(model, groups, split, scratch, weight_file)
    weights = QuantizedWeights(activation_absmax=fp32.absmax, weight_file=weight_file)
    return TableInputs(weight_file.referencing(model), groups, weights, split, fp32.reference, {}, (0.5, 0.8),
                       fp32.prefix, weight_file, Folder.marked(scratch))


def test_sensitivity_rows_side_by_side_equal_the_rows_in_order(tiny_variants, tmp_path):
    from bertforge.fanout import in_order, side_by_side
    from bertforge.optimizers.int8_auto.sensitivity import sensitivity_row

    inputs = table_inputs(tiny_variants, tmp_path / "scratch")
    count = len(inputs.groups)
    expected = in_order(sensitivity_row, inputs, count, lambda index: None)
    finished: list[int] = []
    found = side_by_side(sensitivity_row, inputs, count, finished.append)
    assert found == expected  # every row to the bit: KL, agreement and int8-smooth's chosen alpha
    assert sorted(finished) == list(range(count))


@pytest.mark.parametrize("cores", [1, 4])
def test_side_by_side_gives_each_piece_its_share_of_the_cores_and_keeps_the_order(cores, monkeypatch):
    """On a machine of 4 cores (as this one is made to report) two pieces run at once on 2 each; on one of
    a single core they run one after another on it."""
    from bertforge import environment, fanout
    from bertforge.environment import session_threads
    from bertforge.fanout import PIECES_AT_ONCE, side_by_side
    from bertforge.runtime import session_options

    monkeypatch.setattr(environment, "physical_cores", lambda: cores)
    monkeypatch.setattr(fanout, "physical_cores", lambda: cores)
    assert PIECES_AT_ONCE >= 2
    both_started = threading.Barrier(2, timeout=30)
    beside = cores >= 2
    met: list[int] = []

    def piece(offset: int, index: int) -> tuple[int, int, int]:
        if beside and index < 2:
            both_started.wait()  # the first two pieces run at once, or this times out
            met.append(index)
        return index + offset, session_threads(), session_options().intra_op_num_threads

    called: list[int] = []
    found = side_by_side(piece, 100, 6, called.append)
    share = cores // 2 if beside else cores
    assert found == [(100 + index, share, share) for index in range(6)]
    assert sorted(called) == list(range(6))
    assert sorted(met) == ([0, 1] if beside else [])
    # outside a piece a session takes every core again
    assert session_threads() == cores == session_options().intra_op_num_threads


def test_a_failing_piece_fails_the_map_with_its_own_error():
    from bertforge.fanout import side_by_side

    def piece(inputs: None, index: int) -> int:
        if index == 3:
            raise ValueError("piece 3 broke")
        return index

    with pytest.raises(ValueError, match="piece 3 broke"):
        side_by_side(piece, None, 8, lambda index: None)
