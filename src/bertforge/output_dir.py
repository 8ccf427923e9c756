"""A build's output directory before any work: one writer at a time, writable, the cache outside it,
and where a rebuild whose gates fail goes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from bertforge.cache import cache_root, exclusive_or_fail
from bertforge.errors import UsageError
from bertforge.pipeline import check_output_dir


def output_lock(out: Path):
    """One command at a time writes a build directory: build and validate take the same lock (two would
    race to replace it, or leave build.json from one and report.json from the other)."""
    target = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:20]
    return exclusive_or_fail(cache_root() / "locks" / f"out-{target}.lock",
                             f"another bertforge build or validate is writing {out}; wait for it or choose "
                             "another --out")


def rejected_path(out: Path) -> Path:
    """Where a rebuild whose gates failed goes, beside the build in `out` it leaves as it was; refused,
    as --out is, when what stands there is not a bertforge build alone (files of yours in it, a link,
    the directory you are in)."""
    rejected = out.with_name(f"{out.name}.rejected")
    check_output_dir(rejected, f"{rejected.name} (where a rebuild of {out} whose gates fail goes):")
    return rejected


def check_writable(out: Path) -> None:
    """Before any work: --out's parent and the cache must be writable, and the cache not inside --out
    (replacing --out would delete it)."""
    import tempfile

    root = cache_root().resolve()
    if root == out.resolve() or out.resolve() in root.parents:
        raise UsageError(f"the cache ({root}, $BERTFORGE_CACHE) is inside --out {out}: each build replaces "
                         "--out and would delete it; choose a cache or an --out outside the other")
    if out.resolve().is_relative_to(root):
        raise UsageError(f"--out {out} is inside the cache ({root}, $BERTFORGE_CACHE), whose clean-up and "
                         "`cache prune` manage what is there; choose an --out outside it")
    parent = out.resolve().parent  # created if missing, as the build would
    for place, what in ((parent, f"--out's parent directory {parent}"), (root, f"the cache {root}")):
        try:
            place.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=place, prefix=".bertforge-write-check-"):
                pass
        except OSError as error:
            raise UsageError(f"{what} is not writable: {error.strerror or error}") from None
