"""A job's outputs: listing its folder, and resolving a requested name safely inside it.

:func:`resolve_output` is the only way a download finds its file: the name must be relative,
without ``..``, backslashes or NUL; resolved (links followed), it must still lie inside the
job's folder and be a regular file. Anything else is refused before a file is opened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from dagfusion.outdir import LOCK_FILE
from dagfusion.server.service import Refused

#: Most entries a listing returns.
MAX_LISTED = 10_000


def list_outputs(folder: Path) -> list[dict[str, Any]]:
    """Every regular file under ``folder`` (links not followed, the lock file left out), as
    ``{"name": relative POSIX path, "size": bytes, "modified": time}``, sorted by name."""
    found: list[dict[str, Any]] = []
    if not folder.is_dir():
        return found
    for root, dirs, files in os.walk(folder, followlinks=False):
        for file_name in files:
            path = Path(root) / file_name
            try:
                info = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode) or (Path(root) == folder and file_name == LOCK_FILE):
                continue
            found.append({"name": path.relative_to(folder).as_posix(), "size": info.st_size, "modified": info.st_mtime})
            if len(found) >= MAX_LISTED:
                return sorted(found, key=lambda e: e["name"])
        dirs.sort()
    return sorted(found, key=lambda e: e["name"])


def resolve_output(folder: Path, name: str) -> Path:
    """The file ``name`` inside ``folder``; :class:`Refused` (400 or 404) naming ``name`` otherwise."""
    if not name or "\x00" in name or "\\" in name:
        raise Refused(400, "invalid output name", f"{name!r} is not a valid output name", "name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or any(part == ".." for part in pure.parts):
        raise Refused(400, "invalid output name", f"{name!r} must be relative to the job's folder, without '..'", "name")
    base = folder.resolve()
    target = (base / pure).resolve()
    if base not in target.parents:
        raise Refused(400, "invalid output name", f"{name!r} leads outside the job's folder", "name")
    if pure.name == LOCK_FILE or not target.is_file():
        raise Refused(404, "no such output", f"the job has no output {name!r}", "name")
    return target


__all__ = ["MAX_LISTED", "list_outputs", "resolve_output"]
