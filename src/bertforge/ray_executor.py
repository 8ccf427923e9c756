"""`--executor ray`: a build's stages, int8-auto's sensitivity rows, validation shards and latency as
Ray tasks.

- Stages: one task a variant, each after its parent's (Ray's own dependency on the parent task's
  result), so the waves after the export run side by side where the cluster has room (fp32 -> fused,
  int8-blockwise, int8-weights, int8-auto; fused -> fp16, int8-dynamic, int8-static). A task builds
  into its machine's cache and returns the entry's key; the driver then takes every entry by key from
  its own cache or, across machines, from the remote cache (`--remote-cache`), each file verified.
  Nothing assumes a disk shared between nodes: a cluster of several machines without a remote cache
  is refused before any work.
- int8-auto's sensitivity rows: where the cluster has room for two tasks, the stage's task starts one
  task a row (ray_fanout.py), in the same CPU class and with the same retries.
- Validation: one task a shard (validate.py), each running the reference and every variant over its
  sentences; the driver merges the shards' columns in corpus order, so the report equals the local
  executor's.
- Latency: one task, every variant timed together, interleaved, on one node; the report names it.

A task that dies (worker killed, node lost) is run again by Ray (`max_retries`); stages are keyed and
written atomically, shards are pure, so a rerun changes nothing. Each task takes as many of Ray's CPUs
as the threads it runs (this machine's physical cores, at most a node's CPUs): on a machine of 2
cores tasks run one at a time, as the local executor's steps, and fan-out costs only Ray's overhead.

Where int8 numerics and latency depend on the CPU, tasks go to nodes of the driver's CPU class (its
int8 cache keys and kernel costs are that class's): to nodes started with the custom resource
`cpu_class_<class>` (`ray start --resources='{"cpu_class_avx2": 1000}'`) where any node has one;
otherwise anywhere, and a task on a node of another class fails with the one-line reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertforge.artifact import MANIFEST, read_manifest
from bertforge.cache import shared_lock, use_lock_path
from bertforge.crash_log import one_line
from bertforge.environment import cpu_class, physical_cores, this_machine
from bertforge.errors import SourceError, UsageError
from bertforge.fanout import spreading
from bertforge.pipeline import VARIANT_PLAN, Built, built_elsewhere, required_variants, run_stage, source_artifact
from bertforge.progress import Progress
from bertforge.ray_fanout import spread_on_ray
from bertforge.ray_tasks import CLASS_RESOURCE, TaskSettings, gathered, in_task, where
from bertforge.recipe import Recipe
from bertforge.sources import ResolvedSource
from bertforge.validation.config import ValidationConfig
from bertforge.validation.corpus import PackedExamples

# what a task inherits from the driver's environment (the cache's place and settings, the hub's)
PASSED_ENV = ("BERTFORGE_", "HF_", "TRANSFORMERS_", "AWS_")


@dataclass(frozen=True)
class VariantAt:
    """A variant as a task finds it: the driver's directory where the task's machine sees it, else
    the cache entry by stage and key."""

    path: str
    stage: str
    key: str


# ---- in the task (a Ray worker process) ----

def local_source(source: ResolvedSource, expected_key: str) -> ResolvedSource:
    """The checkpoint on this node: the driver's path where it exists here, else the spec resolved here;
    refused unless its files are the driver's (another folder at that path, or another revision of a hub
    model resolved here, would build and validate another model under the driver's name)."""
    here = source
    if not source.path.is_dir():
        from bertforge.sources import resolve

        here = resolve(source.spec)
    found = source_artifact(here).key
    if found != expected_key:
        raise SourceError(f"the checkpoint {source.spec} is not the same on {where()} ({here.path}: files hash "
                          f"{found}) as on the driver ({expected_key}); give every node the same checkpoint")
    return here


def variant_here(variant: VariantAt, hold: contextlib.ExitStack) -> Path:
    """The variant's directory: the driver's where this node sees it, holding that very entry (stage and
    key: an older build at the same path on another machine is not it), else the cache entry; a cache
    entry's use lock is kept on `hold` (the task's lifetime), so `cache prune` here skips it meanwhile."""
    at = Path(variant.path)
    if (at / "model.onnx").is_file() and (at / MANIFEST).is_file():
        with contextlib.suppress(UsageError):
            named = read_manifest(at)
            if (named.get("stage"), named.get("key")) == (variant.stage, variant.key):
                return at
    return built_elsewhere(variant.stage, variant.key, None, hold).artifact.path


