"""Content fingerprints of values, files and folders, for cache keys.

- Plain data (None, bool, int, float, str, lists, mappings) by canonical form.
- Tensors and arrays by dtype, shape and content bytes.
- Modules by class and every parameter and buffer's content.
- Files by size and a content hash; folders by their files' relative paths and digests,
  following symbolic links (a link back into the folder being walked is recorded, not
  entered). Hashes are memoised per process by (real path, size, mtime, ctime), so an edited
  file is noticed and an unchanged one is hashed once.
- Special files (FIFOs, sockets, devices) are never opened: inside a folder they count by
  kind; named directly they raise :class:`SpecialFileError`.
- Objects may define ``__dagfusion_fingerprint__() -> str``; anything else cannot be
  fingerprinted (:func:`fingerprint` returns ``None``) and makes its node uncacheable.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dagfusion.errors import UnsafeOperationError

_FILE_MEMO: dict[tuple[str, int, int, int], str] = {}
_CHUNK = 1 << 20


class SpecialFileError(UnsafeOperationError):
    """A path names a FIFO, socket or device, which dagfusion refuses to open."""


def new_hasher() -> Any:
    return hashlib.blake2b(digest_size=16)


def fingerprint(value: Any) -> str | None:
    """A hex digest of ``value``'s content, or ``None`` if it cannot be fingerprinted."""
    h = new_hasher()
    if not _feed(h, value, 0):
        return None
    return h.hexdigest()


def _feed(h: Any, value: Any, depth: int) -> bool:
    if depth > 64:
        return False
    if value is None:
        h.update(b"N")
    elif value is True or value is False:
        h.update(b"T" if value else b"F")
    elif isinstance(value, int):
        h.update(b"i" + str(value).encode() + b";")
    elif isinstance(value, float):
        h.update(b"f" + struct.pack("<d", value))
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"s" + str(len(data)).encode() + b":" + data)
    elif isinstance(value, bytes):
        h.update(b"b" + str(len(value)).encode() + b":" + value)
    elif isinstance(value, (list, tuple)):
        h.update(b"[" + str(len(value)).encode() + b":")
        for item in value:
            if not _feed(h, item, depth + 1):
                return False
        h.update(b"]")
    elif isinstance(value, dict):
        h.update(b"{" + str(len(value)).encode() + b":")
        try:
            items = sorted(value.items(), key=lambda kv: repr(kv[0]))
        except Exception:
            return False
        for key, item in items:
            if not _feed(h, key, depth + 1) or not _feed(h, item, depth + 1):
                return False
        h.update(b"}")
    elif hasattr(value, "__dagfusion_fingerprint__"):
        h.update(b"o" + str(value.__dagfusion_fingerprint__()).encode())
    elif _is_tensor(value):
        _feed_tensor(h, value)
    elif _is_module(value):
        h.update(b"m" + type(value).__qualname__.encode())
        for name, tensor in value.state_dict(keep_vars=False).items():
            h.update(name.encode())
            _feed_tensor(h, tensor)
    elif type(value).__module__ == "numpy" and hasattr(value, "tobytes"):
        h.update(b"a" + str(value.dtype).encode() + str(value.shape).encode())
        h.update(value.tobytes())
    else:
        return False
    return True


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _is_module(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


def _feed_tensor(h: Any, tensor: Any) -> None:
    import torch

    t = tensor.detach()
    h.update(b"t" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
    if t.is_sparse or t.numel() == 0:
        h.update(repr(t.tolist()).encode() if t.numel() else b"")
        return
    flat = t.reshape(-1).contiguous().cpu()
    h.update(flat.view(torch.uint8).numpy().tobytes())


def fingerprint_path(path: str | os.PathLike[str]) -> str:
    """Fingerprint of a file or folder by content; a missing path fingerprints as missing.

    Symbolic links are followed: a linked file counts by the content behind it and a linked
    folder is walked like a real one, except that a link back to a folder being walked (a
    loop) is recorded, not entered. Special files (FIFOs, sockets, devices) are never opened:
    inside a folder they count by kind and name; as ``path`` itself they are refused.

    :raises SpecialFileError: ``path`` is a FIFO, socket or device.
    :raises OSError: a regular file in it cannot be read.
    """
    p = Path(path)
    h = new_hasher()
    try:
        st = p.stat()
    except OSError:
        h.update(b"missing:" + str(p).encode())
        return h.hexdigest()
    if stat.S_ISDIR(st.st_mode):
        h.update(b"dir")
        for relative, token in _folder_entries(str(p)):
            h.update(relative.encode("utf-8", "surrogateescape") + b"\0")
            h.update(token.encode())
        return h.hexdigest()
    kind = _special_kind(st.st_mode)
    if kind is not None:
        raise SpecialFileError(
            f"{p} is a {kind}, not a file or folder; dagfusion does not read special files "
            "(reading one can block forever)"
        )
    h.update(b"file" + _file_digest(p, st).encode())
    return h.hexdigest()


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "fifo", "FIFO (named pipe)"),
    (stat.S_ISSOCK, "socket", "socket"),
    (stat.S_ISCHR, "char-device", "character device"),
    (stat.S_ISBLK, "block-device", "block device"),
)


