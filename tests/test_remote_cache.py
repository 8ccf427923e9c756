"""The remote stage cache against a real S3 API: moto's server on a loopback port, started here.

Each test builds the tiny model (fp32, fused, int8-dynamic) through the API, with its own local cache
and its own bucket; the faults are real (bytes changed in the store, a store that goes away mid-upload,
two builds at once in two processes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("moto", reason="the dev extra's moto serves the S3 API these tests use")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")

VARIANTS = ["fp32", "fused", "int8-dynamic"]
STAGES = {"fp32": "export", "fused": "fusion", "int8-dynamic": "int8-dynamic"}
SECRET = "bertforge-test-secret-d41d8cd98f00"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def s3_environment(endpoint: str) -> dict[str, str]:
    """Credentials and endpoint the way a CI job passes them: the AWS_* variables, nothing else."""
    return {"AWS_ACCESS_KEY_ID": "bertforge-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def remote(s3_endpoint, monkeypatch):
    """An empty bucket; returns the cache URL under it."""
    for name, value in s3_environment(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("BERTFORGE_REMOTE_CACHE", raising=False)
    bucket = f"cache-{uuid.uuid4().hex[:12]}"
    client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/builds"


def client():
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def keys_under(url: str) -> list[str]:
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    listed = client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return sorted(item["Key"][len(prefix) + 1:] for item in listed)


def build(out: Path, cache: Path, checkpoint: Path, monkeypatch, **options):
    import bertforge

    monkeypatch.setenv("BERTFORGE_CACHE", str(cache))
    return bertforge.build(out, model=str(checkpoint), variants=VARIANTS, progress="plain",
                           validation={"max_sentences": 20}, bench={"enabled": False}, **options)


def shipped(out: Path) -> dict[str, str]:
    return {v: hashlib.sha256((out / v / "model.onnx").read_bytes()).hexdigest() for v in VARIANTS}


def cli(*argv: str) -> int:
    from bertforge.cli import main

    return main(list(argv))


def test_a_build_from_an_empty_local_cache_fetches_every_stage_and_runs_none(
        tiny_checkpoint, remote, tmp_path, monkeypatch, capsys):
    first = build(tmp_path / "a", tmp_path / "cache-a", tiny_checkpoint, monkeypatch, remote_cache=remote)
    assert first.exit_code == 0
    assert "0 entries fetched and verified, 3 published" in capsys.readouterr().err
    assert [k for k in keys_under(remote) if k.startswith("stages/")] == sorted(
        f"stages/{STAGES[v]}-{first.report['variants'][v]['key']}.json" for v in VARIANTS)

    from bertforge import pipeline

    def must_not_run(*args):
        raise AssertionError("a stage ran although the remote cache holds its entry")

    for stage in STAGES.values():
        monkeypatch.setattr(pipeline.STAGES[stage], "run", must_not_run)
    second = build(tmp_path / "b", tmp_path / "cache-b", tiny_checkpoint, monkeypatch, remote_cache=remote)
    err = capsys.readouterr().err
    assert second.exit_code == 0
    for variant in VARIANTS:
        line = next(x for x in err.splitlines() if x.strip().startswith(variant + " "))
        assert "fetched from the remote cache" in line and "files verified" in line, line
    assert "3 entries fetched and verified, 0 published" in err
    assert shipped(tmp_path / "b") == shipped(tmp_path / "a")
    # the validation results came from the remote cache too: nothing was measured again
    assert all(entry["evaluation_cached"] for entry in second.report["variants"].values())
    assert [v["metrics"] for v in second.report["variants"].values()] == [
        v["metrics"] for v in first.report["variants"].values()]


@pytest.mark.parametrize("fault", ["flipped byte", "truncated"])
def test_a_damaged_remote_blob_is_reported_in_one_line_rebuilt_and_repaired(
        tiny_checkpoint, remote, tmp_path, monkeypatch, capsys, fault):
    clean = build(tmp_path / "a", tmp_path / "cache-a", tiny_checkpoint, monkeypatch, remote_cache=remote)
    name = f"fusion-{clean.report['variants']['fused']['key']}"
    bucket, prefix = remote.removeprefix("s3://").split("/", 1)
    manifest = json.loads(client().get_object(Bucket=bucket, Key=f"{prefix}/stages/{name}.json")["Body"].read())
    blob = f"{prefix}/blobs/sha256/{manifest['files']['model.onnx']['sha256']}"
    data = bytearray(client().get_object(Bucket=bucket, Key=blob)["Body"].read())
    if fault == "flipped byte":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 3]
    client().put_object(Bucket=bucket, Key=blob, Body=bytes(data))
    capsys.readouterr()
    assert cli("cache", "verify", "--remote-cache", remote) == 1
    assert name in capsys.readouterr().out

    again = build(tmp_path / "b", tmp_path / "cache-b", tiny_checkpoint, monkeypatch, remote_cache=remote)
    err = capsys.readouterr().err
    assert again.exit_code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:") and "damaged" in line]
    assert len(warnings) == 1 and name in warnings[0] and "model.onnx" in warnings[0], warnings
    fused_line = next(x for x in err.splitlines() if x.strip().startswith("fused "))
    assert "done" in fused_line and "fetched" not in fused_line  # built here, not taken from the store
    assert shipped(tmp_path / "b") == shipped(tmp_path / "a")
    # the rebuilt bytes are the ones the blob's name promises: uploading them repaired the store
    assert cli("cache", "verify", "--remote-cache", remote) == 0


def test_two_builds_at_once_against_one_empty_remote_cache_both_succeed_with_one_entry_per_stage(
        tiny_checkpoint, remote, tmp_path):
    def start(name: str) -> subprocess.Popen:
        env = {**os.environ, "BERTFORGE_CACHE": str(tmp_path / f"cache-{name}"), "BERTFORGE_REMOTE_CACHE": remote}
        return subprocess.Popen([sys.executable, "-m", "bertforge", "build", "--model", str(tiny_checkpoint),
                                 "--variants", ",".join(VARIANTS), "--max-sentences", "20", "--no-latency",
                                 "--out", str(tmp_path / name), "--progress", "plain"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    builds = [start("a"), start("b")]
    outputs = [b.communicate(timeout=600)[0] for b in builds]
    assert [b.returncode for b in builds] == [0, 0], outputs
    assert shipped(tmp_path / "a") == shipped(tmp_path / "b")
    entries = [k for k in keys_under(remote) if k.startswith("stages/")]
    assert len(entries) == len(STAGES) and all(k.endswith(".json") for k in entries)
    published = sum(int(out.rsplit("verified, ", 1)[1].split(" published")[0]) for out in outputs)
    fetched = sum(int(out.rsplit("(read-write): ", 1)[1].split(" entries")[0]) for out in outputs)
    assert published + fetched >= len(STAGES)  # each stage written once, the other build took it or kept its own
    assert published <= len(STAGES)
    assert cli("cache", "verify", "--remote-cache", remote) == 0


class DyingProxy:
    """A TCP forwarder to the S3 server that closes every connection and stops listening once `limit`
    bytes of requests have passed: the store disappears mid-upload, while the server keeps what it got
    (or, with `on_death`, is killed too)."""

    def __init__(self, port: int, limit: int, on_death=None) -> None:
        self.target, self.limit, self.sent, self.on_death = port, limit, 0, on_death
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.dead = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.dead.is_set():
            try:
                client_side, _ = self.listener.accept()
            except OSError:
                return
            server_side = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client_side, server_side]
            threading.Thread(target=self._pump, args=(client_side, server_side, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server_side, client_side, False), daemon=True).start()

    def _pump(self, source: socket.socket, dest: socket.socket, request: bool) -> None:
        with contextlib.suppress(OSError):
            while (data := source.recv(65536)) and not self.dead.is_set():
                if request:
                    self.sent += len(data)
                    if self.sent > self.limit:
                        self.die()
                        return
                dest.sendall(data)
        with contextlib.suppress(OSError):
            dest.shutdown(socket.SHUT_WR)

    def die(self) -> None:
        if self.on_death is not None:
            self.on_death()
        self.dead.set()
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_a_store_that_disappears_mid_upload_leaves_no_half_entry_and_the_build_succeeds(
        tiny_checkpoint, remote, tmp_path, monkeypatch, capsys):
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    proxy = DyingProxy(int(endpoint.rsplit(":", 1)[1]), limit=1_500_000)  # inside the first model's upload
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    outcome = build(tmp_path / "a", tmp_path / "cache-a", tiny_checkpoint, monkeypatch, remote_cache=remote)
    err = capsys.readouterr().err
    assert proxy.dead.is_set()
    assert outcome.exit_code == 0 and outcome.report["gates_passed"]
    remote_lines = [line for line in err.splitlines() if line.startswith("warning:") and "remote cache" in line]
    assert len(remote_lines) == 1 and "not published" in remote_lines[0], remote_lines
    assert "not used after a failure" in err
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # the store itself kept everything it received
    assert not [k for k in keys_under(remote) if k.startswith("stages/")]  # no entry is visible half-written
    assert cli("cache", "verify", "--remote-cache", remote) == 0
    # and the next build publishes what this one could not
    build(tmp_path / "b", tmp_path / "cache-a", tiny_checkpoint, monkeypatch, remote_cache=remote)
    assert "0 entries fetched and verified, 3 published" in capsys.readouterr().err


def test_a_server_killed_mid_upload_costs_one_warning_and_the_build_succeeds(tiny_checkpoint, remote, tmp_path,
                                                                             monkeypatch, capsys):
    """The S3 server process itself killed (SIGKILL) partway through the first upload."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        client().create_bucket(Bucket="doomed")
        proxy = DyingProxy(port, limit=1_500_000, on_death=server.kill)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        outcome = build(tmp_path / "a", tmp_path / "cache-a", tiny_checkpoint, monkeypatch,
                        remote_cache="s3://doomed/builds")
    finally:
        server.kill()
        server.wait(timeout=30)
    err = capsys.readouterr().err
    assert server.returncode is not None and proxy.dead.is_set()
    assert outcome.exit_code == 0 and outcome.report["gates_passed"]
    assert len([line for line in err.splitlines() if line.startswith("warning:") and "remote cache" in line]) == 1
    assert "not used after a failure" in err


