"""Measuring one point: build the accelerated model, sample the prompts, compare with the full run.

Every point samples the same prompts with the same seeds as the reference (the full-step,
uncached, unquantized run), in chunks of ``batch_size`` prompts, chunk *i* seeded ``seed + i``.
What a point's result holds:

- ``mac_speedup``: the denoiser's multiply-accumulates in the reference run over the point's,
  counted (:func:`dagfusion.model.count_macs`) — fewer steps and cached steps both count; weight
  quantization simulated in float changes no MAC;
- ``weight_bits``: bits per denoiser parameter as stored (the quantization pack's average bits;
  the parameters' own dtype without quantization);
- ``psnr`` (mean over images with a finite value; ``inf`` when every image equals the
  reference) and ``ssim`` against the reference images;
- ``shapeeval`` and ``shapeeval_drop`` (points) when an evaluator is given and every prompt is
  a single-object shapes caption; otherwise ``None``;

Wall-clock is not part of a result (a result is pure: the same inputs give the same result on any
machine); ``dagfusion tune`` prints each point's seconds as it goes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from dagfusion.nodes.tune.space import Point

MAX_PROMPTS = 256
"""The most prompts (images per point) one search may use."""


def denoiser_kind(model: Any) -> str:
    """``"unet"`` or ``"transformer"``: which cache schedulers suit ``model``'s denoiser."""
    from dagfusion.nodes.cache.cachequant import denoiser_kind as cache_kind

    return "unet" if cache_kind(model.denoiser) == "unet" else "transformer"


def conditioning_of(clip: Any, prompts: Sequence[str]) -> Any:
    """One conditioning with a row per prompt (negative: the empty prompt)."""
    from dagfusion.nodes.diffusion.text import encode_prompt

    return encode_prompt(clip, list(prompts), "")


def chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[i:i + size]) for i in range(0, len(items), max(1, size))]


def generate(model: Any, clip: Any, vae: Any, prompts: Sequence[str], *, steps: int, guidance: float, seed: int,
             resolution: int, batch_size: int) -> tuple[Any, int]:
    """Decoded images of ``prompts`` (in [0, 1]) with ``model`` and the denoiser MACs it took."""
    import torch
    from dagfusion.model import count_macs
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.vae import decode

    images, macs = [], 0
    for index, part in enumerate(chunks(prompts, batch_size)):
        cond = conditioning_of(clip, part)
        with torch.no_grad(), count_macs(model.denoiser, records=False) as counter:
            latents = sample(model, cond, empty_latent(model, resolution, resolution, len(part)), steps=steps,
                             guidance_scale=guidance, seed=seed + index)
        macs += counter.total
        with torch.no_grad():
            images.append(decode(vae, latents).float().cpu())
    return torch.cat(images), macs


def weight_bits(model: Any) -> float:
    """Bits per denoiser parameter as the model holds them (its dtype's width)."""
    parameter = next(model.denoiser.parameters(), None)
    return float(parameter.element_size() * 8) if parameter is not None else 32.0


def accelerate(model: Any, clip: Any, point: Point, *, calibration_prompts: Sequence[str], guidance: float,
               seed: int, resolution: int) -> tuple[Any, dict[str, Any]]:
    """``model`` with ``point``'s weight format and cache scheduler, and facts about them.

    The facts are ``weight_bits`` and, for CacheQuant, ``full_steps`` (the calibrated schedule,
    calibrated on ``calibration_prompts`` — never the measured ones — against the unquantized
    model when the point quantizes, as CacheQuant's joint setting does).
    """
    import torch

    facts: dict[str, Any] = {"weight_bits": weight_bits(model)}
    handle = model
    if point.quant != "none":
        from dagfusion.nodes.quant.formats import QuantSpec
        from dagfusion.nodes.quant.nodes import replacing_quantization
        from dagfusion.nodes.quant.patch import average_bits, quantize_module

        module = model.denoiser
        spec = QuantSpec.parse(point.quant, group_size=64 if point.quant == "int4" else None)
        patch = quantize_module(module, spec)
        handle = replacing_quantization(model, patch)
        facts["weight_bits"] = float(average_bits(module, patch))
    if point.cache == "deepcache":
        from dagfusion.nodes.cache.deepcache import DeepCacheConfig, DeepCachePatch

        handle = handle.with_patch(DeepCachePatch(DeepCacheConfig(interval=point.interval)))
    elif point.cache == "blockcache":
        from dagfusion.nodes.cache.blockcache import (
            BlockCacheConfig,
            BlockCachePatch,
            blocks_of,
        )

        count = len(blocks_of(model.denoiser))
        handle = handle.with_patch(BlockCachePatch(BlockCacheConfig(span=(1, count - 1), interval=point.interval)))
    elif point.cache == "cachequant":
        from dagfusion.nodes.cache.cachequant import calibrate, schedule_patch
        from dagfusion.nodes.diffusion.latents import empty_latent

        cond = conditioning_of(clip, calibration_prompts)
        with torch.no_grad():
            schedule = calibrate(handle, cond, empty_latent(handle, resolution, resolution, len(calibration_prompts)),
                                 steps=point.steps, interval=point.interval, guidance_scale=guidance, seed=seed,
                                 reference=model if point.quant != "none" else None)
        facts["full_steps"] = list(schedule.full_steps)
        handle = handle.with_patch(schedule_patch(schedule))
    return handle, facts


