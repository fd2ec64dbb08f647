"""The job server's state folder: its lock, its access token file and its address file.

Light on purpose (no web framework): the client and the CLI read the token and address here.
The folder is created readable by the user only; the token file is written ``0600`` and,
when one already exists with those permissions and owner, reused, so clients keep working
across a restart (``--new-token`` makes a fresh one).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import Any

from dagfusion.errors import WorkflowError
from dagfusion.pidlock import LockHeld, PidLock

TOKEN_FILE = "token"
ADDRESS_FILE = "server.json"
LOCK_FILE = "server.lock"
DATABASE_FILE = "jobs.sqlite3"


class ServerBusy(WorkflowError):
    """Another job server already uses this state folder."""


def prepare_folder(folder: Path) -> Path:
    """Create the state folder (``0700``) if needed; return it resolved."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder.resolve()


def _private(path: Path) -> bool:
    try:
        info = path.lstat()
    except OSError:
        return False
    owner_ok = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    return stat.S_ISREG(info.st_mode) and owner_ok and stat.S_IMODE(info.st_mode) & 0o077 == 0


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable and writable by the user only (``0600``)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create_token(folder: Path, *, fresh: bool = False) -> str:
    """The server's token: the existing private token file's, else a new one written there."""
    from dagfusion.httpguard import new_token

    path = folder / TOKEN_FILE
    if not fresh and _private(path):
        token = path.read_text(encoding="utf-8").strip()
        if len(token) >= 32:
            return token
    token = new_token()
    write_private(path, token + "\n")
    return token


def read_token(folder: Path) -> str | None:
    """The token in ``folder`` if its file is private to this user, else ``None``."""
    path = folder / TOKEN_FILE
    if not _private(path):
        return None
    return path.read_text(encoding="utf-8").strip() or None


def write_address(folder: Path, url: str) -> None:
    write_private(folder / ADDRESS_FILE, json.dumps({"url": url, "pid": os.getpid()}) + "\n")


def read_address(folder: Path) -> str | None:
    """The address of the server last started on ``folder`` (``None`` if it is not running)."""
    try:
        data: Any = json.loads((folder / ADDRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    url = data.get("url") if isinstance(data, dict) else None
    return url if isinstance(url, str) else None


class FolderLock:
    """Holds the state folder for one server process (released when it exits, even killed)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = PidLock(folder / LOCK_FILE, 0o600)

    def __enter__(self) -> FolderLock:
        try:
            self._lock.acquire()
        except LockHeld as held:
            raise ServerBusy(
                f"another queue service — a job server or a canvas — (process {held.holder or '?'}) uses the state folder {self.folder}"
            ) from None
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._lock.release()


__all__ = [
    "ADDRESS_FILE", "DATABASE_FILE", "FolderLock", "LOCK_FILE", "ServerBusy", "TOKEN_FILE", "load_or_create_token",
    "prepare_folder", "read_address", "read_token", "write_address", "write_private",
]
