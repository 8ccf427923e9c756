"""Cached evaluation results: a variant's validation metrics and latency, keyed like stages.

A warm rebuild that changed one variant's config re-validates and re-times only that variant; the
others' results come from here. Keys: the variant's artifact key (which already chains its whole
lineage and the library versions), the source key, the section of the recipe that shapes the
result, a digest of the code that computes it (RESULT_CODE) and EVALUATION_VERSION; latency keys
(and int8-auto's per-group kernel times) add the CPU and thread count, since they are measurements of this machine;
those and the validation results add the CPU class (cpu_target.cpu_class: the instruction sets that pick the
int8 kernels), so a result measured on one class is never reused on another.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from bertforge.artifact import current_umask, write_json_atomic
from bertforge.cache import cache_root, canonical_json, stage_key
from bertforge.environment import cpu_class, cpu_model, physical_cores
from bertforge.errors import BertforgeError
from bertforge.remote_cache import session as remote_session

EVALUATION_VERSION = "1"


def _path(kind: str, key: str) -> Path:
    return cache_root() / "results" / f"{kind}-{key}.json"


# measurements of this machine: their keys add the CPU and the thread count
MACHINE_KINDS = ("latency", "int8-costs")
# results that depend on the CPU's instruction sets: their keys add its class
CPU_CLASS_KINDS = ("latency", "int8-costs", "validation")


# the code that computes each kind of result: a change to it is a new key, never a stale result
RESULT_CODE = {"reference": "bertforge.validation.validate", "validation": "bertforge.validation.validate",
               "latency": "bertforge.bench"}


def key_for(kind: str, parts: dict[str, Any], machine: dict[str, Any] | None = None) -> str:
    """The result's key; `machine`: environment.this_machine() of the machine that measured it, where
    that is not this one (a Ray worker timed the variants)."""
    if kind in MACHINE_KINDS:
        parts = {**parts, **({"cpu": machine["cpu"], "threads": machine["threads"]} if machine
                             else {"cpu": cpu_model(), "threads": physical_cores()})}
    if kind in CPU_CLASS_KINDS:
        parts = {**parts, "cpu_class": machine["cpu_class"] if machine else cpu_class()}
    if kind in RESULT_CODE:
        from bertforge.code_digest import code_digest

        parts = {**parts, "code": code_digest(RESULT_CODE[kind])}
    return stage_key(None, kind, EVALUATION_VERSION, parts)


def _secret() -> bytes:
    """This cache's signing key (created once; readable by its owner and, as the umask allows, its group,
    never by others): a result file edited by hand, or written by anything but bertforge with this cache,
    no longer carries a valid signature. A cache shared by a group is shared by users who may write its
    results anyway, so they share the key; others cannot read it."""
    path = cache_root() / "results.key"
    if not path.is_file():
        # written whole under another name, then linked into place: a process reading it meanwhile, or a
        # kill mid-write, never finds an empty key; the link fails where another process made it first
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".results.key-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640 & ~current_umask())
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(32))
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink(missing_ok=True)
    secret = path.read_bytes()
    if len(secret) != 32:
        raise BertforgeError(f"{path}: not a bertforge results key (remove it; every cached result is then "
                             "measured again)")
    return secret


def _signature(kind: str, key: str, data: Any) -> str:
    message = canonical_json({"kind": kind, "key": key, "data": data}).encode()
    return hmac.new(_secret(), message, hashlib.sha256).hexdigest()


# why the last load of a kind refused its entry (for the progress line), by kind
refused: dict[str, str] = {}


def load(kind: str, key: str) -> dict[str, Any] | None:
    """A stored result, only when its signature holds: a damaged, edited or unsigned entry is measured
    again, never trusted. A local miss is looked up in the remote cache, if one is in use (its results
    carry a sha256 of their contents; a fetched one is stored here, signed with this cache's key)."""
    path = _path(kind, key)
    if not path.is_file():
        remote = remote_session.current()
        fetched = remote.fetch_result(kind, key) if remote is not None else None
        if isinstance(fetched, dict):
            _store_local(kind, key, fetched)
            return fetched
        return None
    try:
        stored = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        refused[kind] = f"{path.name}: unreadable"
        return None
    if not isinstance(stored, dict) or set(stored) != {"data", "signature"}:
        refused[kind] = f"{path.name}: not a signed result"
        return None
    if not hmac.compare_digest(str(stored["signature"]), _signature(kind, key, stored["data"])):
        refused[kind] = f"{path.name}: its signature does not match its contents (edited?)"
        return None
    return stored["data"]


def store(kind: str, key: str, data: dict[str, Any]) -> None:
    """Keep a result here, and in the remote cache if one is in use and writable."""
    _store_local(kind, key, data)
    remote = remote_session.current()
    if remote is not None:
        remote.share_result(kind, key, data)


def _store_local(kind: str, key: str, data: dict[str, Any]) -> None:
    path = _path(kind, key)
    write_json_atomic(path, {"data": data, "signature": _signature(kind, key, data)})
    os.chmod(path, 0o444 & ~current_umask())  # read-only, whatever the umask (world-writable under umask 000)
