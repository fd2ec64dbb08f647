"""EDM training of Stable-Video-Diffusion-layout video UNets, and the pieces SF-V shares with it.

Stable Video Diffusion (SVD) is trained in the EDM formulation (Karras et al. 2022) with a
v-prediction network, exactly what diffusers' ``EulerDiscreteScheduler`` with
``prediction_type="v_prediction"`` and ``timestep_type="continuous"`` samples. With the data
standard deviation ``σ_data = 1``, a noisy latent ``x_σ = x0 + σ·ε`` and the network ``F``:

- input scaling ``c_in(σ) = 1 / √(σ² + 1)`` (the scheduler's ``scale_model_input``);
- noise conditioning ``c_noise(σ) = 0.25 · ln σ`` (the scheduler's continuous timesteps);
- denoised estimate ``D(x_σ; σ) = c_skip·x_σ + c_out·F(c_in·x_σ, c_noise)`` with
  ``c_skip = 1 / (σ² + 1)`` and ``c_out = −σ / √(σ² + 1)`` (the scheduler's
  ``pred_original_sample`` for v-prediction);
- loss ``λ(σ)·‖D(x_σ; σ) − x0‖²`` with ``λ(σ) = (σ² + 1) / σ²``, ``ln σ ~ N(P_mean, P_std²)``.

The video UNet is conditioned on its first frame as SVD samples it
(:func:`~dagfusion.nodes.video.svd.svd_conditioning`): the CLIP image embedding of the first
frame, the VAE latent (the posterior's mode, unscaled) of the first frame plus
``noise_aug_strength`` times Gaussian noise, concatenated to the noisy latents along channels,
and the micro-conditions ``(fps − 1, motion_bucket_id, noise_aug_strength)``. During training
the augmentation strength is drawn per clip (``ln s ~ N(aug_p_mean, aug_p_std²)``) and the image
conditions of a clip are zeroed with probability ``condition_dropout`` (the unconditional half
classifier-free guidance uses).

**Training loop.** The shared loop (:mod:`~dagfusion.nodes.training.loop`) drives this
objective through its batch seam: ``batch_inputs(examples, *, vae, encoder, device, generator)``
builds the clean latents and the ``svd`` conditioning from the raw examples (clips
``(B, F, 3, H, W)``, the first frame as the condition) and returns
:class:`~dagfusion.nodes.training.objectives.BatchInputs`; the loop binds that conditioning
through the model family, whose channel-concatenated image latents the
:class:`~dagfusion.nodes.training.objectives.ModelCall` appends to every sample.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dagfusion import FLOAT, INT, Input, Output, RunContext, node
from dagfusion.nodes.training.objectives import (
    BatchInputs,
    ModelCall,
    Objective,
    TrainBatch,
    TrainStep,
)

SVD_P_MEAN = 0.7
"""SVD's image-to-video training ``P_mean`` (``ln σ`` mean); EDM's own default is −1.2."""
SVD_P_STD = 1.6
"""SVD's image-to-video training ``P_std``; EDM's own default is 1.2."""
SIGMA_MIN = 0.002
SIGMA_MAX = 700.0
"""SVD's sampling range (its scheduler's ``sigma_min`` / ``sigma_max``)."""


# --- EDM preconditioning ------------------------------------------------------------------------


def edm_sigmas(batch: int, generator: Any, p_mean: float = SVD_P_MEAN, p_std: float = SVD_P_STD) -> Any:
    """``batch`` noise levels with ``ln σ ~ N(p_mean, p_std²)``, drawn from ``generator`` (float32, CPU)."""
    import torch

    return torch.exp(p_mean + p_std * torch.randn((batch,), generator=generator, dtype=torch.float32))


@dataclass(frozen=True)
class Preconditioning:
    """The EDM coefficients of one set of noise levels, each ``(B,)`` (see the module docstring)."""

    c_skip: Any
    c_out: Any
    c_in: Any
    c_noise: Any


def precondition(sigma: Any) -> Preconditioning:
    """EDM v-prediction coefficients with ``σ_data = 1`` for ``sigma`` ``(B,)`` (a tensor; float32).

    They equal diffusers' ``EulerDiscreteScheduler`` (``v_prediction``, continuous timesteps):
    ``c_in = 1/√(σ²+1)``, ``c_skip = 1/(σ²+1)``, ``c_out = −σ/√(σ²+1)``, ``c_noise = 0.25·ln σ``.
    """
    import torch

    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    total = sigma**2 + 1.0
    return Preconditioning(c_skip=1.0 / total, c_out=-sigma / total.sqrt(), c_in=1.0 / total.sqrt(),
                           c_noise=0.25 * sigma.log())


def loss_weight(sigma: Any) -> Any:
    """EDM's loss weight ``(σ² + 1) / σ²`` (``σ_data = 1``)."""
    return (sigma**2 + 1.0) / sigma**2


