"""`--executor ray` on a real Ray cluster of two worker nodes started by the tests (conftest.ray_cluster):
stages built as tasks, validation shards merged to the local executor's metrics, a worker killed
mid-validation, placement by CPU class (issue "Past one machine, part 1")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bertforge.cli import main
from conftest import make_tiny_checkpoint, report_metrics, validate_on_ray_killing_a_shard

pytest.importorskip("ray")


def test_a_ray_build_builds_its_stages_on_the_workers_and_reports_the_local_executors_metrics(
        ray_cluster, tmp_path, capsys, monkeypatch):
    from bertforge import ray_executor

    held: list[str] = []  # the entries the driver takes against cache prune as each stage task reports
    real_lock = ray_executor.shared_lock
    monkeypatch.setattr(ray_executor, "shared_lock", lambda path: held.append(Path(path).stem) or real_lock(path))
    # a tiny model's rounds spread wide on a shared machine, and a "busy" latency is not cached; this test
    # checks where a cached latency is kept, so every one counts as quiet
    monkeypatch.setattr("bertforge.bench.busy", lambda stats: False)
    checkpoint = make_tiny_checkpoint(tmp_path / "checkpoint", seed=5)  # its stages are in no cache yet
    out = tmp_path / "out"
    code = main(["build", "--model", str(checkpoint), "--out", str(out),
                 "--variants", "fp32,fp16,int8-dynamic,int8-auto", "--max-sentences", "160",
                 "--executor", "ray", "--ray-address", ray_cluster.address,
                 "--progress", "plain"])
    assert code == 0
    printed = capsys.readouterr().err
    assert "executor: ray, 2 nodes" in printed and "stages on ray" in printed
    assert "5 built, 0 cached" in printed  # fp32, fused, fp16, int8-dynamic, int8-auto: every stage ran in a task
    from bertforge.artifact import read_manifest

    manifests = [read_manifest(out / v) for v in ("fp32", "fp16", "int8-dynamic", "int8-auto")]
    assert {f"{m['stage']}-{m['key']}" for m in manifests} < set(held) and len(held) == 5
    report = json.loads((out / "report.json").read_text())
    assert report["executor"]["kind"] == "ray" and report["executor"]["nodes"] == 2
    assert report["executor"]["latency_measured_on"]["cpu_class"] == report["machine"]["cpu_class"]
    assert "timed on" in (out / "report.md").read_text()
    # the latencies are kept under the machine (and threads) that timed them, the worker, not the driver
    from bertforge import results_cache
    from bertforge.recipe import Recipe

    timed_on = report["executor"]["latency_measured_on"]
    bench_parts = Recipe().bench.model_dump(mode="json")
    for manifest, variant in zip(manifests, ("fp32", "fp16", "int8-dynamic", "int8-auto"), strict=True):
        stored = results_cache.load("latency", results_cache.key_for(
            "latency", {**bench_parts, "variant": manifest["key"]}, timed_on))
        assert stored is not None and stored["p50_ms"] == report["variants"][variant]["latency"]["p50_ms"], variant
    from_ray = report_metrics(out)
    local = tmp_path / "local"
    shutil.copytree(out, local)
    assert main(["validate", str(local), "--no-latency", "-q"]) == 0  # the local executor, measured again
    assert json.loads((local / "report.json").read_text())["executor"]["kind"] == "local"
    assert report_metrics(local) == from_ray


def test_a_worker_killed_mid_validation_changes_nothing(ray_cluster, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert main(["build", "--model", str(tiny_checkpoint), "--out", str(out), "--variants", "fp32,int8-dynamic",
                 "--no-latency", "-q"]) == 0
    local = report_metrics(out)
    outcome, killed = validate_on_ray_killing_a_shard(out, ray_cluster.address, shard_batches=1)
    assert killed, "no validation shard was seen running, so none was killed"
    assert outcome.exit_code == 0
    assert report_metrics(out) == local  # 27 shards of one batch, one of them run twice, merged as one pass


def test_tasks_go_to_nodes_of_the_builds_cpu_class():
    from bertforge.errors import UsageError
    from bertforge.ray_executor import placement

    def node(cpus: float, *classes: str, host: str = "a") -> dict:
        return {"Alive": True, "NodeManagerHostname": host,
                "Resources": {"CPU": cpus, **{f"cpu_class_{c}": 100.0 for c in classes}}}

    nodes, resources = placement([node(0), node(2, "avx2"), node(4, "amx")], "amx")
    assert resources == {"cpu_class_amx": 0.001} and [n["Resources"]["CPU"] for n in nodes] == [4]
    nodes, resources = placement([node(0), node(2), node(4)], "amx")  # no node names a class: checked in each task
    assert resources == {} and len(nodes) == 2
    with pytest.raises(UsageError, match="cpu_class_avx512-vnni"):
        placement([node(2, "avx2")], "avx512-vnni")


def test_a_task_on_a_node_of_another_cpu_class_refuses_to_run():
    from bertforge.errors import UsageError
    from bertforge.ray_executor import TaskSettings, in_task

    with pytest.raises(UsageError, match="CPU class"), in_task(TaskSettings("a-class-no-cpu-has")):
        pass


def test_a_cluster_across_machines_needs_a_remote_cache_its_tasks_can_write():
    from bertforge.errors import UsageError
    from bertforge.ray_executor import RayExecutor, needs_remote_cache

    assert not needs_remote_cache([{"NodeManagerHostname": "here"}], "here")
    assert needs_remote_cache([{"NodeManagerHostname": "here"}, {"NodeManagerHostname": "there"}], "here")

    class TwoMachines:  # what ray.nodes() says of a cluster on another host than the driver's
        @staticmethod
        def nodes():
            return [{"Alive": True, "NodeManagerHostname": "there", "Resources": {"CPU": 2.0}}]

    with pytest.raises(UsageError, match="add --remote-cache URL"):
        RayExecutor.of_cluster(TwoMachines, "there:6379", None)
    with pytest.raises(UsageError, match="read-only"):
        RayExecutor.of_cluster(TwoMachines, "there:6379", ("s3://bucket/cache", True))
    assert RayExecutor.of_cluster(TwoMachines, "there:6379", ("s3://bucket/cache", False)).settings.remote_url


def test_a_task_refuses_a_checkpoint_that_is_not_the_drivers(tiny_checkpoint, tmp_path):
    """Another folder at the driver's path on a worker's machine (or another revision of a hub model
    resolved there) would build and validate another model under the driver's name."""
    import shutil

    from bertforge.errors import SourceError
    from bertforge.pipeline import source_artifact
    from bertforge.ray_executor import local_source
    from bertforge.sources import resolve

    source = resolve(str(tiny_checkpoint))
    expected = source_artifact(source).key
    assert local_source(source, expected) == source
    other = tmp_path / "same-path-elsewhere"
    shutil.copytree(tiny_checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-5}))
    with pytest.raises(SourceError, match="is not the same on .* as on the driver"):
        local_source(resolve(str(other)), expected)


