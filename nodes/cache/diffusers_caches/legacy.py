"""``dagfusion.cache.DiffusersCache``: the former all-in-one diffusers-cache node, kept so that
workflow files written for it still load and give the same result.

It takes every method's inputs and a ``method`` choice, and delegates to that method's node
(:data:`~dagfusion.nodes.cache.diffusers_caches.nodes.METHOD_NODES`) with the inputs the method
uses: the patch, and so the sampled result, is exactly the method node's. New workflows use the
method nodes (``dagfusion.cache.FirstBlockCache``, ``PyramidAttentionBroadcast``, ``FasterCache``,
``TaylorSeer``, ``MagCache``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from dagfusion import STRING, Input, Problem, RunContext, node
from dagfusion.nodes.cache.diffusers_caches.inputs import (
    BEFORE,
    CACHE_INTERVAL,
    CROSS,
    MAG_RATIOS,
    MAG_THRESHOLD,
    MAX_ORDER,
    MAX_SKIP,
    MODEL_INPUT,
    RETENTION,
    SPATIAL,
    THRESHOLD,
    TIMESTEP_RANGE,
    UNCOND,
)
from dagfusion.nodes.cache.diffusers_caches.nodes import METHOD_NODES, OUTPUT, UI
from dagfusion.nodes.cache.diffusers_caches.support import METHODS


def method_inputs(method: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that ``method``'s node takes (``model`` included when present)."""
    names = {spec.name for spec in METHOD_NODES[method].inputs}
    return {name: value for name, value in values.items() if name in names}


def _check(values: Mapping[str, Any]) -> Iterator[Problem]:
    method = values.get("method")
    spec = METHOD_NODES.get(method) if isinstance(method, str) else None
    if spec is not None and spec.check is not None:
        yield from spec.check(method_inputs(method, values))


def _example_pab_unet() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.sd_handles()["model"], "method": "pyramid_attention_broadcast"}


def _example_fbc_pixart() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.pixart_handles()["model"], "method": "first_block_cache", "threshold": 0.1}


@node(
    "dagfusion.cache.DiffusersCache",
    version="1.0.0",
    category="cache/deprecated",
    inputs=[
        MODEL_INPUT,
        Input("method", STRING, "first_block_cache", choices=METHODS,
              description="Which diffusers cache; only that method's inputs are used."),
        THRESHOLD, SPATIAL, CROSS, TIMESTEP_RANGE, UNCOND, CACHE_INTERVAL, MAX_ORDER, BEFORE, MAG_THRESHOLD, MAX_SKIP,
        RETENTION, MAG_RATIOS,
    ],
    outputs=[OUTPUT],
    examples=[_example_pab_unet, _example_fbc_pixart],
    ui=UI,
    check=_check,
)
def diffusers_cache(ctx: RunContext, model: Any, method: str, **inputs: Any) -> Any:
    """Deprecated: use the node of the method (dagfusion.cache.FirstBlockCache, PyramidAttentionBroadcast, FasterCache, TaylorSeer, MagCache).

    Applies the chosen method exactly as its node does; the inputs of the other methods are ignored.
    """
    return METHOD_NODES[method].fn(ctx, **method_inputs(method, {"model": model, **inputs}))


NODES = (diffusers_cache,)
"""The nodes of this module."""