def test_validate_publishes_what_it_measured(tiny_checkpoint, remote, tmp_path, monkeypatch, capsys):
    import bertforge

    build(tmp_path / "a", tmp_path / "cache-a", tiny_checkpoint, monkeypatch)  # no remote cache
    assert keys_under(remote) == []
    outcome = bertforge.validate(tmp_path / "a", remote_cache=remote, progress="plain")
    assert outcome.exit_code == 0
    published = [k for k in keys_under(remote) if k.startswith("results/")]
    assert sum(k.startswith("results/validation-") for k in published) == len(VARIANTS)
    assert any(k.startswith("results/reference-") for k in published)


def test_a_read_only_job_fetches_and_verifies_but_never_writes(tiny_checkpoint, remote, tmp_path, monkeypatch,
                                                              capsys):
    build(tmp_path / "a", tmp_path / "cache-a", tiny_checkpoint, monkeypatch, remote_cache=remote,
          remote_cache_readonly=True)
    assert keys_under(remote) == []
    build(tmp_path / "b", tmp_path / "cache-b", tiny_checkpoint, monkeypatch, remote_cache=remote)
    before = keys_under(remote)
    capsys.readouterr()
    monkeypatch.setenv("BERTFORGE_REMOTE_CACHE_READONLY", "1")
    reader = build(tmp_path / "c", tmp_path / "cache-c", tiny_checkpoint, monkeypatch, remote_cache=remote)
    assert reader.exit_code == 0
    assert "(read-only): 3 entries fetched and verified, 0 published" in capsys.readouterr().err
    assert keys_under(remote) == before


