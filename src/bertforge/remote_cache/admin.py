"""`bertforge cache list|prune|verify --remote-cache URL`: the remote cache's entries, pruning them by
age and size, and rehashing every blob.

An entry's last use is the later of its manifest's and its `used/` marker's modification times (object
stores cannot touch an object's time; every fetch by a writing client rewrites the marker). Pruning
removes an entry's manifest first, so no reader ever finds an entry with blobs gone, then the blobs no
remaining manifest names, once they are an hour old: a writer uploads its blobs before its manifest, and
a younger blob may be one whose manifest is on its way.
"""

from __future__ import annotations

import json
import time

from bertforge.cache_admin import Entry, to_prune
from bertforge.remote_cache.entries import (
    BLOB_GRACE_S,
    SHA256,
    DamagedEntry,
    blob_path,
    entry_path,
    parse_manifest,
    result_digest,
    used_path,
)
from bertforge.remote_cache.store import RemoteStore


def _manifests(store: RemoteStore) -> dict[str, tuple[float, bytes | None]]:
    """Entry name -> (its manifest's modification time, its bytes or None when it vanished meanwhile)."""
    found = {}
    for item in store.listing("stages"):
        name = item.path.removeprefix("stages/")
        if item.path.count("/") == 1 and name.endswith(".json") and "-" in name:
            found[name.removesuffix(".json")] = (item.modified, store.read(item.path))
    return found


def entries(store: RemoteStore) -> list[Entry]:
    used = {item.path.removeprefix("used/"): item.modified for item in store.listing("used")}
    listed = []
    for name, (modified, data) in _manifests(store).items():
        stage, key = name.rsplit("-", 1)
        try:
            files = parse_manifest(data or b"", stage, key)["files"]
            size = sum(facts["size"] for facts in files.values())
        except DamagedEntry:
            size = 0
        listed.append(Entry(f"{store.shown}/{entry_path(name)}", stage, key, size, max(modified, used.get(name, 0.0))))
    return sorted(listed, key=lambda e: (e.last_used, e.key))


def prune(store: RemoteStore, older_than_days: float | None, max_size_gb: float | None,
          dry_run: bool = False) -> tuple[list[Entry], int]:
    """Remove the chosen entries (as local pruning chooses them), then the blobs nothing names any more;
    returns the entries and the number of blobs removed (or, with dry_run, that would be)."""
    chosen = to_prune(entries(store), older_than_days, max_size_gb)
    if dry_run:
        return chosen, 0
    for entry in chosen:
        name = f"{entry.stage}-{entry.key}"
        store.remove(entry_path(name))
        store.remove(used_path(name))
    named: set[str] = set()
    for name, (_, data) in _manifests(store).items():
        stage, key = name.rsplit("-", 1)
        try:
            named.update(facts["sha256"] for facts in parse_manifest(data or b"", stage, key)["files"].values())
        except DamagedEntry:
            continue
    removed = 0
    for item in store.listing("blobs/sha256"):
        sha = item.path.rsplit("/", 1)[1]
        if sha in named or time.time() - item.modified <= BLOB_GRACE_S:
            continue
        # looked at again just before it goes: a writer reusing it meanwhile uploaded it anew
        # (publish_entry), and its manifest then names it
        now = store.stat(item.path)
        if now is not None and time.time() - now.modified > BLOB_GRACE_S:
            store.remove(item.path)
            removed += 1
    return chosen, removed


def verify(store: RemoteStore) -> tuple[list[str], int]:
    """Rehash every blob every entry names (each once) and check every result's digest: one line per
    damaged entry or result, and how many blobs were hashed."""
    checked: dict[str, str | None] = {}  # blob sha -> None when intact, else what is wrong
    problems = []
    for name, (_, data) in _manifests(store).items():
        stage, key = name.rsplit("-", 1)
        try:
            files = parse_manifest(data or b"", stage, key)["files"]
        except DamagedEntry as exc:
            problems.append(f"{name}: {exc}")
            continue
        for relative, facts in sorted(files.items()):
            sha = facts["sha256"]
            if sha not in checked:
                checked[sha] = _blob_problem(store, sha, facts["size"])
            if checked[sha] is not None:
                problems.append(f"{name}: {relative}: {checked[sha]}")
                break
    for item in store.listing("results"):
        kind_key = item.path.removeprefix("results/").removesuffix(".json")
        kind, _, key = kind_key.rpartition("-")
        try:
            stored = json.loads(store.read(item.path) or b"")
            intact = isinstance(stored, dict) and stored.get("sha256") == result_digest(kind, key, stored.get("data"))
        except ValueError:
            intact = False
        if not intact:
            problems.append(f"{item.path}: its contents do not match their sha256")
    return problems, len(checked)


def _blob_problem(store: RemoteStore, sha: str, size: int) -> str | None:
    if not SHA256.fullmatch(sha):
        return "not a sha256 name"
    try:
        actual, actual_size = store.rehash(blob_path(sha))
    except FileNotFoundError:
        return f"blob {sha[:12]} missing"
    if actual_size != size:
        return f"blob {sha[:12]}: {actual_size} bytes where {size} were promised (truncated or replaced)"
    if actual != sha:
        return f"blob {sha[:12]}: its bytes do not hash to its name (altered)"
    return None
