"""Unexpected exceptions as one line for the terminal and a full traceback in a log file.

A failure inside a stage or a library must not look like a failed gate (exit 1) or print a
100-line traceback into a CI log: the CLI prints one line naming where it happened and the cause,
exits 3, and keeps the traceback under the cache's logs/ folder, whose path the line gives.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path


def write_traceback(where: str, error: BaseException) -> Path | None:
    """The exception's full traceback in <cache>/logs/; None when that cannot be written either."""
    from bertforge.cache import cache_root

    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = cache_root() / "logs" / f"{where}-{stamp}-{id(error) % 100000}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(error)), encoding="utf-8")
    except OSError:
        return None
    return path


def one_line(where: str, error: BaseException) -> str:
    """`where failed: Type: first line of the message (traceback: path)`."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    cause = f"{type(error).__name__}: {first}" if first else type(error).__name__
    log = write_traceback(where, error)
    return f"{where} failed: {cause}" + (f" (traceback: {log})" if log else "")
