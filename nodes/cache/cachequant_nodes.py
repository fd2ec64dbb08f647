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
    TRAJECTORIES,
    CacheSchedule,
    calibrate,
    check_fits,
    denoiser_kind,
    schedule_patch,
)
from dagfusion.nodes.diffusion.schedulers import SAMPLER_CHOICES
from dagfusion.nodes.diffusion.types import CONDITIONING, LATENT, MODEL, VAE


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


def _calibrate_example_validated() -> dict[str, Any]:
    import torch

    from dagfusion.nodes.diffusion.data import Latent
    from dagfusion.testing import models as tiny

    handles = tiny.sd_handles()
    return {"model": handles["model"], "conditioning": handles["conditioning"], "latent": Latent(torch.zeros(2, 4, 16, 16)),
            "vae": handles["vae"], "steps": 4, "interval": 2, "guidance_scale": 4.0, "correction": "auto",
            "validation_rows": 1}


def _calibrate_example_dit() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    handles = tiny.pixart_handles()
    return {"model": handles["model"], "conditioning": handles["conditioning"], "latent": handles["latent"],
            "steps": 5, "interval": 2, "span": "0-1", "objective": "corrected", "guidance_scale": 4.0}


CORRECTIONS = ("auto", "on", "off")
"""The calibration node's ``correction`` choices."""


def check_calibrate_inputs(values: Mapping[str, Any]) -> Iterator[Problem]:
    """``full_count`` is at most ``steps``, ``span`` is empty or ``'start-end'``, and validation
    rows come only with ``correction: auto``."""
    full, steps = values.get("full_count"), values.get("steps")
    if isinstance(full, int) and isinstance(steps, int) and full > steps:
        yield Problem("bad-count", f"full_count ({full}) is more than steps ({steps})", input="full_count")
    rows, correction = values.get("validation_rows"), values.get("correction")
    if isinstance(rows, int) and rows > 0 and correction in ("on", "off"):
        yield Problem("unused-validation", f"validation_rows ({rows}) chooses the correction only with "
                      f"correction 'auto', not {correction!r}", input="validation_rows")
    span = values.get("span")
    if isinstance(span, str) and span.strip():
        try:
            blockcache.parse_span(span, None, "span")
        except ValueError as exc:
            yield Problem("bad-span", str(exc), input="span")


def _upgrade_1(inputs: dict[str, Any]) -> dict[str, Any]:
    """1.x -> 2.0: the correction was always applied; 2.0 chooses it ('auto', off for UNets).
    A 1.x workflow keeps its output: its correction is 'on'."""
    inputs.setdefault("correction", "on")
    return inputs