def test_a_task_takes_the_drivers_variant_folder_only_if_it_holds_that_entry(tiny_variants, tmp_path):
    import contextlib
    import shutil

    from bertforge.artifact import read_manifest
    from bertforge.ray_executor import VariantAt, variant_here

    manifest = read_manifest(tiny_variants["fused"])
    older = tmp_path / "older-build-at-that-path"
    shutil.copytree(tiny_variants["fp32"], older)  # a variant folder, but another entry
    with contextlib.ExitStack() as hold:
        assert variant_here(VariantAt(str(tiny_variants["fused"]), "fusion", manifest["key"]), hold) == \
            tiny_variants["fused"]
        assert variant_here(VariantAt(str(older), "fusion", manifest["key"]), hold) == tiny_variants["fused"]


def test_a_ray_client_address_is_refused_for_what_it_is(tmp_path, capsys):
    assert main(["build", "--model", "demo", "--out", str(tmp_path / "o"), "--executor", "ray",
                 "--ray-address", "ray://head:10001"]) == 2
    assert "is a Ray Client address" in capsys.readouterr().err


def test_a_ray_address_without_the_ray_executor_is_refused(tmp_path, capsys):
    assert main(["build", "--model", "demo", "--out", str(tmp_path / "o"), "--ray-address", "127.0.0.1:1"]) == 2
    assert "--ray-address is for --executor ray" in capsys.readouterr().err


def test_without_an_address_a_build_starts_a_ray_instance_of_its_own_on_the_loopback(tmp_path):
    """A fresh interpreter (Ray's loopback switch is read at its import), no cluster given: the build
    starts a local instance for itself and stops it."""
    import os
    import subprocess
    import sys

    checkpoint = make_tiny_checkpoint(tmp_path / "checkpoint")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-m", "bertforge", "build", "--model", str(checkpoint), "--out",
                           str(tmp_path / "out"), "--variants", "fp32", "--max-sentences", "20", "--no-latency",
                           "--executor", "ray", "--progress", "plain"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "executor: ray, 1 node (local)" in done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["executor"]["kind"] == "ray" and report["executor"]["address"] == "local"


def test_a_ray_address_where_nothing_answers_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys):
    import socket

    with socket.socket() as unused:  # a loopback port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    out = tmp_path / "out"
    assert main(["build", "--model", str(tiny_checkpoint), "--out", str(out), "--executor", "ray",
                 "--ray-address", f"127.0.0.1:{port}", "-q"]) == 2
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in capsys.readouterr().err
    assert not out.exists()


def test_a_ray_address_where_something_else_answers_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys):
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the server's own log would go to the stderr checked below
            pass

    server = HTTPServer(("127.0.0.1", 0), Quiet)  # an HTTP/1 server: not a Ray head
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        start = time.monotonic()
        assert main(["build", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--executor", "ray",
                     "--ray-address", address, "-q"]) == 2
        assert time.monotonic() - start < 30, "refused at once, not after Ray's minutes of retries"
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert f"what answers at {address} is not a Ray cluster's head" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_task_keeps_the_cache_entries_it_reads_from_cache_prune(tiny_variants, tmp_path):
    """A shard or latency task takes a variant's entry by key: its use lock is held while the task runs
    (prune skips the entry), and released after."""
    import contextlib

    from bertforge.artifact import read_manifest
    from bertforge.cache import exclusive_or_fail, use_lock_path
    from bertforge.errors import UsageError
    from bertforge.ray_executor import VariantAt, variant_here

    manifest = read_manifest(tiny_variants["fused"])
    at = VariantAt(path=str(tmp_path / "not-on-this-node"), stage=manifest["stage"], key=manifest["key"])
    lock = use_lock_path(f"{manifest['stage']}-{manifest['key']}")
    with contextlib.ExitStack() as hold:
        assert variant_here(at, hold) == tiny_variants["fused"]
        with pytest.raises(UsageError, match="in use"), exclusive_or_fail(lock, "in use"):
            pass  # what cache prune takes before it removes an entry
    with exclusive_or_fail(lock, "in use"):
        pass
