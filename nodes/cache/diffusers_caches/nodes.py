"""The diffusers-cache nodes: one node per method, each with only its method's inputs, and
``MagCacheCalibrate``.

Every method node builds a :class:`~dagfusion.nodes.cache.diffusers_caches.config.CacheSettings`
and returns the model with a :class:`~dagfusion.nodes.cache.diffusers_caches.patch.DiffusersCachePatch`
(the one patch class of every method): the same settings give the same patch key, whichever
node made them — the deprecated ``DiffusersCache`` included.
"""

from __future__ import annotations

from typing import Any

from dagfusion import FLOAT, INT, SEED, STRING, Input, NodeInputError, Output, RunContext, node
from dagfusion.nodes.cache.checks import all_of, enforce
from dagfusion.nodes.cache.diffusers_caches.config import CacheSettings, parse_mag_ratios, parse_timestep_range
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
    check_mag_ratios,
    check_pab_skips,
    check_timestep_range,
)
from dagfusion.nodes.cache.diffusers_caches.patch import DiffusersCachePatch, calibrate_mag_ratios
from dagfusion.nodes.cache.diffusers_caches.support import check_supported
from dagfusion.nodes.diffusion.schedulers import SAMPLER_CHOICES
from dagfusion.nodes.diffusion.types import CONDITIONING, LATENT, MODEL

OUTPUT = Output("model", MODEL, "The model with the diffusers cache applied while sampling.")
UI = {"color": "#26a69a"}


def with_cache(model: Any, settings: CacheSettings) -> Any:
    """``model`` with the diffusers cache of ``settings``.

    :raises NodeInputError: (``model``) the method does not work on this model's denoiser.
    """
    try:
        check_supported(model.denoiser, settings.method)
    except ValueError as exc:
        raise NodeInputError("model", str(exc)) from None
    return model.with_patch(DiffusersCachePatch(settings))


def _tiny(kind: str, **inputs: Any) -> Any:
    def example() -> dict[str, Any]:
        from dagfusion.testing import models as tiny

        handles = tiny.sd_handles() if kind == "sd" else tiny.pixart_handles()
        return {"model": handles["model"], **inputs}

    return example


@node(
    "dagfusion.cache.FirstBlockCache",
    version="1.0.0",
    category="cache",
    inputs=[MODEL_INPUT, THRESHOLD],
    outputs=[OUTPUT],
    examples=[_tiny("pixart", threshold=0.1)],
    ui=UI,
)
def first_block_cache(ctx: RunContext, model: Any, threshold: float) -> Any:
    """diffusers' First Block Cache (DiT, PixArt): skip the remaining blocks while the first block's output barely changes.

    The hooks are diffusers' (diffusers.hooks); they are registered on the denoiser only while a
    sampler runs and removed afterwards, with fresh cache state every run.
    """
    return with_cache(model, CacheSettings("first_block_cache", threshold=threshold))


_PAB_CHECK = all_of(check_pab_skips, check_timestep_range)


@node(
    "dagfusion.cache.PyramidAttentionBroadcast",
    version="1.0.0",
    category="cache",
    inputs=[MODEL_INPUT, SPATIAL, CROSS, TIMESTEP_RANGE],
    outputs=[OUTPUT],
    examples=[_tiny("sd")],
    ui=UI,
    check=_PAB_CHECK,
)
def pyramid_attention_broadcast(
    ctx: RunContext, model: Any, spatial_attention_block_skip_range: int, cross_attention_block_skip_range: int,
    timestep_skip_range: str,
) -> Any:
    """diffusers' Pyramid Attention Broadcast (UNet, DiT, PixArt): reuse attention outputs for a few calls.

    Self- and cross-attention are computed every N-th call inside the timestep range and reused
    in between. The hooks exist only while a sampler runs.
    """
    enforce(_PAB_CHECK, {SPATIAL.name: spatial_attention_block_skip_range,
                         CROSS.name: cross_attention_block_skip_range, TIMESTEP_RANGE.name: timestep_skip_range})
    return with_cache(model, CacheSettings(
        "pyramid_attention_broadcast", spatial_attention_block_skip_range=spatial_attention_block_skip_range,
        cross_attention_block_skip_range=cross_attention_block_skip_range,
        timestep_range=parse_timestep_range(timestep_skip_range),
    ))


@node(
    "dagfusion.cache.FasterCache",
    version="1.0.0",
    category="cache",
    inputs=[MODEL_INPUT, SPATIAL, TIMESTEP_RANGE, UNCOND],
    outputs=[OUTPUT],
    examples=[_tiny("pixart")],
    ui=UI,
    check=check_timestep_range,
)
def faster_cache(
    ctx: RunContext, model: Any, spatial_attention_block_skip_range: int, timestep_skip_range: str,
    unconditional_batch_skip_range: int,
) -> Any:
    """diffusers' FasterCache (PixArt, with guidance): reuse self-attention and approximate the unconditional half.

    Needs classifier-free guidance (guidance_scale > 1); PixArt at 1024 px (resolution
    micro-conditions) is not supported. The hooks exist only while a sampler runs.
    """
    enforce(check_timestep_range, {TIMESTEP_RANGE.name: timestep_skip_range})
    return with_cache(model, CacheSettings(
        "faster_cache", spatial_attention_block_skip_range=spatial_attention_block_skip_range,
        timestep_range=parse_timestep_range(timestep_skip_range),
        unconditional_batch_skip_range=unconditional_batch_skip_range,
    ))