@node(
    "dagfusion.cache.CacheQuantCalibrate",
    version="2.0.0",
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
        Input("correction", STRING, "auto", choices=CORRECTIONS,
              description="The decoupled error correction of reused features: 'auto' = chosen by validation when "
                          "'validation_rows' > 0, else on for transformers and off for UNets (where it was measured "
                          "not to help on held-out prompts); 'on' = the fit as calibrated; 'off'."),
        Input("validation_rows", INT, 0, min=0, max=4096,
              description="'auto': hold out this many rows of the calibration batch (the last ones) and keep the "
                          "correction strength (0, 0.25 … 1) whose cached run comes closest to the uncached one "
                          "on them (PSNR; of the decoded images when 'vae' is linked). 0: no validation. Few rows "
                          "are noisy: on the shapes transformer 4 rows chose 0.25-0.5 where 1 was best on held-out prompts."),
        Input("vae", VAE, link_only=True, optional=True,
              description="Validation compares decoded images (recommended); without it, latents."),
        Input("per_condition", BOOLEAN, False,
              description="Fit the correction separately for the unconditional and the conditional half of the "
                          "guidance batch (measured worse on the shapes models: errors that cancel in the guidance "
                          "difference no longer do)."),
        Input("trajectory", STRING, "full", choices=TRAJECTORIES,
              description="Fit the correction on the uncached calibration run (the paper) or on the cached run "
                          "itself (one more full run)."),
    ],
    outputs=[
        Output("schedule", CACHE_SCHEDULE, "The calibrated schedule with its error correction."),
        Output("full_steps", STRING, "The chosen full steps, comma-separated (usable as DeepCache's explicit schedule)."),
        Output("report", STRING, "JSON: the chosen and the uniform schedule's calibration cost, distances, settings."),
    ],
    examples=[_calibrate_example_unet, _calibrate_example_validated, _calibrate_example_dit],
    ui={"color": "#26a69a"},
    check=check_calibrate_inputs,
    migrations={1: _upgrade_1},
)
def cachequant_calibrate(
    ctx: RunContext, model: Any, conditioning: Any, latent: Any, reference: Any, steps: int, interval: int,
    full_count: int, max_segment: int, objective: str, branch: int, span: str, sampler: str, guidance_scale: float,
    seed: int, correction: str = "auto", validation_rows: int = 0, vae: Any = None, per_condition: bool = False,
    trajectory: str = "full",
) -> tuple[CacheSchedule, str, str]:
    """Calibrate CacheQuant's cache schedule: one full sampling run, a dynamic-programming choice of
    full steps and a per-channel linear correction of every reused step's feature.

    The full steps minimise the summed distance between each reused feature and the one cached
    at its segment's start; the correction ``a ⊙ f + b`` is fitted by least squares per step.
    UNets cache DeepCache's deep feature (``branch``); DiT/PixArt cache the residual of a span of
    transformer blocks. Apply it with dagfusion.cache.CacheQuant, sampling with the same step count.

    The correction is applied at a strength ``λ`` (``(1 + λ(a − 1)) ⊙ f + λb``; 0 = off): with
    ``correction: auto`` and ``validation_rows`` > 0 the last rows of the calibration batch are
    held out and the strength that brings their cached run closest to the uncached one is kept;
    without validation ``auto`` turns it on for transformers and off for UNets (measured on
    held-out prompts of the shapes models: about +1 dB on the transformer at K = 9 and 13 of 25
    steps, a loss on the UNet at K = 5). The report gives the strength and the validation scores.

    With a quantized model and its full-precision 'reference' (CacheQuant's joint cache +
    quantization setting), a second per-channel correction maps every step's feature to the
    reference's: on reused steps the cache error is corrected first, then the quantization error.
    The quantization correction does not depend on ``correction``.
    """
    enforce(check_calibrate_inputs, {"full_count": full_count, "steps": steps, "span": span,
                                     "validation_rows": validation_rows, "correction": correction})
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
        objective=objective, reference=reference, per_condition=per_condition, trajectory=trajectory,
        validate=validation_rows if correction == "auto" else 0, vae=vae,
        strength={"on": 1.0, "off": 0.0}.get(correction),
        ctx=ctx, sampler=sampler, guidance_scale=guidance_scale, seed=seed,
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
        Input("correct", BOOLEAN, True,
              description="Apply the decoupled error correction to reused features at the strength the schedule "
                          "carries (chosen at calibration; 0 on UNets unless validated or asked for); off: none."),
    ],
    outputs=[Output("model", MODEL, "The model sampling with the calibrated cache schedule.")],
    examples=[_apply_example, _apply_example_raw],
    ui={"color": "#26a69a"},
)
def cachequant(ctx: RunContext, model: Any, schedule: CacheSchedule, correct: bool) -> Any:
    """Sample with a calibrated CacheQuant schedule: DeepCache-style on UNets, block caching on DiT/PixArt.

    Full steps run the whole denoiser and cache the feature; every other step reuses it,
    corrected per channel (``a ⊙ f + b``, at the schedule's strength) when ``correct`` is on.
    The strength was chosen at calibration (``correction`` there): on UNets it is 0 unless
    validation or the user turned it on, so ``correct`` changes nothing there by default.
    Sampling must use the step count the schedule was calibrated for.
    """
    check_fits(schedule, model.denoiser)
    return model.with_patch(schedule_patch(schedule, correct=correct))


TYPES = (CACHE_SCHEDULE,)
NODES = (cachequant_calibrate, cachequant)
"""The nodes of this module."""
