"""Which diffusers cache works on which denoiser, and the names its hooks register under."""

from __future__ import annotations

from typing import Any

from dagfusion.model import unwrap_compiled

METHODS = ("first_block_cache", "pyramid_attention_broadcast", "faster_cache", "taylorseer", "mag_cache")
"""The diffusers caches the node offers (each works on at least one of UNet, DiT, PixArt)."""

TAYLORSEER_MODULES = r"(?:.*\.)?(?:single_|temporal_)?transformer_blocks\.\d+\.(?:attn\d*|ff)"
"""Modules TaylorSeer predicts (``re.fullmatch`` on module names): attention and feed-forward of each transformer block."""

DEFAULT_TIMESTEP_RANGES = {"pyramid_attention_broadcast": (100.0, 800.0), "faster_cache": (-1.0, 681.0)}
FASTER_UNCOND_RANGE = (-1.0, 641.0)  # diffusers' default unconditional_batch_timestep_skip_range


def hook_names(method: str) -> tuple[str, ...]:
    """The names diffusers registers the method's hooks under (what ``disable_cache`` removes)."""
    if method == "first_block_cache":
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        return (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK)
    if method == "pyramid_attention_broadcast":
        from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

        return (_PYRAMID_ATTENTION_BROADCAST_HOOK,)
    if method == "faster_cache":
        from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK

        return (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK)
    if method == "taylorseer":
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        return (_TAYLORSEER_CACHE_HOOK,)
    if method == "mag_cache":
        from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK

        return (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK)
    raise ValueError(f"unknown diffusers cache method {method!r}; expected one of {list(METHODS)}")


def all_hook_names() -> frozenset[str]:
    return frozenset(name for method in METHODS for name in hook_names(method))


# --- which method works on which denoiser -----------------------------------------------------


def _top_level_blocks(inner: Any) -> list[Any]:
    """The blocks First Block Cache and MagCache hook: top-level ``ModuleList``s named like block lists."""
    import torch
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    return [
        block
        for name, child in inner.named_children()
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList)
        for block in child
    ]


def _block_problem(inner: Any, minimum: int) -> str | None:
    from diffusers.hooks._helpers import TransformerBlockRegistry

    blocks = _top_level_blocks(inner)
    if len(blocks) < minimum:
        return (
            "it hooks a top-level list of transformer blocks (transformer_blocks, blocks, …), "
            f"of which this model has {len(blocks)} (needs at least {minimum})"
        )
    unknown = set()
    for block in blocks:
        try:
            TransformerBlockRegistry.get(type(block))
        except ValueError:
            unknown.add(type(block).__name__)
    if unknown:
        return f"diffusers does not know the block class(es) {sorted(unknown)} (TransformerBlockRegistry)"
    return None


def _attention_names(inner: Any, patterns: tuple[str, ...], *, cross: bool | None = None) -> list[str]:
    import re

    from diffusers.hooks._common import _ATTENTION_CLASSES

    names = []
    for name, sub in inner.named_modules():
        if not isinstance(sub, _ATTENTION_CLASSES):
            continue
        if cross is not None and bool(getattr(sub, "is_cross_attention", False)) != cross:
            continue
        if any(re.search(p, name) for p in patterns):
            names.append(name)
    return names


def _pixart_micro_conditions(inner: Any) -> bool:
    micro = getattr(inner, "use_additional_conditions", None)
    if micro is None:
        micro = getattr(getattr(inner, "config", None), "sample_size", None) == 128
    return bool(micro)


def unsupported_reasons(module: Any) -> dict[str, str]:
    """``{method: why it cannot work on module}`` for each method of :data:`METHODS` that cannot."""
    import re

    from diffusers.hooks._common import _CROSS_TRANSFORMER_BLOCK_IDENTIFIERS, _SPATIAL_TRANSFORMER_BLOCK_IDENTIFIERS

    from dagfusion.model import family_for

    inner = unwrap_compiled(module)
    reasons: dict[str, str] = {}
    problem = _block_problem(inner, 2)
    if problem:
        reasons["first_block_cache"] = problem
    problem = _block_problem(inner, 1)
    if problem:
        reasons["mag_cache"] = problem
    if not _attention_names(inner, (*_SPATIAL_TRANSFORMER_BLOCK_IDENTIFIERS, *_CROSS_TRANSFORMER_BLOCK_IDENTIFIERS)):
        reasons["pyramid_attention_broadcast"] = "it has no diffusers Attention module inside transformer blocks"
    if not any(re.fullmatch(TAYLORSEER_MODULES, name) for name, _ in inner.named_modules()):
        reasons["taylorseer"] = "it has no attention or feed-forward module inside transformer blocks"
    try:
        family = family_for(inner).name
    except TypeError:
        family = None
    if family != "pixart":
        why = {
            "unet": "the UNet takes a scalar timestep, which FasterCache cannot split into the guidance halves",
            "dit": "DiT puts the conditional half first and passes class_labels, which FasterCache does not split",
        }.get(family or "", "FasterCache's guidance-batch split only fits PixArt-style transformers among "
                              "dagfusion's model families")
        reasons["faster_cache"] = why
    elif _pixart_micro_conditions(inner):
        reasons["faster_cache"] = (
            "this PixArt model takes resolution micro-conditions (added_cond_kwargs), which FasterCache does "
            "not split into the guidance halves"
        )
    elif not _attention_names(inner, ("^transformer_blocks.*attn",), cross=False):
        reasons["faster_cache"] = "it has no self-attention under transformer_blocks"
    return reasons


def supported_methods(module: Any) -> tuple[str, ...]:
    """The methods of :data:`METHODS` that work on ``module``, in that order."""
    reasons = unsupported_reasons(module)
    return tuple(m for m in METHODS if m not in reasons)


def check_supported(module: Any, method: str) -> None:
    """:raises ValueError: naming the method, the model class and the methods it supports."""
    if method not in METHODS:
        raise ValueError(f"unknown diffusers cache method {method!r}; expected one of {list(METHODS)}")
    reasons = unsupported_reasons(module)
    if method in reasons:
        cls = type(unwrap_compiled(module)).__name__
        supported = [m for m in METHODS if m not in reasons]
        raise ValueError(
            f"diffusers' {method} does not work on a {cls}: {reasons[method]}. "
            f"Methods that work on {cls}: {', '.join(supported) if supported else 'none'}"
        )

