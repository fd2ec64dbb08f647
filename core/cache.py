"""Output caches: an in-memory LRU with a byte budget, and an on-disk store for ``persist`` nodes.

Entries are whole node outputs (``{output name: value}``) keyed by the node's cache key. The
memory cache keeps references, never copies: nodes must not mutate their inputs (declare
``mutates=True`` on an input to receive a private copy).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagfusion.types import TypeSystem

_MISSING = object()


def estimate_nbytes(value: Any, _depth: int = 0) -> int:
    """A cheap estimate of the memory a value holds (tensors, modules, arrays, containers)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, torch.nn.Module):
            return sum(t.numel() * t.element_size() for t in (*value.parameters(), *value.buffers()))
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if _depth < 4:
        if isinstance(value, (list, tuple)):
            return 64 + sum(estimate_nbytes(v, _depth + 1) for v in value)
        if isinstance(value, dict):
            return 64 + sum(estimate_nbytes(v, _depth + 1) for v in value.values())
    size = getattr(value, "size", None)
    if isinstance(size, tuple) and len(size) == 2 and hasattr(value, "mode"):  # PIL image
        return size[0] * size[1] * 4
    return sys.getsizeof(value)


class OutputCache:
    """In-memory LRU of node outputs, bounded by ``budget_bytes`` (estimated)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, tuple[Mapping[str, Any], int]] = OrderedDict()
        self._used = 0
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def used_bytes(self) -> int:
        return self._used

    def get(self, key: str) -> Mapping[str, Any] | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: str, outputs: Mapping[str, Any]) -> bool:
        """Store ``outputs``; return ``False`` if they alone exceed the budget (not stored)."""
        size = sum(estimate_nbytes(v) for v in outputs.values()) + 64
        if size > self.budget_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self._used -= old[1]
        self._entries[key] = (outputs, size)
        self._used += size
        while self._used > self.budget_bytes and self._entries:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._used -= evicted
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._used = 0


class DiskCache:
    """Outputs of pure ``persist`` nodes on disk, one folder per key, written atomically.

    Every output is saved with its socket type's serializer (safetensors or JSON, never
    pickle); outputs whose type has none make the entry unstorable.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _dir(self, key: str) -> Path:
        return self.root / "outputs" / key[:2] / key

    def can_store(self, types: TypeSystem, output_types: Mapping[str, str]) -> bool:
        return all(t in types and types.get(t).serializer is not None for t in output_types.values())

    def get(self, key: str, types: TypeSystem) -> dict[str, Any] | None:
        folder = self._dir(key)
        index = folder / "index.json"
        if not index.is_file():
            return None
        try:
            entries = json.loads(index.read_text())
            out = {}
            for name, meta in entries.items():
                serializer = types.get(meta["type"]).serializer
                if serializer is None:
                    return None
                out[name] = serializer.load(str(folder / meta["file"]))
            return out
        except Exception:  # a damaged entry is a miss, never a failure
            return None

    def put(self, key: str, outputs: Mapping[str, Any], output_types: Mapping[str, str], types: TypeSystem) -> None:
        folder = self._dir(key)
        if folder.exists():
            return
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        try:
            index = {}
            for i, (name, value) in enumerate(outputs.items()):
                type_name = output_types[name]
                serializer = types.get(type_name).serializer
                assert serializer is not None
                filename = f"{i}-{name}"
                serializer.save(value, str(tmp / filename))
                index[name] = {"type": type_name, "file": filename}
            (tmp / "index.json").write_text(json.dumps(index))
            tmp.rename(folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
