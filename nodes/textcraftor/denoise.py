"""The two ways TextCraftor turns prompt embeddings into a differentiable image.

Both use the model's own noise schedule and prediction type through a DDIM scheduler built from
the model handle's scheduler (``ε``, ``v`` or ``x0`` prediction; zero-terminal-SNR schedules
included), classifier-free guidance ``u + g·(c − u)`` with the unconditional embedding of ``""``
from the *same* (trained) encoder, and the frozen denoiser and VAE. The denoiser's inputs are
made by its sampler family (:meth:`~dagfusion.model.Family.prepare`, as in sampling), so UNets
and PixArt-style transformers (attention mask, resolution micro-conditions) are called alike:

- :func:`one_step_x0` (the *direct* variant): ``x̂0`` from one prediction at timestep ``t``::

      ε:  x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t
      v:  x̂0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v̂

- :func:`ddim_chain` (the *prompt-based* variant): a deterministic DDIM chain (η = 0) from noise,
  the first ``N − K`` steps without gradients and the last ``K`` with them, each denoiser call
  optionally gradient-checkpointed (activations recomputed in the backward pass).

:func:`decode` maps denoiser-space latents to images in [0, 1] through the VAE, differentiably
(optionally checkpointed too).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Denoiser:
    """The frozen denoiser with its schedule, bound for a training run.

    Attributes:
        module: The denoiser (UNet or transformer); its patches are applied by the caller.
        family: The sampler family adapter.
        scheduler: A DDIM scheduler over the model's schedule.
        dtype: The module's dtype (inputs are cast to it; outputs come back float32).
        guidance: Classifier-free guidance scale (≤ 1: the conditional prediction alone).
        autocast: Returns the autocast context of the run.
        kind: The conditioning kind the text inputs are (``"clip"``, ``"t5"``).
        scale: Pixels per latent pixel (micro-conditions of PixArt-size models).
    """

    module: Any
    family: Any
    scheduler: Any
    dtype: Any
    guidance: float
    autocast: Any
    kind: str = "clip"
    scale: int = 8

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.get("prediction_type", "epsilon"))

    def predict(self, sample: Any, t: Any, cond: dict[str, Any], uncond: dict[str, Any]) -> Any:
        """The guided prediction (float32) for ``sample`` at scalar timestep ``t``; ``cond`` and
        ``uncond`` are the denoiser's text inputs (``encoder_hidden_states`` …, one row per sample)."""
        import torch

        cfg = self.guidance > 1.0
        rows = sample.shape[0]
        prepared = self.family.prepare(
            self.module, _Texts(self.kind, cond, uncond), batch=rows, cfg=cfg, device=sample.device,
            dtype=self.dtype, latent_shape=tuple(sample.shape), scale=self.scale, guidance_scale=self.guidance,
        )
        x = torch.cat([sample, sample]) if cfg else sample
        if prepared.concat is not None:
            x = torch.cat([x, prepared.concat.to(x.device, x.dtype)], dim=self.family.channel_dim)
        timestep = self.family.timestep(t, x.shape[0], sample.device)
        with self.autocast():
            out = self.family.call(self.module, x.to(self.dtype), timestep, prepared.kwargs)
        return self.family.combine(out.float(), self.module, cfg, prepared.batches, self.guidance, 0.0)


@dataclass
class _Texts:
    """A conditioning (``ConditioningLike``) made of the trained encoder's outputs."""

    kind: str
    positive: dict[str, Any]
    negative: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


def make_scheduler(model: Any) -> Any:
    """A DDIM scheduler with the model's training schedule and prediction type.

    :raises ValueError: the model samples by flow matching (TextCraftor needs a noise schedule).
    """
    from dagfusion.nodes.diffusion.schedulers import is_flow_matching, spec_for

    scheduler = spec_for(model.scheduler, "ddim").create()
    if is_flow_matching(scheduler) or scheduler.config.get("prediction_type") not in ("epsilon", "v_prediction", "sample"):
        raise ValueError("TextCraftor needs a model with an ε-, v- or x0-prediction noise schedule, not flow matching")
    return scheduler


def x0_from(prediction: Any, x_t: Any, abar: Any, prediction_type: str) -> Any:
    """The clean sample implied by ``prediction`` at ``x_t`` (``abar``: ᾱ_t per row, ``(B,)``)."""
    a = abar.to(x_t.device, torch_float()).reshape(-1, *([1] * (x_t.ndim - 1)))
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * prediction
    if prediction_type == "sample":
        return prediction
    return (x_t - (1 - a).sqrt() * prediction) / a.clamp_min(1e-6).sqrt()


def torch_float() -> Any:
    import torch

    return torch.float32


def one_step_x0(den: Denoiser, x0: Any, noise: Any, t: Any, cond: Any, uncond: Any) -> Any:
    """Noise ``x0`` to timestep ``t`` (one integer for the batch) and predict ``x̂0`` in one step."""
    abar = den.scheduler.alphas_cumprod[t].to(torch_float()).expand(x0.shape[0])
    a = abar.to(x0.device).reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    prediction = den.predict(x_t, t.to(x0.device), cond, uncond)
    return x0_from(prediction, x_t, abar, den.prediction_type)


def ddim_chain(den: Denoiser, noise: Any, steps: int, grad_steps: int, cond: Any, uncond: Any,
               checkpointing: bool = True) -> Any:
    """Run ``steps`` DDIM steps (η = 0) from ``noise``; gradients flow through the last ``grad_steps``."""
    import torch
    from torch.utils.checkpoint import checkpoint

    sched = den.scheduler
    sched.set_timesteps(steps, device=noise.device)
    latents = noise * getattr(sched, "init_noise_sigma", 1.0)
    first_grad = steps - grad_steps
    for i, t in enumerate(sched.timesteps):
        tracked = i >= first_grad and torch.is_grad_enabled()
        with contextlib.nullcontext() if tracked else torch.no_grad():
            if tracked and checkpointing:
                prediction = checkpoint(den.predict, latents, t, cond, uncond, use_reentrant=False)
            else:
                prediction = den.predict(latents, t, cond, uncond)
            latents = sched.step(prediction, t, latents, eta=0.0, return_dict=False)[0]
    return latents


def decode(vae: Any, latents: Any, checkpointing: bool = False) -> Any:
    """Images ``(B, 3, H, W)`` in [0, 1] (float32) from denoiser-space ``latents``, differentiably."""
    from torch.utils.checkpoint import checkpoint

    from dagfusion.nodes.diffusion.vae import to_vae_space

    module = vae.module
    dtype = next(module.parameters()).dtype

    def run(z: Any) -> Any:
        return module.decode(to_vae_space(module, z).to(dtype)).sample.float()

    pixels = checkpoint(run, latents, use_reentrant=False) if checkpointing and latents.requires_grad else run(latents)
    return (pixels / 2 + 0.5).clamp(0, 1)
