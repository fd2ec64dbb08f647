"""Loading a classifier the metrics pack ships, or the user's own file instead."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def load_shipped_or_path(ctx: Any, path: str | None, shipped: Path, load: Callable[[Path], Any], name: str) -> Any:
    """``load(path)`` of the user's file (confined to the read folders), or of ``shipped`` when no
    path is given.

    :raises FileNotFoundError: no path and the shipped file ``name`` is missing.
    """
    if path:
        return load(ctx.input_path(path))
    if not shipped.is_file():
        raise FileNotFoundError(f"the shipped {name} weights are missing ({shipped})")
    return load(shipped)