def _special_kind(mode: int) -> str | None:
    """A readable name of the kind of a special file's ``st_mode``; ``None`` for files and folders."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((label for test, _, label in _SPECIAL_KINDS if test(mode)), "special file")


def _special_tag(mode: int) -> str:
    """The token a special file inside a folder contributes (``special:fifo``, ...)."""
    return "special:" + next((tag for test, tag, _ in _SPECIAL_KINDS if test(mode)), "other")


def _folder_entries(folder: str) -> Iterator[tuple[str, str]]:
    """``(relative path, token)`` of everything under ``folder``, depth first, names sorted.

    The token of a regular file is its content digest; other entries get a fixed word:
    ``loop`` (a link to a folder being walked), ``special:<kind>``, ``broken-link``,
    ``missing`` or ``unreadable``. Folders themselves yield nothing (an unlistable one yields
    its own ``unreadable``), so plain trees fingerprint as they always have.
    """
    stack: list[tuple[str, str, frozenset[str], Iterator[str]]] = []
    _descend(stack, folder, "", frozenset())
    if not stack:
        yield "", "unreadable"
    while stack:
        current, prefix, ancestors, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        full, relative = os.path.join(current, name), os.path.join(prefix, name) if prefix else name
        try:
            st = os.stat(full)
        except OSError as exc:
            yield relative, "broken-link" if os.path.islink(full) else _unreadable(exc)
            continue
        if stat.S_ISREG(st.st_mode):
            yield relative, _file_digest(Path(full), st)
        elif not stat.S_ISDIR(st.st_mode):
            yield relative, _special_tag(st.st_mode)
        elif os.path.realpath(full) in ancestors:
            yield relative, "loop"
        elif not _descend(stack, full, relative, ancestors):
            yield relative, "unreadable"


def _descend(stack: list[tuple[str, str, frozenset[str], Iterator[str]]], folder: str, relative: str,
             ancestors: frozenset[str]) -> bool:
    """Push ``folder``'s sorted entries onto the walk ``stack``; ``False`` if it cannot be listed."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return False
    stack.append((folder, relative, ancestors | {os.path.realpath(folder)}, iter(names)))
    return True


def _unreadable(exc: OSError) -> str:
    """The token of an entry that cannot be examined."""
    return "missing" if isinstance(exc, FileNotFoundError) else "unreadable"


def _file_digest(path: Path, st: os.stat_result | None = None) -> str:
    """Digest of a regular file's size and bytes, memoised by real path, size and times."""
    st = st or path.stat()
    cached = _FILE_MEMO.get(_memo_key(path, st))
    if cached is not None:
        return cached
    digest, opened = _read_digest(path)
    _FILE_MEMO[_memo_key(path, opened)] = digest
    return digest


def _read_digest(path: Path) -> tuple[str, os.stat_result]:
    """Hash a regular file's size and bytes; return the digest and the stat of what was read.

    The file is opened without blocking and checked to be regular before a byte is read, so a
    path swapped for a FIFO after it was examined raises :class:`SpecialFileError` instead of
    hanging.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        opened = os.fstat(fd)
        _require_regular(path, opened)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    h = new_hasher()
    h.update(str(opened.st_size).encode() + b":")
    with fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest(), opened


def _require_regular(path: Path, st: os.stat_result) -> None:
    """Raise :class:`SpecialFileError` unless ``st`` (of the opened ``path``) is a regular file."""
    if not stat.S_ISREG(st.st_mode):
        kind = "folder" if stat.S_ISDIR(st.st_mode) else _special_kind(st.st_mode)
        raise SpecialFileError(f"{path} became a {kind} while it was being fingerprinted")


def _memo_key(path: Path, st: os.stat_result) -> tuple[str, int, int, int]:
    """Memo key of a file's content: real path (links resolved), size, mtime and ctime (ns)."""
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
