"""The output folder of a run: where it may be, what in it belongs to the engine, and its lock.

A run writes its record (``workflow.yaml``, ``events.jsonl``, ``manifest.json``) into its output
folder; those names, and the lock file, are the engine's: no node may write them
(:func:`check_not_reserved`), so a workflow cannot forge the record of the run that wrote it.
An output folder may not be the working folder, a folder settings are read from, the cache
folder, or an ancestor of any of them (:func:`check_output_dir`), so a run cannot write the
``dagfusion.toml`` that later commands obey. :class:`OutputLock` keeps two runs out of one folder
at a time; a later run replaces the record of an earlier one.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from dagfusion.errors import UnsafeOperationError, WorkflowError
from dagfusion.pidlock import LockHeld, PidLock

RECORD_FILES = ("workflow.yaml", "events.jsonl", "manifest.json")
LOCK_FILE = ".dagfusion-run.lock"
#: Names at the top of an output folder that only the engine writes (compared case-insensitively).
RESERVED_NAMES = frozenset(name.lower() for name in (*RECORD_FILES, LOCK_FILE))


class OutputFolderBusy(WorkflowError):
    """Another run is writing into the same output folder."""


def check_not_reserved(output_dir: Path, target: Path) -> None:
    """Refuse ``target`` (resolved, inside ``output_dir``) if it is one of the run record's files."""
    if target.parent == output_dir.resolve() and target.name.lower() in RESERVED_NAMES:
        raise UnsafeOperationError(
            f"output path {target.name!r} is reserved for the run record "
            f"({', '.join(RECORD_FILES)}); choose another file name"
        )


def check_not_private(target: Path, private: tuple[Path, ...]) -> None:
    """Refuse a file to write (resolved) that lies in one of ``private`` (the cache folder)."""
    folder = _container(_real(target), private)
    if folder is not None:
        raise UnsafeOperationError(
            f"output path {str(target)!r} lies in {folder}, whose files dagfusion trusts (cache); "
            "choose another file name"
        )


def settings_folders(environ: os._Environ[str] | dict[str, str] | None = None) -> tuple[Path, ...]:
    """Every folder a settings file is read from: the working folder, ``~/.config/dagfusion``
    and the folder of ``$DAGFUSION_CONFIG``."""
    env = os.environ if environ is None else environ
    folders = [Path.cwd(), Path.home() / ".config" / "dagfusion"]
    explicit = env.get("DAGFUSION_CONFIG")
    if explicit:
        folders.append(Path(explicit).expanduser().absolute().parent)
    return tuple(folders)


def check_output_dir(output_dir: Path, protected: tuple[Path, ...], private: tuple[Path, ...] = ()) -> None:
    """Refuse an output folder that is one of ``protected`` or an ancestor of one, or that
    lies in one of ``private``.

    ``protected`` are folders whose top-level files later commands trust (see
    :func:`settings_folders`). A folder inside one of them is fine (``outputs/`` in the working
    folder), since settings are read only from the folder itself. ``private`` are folders
    whose whole tree is trusted (the cache folder); :func:`check_not_private` keeps a run's
    files out of them when the output folder contains one.
    """
    out = _real(output_dir)
    folder = _container(out, private)
    if folder is not None:
        raise UnsafeOperationError(
            f"output folder {str(output_dir)!r} lies in {folder}, whose files dagfusion reads "
            "(settings, cache); write runs into a folder of their own, e.g. outputs/NAME"
        )
    for folder in protected:
        real = _real(folder)
        if out == real or out in real.parents:
            what = "the working folder" if real == _real(Path.cwd()) else str(folder)
            relation = "is" if out == real else "contains"
            raise UnsafeOperationError(
                f"output folder {str(output_dir)!r} {relation} {what}, whose files dagfusion reads "
                "(settings, cache); write runs into a folder of their own, e.g. outputs/NAME"
            )


def _container(real_path: Path, folders: tuple[Path, ...]) -> Path | None:
    """The first of ``folders`` that is ``real_path`` or holds it (compared by real path), or ``None``."""
    for folder in folders:
        real = _real(folder)
        if real_path == real or real in real_path.parents:
            return folder
    return None


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path.expanduser()))


class OutputLock:
    """An exclusive, non-blocking lock on an output folder for the length of one run.

    ``with OutputLock(folder):`` creates the folder, then raises :class:`OutputFolderBusy` at
    once if another run (in any process) holds it. The lock is released when the run ends or
    its process dies; the lock file stays (removing it would race with a waiting run).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = PidLock(folder / LOCK_FILE)

    def __enter__(self) -> OutputLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except LockHeld as held:
            raise OutputFolderBusy(
                f"output folder {str(self.folder)!r} is in use by another run"
                f"{f' (process {held.holder})' if held.holder else ''}; wait for it or choose another --out"
            ) from None
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()
