"""Layered Diffusion Brushes: region-targeted edits on the cached latents of a base generation.

Layered Diffusion Brushes (Gholami and Xiao, "Streamlining Image Editing with Layered Diffusion
Brushes") edit a generated picture by changing its *intermediate* latents: the base generation
is run once and the latent ``x_i`` before every step ``i`` is kept; an edit ("layer") takes the
kept latent at a step ``k``, puts new noise into a masked region and denoises only the steps
``k … steps − 1`` again with its own prompt, while after every step the latents outside the mask
are reset to the kept latents of that step. Outside the mask the result is therefore the base
picture exactly, and an edit costs only the steps it re-renders.

**Recording** (:func:`brush_base`). The base run is dagfusion's sampling loop
(:func:`~dagfusion.nodes.diffusion.sampling.run_sampling`: the same seed, sampler, steps and
guidance give the same final latents as ``dagfusion.sampling.Sample``) that also keeps, on the
CPU, the latents before every step and after the last (``steps + 1`` tensors) and the model's
prediction of the clean latents ``x̂0`` at every step (the scheduler's ``pred_original_sample``,
or converted from the model output with the schedule's ``ᾱ_t`` / flow-matching ``σ``). It keeps
the scheduler spec and timesteps too, so a layer rebuilds the same schedule and resumes at any
step (``set_begin_index``, as img2img does).

**A layer** (:func:`brush_layer`) with strength ``s`` re-renders the last ``n = round(s · steps)``
steps (halves round up), starting at step ``k = steps − n``:

1. the region is re-noised: inside the mask the kept latent ``x_k`` is replaced by the kept
   prediction ``x̂0_k`` (what the picture was becoming at step ``k``) *forward-noised to step k's
   noise level with the layer's own seed* — ``add_noise(x̂0_k, ε_seed, t_k)`` (``scale_noise``
   for flow matching), a latent with the right amount of fresh noise for step ``k`` that keeps
   the region's coarse layout but lets the edit prompt redraw its details; at ``k = 0``
   (strength 1) the region is pure fresh noise (``ε_seed · init_noise_sigma``), as text-to-image
   starts. Outside the mask ``x_k`` is kept as it is;
2. steps ``k … steps − 1`` run with the layer's conditioning (and guidance), and after each the
   latents outside the mask are set to the kept latents of the next step, the final ones to the
   kept final latents — so outside the mask the edited latents equal the input's exactly (a
   fractional mask blends, as latent-mask inpainting does).

The layer's output is again a :class:`BrushState`: the input's tensors for steps ``< k`` (shared,
not copied) and the edited ones from ``k`` on, so layers stack — a second layer edits on top of
the first and re-renders only from its own start step, keeping the first layer's region where
their masks do not overlap. Strength 0 (or ``n = 0``) returns the input's latents unchanged.

**Cost.** A layer calls the denoiser ``n`` times (once per re-rendered step, both guidance halves
in one batch), against ``steps`` for the base; the reports count them.

**Schedulers.** A layer resumes a fresh scheduler at step ``k``; that is exact for one-step
schedulers (DDIM, Euler, Euler ancestral, DDPM, flow-matching Euler) and, for multistep solvers
(DPM-Solver++, UniPC), restarts their history at ``k`` as img2img does. Schedulers that run more
scheduler steps than ``steps`` (PNDM's PLMS warm-up, Heun and other second-order ones) cannot
be resumed at a step boundary and are refused. Step-hook patches (caches) are refused as well;
weight patches (LoRA, merges, quantization) are fine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dagfusion import SocketType
from dagfusion.context import RunContext

BRUSH_BASE = SocketType(
    "BRUSH_BASE",
    python_types=("dagfusion.nodes.everyday.brushes.BrushState",),
    description="A base generation (or a stack of brush layers on one) with the latents before every step, "
                "for Layered Diffusion Brushes.",
    color="#9575cd",
)

TYPES = (BRUSH_BASE,)
"""The socket types this module registers."""


def _freeze(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    from types import MappingProxyType

    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True, eq=False)
class BrushState:
    """A recorded generation: what layers edit and what they return.

    Attributes:
        scheduler: The scheduler spec the run used (a layer rebuilds the same schedule from it).
        steps: Number of steps of the schedule.
        timesteps: The schedule's timesteps, one per step.
        seed: Seed of the base generation's noise.
        guidance_scale: The base generation's classifier-free guidance scale.
        latents: ``steps + 1`` CPU tensors ``(B, C, h, w)``: the latents before each step, then the final ones.
        predictions: ``steps`` CPU tensors: the predicted clean latents ``x̂0`` at each step.
        layers: Plain data on each brush layer applied, in order (empty for a base generation).
        model: Fingerprint of the denoiser's weights (``None`` when unknown).
        lineage: Plain data carried into the output latent (model, sampler, prompts).
    """

    scheduler: Any
    steps: int
    timesteps: tuple[float, ...]
    seed: int
    guidance_scale: float
    latents: tuple[Any, ...]
    predictions: tuple[Any, ...]
    layers: tuple[Mapping[str, Any], ...] = ()
    model: str | None = None
    lineage: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lineage", _freeze(self.lineage))
        object.__setattr__(self, "layers", tuple(_freeze(layer) for layer in self.layers))

    @property
    def final(self) -> Any:
        """The final latents (after the last step)."""
        return self.latents[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.latents[0].shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (the engine's output cache budgets with this)."""
        return sum(int(t.numel()) * int(t.element_size()) for t in (*self.latents, *self.predictions))

    def __dagfusion_fingerprint__(self) -> str:
        from dagfusion.fingerprint import fingerprint

        plain = json.dumps({"steps": self.steps, "timesteps": list(self.timesteps), "seed": self.seed,
                            "guidance_scale": self.guidance_scale, "model": self.model,
                            "layers": [dict(layer) for layer in self.layers],
                            "lineage": _plain(self.lineage)}, sort_keys=True, default=str)
        return str(fingerprint([plain, self.scheduler, list(self.latents), list(self.predictions)]))

    def __repr__(self) -> str:
        return f"BrushState(steps={self.steps}, shape={self.shape}, layers={len(self.layers)})"


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- helpers