@node(
    "dagfusion.cache.TaylorSeer",
    version="1.0.0",
    category="cache",
    inputs=[MODEL_INPUT, CACHE_INTERVAL, MAX_ORDER, BEFORE],
    outputs=[OUTPUT],
    examples=[_tiny("sd", cache_interval=3)],
    ui=UI,
)
def taylorseer(ctx: RunContext, model: Any, cache_interval: int, max_order: int, disable_cache_before_step: int) -> Any:
    """diffusers' TaylorSeer cache (UNet, DiT, PixArt): predict attention and feed-forward outputs by a Taylor expansion.

    The attention and feed-forward modules of every transformer block are computed every
    cache_interval steps and extrapolated from their finite differences in between.
    """
    return with_cache(model, CacheSettings(
        "taylorseer", cache_interval=cache_interval, max_order=max_order,
        disable_cache_before_step=disable_cache_before_step,
    ))


@node(
    "dagfusion.cache.MagCache",
    version="1.0.0",
    category="cache",
    inputs=[MODEL_INPUT, MAG_THRESHOLD, MAX_SKIP, RETENTION, MAG_RATIOS],
    outputs=[OUTPUT],
    examples=[_tiny("pixart", mag_ratios="1.0, 0.94, 1.01, 1.0, 0.99, 1.01")],
    ui=UI,
    check=check_mag_ratios,
)
def mag_cache(
    ctx: RunContext, model: Any, mag_threshold: float, max_skip_steps: int, retention_ratio: float, mag_ratios: str,
) -> Any:
    """diffusers' MagCache (DiT, PixArt): skip the blocks while the accumulated magnitude error stays small.

    Needs the model's magnitude ratios: measure them with dagfusion.cache.MagCacheCalibrate and
    link its output to mag_ratios.
    """
    enforce(check_mag_ratios, {MAG_RATIOS.name: mag_ratios})
    return with_cache(model, CacheSettings(
        "mag_cache", mag_threshold=mag_threshold, max_skip_steps=max_skip_steps, retention_ratio=retention_ratio,
        mag_ratios=parse_mag_ratios(mag_ratios),
    ))


def _example_calibrate() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {**tiny.pixart_handles(), "steps": 3,
            "guidance_scale": 4.0, "sampler": "euler", "seed": 1}


@node(
    "dagfusion.cache.MagCacheCalibrate",
    version="1.0.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="The DiT or PixArt model to measure (unpatched)."),
        Input("conditioning", CONDITIONING, link_only=True, description="A typical prompt or class conditioning."),
        Input("latent", LATENT, link_only=True, description="A latent of the size you will sample (only its shape counts)."),
        Input("sampler", STRING, "default", choices=SAMPLER_CHOICES,
              description="The sampler you will use with the cache (the ratios depend on it)."),
        Input("steps", INT, 20, min=2, max=1000, description="The step count you will use (other counts are resampled)."),
        Input("guidance_scale", FLOAT, 7.5, min=0.0, max=100.0, description="Guidance scale, as you will sample."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed of the calibration run's noise."),
    ],
    outputs=[Output("mag_ratios", STRING, "One magnitude ratio per step, comma-separated, for MagCache's mag_ratios.")],
    examples=[_example_calibrate],
    ui={"color": "#26a69a"},
)
def mag_cache_calibrate(
    ctx: RunContext, model: Any, conditioning: Any, latent: Any, sampler: str, steps: int,
    guidance_scale: float, seed: int,
) -> str:
    """Measure MagCache's magnitude ratios for a model with diffusers' calibration mode (one full sampling run).

    MagCache decides which steps may skip the transformer blocks from how the blocks' residual
    shrinks or grows from step to step — a property of the checkpoint and the scheduler. This
    node samples once without skipping, records the ratios and outputs them for the
    ``mag_ratios`` input of dagfusion.cache.MagCache.
    """
    ratios = calibrate_mag_ratios(model, conditioning, latent, ctx=ctx, sampler=sampler, steps=steps,
                                  guidance_scale=guidance_scale, seed=seed)
    return ", ".join(f"{r:.5f}" for r in ratios)

METHOD_NODES = {
    "first_block_cache": first_block_cache,
    "pyramid_attention_broadcast": pyramid_attention_broadcast,
    "faster_cache": faster_cache,
    "taylorseer": taylorseer,
    "mag_cache": mag_cache,
}
"""The node of each method (:data:`~dagfusion.nodes.cache.diffusers_caches.support.METHODS`)."""

NODES = (*METHOD_NODES.values(), mag_cache_calibrate)
"""The nodes of this module, in palette order."""