def test_an_unreachable_store_costs_one_warning_and_no_credential_is_ever_printed(
        tiny_checkpoint, remote, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    env = {**os.environ, "BERTFORGE_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "bertforge", "build", "--model", str(tiny_checkpoint),
                          "--variants", ",".join(VARIANTS), "--max-sentences", "20", "--no-latency", "--out",
                          str(tmp_path / "out"), "--progress", "plain",
                          "--remote-cache", remote.replace("s3://", "s3://someone:hunter2@")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    remote_lines = [line for line in run.stderr.splitlines() if "remote cache" in line and "warning" in line]
    assert len(remote_lines) == 1 and "building with the local cache only" in remote_lines[0], run.stderr
    written = [p for p in [*(tmp_path / "out").rglob("*"), *(tmp_path / "cache").rglob("*")] if p.is_file()]
    for text in (run.stdout, run.stderr, *(p.read_bytes().decode("utf-8", "replace") for p in written)):
        assert SECRET not in text and "hunter2" not in text


def test_cache_list_and_prune_work_on_the_remote_cache(tiny_checkpoint, remote, tmp_path, monkeypatch, capsys):
    from bertforge.remote_cache import admin
    from bertforge.remote_cache.store import RemoteStore

    build(tmp_path / "a", tmp_path / "cache-a", tiny_checkpoint, monkeypatch, remote_cache=remote)
    capsys.readouterr()
    assert cli("cache", "list", "--remote-cache", remote, "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(e["stage"] for e in listed) == sorted(STAGES.values())
    assert all(e["size_bytes"] > 0 and time.time() - e["last_used"] < 3600 for e in listed)
    assert cli("cache", "prune", "--remote-cache", remote, "--older-than", "1") == 0  # nothing that old
    assert len([k for k in keys_under(remote) if k.startswith("stages/")]) == 3
    blobs = {k for k in keys_under(remote) if k.startswith("blobs/")}
    # by size: everything goes; the blobs stay for the grace period a writer's upload may still need
    assert cli("cache", "prune", "--remote-cache", remote, "--max-size", "0") == 0
    assert not [k for k in keys_under(remote) if k.startswith(("stages/", "used/"))]
    assert {k for k in keys_under(remote) if k.startswith("blobs/")} == blobs
    monkeypatch.setattr(admin, "BLOB_GRACE_S", -1.0)
    _, removed = admin.prune(RemoteStore(remote), None, 0)
    assert removed == len(blobs) and not [k for k in keys_under(remote) if k.startswith("blobs/")]


def test_a_filesystem_store_creates_an_entry_once_among_many_writers(tmp_path):
    """file:// (a mount shared between runners): create-if-absent is a hard link, atomic; 8 threads race."""
    from concurrent.futures import ThreadPoolExecutor

    from bertforge.remote_cache.store import RemoteStore

    store = RemoteStore(f"file://{tmp_path}/shared")
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: store.create("stages/x.json", f"writer {i}".encode()), range(8)))
    assert won.count(True) == 1
    assert store.read("stages/x.json") == f"writer {won.index(True)}".encode()
    assert [p.name for p in (tmp_path / "shared" / "stages").iterdir()] == ["x.json"]  # no temp file left


def test_a_filesystem_store_serves_a_second_build(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    url = f"file://{tmp_path}/shared"
    build(tmp_path / "a", tmp_path / "cache-a", tiny_checkpoint, monkeypatch, remote_cache=url)
    capsys.readouterr()
    second = build(tmp_path / "b", tmp_path / "cache-b", tiny_checkpoint, monkeypatch, remote_cache=url)
    assert "3 entries fetched and verified, 0 published" in capsys.readouterr().err
    assert second.exit_code == 0 and shipped(tmp_path / "b") == shipped(tmp_path / "a")


def test_a_remote_manifest_naming_a_path_outside_its_entry_is_refused(tmp_path):
    from bertforge.remote_cache.entries import DamagedEntry, parse_manifest

    good = {"key": "k1", "stage": "fusion", "files": {"model.onnx": {"sha256": "a" * 64, "size": 3}}}
    assert parse_manifest(json.dumps(good).encode(), "fusion", "k1")["files"]
    for files in ({"../../escape": {"sha256": "a" * 64, "size": 3}}, {"/etc/x": {"sha256": "a" * 64, "size": 3}},
                  {"model.onnx": {"sha256": "../x", "size": 3}}, {"manifest.json": {"sha256": "a" * 64, "size": 3}}):
        with pytest.raises(DamagedEntry):
            parse_manifest(json.dumps({**good, "files": files}).encode(), "fusion", "k1")
    with pytest.raises(DamagedEntry, match="not the one for this stage and key"):
        parse_manifest(json.dumps(good).encode(), "fusion", "other-key")
    blob = {"sha256": "a" * 64, "size": 3}  # a file and a file inside it: a damaged entry, not a crash
    with pytest.raises(DamagedEntry, match="'a/b' inside another file it lists"):
        parse_manifest(json.dumps({**good, "files": {"a": blob, "a/b": blob}}).encode(), "fusion", "k1")


def test_a_url_is_shown_without_its_credentials():
    from bertforge.remote_cache.store import redacted

    assert redacted("s3://key:secret@bucket/prefix?X-Amz-Signature=abc") == "s3://bucket/prefix"
    assert redacted("sftp://me:pw@host:2222/cache") == "sftp://host:2222/cache"
    assert redacted("gs://bucket/builds") == "gs://bucket/builds"


def test_the_demo_checkpoint_is_fetched_not_fitted_again_on_a_fresh_runner(tmp_path, monkeypatch):
    """The demo's fitted head is a prepared source, not a stage: a second runner fetches it (its files
    are the source's identity, so every stage key below it then matches the first runner's)."""
    from bertforge.cache import cache_root
    from bertforge.pipeline import source_artifact
    from bertforge.remote_cache.session import RemoteCache, using
    from bertforge.sources import demo
    from bertforge.sources.spec import ResolvedSource

    remote = RemoteCache(f"file://{tmp_path}/shared")
    with using(remote):
        first = demo.ensure_demo_checkpoint()  # the session cache's (fitted by an earlier test, or now)
    assert remote.published == [f"{demo.REMOTE_NAME}-{demo.remote_key()}"]
    monkeypatch.setenv("BERTFORGE_CACHE", str(tmp_path / "fresh-runner"))

    def must_not_fit(target):
        raise AssertionError("the head was fitted again although the remote cache holds it")

    monkeypatch.setattr(demo, "build_demo_checkpoint", must_not_fit)
    with using(remote):
        second = demo.ensure_demo_checkpoint()
    assert second.is_relative_to(cache_root()) and remote.fetched == remote.published
    assert not (second / "manifest.json").exists()
    keys = [source_artifact(ResolvedSource("demo", path, "demo", "")).key for path in (first, second)]
    assert keys[0] == keys[1]


def test_ray_tasks_on_another_disk_hand_their_entries_to_the_driver_through_the_remote_cache(
        ray_cluster, remote, tmp_path, monkeypatch):
    """The tasks write to another cache than the driver's (as on another machine's disk): every entry a
    task builds reaches the driver through the store, verified, and the build is the local one's."""
    pytest.importorskip("ray")
    import ray

    import bertforge
    from conftest import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "checkpoint", seed=13)
    driver_cache, task_cache = tmp_path / "driver-cache", tmp_path / "task-cache"
    monkeypatch.setenv("BERTFORGE_CACHE", str(driver_cache))
    env = {name: value for name, value in os.environ.items() if name.startswith("AWS_")}
    ray.init(address=ray_cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {**env, "BERTFORGE_CACHE": str(task_cache)}})
    try:  # the build joins this connection (its tasks' environment) rather than opening its own
        outcome = bertforge.build(tmp_path / "ray", model=str(checkpoint), variants=VARIANTS, executor="ray",
                                  ray_address=ray_cluster.address, remote_cache=remote,
                                  validation={"max_sentences": 20}, bench={"enabled": False})
    finally:
        ray.shutdown()
    assert outcome.exit_code == 0
    entries = {f"{STAGES[v]}-{outcome.report['variants'][v]['key']}" for v in VARIANTS}
    built_by_tasks = {path.name for path in (task_cache / "stages").iterdir()}
    taken_by_driver = {path.name for path in (driver_cache / "stages").iterdir()}
    assert entries <= built_by_tasks and entries <= taken_by_driver
    published = {key.removeprefix("stages/").removesuffix(".json") for key in keys_under(remote)}
    assert entries <= published

    local = build(tmp_path / "local", tmp_path / "local-cache", checkpoint, monkeypatch)
    assert local.exit_code == 0
    assert shipped(tmp_path / "ray") == shipped(tmp_path / "local")
    assert outcome.report["variants"].keys() == local.report["variants"].keys()
    for name in VARIANTS:
        assert outcome.report["variants"][name]["metrics"] == local.report["variants"][name]["metrics"], name


