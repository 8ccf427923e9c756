"""Artifact directories: atomic creation, manifest.json, verification.

An artifact is a directory a stage wrote in full. It is built in a temporary sibling directory and
renamed into place only once complete, so a build killed at any point leaves either the previous
state or a `.tmp-*` directory that nothing trusts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertforge.environment import library_versions, machine_info
from bertforge.errors import UsageError
from bertforge.json_files import read_json

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"  # every variant directory's model, the name optimum's loaders look for
MANIFEST_SCHEMA = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_json_atomic(path: Path, data: Any, sort_keys: bool = True) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file + os.replace: readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# written into every directory bertforge stages or scratches in: clean-up removes only directories that
# carry it (never a user's folder whose name happens to match), with the pid of the process that owns it
OWNER_FILE = ".bertforge-owner"
OWNER_TAG = "bertforge staging"


def pid_namespace() -> str | None:
    """This process's pid namespace (Linux): where a pid in an owner mark means this machine's process."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def boot_id() -> str | None:
    """This machine's boot (Linux): the first pid namespace has the same name on every host, so a pid is
    this machine's to judge only where the boot is this one too (a cache on a shared filesystem)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


# owner file -> the descriptor holding its lock while this process owns the directory
_owner_locks: dict[str, int] = {}


def claim(directory: Path) -> None:
    """Mark `directory` as this process's, for remove_stale, and hold the mark's lock until release():
    a build on another machine sharing the cache cannot judge this process's pid, and a directory's
    mtime stops moving while a long stage works elsewhere, but a held lock says the owner lives."""
    import fcntl

    mark = {"tool": OWNER_TAG, "pid": os.getpid(), "pid_namespace": pid_namespace(), "boot_id": boot_id()}
    path = Path(directory) / OWNER_FILE
    path.write_text(json.dumps(mark), "utf-8")
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a filesystem without locks: remove_stale's age rule alone
        os.close(fd)
        return
    _owner_locks[str(path)] = fd


def release(directory: Path) -> None:
    """Drop the owner lock claim() took on `directory` (before its mark goes, or the directory does)."""
    fd = _owner_locks.pop(str(Path(directory) / OWNER_FILE), None)
    if fd is not None:
        os.close(fd)


def owner_holds(directory: Path) -> bool:
    """Whether a live process holds `directory`'s owner lock (False where none does, or the file system
    keeps no locks)."""
    import fcntl

    try:
        fd = os.open(Path(directory) / OWNER_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # and with it the lock just taken
    return False


def owner_mark(directory: Path) -> dict[str, Any] | None:
    """A directory's owner mark, or None when it carries none of bertforge's."""
    try:
        mark = json.loads((Path(directory) / OWNER_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(mark, dict) or mark.get("tool") != OWNER_TAG or not isinstance(mark.get("pid"), int):
        return None
    return mark


def exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step (Linux renameat2 RENAME_EXCHANGE); False where the system
    or filesystem cannot, and nothing moved."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def publish(tmp: Path, final: Path, foreign: Callable[[Path], list[str]] | None = None) -> Path | None:
    """Put the finished directory `tmp` at `final`. An existing `final` is swapped out in one step where
    the system can (else renamed aside first, and put back if the new one cannot take its place), then
    removed; unless `foreign` finds files in it that bertforge did not write (added while the command
    ran, after its checks): then the old directory is kept whole beside `final`, and its path returned."""
    if not final.exists():
        os.replace(tmp, final)
        return None
    if exchange(tmp, final):
        old = tmp  # now the old contents
    else:
        # no owner mark: were this process killed between the two renames, the previous build in it is
        # the user's to recover, not a leftover for the next build to remove
        aside = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-old-", dir=final.parent))
        old = aside / final.name
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)  # the previous one back where it was
            shutil.rmtree(aside, ignore_errors=True)
            raise
    try:
        holds_foreign = foreign is not None and bool(foreign(old))
    except Exception:  # noqa: BLE001 - an old directory that cannot be read is kept, not deleted
        holds_foreign = True
    kept = None
    if holds_foreign:
        kept = unique_beside(final, "previous")
        os.replace(old, kept)
    else:
        shutil.rmtree(old, ignore_errors=True)
    if old.parent != final.parent:  # the folder it was renamed aside into
        shutil.rmtree(old.parent, ignore_errors=True)
    return kept


def unique_beside(final: Path, what: str) -> Path:
    """`final`'s sibling named <name>.<what>-<time>, -2, -3... where taken."""
    import time

    base = final.with_name(f"{final.name}.{what}-{time.strftime('%Y%m%d-%H%M%S')}")
    candidate, n = base, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


