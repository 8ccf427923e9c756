"""The content-addressed stage cache.

A stage's key is the hash of its parent's key, the stage's name@version, its config, the versions
of the libraries that shape its output and (from the pipeline) the digest of its code and the inputs
it declares, so changing any of them changes the key of the stage and of every stage below it.
An unhashable config is an error, never a silent random key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from bertforge.cache_dir import cache_root
from bertforge.environment import library_versions

KEY_LENGTH = 20


def canonical_json(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"stage config is not plain JSON data and cannot be hashed: {exc}") from exc


def stage_key(parent_key: str | None, stage: str, version: str, config: dict[str, Any],
              libraries: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> str:
    payload = {
        "parent": parent_key,
        "stage": f"{stage}@{version}",
        "config": config,
        "libraries": library_versions() if libraries is None else libraries,
        **(extra or {}),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:KEY_LENGTH]


@contextlib.contextmanager
def exclusive_or_fail(path: Path, busy: str) -> Iterator[None]:
    """An exclusive advisory lock taken without waiting: `busy` (a UsageError) when another process
    holds it. The kernel drops the lock with its holder, so a killed build never leaves it stuck."""
    from bertforge.errors import UsageError

    with _lock_file(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock_file(path: Path) -> IO[str]:
    """The lock file, created if absent; opened read-only where it is another user's and not writable
    to this one (a cache shared by several users): flock needs no write access."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return open(path, "a+")
    except PermissionError:
        if path.is_file():
            return open(path)
    from bertforge.errors import UsageError

    raise UsageError(f"cannot create {path}: this user may not write {path.parent}. A cache shared by several "
                     "users needs group write on it: `chgrp -R GROUP CACHE; chmod -R g+w CACHE; find CACHE -type d "
                     "-exec chmod g+s {} +` and umask 002 for every user of it")


@contextlib.contextmanager
def _waiting_lock(path: Path, mode: int) -> Iterator[None]:
    with _lock_file(path) as handle:
        fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """An exclusive advisory lock, so two builds sharing a cache never write one entry at once."""
    return _waiting_lock(path, fcntl.LOCK_EX)


def use_lock_path(entry: str) -> Path:
    """The lock a build holds shared on a stage entry it uses, for as long as the build runs."""
    return cache_root() / "locks" / f"{entry}.use"


def shared_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """A shared advisory lock (many holders; an exclusive taker waits or, without waiting, is refused)."""
    return _waiting_lock(path, fcntl.LOCK_SH)
