"""EDICT: exact inversion of a real image into noise with coupled transformations, for editing.

EDICT (Wallace, Gokul and Naik, "EDICT: Exact Diffusion Inversion via Coupled Transformations",
CVPR 2023) keeps two latent sequences ``x`` and ``y`` that start equal and alternate which one
the noise prediction is taken from, then mixes them; every step is an affine map whose inverse is
known in closed form, so inverting and regenerating with the same prompt reproduces the input
latents up to float round-off (DDIM inversion only approximates it). With the DDIM coefficients
``a_t = √(ᾱ_prev / ᾱ_t)`` and ``b_t = √(1 − ᾱ_prev) − √(ᾱ_prev (1 − ᾱ_t) / ᾱ_t)`` and the mixing
parameter ``p`` (the paper uses 0.93), one denoising step ``t → prev`` is::

    x' = a_t·x + b_t·ε(y, t)          y' = a_t·y + b_t·ε(x', t)
    x_prev = p·x' + (1 − p)·y'        y_prev = p·y' + (1 − p)·x_prev

and the inversion step ``prev → t`` undoes it in reverse order::

    y' = (y_prev − (1 − p)·x_prev) / p      x' = (x_prev − (1 − p)·y') / p
    y  = (y' − b_t·ε(x', t)) / a_t          x  = (x' − b_t·ε(y, t)) / a_t

``ε`` is the guided noise prediction (classifier-free guidance with the conditioning's negative);
v- and x0-predicting models are converted to ``ε`` with the schedule's ``ᾱ_t``. Timesteps and
``ᾱ`` come from a DDIM scheduler built from the model's own scheduler configuration, the
previous timestep of ``t`` being ``t − T / steps`` as in DDIM (``ᾱ`` of the final step: the
scheduler's ``final_alpha_cumprod``).

**Zero terminal SNR.** Schedules rescaled to zero terminal SNR (the shipped shapes models, with
trailing timesteps) have ``ᾱ_T = 0`` at the first sampling timestep, where ``a_T`` is infinite
and EDICT is undefined. ``min_alpha_cumprod`` (default ``1e-4``) floors the ``ᾱ`` the
coefficients use — the same floor in inversion and generation, so the maps stay exact inverses;
the model is still told the true timestep, and ``ε`` is converted with the true ``ᾱ_t`` (at
``ᾱ_T = 0`` a v-prediction model's ``ε`` is the input itself). The inverted latents are then the
picture noised to ``ᾱ = 1e-4`` rather than to pure noise. A floor of 0 keeps the stored values
and is refused for such schedules.

**Strength.** Editing from the fully inverted noise lets the edited prompt redraw the whole
picture; ``strength`` below 1 inverts (and regenerates) only the last ``round(steps · strength)``
steps of the schedule — the least noisy ones, as img2img's strength — so an edit keeps more of
the picture (the paper edits from an intermediate step too). Inversion and generation must use
the same strength.

Step-hook patches (caches, for instance) change the model's output from call to call and are
refused: the inversion is exact only if every model call is. Module patches (LoRA, quantization,
merges) are fine: the same function is computed in both directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dagfusion import FLOAT, INT, Input, NodeInputError, Output, RunContext, node
from dagfusion.nodes.diffusion.types import CONDITIONING, LATENT, MODEL

DEFAULT_MIX = 0.93
DEFAULT_MIN_ALPHA_CUMPROD = 1e-4


@dataclass(frozen=True)
class Schedule:
    """The timesteps of a run and the ``ᾱ`` pair each step uses."""

    timesteps: tuple[int, ...]
    alpha: tuple[float, ...]
    alpha_prev: tuple[float, ...]
    prediction_type: str

    def last(self, count: int) -> Schedule:
        """The schedule's last ``count`` steps (the least noisy ones): editing from an intermediate step."""
        start = len(self.timesteps) - count
        return Schedule(self.timesteps[start:], self.alpha[start:], self.alpha_prev[start:], self.prediction_type)

    def floored(self, minimum: float) -> Schedule:
        """The schedule with every ``ᾱ`` raised to at least ``minimum`` (see the module docs)."""
        return Schedule(self.timesteps, tuple(max(a, minimum) for a in self.alpha),
                        tuple(max(a, minimum) for a in self.alpha_prev), self.prediction_type)

    def coefficients(self, index: int) -> tuple[float, float]:
        """``(a_t, b_t)`` of step ``index``."""
        at, prev = self.alpha[index], self.alpha_prev[index]
        a = math.sqrt(prev / at)
        b = math.sqrt(1.0 - prev) - math.sqrt(prev * (1.0 - at) / at)
        return a, b


