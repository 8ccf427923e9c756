"""Stage entries and results in the remote cache, published and fetched with every byte verified.

Layout under the cache URL:
    blobs/sha256/<hex>            every file of every entry, named by its sha256 (stored once)
    stages/<stage>-<key>.json     an entry: the stage's manifest.json, written last and only if absent
    used/<stage>-<key>            rewritten on each hit by a writing client: the entry's last use, for prune
    results/<kind>-<key>.json     a validation, latency or cost result with the sha256 of its contents

A reader trusts nothing it has not hashed: an entry's manifest must be the one for the key it asked for,
name only plain relative paths, and every blob must hash to its name and the manifest's size. A writer
uploads the blobs first and the manifest last with a create-if-absent write, so a reader never sees half
an entry, two writers of one entry never overwrite or delete each other's work (the second finds the
first's manifest and keeps it), and nothing a writer does can remove a complete entry.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertforge.artifact import MANIFEST, file_inventory, read_manifest, safe_relative
from bertforge.cache import canonical_json
from bertforge.remote_cache.store import BlobMismatch, RemoteStore

SHA256 = re.compile(r"[0-9a-f]{64}")


def blob_path(sha256: str) -> str:
    return f"blobs/sha256/{sha256}"


def entry_path(name: str) -> str:
    return f"stages/{name}.json"


def used_path(name: str) -> str:
    return f"used/{name}"


def result_path(kind: str, key: str) -> str:
    return f"results/{kind}-{key}.json"


class DamagedEntry(Exception):
    """A remote entry that cannot be used as it is: the message says which file and why."""

    def __init__(self, message: str, bad_blobs: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.bad_blobs = bad_blobs


def parse_manifest(data: bytes, stage: str, key: str) -> dict[str, Any]:
    """The manifest, only if it is one for this stage and key and lists plain files by sha256 and size."""
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise DamagedEntry(f"its manifest is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("key") != key or manifest.get("stage") != stage:
        raise DamagedEntry("its manifest is not the one for this stage and key")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise DamagedEntry("its manifest lists no files")
    for name, facts in files.items():
        if not safe_relative(name):
            raise DamagedEntry(f"its manifest names {name!r}, not a plain relative path")
        if not (isinstance(facts, dict) and isinstance(facts.get("sha256"), str) and SHA256.fullmatch(facts["sha256"])
                and isinstance(facts.get("size"), int) and facts["size"] >= 0):
            raise DamagedEntry(f"its manifest's entry for {name} has no sha256 and size")
        parts = name.split("/")
        if any("/".join(parts[:i]) in files for i in range(1, len(parts))):  # 'a' and 'a/b' cannot both be files
            raise DamagedEntry(f"its manifest names {name!r} inside another file it lists")
    return manifest


@dataclass(frozen=True)
class Fetched:
    files: int
    bytes: int


def fetch_entry(store: RemoteStore, stage: str, key: str, dest: Path, keep_manifest: bool = True) -> Fetched | None:
    """The remote entry for `stage`-`key` downloaded into the empty directory `dest` (with its manifest.json
    unless not `keep_manifest`), every blob checked against its sha256 and size; None when the store has
    no such entry; DamagedEntry when it has one that fails a check (nothing of it is left in `dest` to be
    trusted: the caller discards `dest`)."""
    name = f"{stage}-{key}"
    data = store.read(entry_path(name))
    if data is None:
        return None
    manifest = parse_manifest(data, stage, key)
    total = 0
    bad: list[str] = []
    problems: list[str] = []
    for relative, facts in sorted(manifest["files"].items()):
        try:
            store.get_verified(blob_path(facts["sha256"]), dest / relative, facts["sha256"], facts["size"])
            total += facts["size"]
        except FileNotFoundError:
            bad.append(facts["sha256"])
            problems.append(f"{relative}: blob {facts['sha256'][:12]} missing")
        except BlobMismatch as exc:
            bad.append(facts["sha256"])
            problems.append(f"{relative}: blob {facts['sha256'][:12]}: {exc}")
    if problems:
        more = f", and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise DamagedEntry(problems[0] + more, tuple(bad))
    if keep_manifest:
        (dest / MANIFEST).write_bytes(data)
    return Fetched(len(manifest["files"]), total)


def directory_manifest(directory: Path, stage: str, key: str) -> bytes:
    """A manifest for a directory that keeps none of its own (a prepared source checkpoint, whose files
    are its identity: a manifest.json in it would change its hash)."""
    return canonical_json({"schema": 1, "key": key, "stage": stage, "files": file_inventory(directory)}).encode()


# how long prune leaves a blob no manifest names: a writer uploads its blobs before its manifest
BLOB_GRACE_S = 3600.0


def publish_entry(store: RemoteStore, directory: Path, damaged: DamagedEntry | None = None,
                  manifest_bytes: bytes | None = None) -> bool:
    """Upload a complete local entry: each blob the store lacks (or holds at another size), then its
    manifest, created only if absent. Returns whether this call wrote the entry (False: another writer's
    complete entry was there first, and is kept).

    `damaged`: the store's entry under this key failed its checks when fetched. Its bad blobs are uploaded
    again (a blob's name is its sha256: a correct upload can only repair it) and its manifest is replaced
    by this complete one, in one atomic write: only an entry found broken is ever replaced.
    `manifest_bytes`: the manifest to publish where `directory` keeps none (directory_manifest)."""
    manifest = json.loads(manifest_bytes) if manifest_bytes is not None else read_manifest(directory)
    name = f"{manifest['stage']}-{manifest['key']}"
    if damaged is None and store.exists(entry_path(name)):
        return False
    repair = damaged.bad_blobs if damaged is not None else ()
    for relative, facts in sorted(manifest["files"].items()):
        blob = blob_path(facts["sha256"])
        there = store.stat(blob)
        # a blob another entry uploaded long ago may be one `cache prune` is about to remove as unnamed:
        # uploaded again, it is new, and prune leaves a new blob alone for BLOB_GRACE_S
        if (facts["sha256"] in repair or there is None or there.size != facts["size"]
                or time.time() - there.modified > BLOB_GRACE_S / 2):
            store.put_file(directory / relative, blob)
    body = manifest_bytes if manifest_bytes is not None else (directory / MANIFEST).read_bytes()
    if damaged is not None:
        store.overwrite(entry_path(name), body)
        return True
    return store.create(entry_path(name), body)


def mark_used(store: RemoteStore, name: str) -> None:
    store.overwrite(used_path(name), b"")


def result_digest(kind: str, key: str, data: Any) -> str:
    import hashlib

    return hashlib.sha256(canonical_json({"kind": kind, "key": key, "data": data}).encode()).hexdigest()


def fetch_result(store: RemoteStore, kind: str, key: str) -> Any | None:
    """A remote result whose recorded sha256 matches its kind, key and data; None when absent;
    DamagedEntry when present but not intact."""
    raw = store.read(result_path(kind, key))
    if raw is None:
        return None
    try:
        stored = json.loads(raw)
    except ValueError:
        raise DamagedEntry(f"{result_path(kind, key)} is not JSON") from None
    if not isinstance(stored, dict) or set(stored) != {"data", "sha256"} or \
            stored["sha256"] != result_digest(kind, key, stored["data"]):
        raise DamagedEntry(f"{result_path(kind, key)}: its contents do not match their sha256")
    return stored["data"]


def publish_result(store: RemoteStore, kind: str, key: str, data: Any, replace_damaged: bool = False) -> bool:
    """Create the result if absent (or replace one found damaged); whether this call wrote it."""
    body = canonical_json({"data": data, "sha256": result_digest(kind, key, data)}).encode()
    if replace_damaged:
        store.overwrite(result_path(kind, key), body)
        return True
    return store.create(result_path(kind, key), body)