@contextlib.contextmanager
def atomic_directory(final: Path, destination: Callable[[], Path] | None = None,
                     foreign: Callable[[Path], list[str]] | None = None,
                     kept: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block completes (or, with
    `destination`, the path it returns then: a build whose gates failed goes beside a good one).
    `foreign` and `kept`: as publish's; `kept` is told where an old directory holding files bertforge
    did not write was kept.

    It carries this process's owner mark, so a later build can tell a killed build's leftover (its
    process gone) from a running build's staging, and removes the leftovers it finds beside `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, ".tmp-")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent))
    # mkdtemp creates 0700; a setgid parent's bit is kept, so a cache shared by a group stays the group's
    os.chmod(tmp, (0o777 & ~current_umask()) | (final.parent.stat().st_mode & stat.S_ISGID))
    claim(tmp)
    try:
        yield tmp
        release(tmp)
        (tmp / OWNER_FILE).unlink()
        old_kept = publish(tmp, Path(destination()) if destination is not None else final, foreign)
        if old_kept is not None and kept is not None:
            kept(old_kept)
    finally:
        release(tmp)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


# a leftover must also be this old: a build in another container sharing the cache has its own pids
STALE_AFTER_S = 3600.0


def remove_stale(directory: Path, prefix: str, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the directories in `directory` named `prefix...` that carry bertforge's owner mark and whose
    process is gone (a killed build's staging or scratch): at once where the mark's pid namespace and
    boot are this process's (its pid is then this machine's to judge), else only once older than
    `older_than_s` (a build in another container, or on another machine sharing the cache, has pids of
    its own), and never while a process holds the mark's lock (claim: the owner lives, wherever it runs,
    however long its stage has left the directory untouched). Nothing without the mark is touched,
    whatever its name."""
    import time

    removed = []
    here, boot = pid_namespace(), boot_id()
    for entry in Path(directory).glob(f"{prefix}*"):
        if entry.is_symlink() or not entry.is_dir() or f"-{os.getpid()}-" in entry.name:
            # named with this process's id: perhaps its own, whose owner file it must not open (on NFS,
            # closing any descriptor of a file drops this process's lock on it); at worst another
            # machine's leftover of the same pid is kept
            continue
        mark = owner_mark(entry)
        if mark is None or mark["pid"] == os.getpid() or process_alive(mark["pid"]) or owner_holds(entry):
            continue
        same_namespace = (here is not None and mark.get("pid_namespace") == here
                          and boot is not None and mark.get("boot_id") == boot)
        with contextlib.suppress(FileNotFoundError):
            if not same_namespace and time.time() - entry.stat().st_mtime < older_than_s:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


# Python's tempfile default is one value for the whole process; every build running in it (two API
# builds on two threads) shares one scratch directory for it, set by the first and restored by the
# last, so no build's exit pulls the default from under another's quantizer.
_process_scratch_lock = threading.Lock()
_process_scratch: dict[str, Any] = {"users": 0, "dir": None, "previous": None}


@contextlib.contextmanager
def owned_scratch(base: Path, prefix: str) -> Iterator[Path]:
    """A scratch directory under `base` (named with this process's id; removed after, and by the
    next build if this one is killed) that Python's tempfile uses by default meanwhile: ORT's
    quantizers write their temporary models (`ort.quant.*`) to the default temp directory and offer
    no option for it, and a killed build left them in /tmp for good."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    remove_stale(base, prefix)
    remove_stale(base, "process-")
    scratch = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base))
    claim(scratch)
    with _process_scratch_lock:
        if _process_scratch["users"] == 0:
            shared = Path(tempfile.mkdtemp(prefix=f"process-{os.getpid()}-", dir=base))
            claim(shared)
            _process_scratch.update(dir=shared, previous=tempfile.tempdir)
            tempfile.tempdir = str(shared)
        _process_scratch["users"] += 1
    try:
        yield scratch
    finally:
        with _process_scratch_lock:
            _process_scratch["users"] -= 1
            if _process_scratch["users"] == 0:
                tempfile.tempdir = _process_scratch["previous"]
                release(_process_scratch["dir"])
                shutil.rmtree(_process_scratch["dir"], ignore_errors=True)
                _process_scratch.update(dir=None, previous=None)
        release(scratch)
        shutil.rmtree(scratch, ignore_errors=True)


