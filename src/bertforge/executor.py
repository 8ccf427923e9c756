"""Where a build's work runs: `local` (this process, the default) or `ray` (ray_executor.py).

An executor builds the variants' stages (the local one leaves that to the pipeline's own loop),
validates them shard by shard, and times them. Whatever runs where, the report is the same: stages
are found by their cache keys, validation shards merge to one pass's tallies, and latency is always
measured in one process, every variant interleaved, on one machine the report names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bertforge.environment import this_machine
from bertforge.errors import UsageError

if TYPE_CHECKING:  # the CLI reads EXECUTORS: this module stays light
    from bertforge.pipeline import Built
    from bertforge.progress import Progress
    from bertforge.recipe import Recipe
    from bertforge.sources import ResolvedSource
    from bertforge.validation.config import ValidationConfig

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    def build_stages(self, recipe: Recipe, source: ResolvedSource, progress: Progress,
                     hold: contextlib.ExitStack | None = None) -> dict[str, Built]: ...

    def validate(self, source: ResolvedSource, variants: dict[str, Path], config: ValidationConfig,
                 progress: Callable[[int, int], None]) -> dict[str, Any]: ...

    def latency(self, variants: dict[str, Path], sequence: int, warmup: int,
                repeats: int) -> tuple[dict[str, dict], dict[str, Any]]: ...

    def describe(self) -> dict[str, Any]: ...


class LocalExecutor:
    """Everything in this process, one step after another."""

    def build_stages(self, recipe: Recipe, source: ResolvedSource, progress: Progress,
                     hold: contextlib.ExitStack | None = None) -> dict[str, Built]:
        return {}  # pipeline.build_variants builds them in its own loop (holding each entry on `hold`)

    def validate(self, source: ResolvedSource, variants: dict[str, Path], config: ValidationConfig,
                 progress: Callable[[int, int], None]) -> dict[str, Any]:
        from bertforge.validation.validate import run_validation

        return run_validation(source.path, variants, config, progress=progress)

    def latency(self, variants: dict[str, Path], sequence: int, warmup: int,
                repeats: int) -> tuple[dict[str, dict], dict[str, Any]]:
        import bertforge.bench as bench

        return bench.latency(variants, 1, sequence, warmup, repeats), this_machine()

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", **this_machine()}


@contextlib.contextmanager
def started(kind: str | None, ray_address: str | None, progress: Progress,
            remote: tuple[str, bool] | None) -> Iterator[Executor]:
    """The executor a command asked for (`local` when None); a Ray one joins `ray_address` (else
    $RAY_ADDRESS, else starts a local Ray instance) and leaves on exit. `remote`: the run's remote
    cache (URL, read-only), which Ray tasks open too."""
    kind = kind or "local"
    if kind not in EXECUTORS:
        raise UsageError(f"executor {kind!r}: choose one of {', '.join(EXECUTORS)}")
    if kind == "local":
        if ray_address:
            raise UsageError("--ray-address is for --executor ray")
        yield LocalExecutor()
        return
    from bertforge.ray_executor import RayExecutor

    with RayExecutor.joined(ray_address, progress, remote) as executor:
        yield executor
