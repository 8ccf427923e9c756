"""Where bertforge's cache lives: a module of its own, so `import bertforge` can name it without
importing the cache's machinery."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$BERTFORGE_CACHE, else $XDG_CACHE_HOME/bertforge, else ~/.cache/bertforge."""
    explicit = os.environ.get("BERTFORGE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "bertforge"