def rows(values: Any, like: Any) -> Any:
    """``values`` ``(B,)`` shaped to broadcast over ``like`` ``(B, ...)`` (its device and dtype)."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=like.dtype)


def denoise(network: Callable[[Any, Any], Any], x_noisy: Any, sigma: Any) -> Any:
    """``D(x_σ; σ) = c_skip·x_σ + c_out·network(c_in·x_σ, c_noise)`` — the denoised estimate.

    ``network(sample, timesteps)`` is the raw v-prediction (a :class:`VideoModelCall`, say);
    ``sigma`` is ``(B,)``.
    """
    pre = precondition(sigma)
    out = network(x_noisy * rows(pre.c_in, x_noisy), pre.c_noise.to(x_noisy.device))
    return rows(pre.c_skip, x_noisy) * x_noisy + rows(pre.c_out, x_noisy) * out.float()


# --- the model call with concatenated latents --------------------------------------------------


VideoModelCall = ModelCall
"""A model call with ``concat`` (the image latents appended to every sample): the training loop's
own :class:`~dagfusion.nodes.training.objectives.ModelCall`."""


def svd_model_call(module: Any, conditioning: Any, shape: tuple[int, ...], *, autocast: Any = None) -> VideoModelCall:
    """A :class:`VideoModelCall` of ``module`` (an SVD-layout video UNet) bound to ``conditioning``
    (kind ``"svd"``) for latents of ``shape`` ``(B, F, C, h, w)``, without guidance, in float32."""
    import contextlib

    import torch
    from dagfusion.model import family_for

    family = family_for(module)
    param = next(module.parameters())
    prepared = family.prepare(module, conditioning, batch=int(shape[0]), cfg=False, device=param.device,
                              dtype=torch.float32, latent_shape=tuple(shape), scale=1, guidance_scale=1.0)
    return VideoModelCall(module, family, prepared.kwargs, autocast or contextlib.nullcontext, concat=prepared.concat)


# --- clips to latents and first-frame conditioning ---------------------------------------------


def clips_tensor(examples: Any) -> Any:
    """The clips ``(B, F, 3, H, W)`` in ``[0, 1]`` of a batch: a tensor, or an object/mapping with
    ``clips`` or ``images`` of that shape.

    :raises ValueError: not a batch of clips.
    """
    value = examples
    for name in ("clips", "images"):
        if isinstance(examples, Mapping) and name in examples:
            value = examples[name]
            break
        if hasattr(examples, name) and not hasattr(examples, "ndim"):
            value = getattr(examples, name)
            break
    shape = tuple(getattr(value, "shape", ()))
    if getattr(value, "ndim", None) != 5 or shape[2] != 3:
        raise ValueError(f"expected RGB clips (B, F, 3, H, W) in [0, 1], got shape {shape}")
    return value


def encode_clips(vae: Any, clips: Any, generator: Any | None = None, *, device: Any = None) -> Any:
    """Latents ``(B, F, C, h, w)`` (times the VAE's scaling factor, float32) of clips in ``[0, 1]``.

    With ``generator`` the posterior is sampled from it; without, its mode is taken.
    """
    import torch

    module = vae.module
    batch, frames = int(clips.shape[0]), int(clips.shape[1])
    with vae.patched(module), torch.no_grad():
        param = next(module.parameters())
        pixels = clips.flatten(0, 1).to(device=param.device, dtype=param.dtype) * 2.0 - 1.0
        dist = module.encode(pixels).latent_dist
        if generator is None:
            z = dist.mode()
        else:
            noise = torch.randn(tuple(dist.mean.shape), generator=generator, dtype=torch.float32)
            z = dist.mean + dist.std * noise.to(device=dist.mean.device, dtype=dist.mean.dtype)
    z = z.float() * float(module.config.scaling_factor)
    z = z.reshape(batch, frames, *z.shape[1:])
    return z.to(device) if device is not None else z


def first_frame_conditioning(
    image_encoder: Any,
    vae: Any,
    first: Any,
    *,
    noise: Any,
    noise_aug: Any,
    fps: int,
    motion_bucket_id: int | Any,
    drop: Any = None,
) -> Any:
    """The ``svd`` conditioning of first frames ``first`` ``(B, 3, H, W)`` in ``[0, 1]``.

    ``motion_bucket_id`` is one id for every row or one per row (a sequence or ``(B,)`` tensor).

    As :func:`~dagfusion.nodes.video.svd.svd_conditioning` with one augmentation strength per row
    (``noise_aug`` ``(B,)``) and the augmentation ``noise`` ``(B, 3, H, W)`` given; rows where
    ``drop`` ``(B,)`` is true get zero image embeddings and zero image latents (what guidance's
    unconditional half is).
    """
    import torch
    from dagfusion.nodes.diffusion.data import Conditioning
    from dagfusion.nodes.video.svd import image_embeddings

    embeds = image_embeddings(image_encoder, first)
    pixels = first.float() * 2.0 - 1.0
    pixels = pixels + noise_aug.float().view(-1, 1, 1, 1) * noise.float()
    module = vae.module
    param = next(module.parameters())
    with vae.patched(module), torch.no_grad():
        latents = module.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist.mode()
    latents = latents.to(embeds.dtype).cpu()
    embeds = embeds.cpu()
    if drop is not None:
        keep = (~drop.bool()).to(embeds.dtype)
        embeds = embeds * keep.view(-1, 1, 1)
        latents = latents * keep.view(-1, 1, 1, 1)
    buckets = torch.as_tensor(motion_bucket_id, dtype=torch.float32)
    buckets = buckets.expand(noise_aug.shape[0]) if buckets.ndim == 0 else buckets.reshape(-1)
    if buckets.shape[0] != noise_aug.shape[0]:
        raise ValueError(f"expected one motion bucket id or {int(noise_aug.shape[0])}, got {int(buckets.shape[0])}")
    ids = torch.stack([
        torch.full_like(noise_aug.float(), float(fps - 1)),
        buckets,
        noise_aug.float(),
    ], dim=1).to(embeds.dtype)
    return Conditioning("svd", {"encoder_hidden_states": embeds, "image_latents": latents.unsqueeze(1),
                                "added_time_ids": ids}, None,
                        meta={"fps": int(fps), "motion_bucket_id": [float(b) for b in buckets.tolist()]})


VideoBatchInputs = BatchInputs
"""What :meth:`EDMVideoObjective.batch_inputs` returns: the clean latents ``x0`` ``(B, F, C, h, w)``
and the ``svd`` conditioning (the loop's :class:`~dagfusion.nodes.training.objectives.BatchInputs`)."""


# --- the objective -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EDMVideoObjective(Objective):
    """EDM denoising loss of an SVD-layout video UNet conditioned on its first frame.

    Attributes:
        p_mean, p_std: ``ln σ ~ N(p_mean, p_std²)`` (SVD's image-to-video values by default).
        aug_p_mean, aug_p_std: ``ln s ~ N(aug_p_mean, aug_p_std²)`` for the first frame's noise
            augmentation strength ``s`` (SVD's conditioning-augmentation distribution).
        fps, motion_bucket_id: The micro-conditions given with every clip (a data source whose raw
            batches carry ``motion_bucket_ids``, like the shapes-video world, gives one per clip).
        condition_dropout: Probability of zeroing a clip's image embedding and image latents.
    """

    name = "edm_video"
    p_mean: float = SVD_P_MEAN
    p_std: float = SVD_P_STD
    aug_p_mean: float = -3.0
    aug_p_std: float = 0.5
    fps: int = 7
    motion_bucket_id: int = 127
    condition_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.p_std < 0 or self.aug_p_std < 0:
            raise ValueError(f"p_std and aug_p_std must be ≥ 0, got {self.p_std} and {self.aug_p_std}")
        if not 0.0 <= self.condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1], got {self.condition_dropout}")
        if self.fps < 1:
            raise ValueError(f"fps must be at least 1, got {self.fps}")

    def describe(self) -> dict[str, Any]:
        return {
            "objective": self.name, "prediction": "v_prediction", "preconditioning": "edm (sigma_data=1)",
            "sigmas": f"ln sigma ~ N({self.p_mean}, {self.p_std}^2)", "weight": "(sigma^2+1)/sigma^2",
            "noise_aug": f"ln s ~ N({self.aug_p_mean}, {self.aug_p_std}^2)", "fps": self.fps,
            "motion_bucket_id": self.motion_bucket_id, "condition_dropout": self.condition_dropout,
        }

    def key(self) -> str:
        cls = type(self)
        return f"{cls.__module__}.{cls.__qualname__}:" + json.dumps(self.describe(), sort_keys=True)

    def batch_inputs(self, examples: Any, *, vae: Any, encoder: Any, device: Any, generator: Any) -> VideoBatchInputs:
        """Clean latents and first-frame conditioning of a batch of clips (the loop seam, part 1).

        ``examples``: clips ``(B, F, 3, H, W)`` in ``[0, 1]`` (see :func:`clips_tensor`); ``vae``:
        the frozen VAE handle; ``encoder``: the frozen image encoder (``CLIP_VISION``) handle. All
        draws (posterior samples, augmentation strengths and noise, dropout) come from ``generator``.
        """
        import torch

        clips = clips_tensor(examples).float()
        batch = int(clips.shape[0])
        x0 = encode_clips(vae, clips, generator, device=device)
        aug = torch.exp(self.aug_p_mean + self.aug_p_std * torch.randn((batch,), generator=generator))
        noise = torch.randn(tuple(clips[:, 0].shape), generator=generator)
        drop = torch.rand((batch,), generator=generator) < self.condition_dropout
        raw = getattr(examples, "raw", None)
        buckets = getattr(raw, "motion_bucket_ids", None)  # data that knows each clip's motion (shapes-video)
        cond = first_frame_conditioning(encoder, vae, clips[:, 0], noise=noise, noise_aug=aug, fps=self.fps,
                                        motion_bucket_id=self.motion_bucket_id if buckets is None else list(buckets),
                                        drop=drop)
        return VideoBatchInputs(x0, cond)

    def loss(self, model_call: ModelCall, batch: TrainBatch, step: TrainStep, generator: Any) -> tuple[Any, dict[str, float]]:
        """``mean(λ(σ)·(D(x0 + σε; σ) − x0)²)`` with ``σ`` and ``ε`` from ``generator``.

        ``model_call`` must be bound to the batch's conditioning (a :class:`VideoModelCall`).
        """
        import torch

        x0 = batch.x0
        if x0.ndim != 5:
            raise ValueError(f"expected video latents (B, F, C, h, w), got shape {tuple(x0.shape)}")
        sigma = edm_sigmas(int(x0.shape[0]), generator, self.p_mean, self.p_std)
        noise = torch.randn(tuple(x0.shape), generator=generator, dtype=torch.float32).to(x0.device)
        x_noisy = x0 + rows(sigma, x0) * noise
        denoised = denoise(model_call, x_noisy, sigma)
        per_row = ((denoised - x0) ** 2).flatten(1).mean(1)
        loss = (loss_weight(sigma).to(x0.device) * per_row).mean()
        return loss, {"sigma_mean": float(sigma.mean()), "denoise_mse": float(per_row.detach().mean())}

    def sampling_scheduler(self, base: Any) -> Any:
        """SVD's Euler scheduler (v-prediction, continuous timesteps, Karras sigmas 0.002 … 700)."""
        from dagfusion.nodes.diffusion.data import SchedulerSpec

        return SchedulerSpec("EulerDiscreteScheduler", svd_scheduler_config())


def svd_scheduler_config() -> dict[str, Any]:
    """The scheduler configuration an EDM-trained SVD-layout UNet samples with (SVD's own)."""
    return {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "interpolation_type": "linear",
        "prediction_type": "v_prediction", "sigma_max": SIGMA_MAX, "sigma_min": SIGMA_MIN, "steps_offset": 1,
        "timestep_spacing": "leading", "timestep_type": "continuous", "use_karras_sigmas": True,
    }


def check_finite(value: float, what: str, step: int) -> None:
    """:raises FloatingPointError: ``value`` is not finite (naming ``what`` and the 1-based step)."""
    if not math.isfinite(value):
        raise FloatingPointError(f"the {what} became {value} at step {step}; lower the learning rate or clip gradients")


@node(
    "dagfusion.video.EDMObjective",
    version="1.0.0",
    category="training/objectives",
    inputs=[
        Input("p_mean", FLOAT, SVD_P_MEAN, min=-10.0, max=10.0,
              description="Mean of ln sigma (SVD's image-to-video 0.7; EDM's own -1.2)."),
        Input("p_std", FLOAT, SVD_P_STD, min=0.0, max=10.0, description="Standard deviation of ln sigma (SVD's 1.6)."),
        Input("aug_p_mean", FLOAT, -3.0, min=-20.0, max=5.0,
              description="Mean of ln s, s the first frame's noise-augmentation strength drawn per clip."),
        Input("aug_p_std", FLOAT, 0.5, min=0.0, max=10.0, description="Standard deviation of ln s."),
        Input("fps", INT, 7, min=1, max=120, description="Frames-per-second micro-condition of every clip."),
        Input("motion_bucket_id", INT, 127, min=0, max=1023,
              description="Motion micro-condition of every clip, unless the data gives one per clip (shapes-video does)."),
        Input("condition_dropout", FLOAT, 0.1, min=0.0, max=1.0,
              description="Probability of zeroing a clip's image conditions (what guidance's unconditional half is)."),
    ],
    outputs=[Output("objective", "OBJECTIVE", "The EDM loss of an SVD-layout video UNet conditioned on its first frame.")],
    examples=[{}],
)
def edm_objective_node(ctx: RunContext, p_mean: float, p_std: float, aug_p_mean: float, aug_p_std: float, fps: int,
                       motion_bucket_id: int, condition_dropout: float) -> EDMVideoObjective:
    """EDM training of an image-to-video UNet as Stable Video Diffusion is trained (v-prediction, σ_data = 1).

    Link it to ``dagfusion.train.Train`` with clips as data (``dagfusion.video.ShapesClips``) and the
    image encoder (``CLIP_VISION``) in the ``clip`` input; the trained model samples with SVD's Euler scheduler.
    """
    return EDMVideoObjective(p_mean=p_mean, p_std=p_std, aug_p_mean=aug_p_mean, aug_p_std=aug_p_std, fps=fps,
                             motion_bucket_id=motion_bucket_id, condition_dropout=condition_dropout)


NODES: tuple[Any, ...] = (edm_objective_node,)