def stage_task(settings: TaskSettings, recipe: Recipe, source: ResolvedSource, expected_key: str, variant: str,
               *parent: Built) -> Built:
    """`variant` into this node's cache, from the source checkpoint (the driver's: `expected_key`) or from
    its parent's entry, taken by the key the parent's task returned (verified, fetched from the remote
    cache where this node lacks it)."""
    with in_task(settings), contextlib.ExitStack() as hold:  # the entries it reads and writes: kept from prune
        stage, parent_variant, section = VARIANT_PLAN[variant]
        if parent_variant is None:
            built_from = source_artifact(local_source(source, expected_key))
        else:
            built_from = built_elsewhere(VARIANT_PLAN[parent_variant][0], parent[0].key, None, hold).artifact
        with spreading(spread_on_ray(settings)) if settings.spread_pieces else contextlib.nullcontext():
            # int8-auto's sensitivity rows: tasks too
            run = run_stage(stage, built_from, getattr(recipe, section), hold)
        return Built(run.artifact.key, run.cached, run.seconds, run.rebuilt_because, where())


def shard_task(settings: TaskSettings, source: ResolvedSource, expected_key: str, variants: dict[str, VariantAt],
               config: ValidationConfig, examples: PackedExamples, first: bool):
    """One validation shard over every variant (validate.validate_shard), against the driver's checkpoint."""
    from bertforge.memory import reused_large_buffers
    from bertforge.validation.validate import Reference, validate_shard

    with in_task(settings), reused_large_buffers(), contextlib.ExitStack() as hold:
        paths = {name: variant_here(at, hold) for name, at in variants.items()}
        reference = Reference(local_source(source, expected_key).path, config)
        return validate_shard(reference, paths, examples, first=first, last=True)


def latency_task(settings: TaskSettings, variants: dict[str, VariantAt], sequence: int, warmup: int,
                 repeats: int) -> tuple[dict[str, dict], dict[str, Any]]:
    import bertforge.bench as bench

    with in_task(settings), contextlib.ExitStack() as hold:
        paths = {name: variant_here(at, hold) for name, at in variants.items()}
        return bench.latency(paths, 1, sequence, warmup, repeats), {**this_machine(), "executor": "ray"}


# ---- in the driver ----

