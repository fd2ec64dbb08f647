"""The CacheQuant nodes: calibrating a schedule, and sampling with it.

See :mod:`~dagfusion.nodes.cache.cachequant` for the method.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from dagfusion import BOOLEAN, FLOAT, INT, SEED, STRING, Input, NodeInputError, Output, Problem, RunContext, SocketType, node
from dagfusion.nodes.cache import blockcache
from dagfusion.nodes.cache.checks import enforce
from dagfusion.nodes.cache.cachequant import (
    OBJECTIVES,
    CacheSchedule,
    calibrate,
    check_fits,
    denoiser_kind,
    schedule_patch,
)
from dagfusion.nodes.diffusion.schedulers import SAMPLER_CHOICES
from dagfusion.nodes.diffusion.types import CONDITIONING, LATENT, MODEL


# --- nodes ----------------------------------------------------------------------------------------

_PKG = "dagfusion.nodes.cache.cachequant"

CACHE_SCHEDULE = SocketType(
    "CACHE_SCHEDULE",
    python_types=(f"{_PKG}.CacheSchedule",),
    description="A calibrated cache schedule: which steps compute in full, and the per-step correction of reused features.",
    color="#4db6ac",
)


def _calibrate_example_unet() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    handles = tiny.sd_handles()
    return {"model": handles["model"], "conditioning": handles["conditioning"], "latent": handles["latent"],
            "steps": 6, "interval": 3, "guidance_scale": 4.0}


def _calibrate_example_dit() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    handles = tiny.pixart_handles()
    return {"model": handles["model"], "conditioning": handles["conditioning"], "latent": handles["latent"],
            "steps": 5, "interval": 2, "span": "0-1", "objective": "corrected", "guidance_scale": 4.0}


def check_calibrate_inputs(values: Mapping[str, Any]) -> Iterator[Problem]:
    """``full_count`` is at most ``steps``, and ``span`` is empty or ``'start-end'``."""
    full, steps = values.get("full_count"), values.get("steps")
    if isinstance(full, int) and isinstance(steps, int) and full > steps:
        yield Problem("bad-count", f"full_count ({full}) is more than steps ({steps})", input="full_count")
    span = values.get("span")
    if isinstance(span, str) and span.strip():
        try:
            blockcache.parse_span(span, None, "span")
        except ValueError as exc:
            yield Problem("bad-span", str(exc), input="span")


@node(
    "dagfusion.cache.CacheQuantCalibrate",
    version="1.0.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="The UNet or DiT/PixArt model to calibrate (as you will sample it)."),
        Input("conditioning", CONDITIONING, link_only=True, description="Calibration prompt(s)."),
        Input("latent", LATENT, link_only=True, description="A latent of the size you will sample; its batch is the calibration batch."),
        Input("reference", MODEL, link_only=True, optional=True,
              description="CacheQuant's joint setting: the full-precision model when 'model' is quantized; the "
                          "quantization error of the cached feature is then corrected too."),
        Input("steps", INT, 25, min=2, max=1000, description="The step count you will sample with."),
        Input("interval", INT, 3, min=1, max=1000,
              description="Speedup target: as many full steps as a uniform schedule with this interval (ceil(steps / interval))."),
        Input("full_count", INT, 0, min=0, max=1000, description="Number of full steps; 0: from 'interval'."),
        Input("max_segment", INT, 0, min=0, max=1000,
              description="Longest run of steps reusing one full step's feature; 0: twice the uniform interval."),
        Input("objective", STRING, "feature", choices=OBJECTIVES,
              description="What the schedule minimises: the feature distance (the paper), or the distance left after correction."),
        Input("branch", INT, 0, min=0, max=64, description="UNets: the DeepCache branch (0 = shallowest, fastest)."),
        Input("span", STRING, "", description="Transformers: cached blocks 'start-end' (end exclusive); empty: all but the first and last."),
        Input("sampler", STRING, "default", choices=SAMPLER_CHOICES, description="The sampler you will use (first-order)."),
        Input("guidance_scale", FLOAT, 7.5, min=0.0, max=100.0, description="Guidance scale, as you will sample."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed of the calibration run's noise."),
    ],
    outputs=[
        Output("schedule", CACHE_SCHEDULE, "The calibrated schedule with its error correction."),
        Output("full_steps", STRING, "The chosen full steps, comma-separated (usable as DeepCache's explicit schedule)."),
        Output("report", STRING, "JSON: the chosen and the uniform schedule's calibration cost, distances, settings."),
    ],
    examples=[_calibrate_example_unet, _calibrate_example_dit],
    ui={"color": "#26a69a"},
    check=check_calibrate_inputs,
)
def cachequant_calibrate(
    ctx: RunContext, model: Any, conditioning: Any, latent: Any, reference: Any, steps: int, interval: int,
    full_count: int, max_segment: int, objective: str, branch: int, span: str, sampler: str, guidance_scale: float,
    seed: int,
) -> tuple[CacheSchedule, str, str]:
    """Calibrate CacheQuant's cache schedule: one full sampling run, a dynamic-programming choice of
    full steps and a per-channel linear correction of every reused step's feature.

    The full steps minimise the summed distance between each reused feature and the one cached
    at its segment's start; the correction ``a ⊙ f + b`` is fitted by least squares per step.
    UNets cache DeepCache's deep feature (``branch``); DiT/PixArt cache the residual of a span of
    transformer blocks. Apply it with dagfusion.cache.CacheQuant, sampling with the same step count.

    With a quantized model and its full-precision 'reference' (CacheQuant's joint cache +
    quantization setting), a second per-channel correction maps every step's feature to the
    reference's: on reused steps the cache error is corrected first, then the quantization error.
    """
    enforce(check_calibrate_inputs, {"full_count": full_count, "steps": steps, "span": span})
    kind = denoiser_kind(model.denoiser)
    used_span = None
    if kind == "dit" and span.strip():
        try:
            used_span = blockcache.parse_span(span, len(blockcache.blocks_of(model.denoiser)), "span")
        except ValueError as exc:
            raise NodeInputError("span", str(exc)) from None
    schedule = calibrate(
        model, conditioning, latent, steps=steps, full=full_count, interval=0 if full_count else interval,
        max_segment=max_segment, branch=branch, span=used_span,
        objective=objective, reference=reference, ctx=ctx, sampler=sampler, guidance_scale=guidance_scale, seed=seed,
    )
    return schedule, ", ".join(str(i) for i in schedule.full_steps), json.dumps(schedule.report, default=float)


def _apply_example(*, correct: bool = True) -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    handles = tiny.sd_handles()
    schedule = calibrate(handles["model"], handles["conditioning"], handles["latent"], steps=6, full=2, guidance_scale=4.0)
    return {"model": handles["model"], "schedule": schedule, "correct": correct}


def _apply_example_raw() -> dict[str, Any]:
    return _apply_example(correct=False)


@node(
    "dagfusion.cache.CacheQuant",
    version="1.1.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="The model the schedule was calibrated on."),
        Input("schedule", CACHE_SCHEDULE, link_only=True, description="From dagfusion.cache.CacheQuantCalibrate."),
        Input("correct", BOOLEAN, True, description="Apply the decoupled error correction to reused features."),
    ],
    outputs=[Output("model", MODEL, "The model sampling with the calibrated cache schedule.")],
    examples=[_apply_example, _apply_example_raw],
    ui={"color": "#26a69a"},
)
def cachequant(ctx: RunContext, model: Any, schedule: CacheSchedule, correct: bool) -> Any:
    """Sample with a calibrated CacheQuant schedule: DeepCache-style on UNets, block caching on DiT/PixArt.

    Full steps run the whole denoiser and cache the feature; every other step reuses it,
    corrected per channel (``a ⊙ f + b``) when ``correct`` is on. Sampling must use the step
    count the schedule was calibrated for.
    """
    check_fits(schedule, model.denoiser)
    return model.with_patch(schedule_patch(schedule, correct=correct))


TYPES = (CACHE_SCHEDULE,)
NODES = (cachequant_calibrate, cachequant)
"""The nodes of this module."""
