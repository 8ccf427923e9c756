"""What every Ray task of bertforge shares: the settings the driver gives it, its setting in the worker
(CPU class checked, threads, remote cache), and collecting task results with their own errors."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bertforge.crash_log import one_line
from bertforge.environment import cpu_class, physical_cores, sharing_cores
from bertforge.errors import BertforgeError, StageError, UsageError

CLASS_RESOURCE = "cpu_class_"  # + a class (environment.cpu_class): a custom resource naming a node's CPU class
RETRIES = 3  # reruns of a task whose worker or node died


@dataclass(frozen=True)
class TaskSettings:
    """What every task needs from the driver, and how a task asks Ray for room for the tasks it starts
    itself (a stage's pieces: fanout.py)."""

    cpu_class: str
    remote_url: str | None = None
    remote_readonly: bool = False
    cpus: float = 1.0  # Ray CPUs a task takes: the threads it runs
    resources: dict[str, float] = field(default_factory=dict)  # the CPU class's resource, where nodes declare one
    spread_pieces: bool = False  # whether a stage task spreads its pieces (the cluster has room for two tasks)

    def options(self, name: str) -> dict[str, Any]:
        """Ray's options for a task of these settings."""
        return {"num_cpus": self.cpus, "resources": self.resources, "max_retries": RETRIES,
                "retry_exceptions": False, "name": name}


@contextlib.contextmanager
def in_task(settings: TaskSettings) -> Iterator[None]:
    """A task's setting: the driver's CPU class checked, the session threads of a local run, the run's
    remote cache."""
    from bertforge.remote_cache import session as remote_session
    from bertforge.remote_cache.session import RemoteCache

    here = cpu_class()
    if here != settings.cpu_class:
        raise UsageError(f"Ray node {socket.gethostname()} is CPU class {here}, this build's is {settings.cpu_class} "
                         f"(its int8 keys and kernel costs are that class's); start nodes with the resource "
                         f"{CLASS_RESOURCE}<class> so tasks go to their class")
    import torch

    # as many threads as the CPUs the task took from Ray (the driver's cores, at most a node's): a node with
    # more cores runs several tasks side by side, and each must not take them all (kernel costs measured
    # under that load would steer int8-auto's plan)
    threads = max(1, min(physical_cores(), int(settings.cpus)))
    torch.set_num_threads(threads)
    remote = RemoteCache(settings.remote_url, settings.remote_readonly) if settings.remote_url else None
    with remote_session.using(remote), sharing_cores(threads):
        yield


def where() -> str:
    return f"{socket.gethostname()} ({cpu_class()})"


def gathered(ray: Any, refs: list[Any], done: Callable[[int, Any], bool | None] = lambda index, value: None,
             resubmit: Callable[[int], Any] | None = None, keep: bool = True) -> list[Any]:
    """Each task's result in `refs`' order, `done` called as each arrives (where it returns False and
    `resubmit` is given, the task is submitted again by `resubmit(index)` and its next result counts); a
    task's error raised here as its own (a bertforge error keeps its exit code), a worker that died past
    its retries as a StageError. Without `keep`, a result is dropped once `done` has seen it (None in its
    place): the driver's memory then does not grow with the number of tasks."""
    index_of = {ref: index for index, ref in enumerate(refs)}
    found: dict[int, Any] = {}
    try:
        while index_of:
            ready, _ = ray.wait(list(index_of), num_returns=1)
            index = index_of.pop(ready[0])
            value = ray.get(ready[0])
            if done(index, value) is False and resubmit is not None:
                index_of[resubmit(index)] = index
                continue
            found[index] = value if keep else None
    except ray.exceptions.RayTaskError as exc:
        for ref in index_of:
            ray.cancel(ref, force=True)
        cause = exc.cause
        if isinstance(cause, BertforgeError):
            raise cause from None
        raise StageError(one_line("a Ray task", cause, logged=exc)) from None
    except ray.exceptions.RayError as exc:  # a worker or node lost past the retries, an object store full...
        for ref in index_of:
            ray.cancel(ref, force=True)
        raise StageError(one_line(f"a Ray task did not complete ({type(exc).__name__}; a lost worker is retried "
                                  f"{RETRIES} times)", exc)) from None
    return [found[index] for index in range(len(refs))]
