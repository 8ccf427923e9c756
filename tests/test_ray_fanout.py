"""int8-auto's sensitivity rows as Ray tasks (ray_fanout.py) on the tests' real two-node cluster
(conftest.ray_cluster): the same table as rows run in order, whether a task reads the search's scratch
in place or, where it cannot see it, a copy shipped through Ray's object store; a row's worker killed
mid-build changes nothing."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from conftest import kill_a_task, make_tiny_checkpoint
from test_fanout import table_inputs

pytest.importorskip("ray")


def test_sensitivity_rows_on_ray_equal_the_rows_in_order_read_in_place_or_shipped(
        ray_cluster, tiny_variants, tmp_path, monkeypatch):
    import pickle

    import ray

    from bertforge import ray_fanout
    from bertforge.environment import cpu_class
    from bertforge.fanout import Folder, in_order
    from bertforge.optimizers.int8_auto.sensitivity import sensitivity_row
    from bertforge.ray_fanout import spread_on_ray
    from bertforge.ray_tasks import TaskSettings

    packings: list[Path] = []  # the driver packs a folder's files only for tasks that cannot see it
    real_packed = ray_fanout.packed
    hidden = tmp_path / "scratch-moved-away"

    def packed_then_gone(root):  # once packed, the folder is out of every task's reach, as on another disk
        packings.append(Path(root))
        files = real_packed(root)
        Path(root).rename(hidden)
        return files

    monkeypatch.setattr(ray_fanout, "packed", packed_then_gone)

    inputs = table_inputs(tiny_variants, tmp_path / "scratch")
    count = len(inputs.groups)
    # as a task on another machine receives them: moved to a copy, every folder a row reads follows
    shipped = pickle.loads(pickle.dumps(inputs))
    shipped.moved_to(tmp_path / "copy")
    assert shipped.weights.weight_file is shipped.weight_file
    assert [holder.directory for holder in (shipped.reference, shipped.prefix, shipped.weight_file)] == [
        tmp_path / "copy" / name for name in ("reference", "prefix", "weights")]
    expected = in_order(sensitivity_row, inputs, count, lambda index: None)
    assert all(row["int8-smooth"]["alpha"] in (0.5, 0.8) for row, _ in expected if row.get("int8-smooth"))

    from bertforge.cache import cache_root

    settings = TaskSettings(cpu_class(), cpus=1, resources={f"cpu_class_{cpu_class()}": 0.001})
    ray.init(address=ray_cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"BERTFORGE_CACHE": str(cache_root())}})  # the tasks' scratch: this test's
    try:
        finished: list[int] = []
        assert inputs.folder.visible()
        assert spread_on_ray(settings)(sensitivity_row, inputs, count, finished.append) == expected
        assert sorted(finished) == list(range(count))
        assert packings == []  # every row read the folder in place
        # a folder no task can see (another machine's disk): each task says so, the files travel once
        # through the object store, and every row is computed in a copy of them
        inputs.folder = Folder(inputs.folder.root, "a token no folder holds")
        assert not inputs.folder.visible()
        assert spread_on_ray(settings)(sensitivity_row, inputs, count, lambda index: None) == expected
        assert packings == [inputs.folder.root] and not inputs.folder.root.exists()  # every row read its copy
        hidden.rename(inputs.folder.root)
    finally:
        ray.shutdown()
    assert not list((cache_root() / "tmp").glob("piece-*")), "each copy is removed after its row"


def test_a_ray_build_spreads_int8_autos_rows_and_a_killed_row_changes_nothing(ray_cluster, tmp_path, capsys):
    from bertforge.cache import cache_root
    from bertforge.cli import main

    checkpoint = make_tiny_checkpoint(tmp_path / "checkpoint", seed=11)
    local = tmp_path / "local"
    args = ["build", "--model", str(checkpoint), "--variants", "int8-auto", "--no-latency", "--max-sentences", "40"]
    assert main([*args, "--out", str(local), "-q"]) == 0
    key = json.loads((local / "int8-auto" / "manifest.json").read_text())["key"]
    shutil.rmtree(cache_root() / "stages" / f"int8-auto-{key}")  # built again on Ray, from the same kernel costs

    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_a_task, args=("bertforge-sensitivity-row", killed, stop))
    killer.start()
    try:
        code = main([*args, "--out", str(tmp_path / "ray"), "--executor", "ray", "--ray-address",
                     ray_cluster.address, "--progress", "plain"])
    finally:
        stop.set()
        killer.join()
    assert code == 0
    assert "int8-auto's sensitivity rows as tasks" in capsys.readouterr().err
    assert killed, "no sensitivity row was seen running as a Ray task, so none was killed"
    on_ray = json.loads((tmp_path / "ray" / "int8-auto" / "manifest.json").read_text())
    assert on_ray["key"] == key
    built_here = json.loads((local / "int8-auto" / "manifest.json").read_text())
    for field in ("sensitivity", "plan", "evaluations", "calibration"):
        assert on_ray["metadata"][field] == built_here["metadata"][field], field
    assert on_ray["files"] == built_here["files"]


def test_a_shipped_folder_unpacks_to_the_same_files_and_nothing_outside_it(tmp_path):
    import numpy as np

    from bertforge.ray_fanout import packed, unpacked

    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "x.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "a" / "y.npy").write_bytes(b"y")
    unpacked(packed(tmp_path / "a"), tmp_path / "b")
    assert (tmp_path / "b" / "sub" / "x.bin").read_bytes() == b"\x00\x01\x02"
    assert (tmp_path / "b" / "y.npy").read_bytes() == b"y"
    with pytest.raises(ValueError, match="not a path inside"):
        unpacked({"../escaped": np.zeros(1, dtype=np.uint8)}, tmp_path / "c")
    assert not (tmp_path / "escaped").exists()
