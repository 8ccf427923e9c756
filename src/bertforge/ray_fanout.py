"""A stage's pieces (fanout.py: int8-auto's sensitivity rows) as Ray tasks, started by the stage's own
task while it runs.

A piece's inputs go through Ray's object store once; the large files they name (the search's weight
file, layer prefix and spilled reference, in the stage's scratch folder) stay where they are. A piece
that runs where that folder is visible (same machine, or a shared disk: its token file is there) reads
it in place; one on another machine says so, and the folder's files are then put in the object store
once and copied into that task's own scratch folder, removed after it. No disk is assumed shared.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bertforge.fanout import Mapper
from bertforge.ray_tasks import TaskSettings, gathered, in_task


class FolderNotHere:
    """A piece's answer where the folder its inputs name is not visible: send the files."""


def packed(root: Path) -> dict[str, np.ndarray]:
    """Every file under `root`, by its relative path, as bytes (numpy: Ray's object store reads them
    without a copy)."""
    return {str(path.relative_to(root)): np.fromfile(path, dtype=np.uint8)
            for path in sorted(Path(root).rglob("*")) if path.is_file()}


def unpacked(files: dict[str, np.ndarray], root: Path) -> None:
    """`packed`'s files written under `root`; a name that would land outside it is refused."""
    root = Path(root).resolve()
    for relative, data in files.items():
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"{relative!r} is not a path inside the folder being copied")
        path.parent.mkdir(parents=True, exist_ok=True)
        data.tofile(path)


def piece_task(settings: TaskSettings, piece: Callable[[Any, int], Any], inputs: Any, index: int,
               files: dict[str, np.ndarray] | None) -> Any:
    """One piece; where the folder `inputs.folder` names is not visible here, in a copy of it (`files`),
    or FolderNotHere without them."""
    with in_task(settings):
        folder = getattr(inputs, "folder", None)
        if folder is None or folder.visible():
            return piece(inputs, index)
        if files is None:
            return FolderNotHere()
        from bertforge.artifact import owned_scratch
        from bertforge.cache import cache_root

        with owned_scratch(cache_root() / "tmp", "piece-") as scratch:
            unpacked(files, scratch)
            inputs.moved_to(scratch)
            return piece(inputs, index)


def spread_on_ray(settings: TaskSettings) -> Mapper:
    """A fanout mapper: each piece a Ray task of `settings`, named bertforge-<piece>-<index>."""
    import ray

    def spread(piece: Callable[[Any, int], Any], inputs: Any, count: int, done: Callable[[int], None]) -> list[Any]:
        task = ray.remote(piece_task)
        shared = ray.put(inputs)
        files: list[Any] = []  # the folder's files in the object store, once a piece asked for them

        def submit(index: int) -> Any:
            name = f"bertforge-{piece.__name__.replace('_', '-')}-{index}"
            return task.options(**settings.options(name)).remote(settings, piece, shared, index,
                                                                  files[0] if files else None)

        def finished(index: int, value: Any) -> bool:
            if isinstance(value, FolderNotHere):
                if not files:
                    files.append(ray.put(packed(inputs.folder.root)))
                return False
            done(index)
            return True

        return gathered(ray, [submit(index) for index in range(count)], finished, submit)

    return spread
