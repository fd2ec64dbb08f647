"""Content fingerprints of values, files and folders, for cache keys.

- Plain data (None, bool, int, float, str, lists, mappings) by canonical form.
- Tensors and arrays by dtype, shape and content bytes.
- Modules by class and every parameter and buffer's content.
- Files by size, modification time and a content hash; folders by their files' relative
  paths and fingerprints. Hashes are memoised per process by (path, size, mtime), so an edited
  file is noticed and an unchanged one is hashed once.
- Objects may define ``__dagfusion_fingerprint__() -> str``; anything else cannot be
  fingerprinted (:func:`fingerprint` returns ``None``) and makes its node uncacheable.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
from pathlib import Path
from typing import Any

_FILE_MEMO: dict[tuple[str, int, int], str] = {}
_CHUNK = 1 << 20


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
    """Fingerprint of a file or folder by content; a missing path fingerprints as missing."""
    p = Path(path)
    h = new_hasher()
    try:
        st = p.stat()
    except OSError:
        h.update(b"missing:" + str(p).encode())
        return h.hexdigest()
    if p.is_dir():
        h.update(b"dir")
        for child in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(str(child.relative_to(p)).encode() + b"\0")
            h.update(_file_digest(child).encode())
    else:
        h.update(b"file" + _file_digest(p, st).encode())
    return h.hexdigest()


def _file_digest(path: Path, st: os.stat_result | None = None) -> str:
    st = st or path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    cached = _FILE_MEMO.get(memo_key)
    if cached is not None:
        return cached
    h = new_hasher()
    h.update(str(st.st_size).encode() + b":")
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _FILE_MEMO[memo_key] = digest
    return digest