def shapeeval_score(evaluator: Any, images: Any, prompts: Sequence[str]) -> float | None:
    """ShapeEval all-correct of ``images`` against ``prompts``; ``None`` when a prompt is not a shapes caption."""
    if evaluator is None:
        return None
    from dagfusion.nodes.metrics.evaluator import score

    try:
        return float(score(evaluator, images, list(prompts))["all_correct"])
    except ValueError:
        return None


def mean_psnr(images: Any, reference: Any) -> float:
    """Mean PSNR (dB) over the images whose PSNR is finite; ``inf`` when every image equals its reference."""
    from dagfusion.nodes.metrics.fidelity import psnr

    values = [v for v in psnr(images, reference).tolist() if math.isfinite(v)]
    return sum(values) / len(values) if values else math.inf


def measure_point(model: Any, clip: Any, vae: Any, point: Point, *, prompts: Sequence[str],
                  calibration_prompts: Sequence[str], reference: Any, reference_macs: int, guidance: float,
                  seed: int, resolution: int, batch_size: int, evaluator: Any = None,
                  reference_shapeeval: float | None = None) -> dict[str, Any]:
    """Measure ``point`` against the reference images (see the module docstring for the fields)."""
    from dagfusion.nodes.metrics.fidelity import ssim

    handle, facts = accelerate(model, clip, point, calibration_prompts=calibration_prompts, guidance=guidance,
                               seed=seed, resolution=resolution)
    images, macs = generate(handle, clip, vae, prompts, steps=point.steps, guidance=guidance, seed=seed,
                            resolution=resolution, batch_size=batch_size)
    if tuple(images.shape) != tuple(reference.shape):
        raise ValueError(f"the reference images are {tuple(reference.shape)}, the point's {tuple(images.shape)}: "
                         "the reference must come from the same prompts and resolution")
    score = shapeeval_score(evaluator, images, prompts)
    drop = None if score is None or reference_shapeeval is None else round(100.0 * (reference_shapeeval - score), 2)
    return {
        "setting": point.setting, "label": point.label, "steps": point.steps, "cache": point.cache,
        "interval": point.interval, "quant": point.quant,
        "mac_speedup": round(reference_macs / max(macs, 1), 4), "macs": int(macs),
        "psnr": round(mean_psnr(images, reference), 3), "ssim": round(float(ssim(images, reference).mean()), 4),
        "shapeeval": score, "shapeeval_drop": drop, **facts,
    }


def reference_run(model: Any, clip: Any, vae: Any, prompts: Sequence[str], *, steps: int, guidance: float, seed: int,
                  resolution: int, batch_size: int) -> tuple[Any, int]:
    """The full run every point is compared with: ``(images, denoiser MACs)``."""
    return generate(model, clip, vae, prompts, steps=steps, guidance=guidance, seed=seed, resolution=resolution,
                    batch_size=batch_size)


def run_search(points: Sequence[Point], measure: Callable[[Point], dict[str, Any]], *,
               done: dict[str, dict[str, Any]] | None = None,
               on_point: Callable[[int, int, dict[str, Any]], None] | None = None,
               should_stop: Callable[[], bool] | None = None,
               save: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Measure every point not already in ``done`` (``{setting: result}``), in order.

    ``save`` keeps each new result as soon as it is measured (so an interrupted search resumes);
    ``on_point(index, total, result)`` reports progress; ``should_stop()`` is asked before each new
    point (a time budget), and the points left are not measured.
    """
    known = dict(done or {})
    results: list[dict[str, Any]] = []
    for index, point in enumerate(points):
        result = known.get(point.setting)
        if result is None:
            if should_stop is not None and should_stop():
                break
            result = measure(point)
            if save is not None:
                save(result)
        results.append(result)
        if on_point is not None:
            on_point(index + 1, len(points), result)
    return results