def file_inventory(directory: Path) -> dict[str, dict[str, object]]:
    files = {}
    for path in sorted(Path(directory).rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and path.name != MANIFEST and rel != OWNER_FILE:
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def make_read_only(directory: Path) -> None:
    """Clear the write bits of every file under `directory`: a finished cache entry is never written
    again, and the hard links an output directory makes to it share its mode."""
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            mode = path.stat().st_mode
            if mode & 0o222:
                with contextlib.suppress(PermissionError):  # another user's file in a shared cache
                    os.chmod(path, mode & ~0o222)


def link_or_copy_tree(src: Path, dest: Path, skip: tuple[str, ...] = (), copy: tuple[str, ...] = ()) -> dict[str, int]:
    """`dest` with every file of `src` (but the top-level names in `skip`) hard-linked, or copied
    where the filesystem refuses a link (another device, no link support) or the name is in `copy`;
    returns the counts and the bytes copied. Links share the source's read-only mode (make_read_only),
    so an edit in `dest` has to be deliberate, and a cache entry changed anyway fails its check at the
    next hit and is rebuilt."""
    src, dest = Path(src), Path(dest)
    counts = {"linked": 0, "copied": 0, "bytes_copied": 0}
    dest.mkdir(parents=True)
    for path in sorted(src.rglob("*")):
        relative = path.relative_to(src)
        if relative.parts[0] in skip:
            continue
        target = dest / relative
        if path.is_dir():
            target.mkdir(exist_ok=True)
            continue
        if path.name not in copy:
            try:
                os.link(path, target)
                counts["linked"] += 1
                continue
            except OSError:
                pass  # another device, or no link support: copied below
        shutil.copyfile(path, target)  # an independent file: normal permissions, not the entry's
        os.chmod(target, 0o666 & ~current_umask())
        counts["copied"] += 1
        counts["bytes_copied"] += target.stat().st_size
    return counts


@dataclass(frozen=True)
class Artifact:
    """A complete stage output on disk and the facts that produced it."""

    path: Path
    key: str
    stage: str
    parent: str | None


def write_manifest(directory: Path, *, key: str, stage: str, stage_version: str, parent: str | None,
                   config: dict[str, Any], lineage: list[dict[str, str]], metadata: dict[str, Any],
                   seconds: float) -> dict[str, Any]:
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "key": key,
        "stage": stage,
        "stage_version": stage_version,
        "parent": parent,
        "lineage": lineage,
        "config": config,
        "metadata": metadata,
        "libraries": library_versions(),
        "machine": machine_info(),
        "timings": {"seconds": round(seconds, 3)},
        "files": file_inventory(directory),
    }
    write_json_atomic(Path(directory) / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    return read_json(Path(directory) / MANIFEST)


def safe_relative(name: str) -> bool:
    """Whether a file name read from a manifest is a plain relative path inside its directory: names read
    back never become paths outside it (no absolute path, no '..', no manifest.json)."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and "\\" not in name and all(
        part not in ("", ".", "..") for part in parts) and parts[0] != MANIFEST


def manifest_files(directory: Path) -> dict[str, Any] | None:
    """The manifest's file list, or None where manifest.json is no bertforge manifest (no such mapping)."""
    files = read_manifest(directory).get("files")  # read_json: an object, or bad input named
    return files if isinstance(files, dict) else None


def unlisted_files(directory: Path, listed: Iterable[str] | None = None) -> list[str]:
    """The files under `directory` its manifest does not list (manifest.json itself aside), by name only:
    no file is read, so it is cheap on a build of large models."""
    directory = Path(directory)
    if listed is None:
        listed = manifest_files(directory) or {}
    actual = {p.relative_to(directory).as_posix() for p in directory.rglob("*")
              if (p.is_file() or p.is_symlink()) and p.relative_to(directory).as_posix() != MANIFEST}
    return sorted(actual - set(listed))


def verify_directory(directory: Path) -> list[str]:
    """Return one line per problem: a missing, resized or altered file, an unlisted one, or a listed name
    that is no plain path inside the directory (never opened)."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path}: no manifest (not a bertforge artifact directory)"]
    try:
        listed = manifest_files(directory)
    except UsageError as exc:  # not readable JSON, or no object: damage to report, not a reason to stop
        return [str(exc)]
    if listed is None:
        return [f"{manifest_path}: not a bertforge manifest (no 'files' mapping)"]
    problems = []
    for rel, facts in sorted(listed.items()):
        path = directory / rel
        if not safe_relative(rel):
            problems.append(f"{rel}: not a plain file name inside {directory}")
            continue
        if not (isinstance(facts, dict) and type(facts.get("size")) is int and isinstance(facts.get("sha256"), str)):
            problems.append(f"{rel}: the manifest gives no size and sha256 for it")
            continue
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != facts["size"]:
            problems.append(f"{rel}: size {path.stat().st_size} != {facts['size']}")
        elif sha256_file(path) != facts["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    for rel in unlisted_files(directory, listed):
        problems.append(f"{rel}: not listed in the manifest")
    return problems