def rerendered_steps(strength: float, steps: int) -> int:
    """How many steps a layer of ``strength`` re-renders: ``round(strength · steps)``, halves up."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return max(0, min(steps, math.floor(strength * steps + 0.5 + 1e-9)))


def step_hook_patches(model: Any) -> list[str]:
    """Names of ``model``'s patches that hook the sampling loop (caches, schedules)."""
    from dagfusion.model import ModelPatch

    return [type(p).__name__ for p in model.patches if getattr(type(p), "begin", ModelPatch.begin) is not ModelPatch.begin]


def check_scheduler(spec: Any, steps: int) -> None:
    """:raises ValueError: the scheduler cannot be resumed at a step boundary (see the module docs)."""
    sched = spec.create()
    sched.set_timesteps(steps)
    order = int(getattr(sched, "order", 1))
    count = len(sched.timesteps)
    if order != 1 or count != steps:
        raise ValueError(
            f"the scheduler {type(sched).__name__} runs {count} scheduler steps of order {order} for {steps} steps, "
            "so a brush layer cannot resume it at a step; choose a one-step sampler (ddim, euler, euler_ancestral, "
            "dpmpp_2m, unipc or flow_euler)"
        )


def _model_fingerprint(model: Any) -> str | None:
    value = model.info.get("fingerprint")
    return None if value is None else str(value)


def _predicted_x0(sched: Any, result: Any, prediction: Any, x: Any, t: Any, index: int, flow: bool) -> Any:
    """The clean latents the step predicted: the scheduler's own ``pred_original_sample`` when it
    gives one, else converted from the model output (flow matching: ``x − σ·v``; otherwise with
    ``ᾱ_t`` and the prediction type)."""
    pred = getattr(result, "pred_original_sample", None)
    if pred is not None:
        return pred
    if flow:
        sigma = sched.sigmas[index].to(x.device, x.dtype)
        return x - sigma * prediction
    ac = float(sched.alphas_cumprod[round(float(t))])
    alpha, sigma = math.sqrt(ac), math.sqrt(1.0 - ac)
    kind = sched.config.get("prediction_type", "epsilon")
    if kind == "v_prediction":
        return alpha * x - sigma * prediction
    if kind == "sample":
        return prediction
    return (x - sigma * prediction) / max(alpha, 1e-8)


def _cpu(tensor: Any) -> Any:
    import torch

    return tensor.detach().to("cpu", torch.float32).clone()


