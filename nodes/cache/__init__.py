"""The cache-scheduler pack: skip redundant denoiser computation by reusing features of earlier steps.

Every node takes a ``MODEL`` handle and returns a new handle carrying its patch (shared weights,
patches applied only while sampling; per-run state created fresh by ``begin`` at the start of
every sampling run, so cached workflows never see stale cache state).

Registering this pack imports neither torch nor diffusers: each node imports them when it runs.
"""

from __future__ import annotations

from typing import Any

from dagfusion import hookimpl
from dagfusion.nodes.cache import blockcache, cachequant_nodes, deepcache, diffusers_caches, lazydit

NODES = (*deepcache.NODES, *blockcache.NODES, *cachequant_nodes.NODES, *diffusers_caches.NODES, *lazydit.NODES)
"""Every node of the pack, in palette order."""


@hookimpl
def register_types(register: Any) -> None:
    for socket_type in cachequant_nodes.TYPES:
        register(socket_type)


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)
