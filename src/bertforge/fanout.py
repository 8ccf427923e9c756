"""Independent pieces of a stage (int8-auto's sensitivity rows), and where they run: here, one after
another, unless the executor running the stage spreads them (ray_executor.stage_task) while it runs.

A stage's output never depends on where its pieces ran: each piece is a pure function of the inputs
it is given (which pickle, so another process may run it), and the pieces come back in order.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (piece, its inputs, how many pieces, called with each finished piece's index) -> the pieces' results, in order
Mapper = Callable[[Callable[[Any, int], Any], Any, int, Callable[[int], None]], list[Any]]


def in_order(piece: Callable[[Any, int], Any], inputs: Any, count: int, done: Callable[[int], None]) -> list[Any]:
    results = []
    for index in range(count):
        results.append(piece(inputs, index))
        done(index)
    return results


_mapper: ContextVar[Mapper] = ContextVar("bertforge_fanout", default=in_order)


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