def _denoise(
    model: Any, conditioning: Any, spec: Any, steps: int, start: int, shape: tuple[int, ...],
    begin: Callable[[Any, Any, Any], Any],
    guidance_scale: float, generator: Any, *, mask: Any = None, reference: BrushState | None = None,
    ctx: RunContext | None = None,
) -> tuple[list[Any], list[Any], Any, int]:
    """Run steps ``start … steps − 1``; ``begin(scheduler, device, dtype)`` gives the latents before
    step ``start``. With ``mask``, the latents (and predictions) outside it are reset to
    ``reference``'s after every step.

    :returns: ``(latents, predictions, first, denoiser calls)``: the latents after each step, the
        predictions of each step (both blended, CPU) and the latents before step ``start``.
    """
    import torch
    from dagfusion.model import apply_patches, family_for
    from dagfusion.nodes.diffusion.sampling import (
        _set_timesteps,
        _step_kwargs,
        module_dtype,
    )
    from dagfusion.nodes.diffusion.schedulers import is_flow_matching

    module = model.denoiser
    family = family_for(module)
    sched = spec.create()
    device = torch.device(model.device)
    dtype = module_dtype(module)
    latents_out: list[Any] = []
    predictions_out: list[Any] = []
    calls = 0
    with model.use(module), torch.no_grad(), apply_patches(model.patches, module):
        _set_timesteps(sched, steps, device, shape)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        x = begin(sched, device, dtype)
        first = _cpu(x)
        timesteps = sched.timesteps
        flow = is_flow_matching(sched)
        cfg = guidance_scale > 1.0 and family.supports_cfg(module)
        prepared = family.prepare(
            module, conditioning, batch=shape[0], cfg=cfg, device=device, dtype=dtype,
            latent_shape=shape, scale=model.vae_scale_factor, guidance_scale=guidance_scale,
        )
        kwargs, batches, concat = prepared.kwargs, prepared.batches, prepared.concat
        step_kwargs = _step_kwargs(sched, 0.0, generator)
        scale_input = getattr(sched, "scale_model_input", None)
        if mask is not None:
            inside = mask.to(device=device, dtype=dtype)
            outside = 1 - inside
        total = steps - start
        for i in range(start, steps):
            if ctx is not None:
                ctx.check_cancelled()
            t = timesteps[i]
            model_input = torch.cat([x] * 2) if cfg else x
            if scale_input is not None:
                model_input = scale_input(model_input, t)
            if concat is not None:
                model_input = torch.cat([model_input, concat], dim=family.channel_dim)
            out = family.call(module, model_input, family.timestep(t, model_input.shape[0], device), kwargs)
            calls += 1
            prediction = family.combine(out, module, cfg, batches, guidance_scale, 0.0)
            result = sched.step(prediction, t, x, **step_kwargs, return_dict=True)
            x0 = _predicted_x0(sched, result, prediction, x, t, i, flow)
            x = result.prev_sample
            if mask is not None and reference is not None:
                x = outside * reference.latents[i + 1].to(device=device, dtype=dtype) + inside * x
                x0 = outside * reference.predictions[i].to(device=device, dtype=dtype) + inside * x0.to(dtype)
            latents_out.append(_cpu(x))
            predictions_out.append(_cpu(x0))
            if ctx is not None:
                ctx.progress(i + 1 - start, total, timestep=float(t))
    return latents_out, predictions_out, first, calls


# --------------------------------------------------------------------------- base and layers


def brush_base(
    model: Any, conditioning: Any, latent: Any, *, steps: int = 25, guidance_scale: float = 7.5,
    sampler: str = "default", seed: int = 0, scheduler: Any = None, ctx: RunContext | None = None,
) -> tuple[BrushState, dict[str, Any]]:
    """Generate from noise as ``dagfusion.sampling.Sample`` does, recording every step (see the
    module docs). ``latent`` gives the shape. Returns the state and a report (plain data).

    :raises ValueError: image latents are needed; the scheduler cannot be resumed; the model
        carries step hooks.
    """
    import torch
    from dagfusion.nodes.diffusion.schedulers import spec_for

    samples = latent.samples
    if samples.ndim != 4:
        raise ValueError(f"expected image latents (B, C, h, w), got shape {tuple(samples.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    hooked = step_hook_patches(model)
    if hooked:
        raise ValueError(
            f"the model carries step-hook patches ({', '.join(hooked)}) that change the denoiser's outputs from run to "
            "run; brush layers reuse recorded latents, so remove them"
        )
    spec = spec_for(scheduler or model.scheduler, sampler)
    check_scheduler(spec, steps)
    shape = tuple(samples.shape)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))

    def begin(sched: Any, device: Any, dtype: Any) -> Any:
        # the sampler's own noise (a CPU generator, the model's dtype), as text-to-image starts
        return torch.randn(shape, generator=generator, dtype=dtype).to(device) * getattr(sched, "init_noise_sigma", 1.0)

    latents, predictions, first, calls = _denoise(model, conditioning, spec, steps, 0, shape, begin, guidance_scale,
                                                  generator, ctx=ctx)
    sched = spec.create()
    sched.set_timesteps(steps)
    timesteps = tuple(float(t) for t in sched.timesteps.detach().float().cpu().tolist())
    lineage = {
        **dict(latent.lineage),
        "model": {k: model.info.get(k) for k in ("source", "fingerprint", "dtype", "pipeline") if k in model.info},
        "sampler": {"name": spec.name, "scheduler": spec.class_name, "steps": steps, "seed": int(seed),
                    "guidance_scale": guidance_scale},
        "conditioning": {k: v for k, v in conditioning.meta.items() if k in ("prompt", "negative_prompt", "class_labels")},
    }
    state = BrushState(spec, steps, timesteps, int(seed), float(guidance_scale), (first, *latents), tuple(predictions),
                       (), _model_fingerprint(model), lineage)
    report = {"denoiser_calls": calls, "steps": steps, "start_step": 0, "rerendered_steps": steps,
              "sampler": spec.name, "scheduler": spec.class_name,
              "layers": 0}
    return state, report


