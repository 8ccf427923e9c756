"""Unexpected exceptions as one line for the terminal and a full traceback in a log file.

A failure inside a stage or a library must not look like a failed gate (exit 1) or print a
100-line traceback into a CI log: the CLI prints one line naming where it happened and the cause,
exits 3, and keeps the traceback under the cache's logs/ folder, whose path the line gives.
"""

from __future__ import annotations

import contextlib
import errno
import time
import traceback
from collections.abc import Iterator
from pathlib import Path


def write_traceback(where: str, error: BaseException) -> Path | None:
    """The exception's full traceback in <cache>/logs/; None when that cannot be written either."""
    from bertforge.cache_dir import cache_root

    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = cache_root() / "logs" / f"{where}-{stamp}-{id(error) % 100000}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(error)), encoding="utf-8")
    except OSError:
        return None
    return path


def disk_full(error: BaseException) -> OSError | None:
    """The out-of-space OSError behind `error`, if one is (a library may wrap it in its own error)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def one_line(where: str, error: BaseException, logged: BaseException | None = None) -> str:
    """`where failed: Type: first line of the message (traceback: path)`; the log holds `logged`'s
    traceback where given (a Ray task's error, whose text carries the task's name and its remote
    traceback, which the deserialized `error` lacks)."""
    full = disk_full(error)
    if full is not None:  # what to free, not a library's echo of a half-written file
        written = f" writing {full.filename2 or full.filename}" if (full.filename2 or full.filename) else ""
        return (f"{where} failed: no space left on the device{written}; free space there or in the cache "
                "(`bertforge cache prune`) and run it again")
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    cause = f"{type(error).__name__}: {first}" if first else type(error).__name__
    log = write_traceback(where, logged or error)
    return f"{where} failed: {cause}" + (f" (traceback: {log})" if log else "")


@contextlib.contextmanager
def library_messages_to(path: Path) -> Iterator[None]:
    """The libraries' warnings (logging's root logger, where onnxruntime's quantizers write "Please
    consider to run pre-processing", and Python warnings) go to a log file under the cache, not into
    the progress line; the file exists only if something was written."""
    import logging

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, delay=True)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def transformers_errors_only() -> Iterator[None]:
    """transformers' own warnings (its logger writes to stderr itself, past library_messages_to) held
    back while a checkpoint loads where bertforge reports, or makes, what they are about: a missing MLM
    head."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
