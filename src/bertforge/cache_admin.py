"""`bertforge cache list|prune|verify`: what the stage cache holds, removing what was not used lately,
and checking every entry against its manifest (remote_cache/admin.py does the same on a remote cache).

An entry's last use is its directory's modification time, which the pipeline sets on every cache hit
(a file in the entry would fail its verification: entries hold exactly what their manifest lists).
Pruning takes each entry's locks without waiting and skips an entry a build is writing, or has used
and is still running (a build holds every entry it used, shared, until it ends).
Results (validation metrics, latency: small JSON files) and checkpoints in `sources/` are kept.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from bertforge.cache import cache_root, exclusive_or_fail, use_lock_path
from bertforge.errors import UsageError


@dataclass(frozen=True)
class Entry:
    path: Path | str  # a local directory, or a remote entry's URL
    stage: str
    key: str
    size_bytes: int
    last_used: float  # seconds since the epoch

    def as_dict(self) -> dict[str, object]:
        return {"stage": self.stage, "key": self.key, "size_bytes": self.size_bytes, "last_used": self.last_used,
                "path": str(self.path)}


def entries() -> list[Entry]:
    """The cache's complete stage entries, least recently used first (staging directories skipped)."""
    root = cache_root() / "stages"
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.is_dir() or path.name.startswith(".") or "-" not in path.name or ".tmp-" in path.name:
            continue
        stage, key = path.name.rsplit("-", 1)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        found.append(Entry(path, stage, key, size, path.stat().st_mtime))
    return sorted(found, key=lambda e: (e.last_used, e.path.name))


def to_prune(present: list[Entry], older_than_days: float | None, max_size_gb: float | None) -> list[Entry]:
    """Entries unused for `older_than_days`, then the least recently used (`present` is sorted so) until
    the rest fit in `max_size_gb`."""
    if older_than_days is None and max_size_gb is None:
        raise UsageError("cache prune needs --older-than DAYS and/or --max-size GB")
    if (older_than_days or 0) < 0 or (max_size_gb or 0) < 0:
        raise UsageError("cache prune: --older-than and --max-size must be 0 or more")
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
    chosen = [e for e in present if cutoff is not None and e.last_used < cutoff]
    total = sum(e.size_bytes for e in present) - sum(e.size_bytes for e in chosen)
    if max_size_gb is not None:
        for entry in (e for e in present if e not in chosen):
            if total <= max_size_gb * 1e9:
                break
            chosen.append(entry)
            total -= entry.size_bytes
    return chosen


def prune(older_than_days: float | None, max_size_gb: float | None, dry_run: bool = False) -> list[Entry]:
    """Remove entries unused for `older_than_days`, then the least recently used until the entries fit
    in `max_size_gb`. Returns what was (or, with dry_run, would be) removed."""
    chosen = to_prune(entries(), older_than_days, max_size_gb)
    removed = []
    for entry in chosen:
        if dry_run:
            removed.append(entry)
            continue
        try:
            # a live build holds the use lock of every entry it has used, shared, until it ends
            with exclusive_or_fail(use_lock_path(f"{entry.stage}-{entry.key}"), "in use"), \
                    exclusive_or_fail(cache_root() / "locks" / f"{entry.stage}-{entry.key}.lock", "busy"):
                if Path(entry.path).stat().st_mtime != entry.last_used:
                    continue  # a build used it since it was listed (and has ended): no longer what was chosen
                shutil.rmtree(Path(entry.path))
        except (UsageError, FileNotFoundError):
            continue  # a build holds it now, or it is gone already
        removed.append(entry)
    return removed


def verify() -> list[str]:
    """One line per damaged entry (a file missing, resized, altered or unlisted); empty when all hold."""
    from bertforge.artifact import verify_directory

    damaged = []
    for entry in entries():
        problems = verify_directory(Path(entry.path))
        if problems:
            damaged.append(f"{Path(entry.path).name}: {problems[0]}" + (
                f", and {len(problems) - 1} more" if len(problems) > 1 else ""))
    return damaged


def render(listed: list[Entry], where: str | None = None) -> str:
    now = time.time()
    lines = [f"{'stage':<16} {'key':<22} {'MB':>9} {'last used':>12}"]
    for entry in listed:
        days = (now - entry.last_used) / 86400
        lines.append(f"{entry.stage:<16} {entry.key:<22} {entry.size_bytes / 1e6:>9.1f} {days:>9.1f} d ago")
    total = sum(e.size_bytes for e in listed) / 1e9
    lines.append(f"{len(listed)} entries, {total:.2f} GB in {where or cache_root() / 'stages'}")
    return "\n".join(lines)