def test_a_listing_reads_each_stores_own_modification_time_and_never_dates_a_file_to_1970():
    """fsspec stores name the time differently (memory: `created`, gcsfs: an ISO `updated`); a time read
    as 0 made `cache prune --older-than` take every file, uploads in flight among them, as decades old."""
    import datetime

    from bertforge.remote_cache.store import RemoteStore

    store = RemoteStore("memory://bertforge-listing-test/cache")
    store.fs.pipe("/bertforge-listing-test/cache/stages/a", b"123")
    (listed,) = store.listing("stages")
    assert listed.path == "stages/a" and abs(time.time() - listed.modified) < 600
    original = store.fs.info

    def gcs_like(path, **kwargs):  # the same file as gcsfs describes one: no mtime, an ISO string
        info = {k: v for k, v in original(path, **kwargs).items() if k != "created"}
        return {**info, "updated": "2026-01-02T03:04:05.000Z"}

    store.fs.info = gcs_like
    found = store.fs.find
    store.fs.find = lambda path, detail=False, **kw: {k: gcs_like(k) for k in found(path)} if detail else found(path)
    (listed,) = store.listing("stages")
    assert listed.modified == datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc).timestamp()
    store.fs.rm("/bertforge-listing-test", recursive=True)


def test_a_blob_a_new_entry_reuses_survives_a_prune_that_listed_the_manifests_before_it(tmp_path, monkeypatch):
    """After an upgrade, a new entry's tokenizer.json is byte for byte an old, unnamed blob's. Prune lists
    the manifests, a writer finds the old blob and creates its manifest, prune removes the blobs it saw
    unnamed: the new entry would name a removed blob. The writer uploads such an old blob anew instead."""
    import os

    from bertforge.artifact import write_manifest
    from bertforge.remote_cache import admin
    from bertforge.remote_cache.entries import blob_path, fetch_entry, publish_entry
    from bertforge.remote_cache.store import RemoteStore

    store = RemoteStore(f"file://{tmp_path}/shared")

    def entry(key: str) -> Path:
        directory = tmp_path / key
        directory.mkdir()
        (directory / "tokenizer.json").write_text('{"same": "bytes"}')
        (directory / "model.onnx").write_bytes(key.encode())
        write_manifest(directory, key=key, stage="fusion", stage_version="1", parent=None, config={}, lineage=[],
                       metadata={}, seconds=0.0)
        return directory

    assert publish_entry(store, entry("old0"))
    store.remove("stages/fusion-old0.json")  # pruned long ago; its blobs are unnamed now
    shared = tmp_path / "shared" / blob_path(json.loads((tmp_path / "old0" / "manifest.json").read_text())[
        "files"]["tokenizer.json"]["sha256"])
    two_hours_ago = time.time() - 7200
    for blob in (tmp_path / "shared" / "blobs").rglob("*"):
        os.utime(blob, (two_hours_ago, two_hours_ago))
    listed_before = admin._manifests(store)  # what prune read before the writer's manifest appeared
    assert publish_entry(store, entry("new1"))
    monkeypatch.setattr(admin, "_manifests", lambda store: listed_before)
    _, removed = admin.prune(store, 3650, None)  # no entry that old: only unnamed blobs go
    assert removed == 1  # old0's model.onnx; the shared tokenizer.json was uploaded again and stays
    assert shared.is_file()
    assert fetch_entry(store, "fusion", "new1", tmp_path / "fetched") is not None
    assert (tmp_path / "fetched" / "tokenizer.json").read_text() == '{"same": "bytes"}'


