"""An exclusive, non-blocking lock held by one process, naming its holder.

:class:`PidLock` locks a file with ``flock`` (released when the holder closes it or dies, even
killed) and writes the holder's process id into it, so a refused process can say who holds it.
Where ``fcntl`` does not exist the lock only records the holder.
"""

from __future__ import annotations

import os
from pathlib import Path

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is its process id as it wrote it ("" if unknown)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by process {holder or '?'}")
        self.path = path
        self.holder = holder


class PidLock:
    """``acquire()`` takes the lock on ``path`` (created with ``mode``) or raises :class:`LockHeld`;
    ``release()`` gives it back. The file stays: removing it would race with a waiting process."""

    def __init__(self, path: Path, mode: int = 0o644) -> None:
        self.path = path
        self.mode = mode
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, self.mode)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                raise LockHeld(self.path, holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
