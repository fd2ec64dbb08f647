"""Read confinement that follows the real path: every file a loader opens must lie, after
resolving symbolic links, under an allowed read folder.

:func:`check_tree_readable` walks a file or folder (links followed, each real folder once, so
loops end) and refuses the first entry whose real path is outside the roots, or that is a
special file (FIFO, socket, device). It opens nothing. Loaders call it before reading; the
validator calls it (through :meth:`dagfusion.settings.Settings.check_tree_readable`) for
``PATH`` inputs, so a run never even hashes a file outside the read folders.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from dagfusion.errors import UnsafeOperationError


def check_tree_readable(path: str | os.PathLike[str], roots: Sequence[Path]) -> list[Path]:
    """Check that ``path`` and, for a folder, everything under it really lies under ``roots``.

    Folders are walked following symbolic links; each real folder is entered once, so link
    loops end. Every entry (files, folders, dangling links) is resolved to its real path and
    must lie under one of ``roots`` (themselves resolved). FIFOs, sockets and devices are
    refused too (opening one can block forever). Nothing is opened or read.

    :returns: the real paths of the regular files found, sorted.
    :raises UnsafeOperationError: naming the first entry whose real path is outside ``roots``
        (with where it leads and the roots), or that is a special file.
    """
    real_roots = tuple(Path(r).expanduser().resolve() for r in roots)
    files: list[Path] = []
    visited: set[Path] = set()
    pending = [Path(path)]
    while pending:
        entry = pending.pop()
        real = _confined(entry, real_roots)
        mode = _mode(real)
        if stat.S_ISDIR(mode):
            if real not in visited:
                visited.add(real)
                pending.extend(sorted(entry.iterdir(), reverse=True))
        elif stat.S_ISREG(mode):
            files.append(real)
        elif mode:
            raise UnsafeOperationError(f"{entry} is a special file (FIFO, socket or device); loaders read only regular files")
    return sorted(files)


def _mode(real: Path) -> int:
    """The ``st_mode`` of ``real`` (links already resolved), or 0 if it does not exist."""
    try:
        return real.stat().st_mode
    except OSError:
        return 0


def _confined(entry: Path, roots: tuple[Path, ...]) -> Path:
    """The real path of ``entry`` if it lies under one of ``roots`` (resolved), else :class:`UnsafeOperationError`."""
    real = entry.resolve()
    if any(real == root or real.is_relative_to(root) for root in roots):
        return real
    if entry.is_symlink():
        where = f"{entry} is a link to {real}, which is"
    elif real != entry.absolute():
        where = f"{entry} (really {real}) is"
    else:
        where = f"{entry} is"
    listed = ", ".join(str(r) for r in roots) or "none"
    raise UnsafeOperationError(
        f"{where} outside the allowed read folders ({listed}); a loader reads only files whose real path lies "
        "under them: copy the file there, or add its folder to read_dirs in the settings or DAGFUSION_READ_DIRS"
    )
