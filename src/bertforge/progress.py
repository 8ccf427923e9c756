"""Live status per stage with elapsed time; plain, quiet and JSON-lines modes for CI logs."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

MODES = ("auto", "bar", "plain", "quiet", "jsonl")

# Where a stage's own progress goes: stages are pure functions of (parent dir, out dir, config) and get
# no Progress, but a long one (int8-auto's search: minutes on bert-base) reports its steps through
# `report`, which the pipeline points at the running step's line (`reporting`)
_STAGE_DETAIL: ContextVar[Callable[[str], None] | None] = ContextVar("stage_detail", default=None)


@contextmanager
def reporting(callback: Callable[[str], None]) -> Iterator[None]:
    """Send what `report` is given meanwhile to `callback` (e.g. Progress.update)."""
    token = _STAGE_DETAIL.set(callback)
    try:
        yield
    finally:
        _STAGE_DETAIL.reset(token)


def report(detail: str) -> None:
    """A running stage's progress, e.g. 'sensitivity: group 12/50'; nothing happens outside `reporting`."""
    callback = _STAGE_DETAIL.get()
    if callback is not None:
        callback(detail)


class Progress:
    def __init__(self, mode: str = "auto", stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "plain"
        self.mode = mode
        self._detail = ""
        self._lock = threading.Lock()

    def event(self, kind: str, **fields: object) -> None:
        if self.mode == "jsonl":
            print(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.mode == "jsonl":
            self.event("message", text=text)
        elif self.mode != "quiet":
            print(text, file=self.stream, flush=True)

    def alert(self, text: str) -> None:
        """Printed in every mode, quiet included: gate failures a CI log must show."""
        if self.mode == "jsonl":
            self.event("alert", text=text)
        else:
            print(text, file=self.stream, flush=True)

    def update(self, detail: str) -> None:
        """A step's own progress, e.g. '120/320 sentences'."""
        with self._lock:
            self._detail = detail

    @contextmanager
    def step(self, name: str) -> Iterator[dict]:
        """Time a step; the caller may set info['cached'] = True or info['note']."""
        info: dict = {}
        start = time.monotonic()
        self._detail = ""
        self.event("step_start", step=name)
        stop = threading.Event()
        ticker = None
        if self.mode == "bar":
            ticker = threading.Thread(target=self._tick, args=(name, start, stop), daemon=True)
            ticker.start()
        try:
            yield info
        except BaseException:
            self._finish(name, start, stop, ticker, "failed", info)
            raise
        self._finish(name, start, stop, ticker, "cached" if info.get("cached") else "done", info)

    def _tick(self, name: str, start: float, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            with self._lock:
                detail = f"  {self._detail}" if self._detail else ""
            self.stream.write(f"\r  {name:<20} {time.monotonic() - start:7.1f}s{detail}\033[K")
            self.stream.flush()

    def _finish(self, name, start, stop, ticker, status, info) -> None:
        stop.set()
        if ticker:
            ticker.join()
            self.stream.write("\r\033[K")
        seconds = time.monotonic() - start
        note = f"  {info['note']}" if info.get("note") else ""
        if self.mode == "jsonl":
            self.event("step_end", step=name, status=status, seconds=round(seconds, 3), note=info.get("note"))
        elif self.mode != "quiet":
            print(f"  {name:<20} {status:<6} {seconds:7.1f}s{note}", file=self.stream, flush=True)
