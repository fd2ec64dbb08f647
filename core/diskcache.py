"""The on-disk store of ``persist`` nodes' outputs, verified on every read.

Each entry's ``index.json`` records every file's size and checksum; a damaged entry is
reported, deleted and treated as a miss, and entries are published whole (written to a
temporary folder, then renamed into place under a lock), so readers never see half an entry.
Disk trouble never fails a run: it becomes a miss or a reported failed write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagfusion.errors import WorkflowError
from dagfusion.types import TypeSystem

try:
    import fcntl as _fcntl
except ImportError:  # not POSIX
    _fcntl = None  # type: ignore[assignment]
try:
    import msvcrt as _msvcrt
except ImportError:  # not Windows
    _msvcrt = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class CacheDamage:
    """A persisted entry that failed verification when read.

    ``reason`` says what was wrong; ``removed`` whether the entry could be deleted (the caller
    recomputes the outputs either way, and the next :meth:`DiskCache.put` replaces the entry).
    """

    key: str
    path: Path
    reason: str
    removed: bool = True

    @property
    def message(self) -> str:
        action = "deleted it" if self.removed else "could not delete it"
        return f"cached outputs in {self.path} were damaged ({self.reason}); {action} and will recompute"

    def __str__(self) -> str:
        return self.message


class CacheEntryError(WorkflowError):
    """A persisted cache entry is damaged (raised and handled inside :class:`DiskCache`)."""


class _Unusable(WorkflowError):
    """An intact entry this reader cannot use (another layout, unknown socket type): a plain miss."""


#: What identifies one published entry: the folder's (device, inode) and its index bytes.
_Identity = tuple[int, int, bytes | None]

_INDEX = "index.json"
_FORMAT = 2
_HASHERS: dict[str, Callable[[], Any]] = {
    "blake2b": lambda: hashlib.blake2b(digest_size=32),
    "sha256": hashlib.sha256,
}
_WRITE_HASH = "blake2b"
_CHUNK = 1 << 20
_CACHE_DIR_HINT = "(setting cache_dir or DAGFUSION_CACHE_DIR)"
_THREAD_LOCK = threading.Lock()


class DiskCache:
    """Outputs of pure ``persist`` nodes on disk, one verified folder per key.

    Every output is saved with its socket type's serializer (safetensors or JSON, never
    pickle); outputs whose type has none make the entry unstorable. Layout:
    ``<root>/outputs/<key[:2]>/<key>/`` holds one file per output and ``index.json``
    (``{"format": 2, "id": ..., "outputs": {name: {"type", "file", "size", "hash"}}}``, the
    hash written as ``"blake2b:<hex>"``; ``sha256`` is also accepted).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def _outputs(self) -> Path:
        return self.root / "outputs"

    def _dir(self, key: str) -> Path:
        return self._outputs / key[:2] / key

    def can_store(self, types: TypeSystem, output_types: Mapping[str, str]) -> bool:
        return all(t in types and types.get(t).serializer is not None for t in output_types.values())

    # --- checking the root ----------------------------------------------------------------

    def problem(self) -> str | None:
        """Why the cache folder cannot be used, or ``None`` if it can.

        Creates the folder (and its parents) if missing; changes nothing else. A problem is a
        sentence naming the folder and the setting that chose it.
        """
        for path in (self.root, self._outputs):
            if path.exists() and not path.is_dir():
                return f"cache_dir {self.root}: {path} is a file, not a folder {_CACHE_DIR_HINT}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cache_dir {self.root} cannot be created: {_creation_problem(self.root, exc)} {_CACHE_DIR_HINT}"
        if not os.access(self.root, os.W_OK | os.X_OK):
            return f"cache_dir {self.root} is not writable {_CACHE_DIR_HINT}"
        return None

    # --- reading ---------------------------------------------------------------------

    def get(
        self, key: str, types: TypeSystem, on_damage: Callable[[CacheDamage], None] | None = None
    ) -> dict[str, Any] | None:
        """The verified outputs stored under ``key``, or ``None`` (a miss).

        Never raises for disk trouble. A damaged entry (file missing, truncated or altered,
        index unreadable, content that does not load) is deleted, reported to ``on_damage``
        and returned as a miss. An entry replaced by another writer while it was read is a
        miss, not damage.
        """
        folder = self._dir(key)
        seen = _identity(folder)
        if seen is None:
            return None
        try:
            outputs = _load_entry(folder, seen[2], types)
        except _Unusable:
            return None
        except CacheEntryError as exc:
            self._report_damage(key, folder, seen, str(exc), on_damage)
            return None
        return outputs if _identity(folder) == seen else None

    def _report_damage(
        self, key: str, folder: Path, seen: _Identity, reason: str, on_damage: Callable[[CacheDamage], None] | None
    ) -> None:
        """Delete the damaged entry ``seen`` and tell ``on_damage``, unless it was replaced meanwhile."""
        try:
            with self._lock():
                if _identity(folder) != seen:
                    return  # a writer published a new entry while we read the old one
                aside = _move_aside(folder)
            _remove(aside)
            removed = True
        except OSError:
            removed = False
        if on_damage is not None:
            on_damage(CacheDamage(key, folder, reason, removed))

    # --- writing ---------------------------------------------------------------------

    def put(
        self,
        key: str,
        outputs: Mapping[str, Any],
        output_types: Mapping[str, str],
        types: TypeSystem,
        on_error: Callable[[str], None] | None = None,
    ) -> bool:
        """Store ``outputs`` under ``key``, replacing any entry there; ``True`` if stored.

        The entry is written and synced in a temporary folder, then renamed into place under
        the cache lock, so concurrent writers leave one complete entry. Never raises for a
        failed write (disk full, unusable cache folder, a value its serializer rejects): the
        reason goes to ``on_error`` and ``False`` is returned.
        """
        folder = self._dir(key)
        tmp: Path | None = None
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
            _write_entry(tmp, outputs, output_types, types)
            self._publish(tmp, folder)
        except Exception as exc:
            if tmp is not None:
                _remove(tmp)
            if on_error is not None:
                on_error(f"could not store cached outputs in {folder}: {type(exc).__name__}: {exc}")
            return False
        except BaseException:
            if tmp is not None:
                _remove(tmp)
            raise
        return True

    def _publish(self, tmp: Path, folder: Path) -> None:
        """Rename the finished entry ``tmp`` to ``folder``, moving any old entry out of the way."""
        with self._lock():
            old = _move_aside(folder) if os.path.lexists(folder) else None
            os.rename(tmp, folder)
            _fsync_dir(folder.parent)
        if old is not None:
            _remove(old)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Hold the cache lock: ``fcntl.flock`` (or ``msvcrt.locking``) on ``outputs/.lock``.

        Without either, only threads of this process are excluded; the renames stay atomic.
        """
        with _THREAD_LOCK:
            fd = os.open(self._outputs / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _lock_file(fd)
                try:
                    yield
                finally:
                    _unlock_file(fd)
            finally:
                os.close(fd)


# --- entry files ------------------------------------------------------------------------


def _write_entry(folder: Path, outputs: Mapping[str, Any], output_types: Mapping[str, str], types: TypeSystem) -> None:
    """Save every output and a checksummed ``index.json`` into ``folder``, all synced to disk."""
    files = {}
    for i, (name, value) in enumerate(outputs.items()):
        type_name = output_types[name]
        serializer = types.get(type_name).serializer
        if serializer is None:
            raise TypeError(f"socket type {type_name} has no serializer")
        filename = f"{i}-{name}"
        serializer.save(value, str(folder / filename))
        size, digest = _seal(folder / filename)
        files[name] = {"type": type_name, "file": filename, "size": size, "hash": f"{_WRITE_HASH}:{digest}"}
    index = {"format": _FORMAT, "id": uuid.uuid4().hex, "outputs": files}
    with open(folder / _INDEX, "w", encoding="utf-8") as fh:
        json.dump(index, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(folder)


def _seal(path: Path) -> tuple[int, str]:
    """Sync ``path`` to disk and return its size and checksum (with :data:`_WRITE_HASH`)."""
    with open(path, "r+b") as fh:
        os.fsync(fh.fileno())
    return _checksum(path, _WRITE_HASH)


def _checksum(path: Path, algorithm: str) -> tuple[int, str]:
    """Size and hex digest of ``path``'s bytes."""
    h = _HASHERS[algorithm]()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _load_entry(folder: Path, index_bytes: bytes | None, types: TypeSystem) -> dict[str, Any]:
    """Verify and load the entry in ``folder`` whose ``index.json`` holds ``index_bytes``.

    :raises CacheEntryError: the entry is damaged.
    :raises _Unusable: the entry is intact but not usable here.
    """
    files = _parse_index(index_bytes)
    out = {}
    for name, meta in files.items():
        if meta["type"] not in types or types.get(meta["type"]).serializer is None:
            raise _Unusable(meta["type"])
        path = folder / meta["file"]
        _verify_file(path, meta["size"], meta["hash"])
        try:
            out[name] = types.get(meta["type"]).serializer.load(str(path))
        except Exception as exc:
            raise CacheEntryError(f"{meta['file']} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    return out


def _parse_index(index_bytes: bytes | None) -> dict[str, dict[str, Any]]:
    """The ``outputs`` table of an index, each row checked for shape.

    :raises CacheEntryError: the index is missing, not JSON, or malformed.
    :raises _Unusable: the index has another layout (an older one without checksums, or a
        newer format number).
    """
    if index_bytes is None:
        raise CacheEntryError(f"{_INDEX} is missing or unreadable")
    try:
        index = json.loads(index_bytes)
    except ValueError as exc:
        raise CacheEntryError(f"{_INDEX} is not valid JSON") from exc
    if not isinstance(index, dict):
        raise CacheEntryError(f"{_INDEX} is malformed")
    if "format" not in index and all(isinstance(m, dict) for m in index.values()):
        raise _Unusable("index without checksums")
    if isinstance(index.get("format"), int) and index["format"] > _FORMAT:
        raise _Unusable(f"index format {index['format']}")
    files = index.get("outputs") if index.get("format") == _FORMAT else None
    if not isinstance(files, dict) or not all(_row_ok(row) for row in files.values()):
        raise CacheEntryError(f"{_INDEX} is malformed")
    return files


def _row_ok(row: Any) -> bool:
    """Whether one index row has a type, a plain file name, a size and a known checksum."""
    if not isinstance(row, dict):
        return False
    file, size, digest = row.get("file"), row.get("size"), row.get("hash")
    return (
        isinstance(row.get("type"), str)
        and isinstance(file, str)
        and file not in ("", ".", "..", _INDEX)
        and "/" not in file
        and "\\" not in file
        and isinstance(size, int)
        and isinstance(digest, str)
        and digest.partition(":")[0] in _HASHERS
    )


def _verify_file(path: Path, size: int, digest: str) -> None:
    """Check that ``path`` is a regular file with ``size`` bytes and checksum ``digest``.

    :raises CacheEntryError: it is missing, not a regular file, or differs.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise CacheEntryError(f"{path.name} is not a regular file")
        if st.st_size != size:
            raise CacheEntryError(f"{path.name} has {st.st_size} bytes, expected {size}")
        algorithm, _, expected = digest.partition(":")
        if _checksum(path, algorithm) != (size, expected):
            raise CacheEntryError(f"{path.name} does not match its checksum")
    except OSError as exc:
        raise CacheEntryError(f"{path.name} cannot be read: {exc.strerror or exc}") from exc


# --- folders, identity and locking -------------------------------------------------------


def _identity(folder: Path) -> _Identity | None:
    """What identifies the entry now at ``folder`` (``None`` if nothing is there)."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    try:
        index = (folder / _INDEX).read_bytes()
    except OSError:
        index = None
    return (st.st_dev, st.st_ino, index)


def _move_aside(path: Path) -> Path:
    """Rename ``path`` to a hidden sibling (so it vanishes from its key atomically); return it."""
    aside = path.with_name(f".old-{uuid.uuid4().hex[:12]}")
    os.rename(path, aside)
    return aside


def _remove(path: Path) -> None:
    """Delete a file or folder tree, ignoring errors."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _fsync_dir(folder: Path) -> None:
    """Sync a folder's entries to disk where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _lock_file(fd: int) -> None:
    """Take an exclusive lock on the open lock file ``fd`` (blocking)."""
    if _fcntl is not None:
        _fcntl.flock(fd, _fcntl.LOCK_EX)
    elif _msvcrt is not None:
        _msvcrt.locking(fd, _msvcrt.LK_LOCK, 1)


def _unlock_file(fd: int) -> None:
    """Release the lock taken by :func:`_lock_file`."""
    if _fcntl is not None:
        _fcntl.flock(fd, _fcntl.LOCK_UN)
    elif _msvcrt is not None:
        os.lseek(fd, 0, os.SEEK_SET)
        _msvcrt.locking(fd, _msvcrt.LK_UNLCK, 1)


def _creation_problem(root: Path, exc: OSError) -> str:
    """Why ``root`` could not be created: the ancestor that is a file, else the OS's reason."""
    for parent in root.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            break
    return exc.strerror or str(exc)
