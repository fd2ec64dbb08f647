"""Output caches: an in-memory LRU with a byte budget (:class:`OutputCache`), and the on-disk
store for ``persist`` nodes (:class:`~dagfusion.diskcache.DiskCache`, re-exported here).

Entries are whole node outputs (``{output name: value}``) keyed by the node's cache key. The
memory cache keeps references, never copies: nodes must not mutate their inputs (declare
``mutates=True`` on an input to receive a private copy).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from dagfusion.diskcache import CacheDamage, CacheEntryError, DiskCache  # re-exported: the disk store's home


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


__all__ = ["CacheDamage", "CacheEntryError", "DiskCache", "OutputCache", "estimate_nbytes"]