def placement(nodes: list[dict[str, Any]], build_class: str,
              address: str = "the cluster") -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The live nodes with CPUs a task of this build may run on, and the resource a task asks for:
    where any node names its CPU class (resource cpu_class_<class>), only nodes of the build's class;
    where none does, every node (each task checks its class itself, in_task)."""
    nodes = [n for n in nodes if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if not nodes:
        raise UsageError(f"the Ray cluster at {address} has no node with CPUs to run tasks")
    if not any(k.startswith(CLASS_RESOURCE) for n in nodes for k in n["Resources"]):
        return nodes, {}
    resource = CLASS_RESOURCE + build_class
    nodes = [n for n in nodes if resource in n["Resources"]]
    if not nodes:
        raise UsageError(f"no node of the Ray cluster at {address} has the resource {resource}, this machine's "
                         "CPU class; this build's int8 keys and kernel costs are that class's")
    return nodes, {resource: 0.001}


def needs_remote_cache(nodes: list[dict[str, Any]], driver_host: str) -> bool:
    """Whether the nodes and the driver are more than one machine: then only a remote cache carries
    stage entries between them (no disk is assumed shared)."""
    return len({n.get("NodeManagerHostname") for n in nodes} | {driver_host}) > 1

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS frame


def http2_answer(host: str, port: int, timeout: float = 10.0) -> str | None:
    """None where the server at host:port speaks HTTP/2 (a Ray head's GCS is a gRPC server: it answers
    a client's preface with a SETTINGS frame), else what it answered instead, in a few words; OSError
    where nothing accepts the connection. By hand: Ray's own client retries such an address for minutes,
    and gRPC's Python package is not one of Ray's core dependencies."""
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(HTTP2_PREFACE)
        try:
            reply = connection.recv(64)
        except TimeoutError:
            return f"no answer in {timeout:g} s"
    if len(reply) >= 9 and reply[3] == 4:  # a frame header: 3 bytes of length, then the type, 4 = SETTINGS
        return None
    if not reply:
        return "it closed the connection"
    first = reply.split(b"\r\n", 1)[0].decode("ascii", "replace")
    return f"it answered {first[:40]!r}"


def import_ray(local: bool):
    """Ray, imported; with `local` (a local instance, or a cluster on the loopback) Ray keeps to the
    loopback (its own switch, read at import: otherwise it rewrites 127.0.0.1 to this machine's address)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install 'bertforge[ray]'") from None
    return ray


class RayExecutor:
    def __init__(self, ray: Any, settings: TaskSettings, nodes: list[dict[str, Any]], address: str) -> None:
        self.ray, self.settings, self.nodes, self.address = ray, settings, nodes, address

    @classmethod
    @contextlib.contextmanager
    def joined(cls, address: str | None, progress: Progress, remote: tuple[str, bool] | None) -> Iterator[RayExecutor]:
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address is not None and address.startswith("ray://"):
            raise UsageError(f"{address} is a Ray Client address; --ray-address takes the cluster's GCS address "
                             "(HEAD:6379, what `ray start --head` printed): the build joins it as a driver")
        host, _, port = (address or "").rpartition(":")
        if address is not None and port.isdigit():
            # Ray retries an address where nothing answers, or something else does, for minutes without
            # raising: ask once first
            try:
                answer = http2_answer(host, int(port))
            except OSError as exc:
                raise UsageError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start its head "
                                 "with `ray start --head` or give another --ray-address") from None
            if answer is not None:
                raise UsageError(f"what answers at {address} is not a Ray cluster's head ({answer}); give the "
                                 "address `ray start --head` printed") from None
        ray = import_ray(local=address is None or host in ("127.0.0.1", "localhost"))
        owned = not ray.is_initialized()
        if owned:
            options: dict[str, Any] = {
                "include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR,
                "runtime_env": {"env_vars": {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)}}}
            try:
                if address is None:  # a Ray instance of this machine's cores, for this command only
                    # worker_niceness 0: Ray runs workers at nice 15, so its own daemons and the driver's
                    # threads take the cores from them whenever they wake; the tasks time kernels and latency
                    ray.init(address="local", num_cpus=physical_cores(), _node_ip_address="127.0.0.1",
                             _system_config={"worker_niceness": 0}, **options)
                else:
                    ray.init(address=address, **options)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                ray.shutdown()  # whatever init had started before it failed
                raise UsageError(one_line(f"cannot join the Ray cluster at {address or 'a local instance'}",
                                          exc)) from None
        elif address is not None:
            progress.message(f"warning: Ray is already initialised in this process; --ray-address {address} is "
                             "not joined, the tasks run where that Ray instance is")
        try:
            executor = cls.of_cluster(ray, address or "local", remote)
            progress.message(f"executor: ray, {executor.summary()}")
            yield executor
        finally:
            if owned:
                ray.shutdown()

    @classmethod
    def of_cluster(cls, ray: Any, address: str, remote: tuple[str, bool] | None) -> RayExecutor:
        build_class = cpu_class()
        nodes, resources = placement(ray.nodes(), build_class, address)
        # a task takes as many of Ray's CPUs as the threads it runs: this machine's cores, at most a node's
        cpus = min(physical_cores(), *(node["Resources"]["CPU"] for node in nodes))
        # a stage spreads its pieces where two tasks fit side by side; on one machine of `cpus` cores
        # they would only queue behind each other, at Ray's cost
        room = sum(int(node["Resources"]["CPU"] // cpus) for node in nodes)
        settings = TaskSettings(build_class, *(remote or (None, False)), cpus=cpus, resources=resources,
                                spread_pieces=room >= 2)
        if needs_remote_cache(nodes, socket.gethostname()) and (settings.remote_url is None
                                                                 or settings.remote_readonly):
            hosts = sorted({n.get("NodeManagerHostname") or "?" for n in nodes} | {socket.gethostname()})
            raise UsageError(f"the Ray cluster spans machines ({', '.join(hosts)}): its tasks share stage entries "
                             "through a remote cache they write to; " + (
                                 "this one is read-only (--remote-cache-readonly)" if settings.remote_url
                                 else "add --remote-cache URL (a store that failed its check is not used)"))
        return cls(ray, settings, nodes, address)

    def summary(self) -> str:
        resources, cpus = self.settings.resources, self.settings.cpus
        placement = (f"tasks on nodes with {next(iter(resources))}" if resources
                     else f"tasks on any node, each checking it is {self.settings.cpu_class}")
        pieces = ("int8-auto's sensitivity rows as tasks" if self.settings.spread_pieces
                  else "room for one task at a time")
        return (f"{len(self.nodes)} node{'s' * (len(self.nodes) != 1)} ({self.address}), {cpus:g} CPUs a task, "
                f"{placement}, {pieces}")

    def describe(self) -> dict[str, Any]:
        return {"kind": "ray", "address": self.address, "nodes": len(self.nodes), "cpus_per_task": self.settings.cpus,
                "cpu_class": self.settings.cpu_class, "sensitivity_rows_spread": self.settings.spread_pieces}

    def remote(self, function: Callable[..., Any], name: str) -> Any:
        return self.ray.remote(function).options(**self.settings.options(name))

    def results(self, refs: list[Any], done: Callable[[int, Any], None] = lambda index, value: None,
                keep: bool = True) -> list[Any]:
        return gathered(self.ray, refs, done, keep=keep)

    def build_stages(self, recipe: Recipe, source: ResolvedSource, progress: Progress,
                     hold: contextlib.ExitStack | None = None) -> dict[str, Built]:
        """Each variant's stage as a task; with `hold`, the driver takes each entry's use lock on this
        machine as its task reports (the task held it while it ran), so `cache prune` skips it."""
        needed = required_variants(recipe.variants)
        expected = source_artifact(source).key
        refs: dict[str, Any] = {}
        for variant in needed:
            parent = VARIANT_PLAN[variant][1]
            refs[variant] = self.remote(stage_task, f"bertforge-stage-{variant}").remote(
                self.settings, recipe, source, expected, variant, *([refs[parent]] if parent else []))
        built: dict[str, Built] = {}

        def done(index: int, result: Built) -> None:
            if hold is not None:
                hold.enter_context(shared_lock(use_lock_path(f"{VARIANT_PLAN[needed[index]][0]}-{result.key}")))
            built[needed[index]] = result
            progress.update(f"{len(built)}/{len(needed)}: {needed[index]} "
                            f"{'cached' if result.cached else f'built in {result.seconds:.1f} s'} on {result.where}")

        with progress.step("stages on ray") as info:
            self.results([refs[v] for v in needed], done)
            fresh = sum(not b.cached for b in built.values())
            info["note"] = f"{fresh} built, {len(built) - fresh} cached"
        return built

    def located(self, variants: dict[str, Path]) -> dict[str, VariantAt]:
        found = {}
        for name, path in variants.items():
            manifest = read_manifest(path)
            found[name] = VariantAt(str(Path(path).resolve()), manifest["stage"], manifest["key"])
        return found

    def validate(self, source: ResolvedSource, variants: dict[str, Path], config: ValidationConfig,
                 progress: Callable[[int, int], None]) -> dict[str, Any]:
        from bertforge.validation.validate import Corpus, ShardResult

        corpus = Corpus.of(source.path, config)
        shards = [corpus.shard(index) for index in range(corpus.shard_count())]
        at = self.located(variants)
        expected = source_artifact(source).key
        refs = [self.remote(shard_task, f"bertforge-validation-shard-{index}").remote(
            self.settings, source, expected, at, config, shard, index == 0) for index, shard in enumerate(shards)]
        total = len(corpus.examples) * (1 + len(variants))
        finished = [0]
        merged = ShardResult()

        def done(index: int, result: Any) -> None:
            # merged as each arrives, in any order (exact sums and counts; the probes come with the first
            # shard only), and then dropped: the driver holds one result, not one per shard
            merged.merge(result)
            finished[0] += len(shards[index]) * (1 + len(variants))
            progress(finished[0], total)

        self.results(refs, done, keep=False)
        return merged.summary(corpus.record(config))

    def latency(self, variants: dict[str, Path], sequence: int, warmup: int,
                repeats: int) -> tuple[dict[str, dict], dict[str, Any]]:
        task = self.remote(latency_task, "bertforge-latency")
        return self.results([task.remote(self.settings, self.located(variants), sequence, warmup, repeats)])[0]
