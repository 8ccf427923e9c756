"""JSON files bertforge reads back (manifests, reports, build.json, config.json): a file that does not
parse is bad input named by its path (exit 2), never a library's traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bertforge.errors import UsageError


def read_json(path: Path | str, expect: type = dict) -> Any:
    """`path`'s JSON value, which must be an `expect` (a dict unless said)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers JSONDecodeError and bad UTF-8
        raise UsageError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, expect):
        raise UsageError(f"{path}: not a JSON {'object' if expect is dict else expect.__name__}")
    return value