def test_an_s3_store_creates_an_entry_once_among_many_writers(remote):
    """S3: create-if-absent is a conditional PUT (If-None-Match: *); 8 threads race for one manifest and
    exactly one writes it, the others are told it is there (moto answers as S3 does)."""
    from concurrent.futures import ThreadPoolExecutor

    from bertforge.remote_cache.store import RemoteStore

    store = RemoteStore(remote)
    for round_ in range(3):
        path = f"stages/x{round_}.json"
        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(lambda i, path=path: store.create(path, f"writer {i}".encode()), range(8)))
        assert won.count(True) == 1, won
        assert store.read(path) == f"writer {won.index(True)}".encode()


def test_an_s3_write_conflict_is_retried_not_taken_for_a_dead_store(remote):
    """S3 may answer a conditional PUT that races another with 409 ConditionalRequestConflict, which s3fs
    passes on as a plain OSError: retried, it writes the entry or finds it there, and the remote cache
    stays on."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    from bertforge.remote_cache.store import RemoteStore, conflicting_write

    conflict = translate_boto_error(ClientError(
        {"Error": {"Code": "ConditionalRequestConflict", "Message": "A conflicting operation is in progress"}},
        "PutObject"))
    assert type(conflict) is OSError and conflicting_write(conflict)
    store = RemoteStore(remote)
    real = store.fs.pipe_file
    calls = []

    def conflicts_once(path, data, **kwargs):  # moto's S3 API, with the first answer S3's 409
        calls.append(path)
        if len(calls) == 1:
            raise conflict
        return real(path, data, **kwargs)

    store.fs.pipe_file = conflicts_once
    assert store.create("stages/y.json", b"mine") and len(calls) == 2
    assert store.read("stages/y.json") == b"mine"
    calls.clear()
    assert not store.create("stages/y.json", b"theirs")  # there already: told so, nothing overwritten
    assert store.read("stages/y.json") == b"mine"
