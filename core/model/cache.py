"""One process-wide cache of loaded weights, shared by every node, engine and run.

Entries are keyed by what was loaded (source kind, resolved path, content fingerprint, dtype,
placement) and hold a dict of components (``{"unet": module}`` for one component of a diffusers
folder, every component for a single-file checkpoint). Handles never hold the modules
themselves: they hold a :class:`~dagfusion.model.ComponentRef` (a key plus
how to load it), so evicting an entry really frees its memory, and a handle whose entry was
evicted reloads on next use.

The budget is a byte count over the parameters and buffers of the cached modules
(``DAGFUSION_MODEL_CACHE_BYTES``, default 16 GiB). The entry being loaded always stays,
however large; least recently used entries are evicted beyond the budget.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BUDGET_BYTES = 16 * 1024**3

Loader = Callable[[], dict[str, Any]]
"""Loads one cache entry: returns ``{component name: object}``."""


def nbytes_of(value: Any) -> int:
    """Bytes held by a module's parameters and buffers (0 for tokenizers and other objects)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.nn.Module):
        return 0
    seen: set[int] = set()
    total = 0
    for tensor in (*value.parameters(), *value.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class CacheStats:
    """Counters of a :class:`ModelCache` (for tests and diagnostics)."""

    loads: int = 0
    hits: int = 0
    evictions: int = 0
    loaded_keys: list[Hashable] = field(default_factory=list)


class ModelCache:
    """An LRU of loaded components with a byte budget (thread-safe)."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        if budget_bytes is None:
            budget_bytes = _budget_from_environment()
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Hashable, tuple[dict[str, Any], int]] = OrderedDict()
        self._lock = threading.RLock()
        self.stats = CacheStats()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:  # an empty cache is still a cache
        return True

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._entries.values())

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    def get(self, key: Hashable, name: str, loader: Loader) -> Any:
        """Component ``name`` of entry ``key``, loading the entry with ``loader`` if absent.

        :raises KeyError: the loaded entry has no component ``name``.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                components = entry[0]
            else:
                components = dict(loader())
                size = sum(nbytes_of(v) for v in components.values())
                self._entries[key] = (components, size)
                self.stats.loads += 1
                self.stats.loaded_keys.append(key)
                self._enforce_budget(keep=key)
            if name not in components:
                raise KeyError(f"cache entry {key!r} has no component {name!r} (it has {sorted(components)})")
            return components[name]

    def set_budget(self, budget_bytes: int) -> None:
        """Change the budget, evicting least recently used entries beyond it."""
        with self._lock:
            self.budget_bytes = budget_bytes
            self._enforce_budget(keep=None)

    def evict(self, key: Hashable) -> bool:
        """Drop one entry and free its memory; ``False`` if it was not cached."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self.stats.evictions += 1
        del entry
        _free_memory()
        return True

    def clear(self) -> None:
        """Drop every entry and free the memory."""
        with self._lock:
            self.stats.evictions += len(self._entries)
            self._entries.clear()
        _free_memory()

    def _enforce_budget(self, keep: Hashable | None) -> None:
        if self.budget_bytes <= 0:
            return
        evicted = False
        while self._entries and sum(s for _, s in self._entries.values()) > self.budget_bytes:
            victim = next((k for k in self._entries if k != keep), None)
            if victim is None:
                break
            self._entries.pop(victim)
            self.stats.evictions += 1
            evicted = True
        if evicted:
            _free_memory()


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _budget_from_environment() -> int:
    raw = os.environ.get("DAGFUSION_MODEL_CACHE_BYTES")
    if not raw:
        return DEFAULT_BUDGET_BYTES
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"DAGFUSION_MODEL_CACHE_BYTES must be an integer byte count, got {raw!r}") from exc
    if value < 0:
        raise ValueError(f"DAGFUSION_MODEL_CACHE_BYTES must not be negative, got {value}")
    return value


_default: ModelCache | None = None
_default_lock = threading.Lock()


def default_cache() -> ModelCache:
    """The process-wide model cache (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ModelCache()
        return _default
