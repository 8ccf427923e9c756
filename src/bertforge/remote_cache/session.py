"""The remote cache a build or validation uses, and what it says about it.

`using(cache)` makes it the current one for the code below (a context variable: the pipeline and the
results cache reach it without every call in between passing it on). Every failure of the store is
caught here: the first is reported in one warning, the remote cache is then left alone for the rest of
the run, and the work goes on from the local cache. A damaged remote entry or result is reported in one
line, ignored, built again locally, and (by a writing client) replaced.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bertforge.artifact import atomic_directory, make_read_only
from bertforge.remote_cache.entries import (
    DamagedEntry,
    Fetched,
    fetch_entry,
    fetch_result,
    mark_used,
    publish_entry,
    publish_result,
)
from bertforge.remote_cache.store import RemoteError, RemoteStore

ENV_URL = "BERTFORGE_REMOTE_CACHE"
ENV_READONLY = "BERTFORGE_REMOTE_CACHE_READONLY"


class RemoteCache:
    def __init__(self, url: str, readonly: bool = False, notify: Callable[[str], None] | None = None) -> None:
        self.store = RemoteStore(url)
        self.readonly = readonly
        self.notify = notify or (lambda text: None)
        self.failed: str | None = None  # the failure that switched it off for this run
        self.damaged: dict[str, DamagedEntry] = {}  # entries (and results) found damaged in this run
        self.published: list[str] = []  # entries this run wrote to the store
        self.fetched: list[str] = []  # entries this run took from it

    def settings(self) -> tuple[str, bool]:
        """URL and read-only flag: what another process (a Ray task) opens the same cache with."""
        return self.store.url, self.readonly

    @property
    def shown(self) -> str:
        return self.store.shown

    def summary(self) -> str:
        state = ("read-only" if self.readonly else "read-write") if self.usable() else "not used after a failure"
        return (f"remote cache {self.shown} ({state}): {len(self.fetched)} entries fetched and verified, "
                f"{len(self.published)} published")

    def usable(self) -> bool:
        return self.failed is None

    def _fail(self, error: RemoteError, consequence: str) -> None:
        if self.failed is None:
            self.failed = str(error)
            self.notify(f"warning: {error}; {consequence}")

    def check(self) -> bool:
        try:
            self.store.check()
        except RemoteError as exc:
            self._fail(exc, "building with the local cache only")
        return self.usable()

    def fetch_stage(self, stage: str, key: str, target: Path, keep_manifest: bool = True) -> Fetched | None:
        """The remote entry, verified, placed at `target` in the local cache; None when there is none
        (or it was damaged, or the store failed: each said once). Without `keep_manifest` (a prepared
        source checkpoint) only the files the manifest lists are placed."""
        if not self.usable():
            return None
        name = f"{stage}-{key}"
        try:
            with atomic_directory(target) as staging:
                fetched = fetch_entry(self.store, stage, key, staging, keep_manifest)
                if fetched is None:
                    raise _Absent
                make_read_only(staging)
        except _Absent:
            return None
        except DamagedEntry as exc:
            self.damaged[name] = exc
            self.notify(f"warning: remote cache entry {name} is damaged ({exc}); ignored, built here")
            return None
        except RemoteError as exc:
            self._fail(exc, "going on with the local cache only")
            return None
        self.fetched.append(name)
        if not self.readonly:
            self._quietly(mark_used, name)
        return fetched

    def share_stage(self, directory: Path, name: str | None = None, manifest_bytes: bytes | None = None) -> None:
        """Publish a complete local entry the store lacks (nothing, for a read-only client); `name` and
        `manifest_bytes` for a directory that keeps no manifest.json (entries.directory_manifest)."""
        if self.readonly or not self.usable():
            return
        name = name or directory.name
        try:
            if publish_entry(self.store, directory, self.damaged.pop(name, None), manifest_bytes):
                self.published.append(name)
            else:
                mark_used(self.store, name)
        except RemoteError as exc:
            self._fail(exc, f"{name} not published (a remote entry is visible only once complete, so none is "
                            "half there); the build goes on from local work")

    def fetch_result(self, kind: str, key: str) -> Any | None:
        if not self.usable():
            return None
        try:
            return fetch_result(self.store, kind, key)
        except DamagedEntry as exc:
            self.damaged[f"{kind}-{key}"] = exc
            self.notify(f"warning: remote cache: {exc}; ignored, measured here")
        except RemoteError as exc:
            self._fail(exc, "going on with the local cache only")
        return None

    def share_result(self, kind: str, key: str, data: Any) -> None:
        if self.readonly or not self.usable():
            return
        try:
            publish_result(self.store, kind, key, data, replace_damaged=self.damaged.pop(f"{kind}-{key}", None)
                           is not None)
        except RemoteError as exc:
            self._fail(exc, "results not published; the build goes on from local work")

    def _quietly(self, action: Callable[..., Any], *args: Any) -> None:
        try:
            action(self.store, *args)
        except RemoteError as exc:
            self._fail(exc, "going on with the local cache only")


class _Absent(Exception):
    """No entry under the key: leaves atomic_directory without publishing anything."""


_current: contextvars.ContextVar[RemoteCache | None] = contextvars.ContextVar("remote_cache", default=None)


def current() -> RemoteCache | None:
    return _current.get()


@contextlib.contextmanager
def using(cache: RemoteCache | None) -> Iterator[RemoteCache | None]:
    token = _current.set(cache)
    try:
        yield cache
    finally:
        _current.reset(token)


def from_settings(url: str | None, readonly: bool | None, notify: Callable[[str], None]) -> RemoteCache | None:
    """The remote cache a command asked for: its flag, else $BERTFORGE_REMOTE_CACHE (read-only with
    --remote-cache-readonly or $BERTFORGE_REMOTE_CACHE_READONLY=1); None when neither names one. Checked
    with one request: an unreachable store is one warning, and the run goes on without it."""
    url = url or os.environ.get(ENV_URL) or None
    if url is None:
        return None
    readonly = bool(readonly) or os.environ.get(ENV_READONLY, "") not in ("", "0")
    cache = RemoteCache(url, readonly, notify)
    cache.check()
    return cache
