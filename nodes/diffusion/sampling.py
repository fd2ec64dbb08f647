"""dagfusion's denoising loop over diffusers schedulers, and the Sample node.

The loop (:func:`sample`) is written once for every model family
(:mod:`~dagfusion.model.families`) and every scheduler, and follows the diffusers
pipelines step for step, so that the same seed, scheduler and step count give the same
latents as ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``DiTPipeline`` and
``PixArtAlphaPipeline`` (the equivalence tests check it):

1. a fresh scheduler from the spec; ``set_timesteps(steps)``; for ``strength < 1`` the first
   ``steps - int(steps * strength)`` steps are skipped (img2img);
2. noise from a CPU generator seeded with ``seed`` (the same on every machine), drawn in the
   model's dtype; text-to-image starts from ``noise * init_noise_sigma``, img2img from the input
   latents noised to the first timestep (``add_noise``, or ``scale_noise`` for flow matching);
3. each step: batch both guidance halves, ``scale_model_input``, call the denoiser through the
   step-hook chain (:mod:`~dagfusion.model.hooks`), combine with classifier-free
   guidance (and optional rescale), ``scheduler.step`` (passing ``eta`` and the generator where
   the scheduler takes them), let step hooks see (and optionally replace) the new latents
   (``after_step``), report progress (which also checks for cancellation), preview.

Patches of the model handle are applied for the duration of the loop only.

:func:`run_sampling` also returns the run's :class:`~dagfusion.model.RunReport`: per step
whether the real denoiser ran and how often, the MACs its layers computed (counted with
:func:`~dagfusion.model.count_macs` unless ``count_macs=False`` or the denoiser is
``torch.compile``'d) and the step's seconds; per patch, what its step hook's ``end()`` returned.
The Sample node outputs it as ``report`` (``RUN_REPORT``), so statistics nodes read them from
the run that produced the latent — also when that run is served from a cache.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from typing import Any

from dagfusion import BOOLEAN, FLOAT, INT, SEED, STRING, Input, Output, RunContext, node
from dagfusion.model import ModelHandle, RunReport, StepRecord, patch_key, plain_report
from dagfusion.nodes.diffusion.data import Conditioning, Latent, SchedulerSpec
from dagfusion.nodes.diffusion.schedulers import SAMPLER_CHOICES, spec_for
from dagfusion.nodes.diffusion.types import CONDITIONING, LATENT, MODEL, RUN_REPORT, SCHEDULER

_STEP_KWARGS: dict[type, tuple[bool, bool]] = {}


def _step_kwargs(scheduler: Any, eta: float, generator: Any) -> dict[str, Any]:
    cls = type(scheduler)
    accepts = _STEP_KWARGS.get(cls)
    if accepts is None:
        params = inspect.signature(scheduler.step).parameters
        accepts = _STEP_KWARGS[cls] = ("eta" in params, "generator" in params)
    kwargs: dict[str, Any] = {}
    if accepts[0]:
        kwargs["eta"] = eta
    if accepts[1]:
        kwargs["generator"] = generator
    return kwargs


def module_dtype(module: Any) -> Any:
    import torch

    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _set_timesteps(scheduler: Any, steps: int, device: Any, latent_shape: tuple[int, ...]) -> None:
    kwargs: dict[str, Any] = {}
    config = scheduler.config
    if config.get("use_dynamic_shifting"):
        # Flow-matching resolution-dependent shift, as SD3/Flux compute it (patch size 2).
        seq = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        base_seq, max_seq = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (max_shift - base_shift) / (max_seq - base_seq)
        kwargs["mu"] = seq * slope + (base_shift - slope * base_seq)
    scheduler.set_timesteps(steps, device=device, **kwargs)


def _sigmas(scheduler: Any) -> list[float] | None:
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or not hasattr(sigmas, "tolist"):
        return None
    return [float(s) for s in sigmas.detach().float().cpu().tolist()]


def sample(
    model: ModelHandle,
    conditioning: Conditioning,
    latent: Latent,
    *,
    scheduler: SchedulerSpec | None = None,
    sampler: str = "default",
    steps: int = 20,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    eta: float = 0.0,
    strength: float = 1.0,
    seed: int = 0,
    ctx: RunContext | None = None,
    preview_every: int = 0,
) -> Latent:
    """Denoise ``latent`` with ``model`` under ``conditioning``; see the module docstring.

    :param scheduler: Scheduler spec (default: the model's own); ``sampler`` switches its class.
    :param strength: 1 starts from pure noise (text-to-image, the latent only gives the shape);
        below 1 the latent is noised to the matching timestep and denoised from there (img2img).
    :param ctx: Run context for progress, cancellation and previews (optional).
    :raises ValueError: on inputs that cannot work together (explained in the message).
    """
    latents, _ = run_sampling(
        model, conditioning, latent, scheduler=scheduler, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale, eta=eta, strength=strength, seed=seed, ctx=ctx, preview_every=preview_every,
        count_macs=False,
    )
    return latents


def run_sampling(
    model: ModelHandle,
    conditioning: Conditioning,
    latent: Latent,
    *,
    scheduler: SchedulerSpec | None = None,
    sampler: str = "default",
    steps: int = 20,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    eta: float = 0.0,
    strength: float = 1.0,
    seed: int = 0,
    ctx: RunContext | None = None,
    preview_every: int = 0,
    count_macs: bool = True,
    min_guidance_scale: float | None = None,
) -> tuple[Latent, RunReport]:
    """:func:`sample`, also returning the run's :class:`~dagfusion.model.RunReport` (see the
    module docstring); the latents are the same as :func:`sample`'s.

    :param count_macs: Count the MACs of every step (forward hooks on the denoiser's layers for
        the run; skipped for a ``torch.compile``'d denoiser, whose steps then report ``None``).
    :param min_guidance_scale: Video models only: the guidance scale ramps linearly across the
        frames from this value (first frame) to ``guidance_scale`` (last frame), as Stable Video
        Diffusion samples; guidance applies when ``guidance_scale > 1``. ``None``: one scale.
    :raises TypeError: a step hook's ``end()`` returned something that is not plain data.
    """
    import torch

    from dagfusion.model import DenoiserCall, SamplingRun, StepInfo, apply_patches, chain, family_for, unwrap_compiled
    from dagfusion.model import count_macs as counting
    from dagfusion.nodes.diffusion.schedulers import is_flow_matching

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    module = model.denoiser
    family = family_for(module)
    spec = spec_for(scheduler or model.scheduler, sampler)
    sched = spec.create()
    device = torch.device(model.device)
    dtype = module_dtype(module)
    init = latent.samples
    expected_dims = 5 if family.video else 4
    if init.ndim != expected_dims:
        raise ValueError(
            f"a {family.name} model needs {'video latents (B, F, C, h, w)' if family.video else 'latents (B, C, h, w)'}, "
            f"got a latent of shape {tuple(init.shape)}"
        )
    channels = family.latent_channels(module)
    if init.shape[family.channel_dim] != channels:
        raise ValueError(
            f"the model works on {channels}-channel latents, got {init.shape[family.channel_dim]} channels "
            f"(shape {tuple(init.shape)}); make the latent with this model's VAE or EmptyLatent"
        )
    shape = tuple(init.shape)
    batch = shape[0]
    if min_guidance_scale is not None and not family.video:
        raise ValueError(
            f"min_guidance_scale ramps guidance across video frames; a {family.name} model makes images — "
            "leave it unset"
        )

    with model.use(module), torch.no_grad():
        _set_timesteps(sched, steps, device, shape)
        timesteps = sched.timesteps
        order = getattr(sched, "order", 1)
        start = 0
        if strength < 1.0:
            init_steps = min(int(steps * strength), steps)
            start = max(steps - init_steps, 0) * order
            timesteps = timesteps[start:]
            if len(timesteps) == 0:
                raise ValueError(
                    f"strength {strength} with {steps} steps leaves no step to run; raise strength or steps"
                )
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)

        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        if strength < 1.0:
            init = init.to(device=device, dtype=dtype)
            first = timesteps[:1].repeat(batch)
            if is_flow_matching(sched):
                latents = sched.scale_noise(init, first, noise)
            else:
                latents = sched.add_noise(init, noise, first)
        else:
            latents = noise * getattr(sched, "init_noise_sigma", 1.0)

        cfg = guidance_scale > 1.0 and family.supports_cfg(module)
        scale = model.vae_scale_factor
        prepared = family.prepare(
            module, conditioning, batch=batch, cfg=cfg, device=device, dtype=dtype,
            latent_shape=shape, scale=scale, guidance_scale=guidance_scale,
        )
        kwargs, batches, concat = prepared.kwargs, prepared.batches, prepared.concat
        guidance: Any = guidance_scale
        if cfg and min_guidance_scale is not None:  # one scale per frame, broadcast over (B, F, C, h, w)
            guidance = torch.linspace(float(min_guidance_scale), float(guidance_scale), shape[1])
            guidance = guidance.to(device, dtype).view(1, shape[1], *([1] * (len(shape) - 2)))
        step_kwargs = _step_kwargs(sched, eta, generator)
        values = [float(t) for t in timesteps.detach().float().cpu().tolist()]
        sigmas = _sigmas(sched)
        total = len(values)
        one_step_original = family.name == "pixart" and total == 1
        scale_input = getattr(sched, "scale_model_input", None)

        records: list[StepRecord] = []
        reports: list[tuple[Any, Any, Any]] = []
        measure = count_macs and unwrap_compiled(module) is module
        with apply_patches(model.patches, module), contextlib.ExitStack() as stack:
            counter = stack.enter_context(counting(module, records=False)) if measure else None
            run = SamplingRun(
                handle=model, module=module, family=family.name, scheduler=sched, timesteps=tuple(values),
                steps=total, guidance_scale=guidance_scale, cfg=cfg, seed=int(seed), shape=shape,
                device=device, dtype=dtype,
            )
            begun = [(p, p.begin(run)) for p in model.patches if hasattr(p, "begin")]
            begun = [(p, h) for p, h in begun if h is not None]
            hooks = [h for _, h in begun]
            denoiser_calls = [0]

            def call_module(call: DenoiserCall) -> Any:
                denoiser_calls[0] += 1
                return family.call(call.module, call.sample, call.timestep, call.kwargs)

            forward = chain(hooks, call_module) if hooks else call_module
            try:
                for i, t in enumerate(timesteps):
                    if ctx is not None:
                        ctx.check_cancelled()
                    started = time.perf_counter()
                    calls_before = denoiser_calls[0]
                    macs_before = counter.total if counter is not None else 0
                    model_input = torch.cat([latents] * 2) if cfg else latents
                    if scale_input is not None:
                        model_input = scale_input(model_input, t)
                    if concat is not None:
                        model_input = torch.cat([model_input, concat], dim=family.channel_dim)
                    sigma = sigmas[start + i] if sigmas is not None and start + i < len(sigmas) else None
                    info = StepInfo(i, total, t, values[i], sigma)
                    call = DenoiserCall(
                        info, module, model_input, family.timestep(t, model_input.shape[0], device),
                        kwargs, batches, family.name,
                    )
                    out = forward(call)
                    prediction = family.combine(out, module, cfg, batches, guidance, guidance_rescale)
                    result = sched.step(prediction, t, latents, **step_kwargs, return_dict=False)
                    latents = result[1] if one_step_original and len(result) > 1 else result[0]
                    for hook in hooks:
                        replaced = hook.after_step(info, latents)
                        if replaced is not None:  # e.g. latent-mask inpainting blends the known region back
                            if tuple(replaced.shape) != tuple(latents.shape):
                                raise ValueError(
                                    f"step hook {type(hook).__qualname__}.after_step returned latents of shape "
                                    f"{tuple(replaced.shape)}, expected {tuple(latents.shape)}"
                                )
                            latents = replaced
                    records.append(StepRecord(
                        i, values[i], denoiser_calls[0] - calls_before,
                        counter.total - macs_before if counter is not None else None, time.perf_counter() - started,
                    ))
                    if ctx is not None:
                        ctx.progress(i + 1, total, timestep=values[i])
                        if preview_every and ctx.handler is not None and ((i + 1) % preview_every == 0 or i + 1 == total):
                            ctx.preview(latent_preview(latents, getattr(model, "preview_vae", None)),
                                        label=f"step {i + 1}/{total}")
            finally:
                for patch, hook in begun:
                    reports.append((patch, hook, hook.end()))

    report = RunReport(
        steps=tuple(records),
        patches=_patch_reports(reports),
        info={"family": family.name, "sampler": spec.name, "scheduler": spec.class_name, "steps": total,
              "cfg": cfg, "guidance_scale": guidance_scale, "seed": int(seed), "batch": batch,
              "macs_counted": measure,
              **({"min_guidance_scale": min_guidance_scale} if min_guidance_scale is not None else {})},
    )
    lineage = {
        **dict(latent.lineage),
        "model": {k: model.info.get(k) for k in ("source", "fingerprint", "dtype", "pipeline") if k in model.info},
        "patches": [patch_key(p) for p in model.patches],
        "sampler": {"name": spec.name, "scheduler": spec.class_name, "steps": steps, "seed": int(seed),
                    "guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale, "eta": eta,
                    **({"min_guidance_scale": min_guidance_scale} if min_guidance_scale is not None else {}),
                    "strength": strength},
        "conditioning": {k: v for k, v in conditioning.meta.items() if k in ("prompt", "negative_prompt", "class_labels")},
    }
    return Latent(latents, lineage), report


def _patch_reports(reports: list[tuple[Any, Any, Any]]) -> dict[str, Any]:
    """``{patch key: plain report}`` of the hooks that returned one (a repeated key gets ``#2`` …)."""
    out: dict[str, Any] = {}
    for patch, hook, value in reports:
        if value is None:
            continue
        key = patch_key(patch)
        name, n = key, 1
        while name in out:
            n += 1
            name = f"{key}#{n}"
        out[name] = plain_report(value, f"{type(hook).__qualname__}.end() of patch {type(patch).__name__}")
    return out


def latent_preview(latents: Any, vae: Any = None) -> Any:
    """A quick picture of the first latent (:func:`~dagfusion.nodes.diffusion.preview.preview_picture`):
    through a latent-to-RGB projection fitted for ``vae``, else its first channels stretched."""
    from dagfusion.nodes.diffusion.preview import preview_picture

    return preview_picture(latents, vae)


def _sample_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    parts = tiny.sd_handles()
    return {"model": parts["model"], "conditioning": parts["conditioning"], "latent": parts["latent"],
            "steps": 1, "seed": 3, "guidance_scale": 4.0, "sampler": "euler"}


@node(
    "dagfusion.sampling.Sample",
    version="1.1.0",
    category="sampling",
    inputs=[
        Input("model", MODEL, link_only=True, description="The denoiser handle (with its patches)."),
        Input("conditioning", CONDITIONING, link_only=True, description="Prompt or class conditioning, with its negative."),
        Input("latent", LATENT, link_only=True,
              description="Starting latent: only its shape counts at strength 1; img2img source below 1."),
        Input("scheduler", SCHEDULER, optional=True, link_only=True,
              description="Scheduler spec (default: the model's own); the sampler input can switch its class."),
        Input("sampler", STRING, "default", choices=SAMPLER_CHOICES,
              description="Sampler; 'default' uses the scheduler input (or the model's scheduler) as is."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed of the noise (a CPU generator: same on every machine)."),
        Input("steps", INT, 20, min=1, max=1000, description="Number of denoising steps."),
        Input("guidance_scale", FLOAT, 7.5, min=0.0, max=100.0,
              description="Classifier-free guidance scale; 1 or less disables guidance."),
        Input("guidance_rescale", FLOAT, 0.0, min=0.0, max=1.0,
              description="Rescale guided predictions towards the conditional one's std (0 = off)."),
        Input("eta", FLOAT, 0.0, min=0.0, max=1.0, description="DDIM eta (noise added per step; 0 = deterministic)."),
        Input("strength", FLOAT, 1.0, min=0.0, max=1.0,
              description="Denoising strength: 1 = from pure noise; lower keeps more of the input latent (img2img)."),
        Input("preview_every", INT, 0, min=0, max=1000, description="Emit a latent preview every N steps (0 = none)."),
        Input("count_macs", BOOLEAN, True,
              description="Count the multiply-accumulates of every step for the report (off: a little less overhead)."),
    ],
    outputs=[
        Output("latent", LATENT, "The denoised latents."),
        Output("report", RUN_REPORT,
               "What the run did: per step whether the denoiser ran, its MACs and seconds; per patch its statistics."),
    ],
    examples=[_sample_example],
    ui={"color": "#7e57c2"},
)
def sample_node(
    ctx: RunContext,
    model: ModelHandle,
    conditioning: Conditioning,
    latent: Latent,
    scheduler: SchedulerSpec | None,
    sampler: str,
    seed: int,
    steps: int,
    guidance_scale: float,
    guidance_rescale: float,
    eta: float,
    strength: float,
    preview_every: int,
    count_macs: bool,
) -> tuple[Latent, RunReport]:
    """Denoise a latent with dagfusion's sampling loop (CFG, seeded noise, step hooks for patches).

    Runs the model handle's patches around every denoiser call, reports progress every step
    (cancellable) and can emit latent previews. With strength below 1 it continues from the
    input latent (img2img). The report says, per step, whether the denoiser ran, the MACs it
    computed and the seconds taken, and holds each patch's statistics (cache and LazyDiT
    statistics nodes read it).
    """
    if strength <= 0.0:
        raise ValueError("strength must be greater than 0 (0 would run no step)")
    return run_sampling(
        model, conditioning, latent, scheduler=scheduler, sampler=sampler, steps=steps,
        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta, strength=strength,
        seed=seed, ctx=ctx, preview_every=preview_every, count_macs=count_macs,
    )


NODES = (sample_node,)