def ddim_schedule(model: Any, steps: int, min_alpha_cumprod: float) -> Schedule:
    """The DDIM timesteps and ``ᾱ`` values of ``model``'s scheduler configuration (see the module docs).

    :raises ValueError: the model's scheduler is a flow-matching one (EDICT needs a VP schedule).
    """
    from diffusers import DDIMScheduler

    from dagfusion.nodes.diffusion.schedulers import is_flow_matching

    base = model.scheduler.create()
    if is_flow_matching(base):
        raise ValueError("EDICT inverts variance-preserving (DDPM/DDIM) schedules; this model uses flow matching")
    config = {k: v for k, v in dict(base.config).items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    cumprod = scheduler.alphas_cumprod.double()
    final = float(scheduler.final_alpha_cumprod)
    step_size = scheduler.config.num_train_timesteps // steps
    timesteps = [int(t) for t in scheduler.timesteps]
    alpha, alpha_prev = [], []
    for t in timesteps:
        prev = t - step_size
        alpha.append(float(cumprod[t]))
        alpha_prev.append(float(cumprod[prev]) if prev >= 0 else final)
    stored = Schedule(tuple(timesteps), tuple(alpha), tuple(alpha_prev), str(scheduler.config.prediction_type))
    return stored.floored(min_alpha_cumprod)


def _check_finite(schedule: Schedule) -> Schedule:
    """:raises ValueError: a step of ``schedule`` has ᾱ = 0, where EDICT's coefficients are infinite."""
    if min(schedule.alpha) <= 0.0:
        raise ValueError(
            "this model's schedule reaches ᾱ = 0 (zero terminal SNR) where EDICT's coefficient √(ᾱ_prev/ᾱ_t) is "
            "infinite; set min_alpha_cumprod above 0 (1e-4 is the default) or strength below 1"
        )
    return schedule


class _Epsilon:
    """The guided noise prediction ``ε(x, t)`` of a model under a conditioning."""

    def __init__(self, model: Any, conditioning: Any, shape: tuple[int, ...], guidance_scale: float, schedule: Schedule,
                 true_alpha: tuple[float, ...]) -> None:
        import torch

        from dagfusion.model import family_for
        from dagfusion.nodes.diffusion.sampling import module_dtype

        self.module = model.denoiser
        self.family = family_for(self.module)
        if self.family.video:
            raise ValueError("EDICT works on image latents (B, C, h, w); this is a video model")
        self.device = torch.device(model.device)
        self.dtype = module_dtype(self.module)
        self.cfg = guidance_scale > 1.0 and self.family.supports_cfg(self.module)
        self.scale = guidance_scale
        prepared = self.family.prepare(
            self.module, conditioning, batch=shape[0], cfg=self.cfg, device=self.device, dtype=self.dtype,
            latent_shape=shape, scale=model.vae_scale_factor, guidance_scale=guidance_scale,
        )
        self.kwargs, self.batches, self.concat = prepared.kwargs, prepared.batches, prepared.concat
        self.schedule = schedule
        self.true_alpha = true_alpha
        self.calls = 0

    def __call__(self, x: Any, index: int) -> Any:
        import torch

        t = torch.tensor(self.schedule.timesteps[index], device=self.device)
        model_input = torch.cat([x] * 2) if self.cfg else x
        model_input = model_input.to(self.dtype)
        if self.concat is not None:
            model_input = torch.cat([model_input, self.concat], dim=self.family.channel_dim)
        out = self.family.call(self.module, model_input, self.family.timestep(t, model_input.shape[0], self.device), self.kwargs)
        self.calls += 1
        out = self.family.combine(out, self.module, self.cfg, self.batches, self.scale, 0.0).to(x.dtype)
        # the model's true ᾱ_t converts v / x0 predictions (the floored one only shapes the coefficients)
        at = float(self.true_alpha[index])
        alpha, sigma = math.sqrt(at), math.sqrt(1.0 - at)
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            return out
        if kind == "v_prediction":
            return alpha * out + sigma * x
        if kind == "sample":
            return (x - alpha * out) / max(sigma, 1e-12)
        raise ValueError(f"EDICT cannot use prediction type {kind!r}")


def _refuse_step_hooks(model: Any) -> None:
    from dagfusion.model import ModelPatch

    hooked = [type(p).__name__ for p in model.patches if getattr(type(p), "begin", ModelPatch.begin) is not ModelPatch.begin]
    if hooked:
        raise ValueError(
            f"EDICT needs every model call to be exact and repeatable; the model carries step-hook patches "
            f"({', '.join(hooked)}: caches or schedules) that change outputs between calls — remove them for EDICT"
        )


def _prepare(model: Any, conditioning: Any, shape: tuple[int, ...], steps: int, guidance_scale: float,
             min_alpha_cumprod: float, strength: float = 1.0) -> _Epsilon:
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    _refuse_step_hooks(model)
    count = max(1, min(steps, round(steps * strength)))
    stored = ddim_schedule(model, steps, 0.0).last(count)  # the stored ᾱ: converts v / x0 predictions to ε
    schedule = _check_finite(stored.floored(min_alpha_cumprod))
    return _Epsilon(model, conditioning, shape, guidance_scale, schedule, stored.alpha)


def edict_invert(
    model: Any, conditioning: Any, latents: Any, *, steps: int = 50, mix: float = DEFAULT_MIX,
    guidance_scale: float = 1.0, min_alpha_cumprod: float = DEFAULT_MIN_ALPHA_CUMPROD, strength: float = 1.0,
    ctx: RunContext | None = None,
) -> tuple[Any, Any]:
    """``(x_T, y_T)``: the coupled noise latents that :func:`edict_generate` maps back to ``latents``.

    ``latents`` are clean latents in the denoiser's space (the VAE's encoding times its scaling factor).
    """
    import torch

    _check_mix(mix)
    x = latents.detach().to(torch.float64)
    with model.use(model.denoiser), torch.no_grad():
        from dagfusion.model import apply_patches

        with apply_patches(model.patches, model.denoiser):
            eps = _prepare(model, conditioning, tuple(latents.shape), steps, guidance_scale, min_alpha_cumprod, strength)
            x, y = x.to(eps.device), x.clone().to(eps.device)
            total = len(eps.schedule.timesteps)
            for done, index in enumerate(reversed(range(total))):
                if ctx is not None:
                    ctx.check_cancelled()
                a, b = eps.schedule.coefficients(index)
                y_inter = (y - (1 - mix) * x) / mix
                x_inter = (x - (1 - mix) * y_inter) / mix
                y = (y_inter - b * eps(x_inter.float(), index).double()) / a
                x = (x_inter - b * eps(y.float(), index).double()) / a
                if ctx is not None:
                    ctx.progress(done + 1, total)
    return x.float().cpu(), y.float().cpu()


def edict_generate(
    model: Any, conditioning: Any, x: Any, y: Any, *, steps: int = 50, mix: float = DEFAULT_MIX,
    guidance_scale: float = 1.0, min_alpha_cumprod: float = DEFAULT_MIN_ALPHA_CUMPROD, strength: float = 1.0,
    ctx: RunContext | None = None,
) -> tuple[Any, Any]:
    """``(x_0, y_0)`` from coupled noise latents: the inverse of :func:`edict_invert` for the same
    model, conditioning and settings; another conditioning edits the picture."""
    import torch

    _check_mix(mix)
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(f"the coupled latents must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    with model.use(model.denoiser), torch.no_grad():
        from dagfusion.model import apply_patches

        with apply_patches(model.patches, model.denoiser):
            eps = _prepare(model, conditioning, tuple(x.shape), steps, guidance_scale, min_alpha_cumprod, strength)
            x, y = x.to(eps.device, torch.float64), y.to(eps.device, torch.float64)
            total = len(eps.schedule.timesteps)
            for index in range(total):
                if ctx is not None:
                    ctx.check_cancelled()
                a, b = eps.schedule.coefficients(index)
                x_inter = a * x + b * eps(y.float(), index).double()
                y_inter = a * y + b * eps(x_inter.float(), index).double()
                x = mix * x_inter + (1 - mix) * y_inter
                y = mix * y_inter + (1 - mix) * x
                if ctx is not None:
                    ctx.progress(index + 1, total)
    return x.float().cpu(), y.float().cpu()


def ddim_invert(
    model: Any, conditioning: Any, latents: Any, *, steps: int = 50, guidance_scale: float = 1.0,
    min_alpha_cumprod: float = DEFAULT_MIN_ALPHA_CUMPROD, strength: float = 1.0, ctx: RunContext | None = None,
) -> Any:
    """Plain DDIM inversion (η = 0), the approximation EDICT makes exact: the noise latents that
    :func:`ddim_generate` maps *approximately* back to ``latents``.

    Each step ``prev → t`` runs DDIM's update backwards with the noise predicted at the *less*
    noisy latent, ``x_t = (x_prev − b_t·ε(x_prev, t)) / a_t`` (DDIM's own step uses ``ε(x_t, t)``,
    which is not known yet), with EDICT's schedule, coefficients, guidance, ``ᾱ`` floor and
    ``strength`` — so the two compare like for like. Same dtypes as EDICT (fp32 model calls, fp64
    updates).
    """
    import torch

    x = latents.detach().to(torch.float64)
    with model.use(model.denoiser), torch.no_grad():
        from dagfusion.model import apply_patches

        with apply_patches(model.patches, model.denoiser):
            eps = _prepare(model, conditioning, tuple(latents.shape), steps, guidance_scale, min_alpha_cumprod, strength)
            x = x.to(eps.device)
            total = len(eps.schedule.timesteps)
            for done, index in enumerate(reversed(range(total))):
                if ctx is not None:
                    ctx.check_cancelled()
                a, b = eps.schedule.coefficients(index)
                x = (x - b * eps(x.float(), index).double()) / a
                if ctx is not None:
                    ctx.progress(done + 1, total)
    return x.float().cpu()


def ddim_generate(
    model: Any, conditioning: Any, noise: Any, *, steps: int = 50, guidance_scale: float = 1.0,
    min_alpha_cumprod: float = DEFAULT_MIN_ALPHA_CUMPROD, strength: float = 1.0, ctx: RunContext | None = None,
) -> Any:
    """Deterministic DDIM sampling (η = 0) from ``noise`` with EDICT's schedule and coefficients,
    ``x_prev = a_t·x_t + b_t·ε(x_t, t)``: regenerates from :func:`ddim_invert`'s latents."""
    import torch

    with model.use(model.denoiser), torch.no_grad():
        from dagfusion.model import apply_patches

        with apply_patches(model.patches, model.denoiser):
            eps = _prepare(model, conditioning, tuple(noise.shape), steps, guidance_scale, min_alpha_cumprod, strength)
            x = noise.detach().to(eps.device, torch.float64)
            total = len(eps.schedule.timesteps)
            for index in range(total):
                if ctx is not None:
                    ctx.check_cancelled()
                a, b = eps.schedule.coefficients(index)
                x = a * x + b * eps(x.float(), index).double()
                if ctx is not None:
                    ctx.progress(index + 1, total)
    return x.float().cpu()


def _check_mix(mix: float) -> None:
    if not 0.0 < mix <= 1.0:
        raise ValueError(f"the mixing parameter p must be in (0, 1], got {mix}")


# --- nodes -------------------------------------------------------------------------------------

_SETTINGS = [
    Input("steps", INT, 50, min=1, max=1000, description="DDIM steps (the same for inversion and generation)."),
    Input("mix", FLOAT, DEFAULT_MIX, min=0.5, max=1.0,
          description="EDICT's mixing parameter p (0.93 in the paper); lower couples the two sequences more."),
    Input("guidance_scale", FLOAT, 1.0, min=0.0, max=100.0,
          description="Classifier-free guidance in both directions (1: none; inversion is exact for any value)."),
    Input("min_alpha_cumprod", FLOAT, DEFAULT_MIN_ALPHA_CUMPROD, min=0.0, max=0.5,
          description="Floor of ᾱ in the coefficients (zero-terminal-SNR schedules; 0 uses the stored values)."),
    Input("strength", FLOAT, 1.0, exclusive_min=0.0, max=1.0,
          description="Fraction of the schedule inverted (and regenerated): below 1 the picture is inverted to an "
                      "intermediate step, which keeps more of it in an edit."),
]


def _example_latents() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    parts = tiny.sd_handles()
    import torch

    from dagfusion.nodes.diffusion.data import Latent

    latent = Latent(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5)
    return {"model": parts["model"], "conditioning": parts["conditioning"], "latent": latent, "steps": 3, "mix": 0.93,
            "guidance_scale": 1.0, "min_alpha_cumprod": DEFAULT_MIN_ALPHA_CUMPROD, "strength": 1.0}


@node(
    "dagfusion.edit.EDICTInvert",
    version="1.0.0",
    category="edit",
    inputs=[
        Input("model", MODEL, link_only=True),
        Input("conditioning", CONDITIONING, link_only=True, description="The prompt that describes the picture."),
        Input("latent", LATENT, link_only=True, description="The picture's latents (VAE encode)."),
        *_SETTINGS,
    ],
    outputs=[Output("noise_x", LATENT, "The first coupled noise latent."),
             Output("noise_y", LATENT, "The second coupled noise latent.")],
    examples=[_example_latents],
)
def edict_invert_node(ctx: RunContext, model: Any, conditioning: Any, latent: Any, steps: int, mix: float,
                      guidance_scale: float, min_alpha_cumprod: float, strength: float) -> dict[str, Any]:
    """Invert a picture's latents exactly into EDICT's two coupled noise latents."""
    from dagfusion.nodes.diffusion.data import Latent

    if latent.samples.ndim != 4:
        raise NodeInputError("latent", f"expected image latents (B, C, h, w), got shape {tuple(latent.samples.shape)}")
    try:
        x, y = edict_invert(model, conditioning, latent.samples, steps=steps, mix=mix, guidance_scale=guidance_scale,
                            min_alpha_cumprod=min_alpha_cumprod, strength=strength, ctx=ctx)
    except ValueError as error:
        raise NodeInputError("model", str(error)) from error
    lineage = {**dict(latent.lineage), "edict": {"steps": steps, "mix": mix, "guidance_scale": guidance_scale,
                                                  "min_alpha_cumprod": min_alpha_cumprod, "strength": strength}}
    return {"noise_x": Latent(x, lineage), "noise_y": Latent(y, lineage)}


def _example_noise() -> dict[str, Any]:
    args = _example_latents()
    x, y = edict_invert(args["model"], args["conditioning"], args["latent"].samples, steps=3)
    from dagfusion.nodes.diffusion.data import Latent

    return {"model": args["model"], "conditioning": args["conditioning"], "noise_x": Latent(x), "noise_y": Latent(y),
            "steps": 3, "mix": 0.93, "guidance_scale": 1.0, "min_alpha_cumprod": DEFAULT_MIN_ALPHA_CUMPROD,
            "strength": 1.0}


@node(
    "dagfusion.edit.EDICTGenerate",
    version="1.0.0",
    category="edit",
    inputs=[
        Input("model", MODEL, link_only=True),
        Input("conditioning", CONDITIONING, link_only=True,
              description="The inversion's prompt reconstructs the picture; an edited prompt edits it."),
        Input("noise_x", LATENT, link_only=True),
        Input("noise_y", LATENT, link_only=True),
        *_SETTINGS,
    ],
    outputs=[Output("latent", LATENT, "The generated (reconstructed or edited) latents.")],
    examples=[_example_noise],
)
def edict_generate_node(ctx: RunContext, model: Any, conditioning: Any, noise_x: Any, noise_y: Any, steps: int,
                        mix: float, guidance_scale: float, min_alpha_cumprod: float, strength: float) -> Any:
    """Generate from EDICT's coupled noise latents (use the inversion's settings)."""
    from dagfusion.nodes.diffusion.data import Latent

    if tuple(noise_x.samples.shape) != tuple(noise_y.samples.shape):
        raise NodeInputError("noise_y", f"expected the shape of noise_x {tuple(noise_x.samples.shape)}, got "
                                        f"{tuple(noise_y.samples.shape)}; link both outputs of one EDICTInvert")
    try:
        x, _ = edict_generate(model, conditioning, noise_x.samples, noise_y.samples, steps=steps, mix=mix,
                              guidance_scale=guidance_scale, min_alpha_cumprod=min_alpha_cumprod, strength=strength,
                              ctx=ctx)
    except ValueError as error:
        raise NodeInputError("model", str(error)) from error
    return Latent(x, dict(noise_x.lineage))


NODES = (edict_invert_node, edict_generate_node)
"""EDICT's nodes, in palette order."""
