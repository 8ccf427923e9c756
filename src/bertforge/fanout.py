"""Independent pieces of a stage (int8-auto's sensitivity rows), and where they run: here, two at a
time on threads that share the cores (side_by_side), unless the executor running the stage spreads them
(ray_executor.stage_task) while it runs.

A stage's output never depends on where its pieces ran: each piece is a pure function of the inputs
it is given (which pickle, so another process may run it), and the pieces come back in order.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertforge.environment import physical_cores, sharing_cores

# (piece, its inputs, how many pieces, called with each finished piece's index) -> the pieces' results, in order
Mapper = Callable[[Callable[[Any, int], Any], Any, int, Callable[[int], None]], list[Any]]


def in_order(piece: Callable[[Any, int], Any], inputs: Any, count: int, done: Callable[[int], None]) -> list[Any]:
    results = []
    for index in range(count):
        results.append(piece(inputs, index))
        done(index)
    return results


# pieces that run at once on one machine, each with its share of the cores (side_by_side)
PIECES_AT_ONCE = 2


def side_by_side(piece: Callable[[Any, int], Any], inputs: Any, count: int, done: Callable[[int], None]
                 ) -> list[Any]:
    """The pieces PIECES_AT_ONCE at a time on threads of this process, each one's onnxruntime sessions on
    its share of the cores (environment.sharing_cores); `done` is called on this thread. The search's
    sessions run small batches (32 sentences), where one session of two threads keeps the cores less
    busy than two sessions of one (the whole fp32 bert-base graph over the calibration split: 0.88x the
    time, Intel Xeon, 2 cores), and one piece's Python work (graph edits, KL) runs beside the other's
    onnxruntime run, which releases the GIL. A piece's results do not depend on its thread count (MLAS
    splits a GEMM's rows and columns across threads, not its sums): int8-auto's rows are equal to the bit
    either way (tests/test_fanout.py; synthetic bert-base's 50 rows checked too)."""
    cores = physical_cores()
    workers = min(PIECES_AT_ONCE, cores, count)
    if workers < 2:
        return in_order(piece, inputs, count, done)

    def run(index: int) -> Any:
        with sharing_cores(cores // workers):
            return piece(inputs, index)

    results: list[Any] = [None] * count
    with ThreadPoolExecutor(workers, thread_name_prefix="bertforge-piece") as pool:
        futures = {pool.submit(run, index): index for index in range(count)}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                done(futures[future])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


_mapper: ContextVar[Mapper] = ContextVar("bertforge_fanout", default=side_by_side)


def mapper() -> Mapper:
    return _mapper.get()


@contextlib.contextmanager
def spreading(spread: Mapper) -> Iterator[None]:
    token = _mapper.set(spread)
    try:
        yield
    finally:
        _mapper.reset(token)


@dataclass(frozen=True)
class Folder:
    """A folder of files a stage's pieces read (inputs with a `folder` and a `moved_to(root)`), and how
    a process elsewhere tells whether it sees it: the token written in it."""

    root: Path
    token: str

    @classmethod
    def marked(cls, root: Path) -> Folder:
        token = uuid.uuid4().hex
        (Path(root) / TOKEN_FILE).write_text(token)
        return cls(Path(root), token)

    def visible(self) -> bool:
        try:
            return (self.root / TOKEN_FILE).read_text() == self.token
        except OSError:
            return False


TOKEN_FILE = ".pieces-token"