def brush_layer(
    model: Any, state: BrushState, conditioning: Any, mask: Any, *, strength: float, seed: int = 0,
    guidance_scale: float | None = None, ctx: RunContext | None = None,
) -> tuple[BrushState, dict[str, Any]]:
    """Apply one brush layer to ``state`` (see the module docs).

    :param mask: ``(1 or B, 1, h, w)`` at the latents' size, in [0, 1]; 1 = the region to edit.
    :param strength: Fraction of the schedule re-rendered: the layer starts at step
        ``steps − round(strength · steps)``.
    :param guidance_scale: ``None``: the base generation's.
    :returns: the edited state and a report (plain data, the same for the same inputs:
        ``denoiser_calls``, ``start_step`` …).
    :raises ValueError: the mask does not fit the latents, or ``strength`` is outside [0, 1].
    """
    import torch
    from dagfusion.nodes.diffusion.schedulers import is_flow_matching

    steps = state.steps
    n = rerendered_steps(strength, steps)
    start = steps - n
    shape = state.shape
    mask = mask.detach().float().cpu()
    if mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != tuple(shape[-2:]):
        raise ValueError(f"expected a mask (1 or B, 1, {shape[-2]}, {shape[-1]}) at latent size, got {tuple(mask.shape)}")
    if mask.shape[0] not in (1, shape[0]):
        raise ValueError(f"the mask has {mask.shape[0]} rows and the latents {shape[0]}; give 1 or {shape[0]}")
    mask = mask.expand(shape[0], 1, *shape[-2:]).clamp(0, 1)
    guidance = state.guidance_scale if guidance_scale is None else float(guidance_scale)
    layer = {"strength": float(strength), "seed": int(seed), "guidance_scale": guidance, "start_step": start,
             "rerendered_steps": n, "masked_fraction": float(mask.mean()),
             "prompt": conditioning.meta.get("prompt")}
    if n == 0:
        edited = BrushState(state.scheduler, steps, state.timesteps, state.seed, state.guidance_scale, state.latents,
                            state.predictions, (*state.layers, layer), state.model, state.lineage)
        return edited, {"denoiser_calls": 0, "steps": steps, "start_step": start, "rerendered_steps": 0,
                        "masked_fraction": layer["masked_fraction"],
                        "layers": len(edited.layers)}
    hooked = step_hook_patches(model)
    if hooked:
        raise ValueError(f"the model carries step-hook patches ({', '.join(hooked)}); remove them for brush layers")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))

    def begin(sched: Any, device: Any, dtype: Any) -> Any:
        noise = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        if start == 0:
            fresh = noise * getattr(sched, "init_noise_sigma", 1.0)
        else:
            x0 = state.predictions[start].to(device=device, dtype=dtype)
            t = sched.timesteps[start:start + 1].repeat(shape[0])
            fresh = sched.scale_noise(x0, t, noise) if is_flow_matching(sched) else sched.add_noise(x0, noise, t)
        inside = mask.to(device=device, dtype=dtype)
        kept = state.latents[start].to(device=device, dtype=dtype)
        return (1 - inside) * kept + inside * fresh.to(dtype)

    latents, predictions, first, calls = _denoise(model, conditioning, state.scheduler, steps, start, shape, begin, guidance,
                                                  generator, mask=mask, reference=state, ctx=ctx)
    edited = BrushState(
        state.scheduler, steps, state.timesteps, state.seed, state.guidance_scale,
        (*state.latents[:start], first, *latents), (*state.predictions[:start], *predictions),
        (*state.layers, layer), state.model, state.lineage,
    )
    report = {"denoiser_calls": calls, "steps": steps, "start_step": start, "rerendered_steps": n,
              "masked_fraction": layer["masked_fraction"],
              "layers": len(edited.layers)}
    return edited, report
