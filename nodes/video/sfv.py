"""SF-V: one forward pass of a video UNet makes the whole clip (Zhang et al., NeurIPS 2024).

SF-V fine-tunes a Stable-Video-Diffusion-layout image-to-video UNet adversarially, in latent
space, so that a single evaluation of the network at the largest noise level gives the clip:

- **Generator** ``G``: initialised from the multi-step UNet, all of it trained. It is used as an
  EDM denoiser (:func:`~dagfusion.nodes.video.edm.denoise`: v-prediction, ``σ_data = 1``) at one
  fixed noise level ``σ_G`` (default 700, SVD's ``σ_max``): ``x̂0 = D_G(x0 + σ_G·ε; σ_G, c)``.
- **Discriminator** (:class:`Discriminator`): a frozen copy of the *initial* UNet's encoder
  (``conv_in``, time and micro-condition embeddings, down blocks, mid block) with trainable
  heads on the features after every down block and after the mid block — a *spatial* head per
  frame (2-D convolutions over ``(B·F, C, h, w)``) and a *temporal* head per spatial location
  (1-D convolutions over the frames of ``(B·h·w, C, F)``), both conditioned by projection on
  the first frame's image embedding and on the frame index.
- **Re-noising**: real latents ``x0`` and generated ``x̂0`` are noised at ``σ'`` with
  ``ln σ' ~ N(P_mean, P_std²)`` (default ``P_mean = −1``, ``P_std = 1``) and
  preconditioned (``c_in(σ')``, ``c_noise(σ')``) before the discriminator.
- **First-frame conditioning**: generator and discriminator both get the clip's image
  conditioning as SVD does — the first frame's CLIP embedding (cross-attention), its noise-
  augmented VAE latent concatenated to the input along channels, and the micro-conditions.
- **Losses**: generator ``λ_recon·L_recon(x̂0, x0) + λ_adv·(−mean D(x̂0 + σ'ε'))`` with the
  pseudo-Huber reconstruction ``√(mse + c²) − c`` per clip; discriminator hinge
  ``mean(relu(1 − D(real))) + mean(relu(1 + D(fake)))``. One generator update then one
  discriminator update per step (:func:`sfv_step`).

The trained model is one-step: its handle carries a :class:`OneStepPatch` (and ``info["one_step"]``)
that refuses any sampling run of more than one step, or whose first noise level is not ``σ_G``.
Sampling (:func:`one_step_sample`, node ``dagfusion.video.SampleOneStep``) runs the shared sampler
for one Euler step on SVD's scheduler with ``sigma_max = σ_G``: the noise ``ε·√(σ_G²+1)`` goes
through exactly the preconditioning used in training, and the Euler step to σ = 0 returns the
denoised estimate ``D_G``. ``SampleVideo`` with ``steps=1`` and no guidance is the same run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dagfusion import (
    BOOLEAN,
    FLOAT,
    INT,
    PATH,
    SEED,
    Input,
    NodeInputError,
    Output,
    RunContext,
    SocketType,
    node,
    union,
)
from dagfusion.model import ModelPatch
from dagfusion.nodes.diffusion.types import (
    CONDITIONING,
    LATENT,
    MODEL,
    RUN_REPORT,
    VAE,
    VIDEO,
)
from dagfusion.nodes.video.edm import SIGMA_MAX

TYPE_ID = "dagfusion.video.TrainSFV"
VERSION = "1.0.0"
RECENT = 10
"""Reported losses are means over the last this-many steps."""

VIDEO_CLIPS = SocketType(
    "VIDEO_CLIPS",
    python_types=("dagfusion.nodes.video.sfv.VideoClips",),
    description="A source of training clips: clips(first, count) -> (count, F, 3, H, W) in [0, 1], addressed by index.",
    color="#80deea",
)
TYPES: tuple[SocketType, ...] = (VIDEO_CLIPS,)


# --- training clips ------------------------------------------------------------------------------


class VideoClips:
    """A source of training clips (the ``VIDEO_CLIPS`` socket type).

    ``clips(first, count)`` returns clips ``first … first + count − 1`` of an endless stream as a
    float tensor ``(count, F, 3, H, W)`` in ``[0, 1]``; the same index always gives the same clip,
    so step ``s`` with batch size ``B`` reads clips ``s·B … s·B + B − 1`` and a resumed run needs no
    data state. Subclasses define ``clips`` and ``__dagfusion_fingerprint__`` (their identity).
    """

    def clips(self, first: int, count: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement clips(first, count)")

    def describe(self) -> dict[str, Any]:
        """Plain data about the source (written into checkpoints)."""
        return {"source": type(self).__name__}

    def __dagfusion_fingerprint__(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} must define __dagfusion_fingerprint__ (its identity)")


class ClipSet(VideoClips):
    """A fixed set of clips ``(N, F, 3, H, W)`` repeated endlessly: clip ``i`` is ``order[i mod N]``
    with a new seeded permutation every pass (``shuffle``), or in order."""

    def __init__(self, clips: Any, *, seed: int = 0, shuffle: bool = True) -> None:
        if getattr(clips, "ndim", None) != 5 or clips.shape[2] != 3:
            raise ValueError(f"expected clips (N, F, 3, H, W), got shape {tuple(getattr(clips, 'shape', ()))}")
        if clips.shape[0] == 0:
            raise ValueError("got no clips")
        self.data = clips.detach().float().cpu()
        self.seed = int(seed)
        self.shuffle = bool(shuffle)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def _index(self, i: int) -> int:
        import torch

        epoch, position = divmod(i, len(self))
        if not self.shuffle:
            return position
        return int(torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed * 10_007 + epoch))[position])

    def clips(self, first: int, count: int) -> Any:
        return self.data[[self._index(first + k) for k in range(count)]]

    def describe(self) -> dict[str, Any]:
        return {"source": "clips", "count": len(self), "frames": int(self.data.shape[1]), "shuffle": self.shuffle,
                "seed": self.seed}

    def __dagfusion_fingerprint__(self) -> str:
        from dagfusion.fingerprint import fingerprint

        return "clips:" + str(fingerprint({"clips": self.data, "seed": self.seed, "shuffle": self.shuffle}))


def clip_buckets(source: Any, first: int, count: int) -> list[int] | None:
    """Each clip's motion bucket id when the source knows them (``motion_bucket_ids(first, count)``,
    as the shapes-video world does), else ``None`` (the configured id for every clip)."""
    known = getattr(source, "motion_bucket_ids", None)
    return [int(b) for b in known(first, count)] if callable(known) else None


def as_video_clips(value: Any) -> VideoClips:
    """``value`` as a :class:`VideoClips`: itself, or a ``VIDEO`` tensor ``(N, F, 3, H, W)`` as a
    :class:`ClipSet` in order.

    :raises TypeError: neither.
    """
    if isinstance(value, VideoClips):
        return value
    if getattr(value, "ndim", None) == 5:
        return ClipSet(value, shuffle=False)
    raise TypeError(f"expected training clips (a VideoClips source or a VIDEO tensor (N, F, 3, H, W)), got {type(value).__name__}")


# --- the discriminator ---------------------------------------------------------------------------


def _projection(hidden: Any, proj: Any) -> Any:
    """Projection-discriminator term ``<hidden, proj>`` over channels (dim 1), scaled by 1/√channels."""
    return (hidden * proj).sum(1, keepdim=True) / math.sqrt(hidden.shape[1])


def _heads(channels: int, hidden: int, cond_dim: int, frames: int, kind: str) -> Any:
    from torch import nn

    conv = nn.Conv2d if kind == "spatial" else nn.Conv1d
    head = nn.Module()
    head.norm = nn.GroupNorm(math.gcd(32, channels), channels)
    head.conv = conv(channels, hidden, 3, padding=1)
    head.out = conv(hidden, 1, 1)
    head.cond = nn.Linear(cond_dim, hidden)
    head.frame = nn.Embedding(frames, hidden)
    return head


class Discriminator:
    """SF-V's discriminator: a frozen copy of a video UNet's encoder with trainable spatial and
    temporal heads on its features (see the module docstring). Built lazily as a torch module by
    :func:`build_discriminator`; this class only names the contract.

    ``forward(x_noisy, sigma, inputs)`` takes re-noised latents ``(B, F, C, h, w)``, their noise
    levels ``(B,)`` and the bound conditioning (:class:`DiscriminatorInputs`) and returns one logit
    tensor ``(B, n_i)`` per head, spatial heads first then temporal, shallow to deep.
    ``head_parameters()`` are the trainable parameters; ``encoder`` holds the frozen copy.
    """


@dataclass(frozen=True)
class DiscriminatorInputs:
    """The conditioning a discriminator call binds: ``encoder_hidden_states`` ``(B, 1, D)``,
    ``added_time_ids`` ``(B, 3)`` and the image latents ``concat`` ``(B, F, C', h, w)``."""

    encoder_hidden_states: Any
    added_time_ids: Any
    concat: Any


def build_discriminator(unet: Any, *, hidden: int = 64, frames: int | None = None) -> Any:
    """A :class:`Discriminator` module over a frozen copy of ``unet``'s encoder (``unet`` itself
    is not changed), float32, on ``unet``'s device. ``hidden``: the heads' width; ``frames``: the
    most frames the heads' frame-index embedding knows (default the UNet's ``num_frames``)."""
    import torch
    import torch.nn.functional as F
    from dagfusion.model import unwrap_compiled
    from dagfusion.nodes.video.edm import precondition, rows
    from torch import nn

    source = unwrap_compiled(unet)
    config = source.config
    if "UNetSpatioTemporalConditionModel" not in {c.__name__ for c in type(source).__mro__}:
        raise TypeError(f"expected a video UNet (UNetSpatioTemporalConditionModel), got {type(source).__name__}")
    channels = [int(c) for c in config.block_out_channels]
    feature_channels = [*channels, channels[-1]]
    cond_dim = int(config.cross_attention_dim)
    max_frames = int(frames or getattr(config, "num_frames", 25))
    device = next(source.parameters()).device

    class _Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name in ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding", "down_blocks",
                         "mid_block"):
                setattr(self, name, copy.deepcopy(getattr(source, name)))

        def forward(self, sample: Any, c_noise: Any, ehs: Any, ids: Any) -> list[Any]:
            batch, count = int(sample.shape[0]), int(sample.shape[1])
            emb = self.time_embedding(self.time_proj(c_noise.reshape(-1).expand(batch)).to(sample.dtype))
            extra = self.add_time_proj(ids.flatten()).reshape(batch, -1).to(emb.dtype)
            emb = (emb + self.add_embedding(extra)).repeat_interleave(count, dim=0)
            ehs = ehs.repeat_interleave(count, dim=0)
            hidden = self.conv_in(sample.flatten(0, 1))
            indicator = torch.zeros(batch, count, dtype=hidden.dtype, device=hidden.device)
            features = []
            for block in self.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    hidden, _ = block(hidden_states=hidden, temb=emb, encoder_hidden_states=ehs,
                                      image_only_indicator=indicator)
                else:
                    hidden, _ = block(hidden_states=hidden, temb=emb, image_only_indicator=indicator)
                features.append(hidden)
            hidden = self.mid_block(hidden_states=hidden, temb=emb, encoder_hidden_states=ehs,
                                    image_only_indicator=indicator)
            features.append(hidden)
            return features

    class _Discriminator(nn.Module, Discriminator):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = _Encoder()
            self.encoder.requires_grad_(False)
            self.encoder.eval()
            self.spatial = nn.ModuleList(_heads(c, hidden, cond_dim, max_frames, "spatial") for c in feature_channels)
            self.temporal = nn.ModuleList(_heads(c, hidden, cond_dim, max_frames, "temporal") for c in feature_channels)
            self.settings = {"hidden": int(hidden), "frames": max_frames}

        def train(self, mode: bool = True) -> Any:  # the encoder copy stays in eval mode
            super().train(mode)
            self.encoder.eval()
            return self

        def head_parameters(self) -> dict[str, Any]:
            return {n: p for n, p in self.named_parameters() if not n.startswith("encoder.")}

        def forward(self, x_noisy: Any, sigma: Any, inputs: DiscriminatorInputs) -> list[Any]:
            batch, count = int(x_noisy.shape[0]), int(x_noisy.shape[1])
            if count > max_frames:
                raise ValueError(f"the discriminator's heads know at most {max_frames} frames, got {count}")
            pre = precondition(sigma)
            concat = inputs.concat.to(device=x_noisy.device, dtype=x_noisy.dtype)
            sample = torch.cat([x_noisy * rows(pre.c_in, x_noisy), concat], dim=2)
            features = self.encoder(sample, pre.c_noise.to(x_noisy.device), inputs.encoder_hidden_states,
                                    inputs.added_time_ids)
            cond = inputs.encoder_hidden_states[:, 0].to(x_noisy.dtype)
            index = torch.arange(count, device=x_noisy.device)
            spatial, temporal = [], []
            for feat, head in zip(features, self.spatial):
                h = F.silu(head.conv(F.silu(head.norm(feat))))
                proj = head.cond(cond).repeat_interleave(count, 0) + head.frame(index).repeat(batch, 1)
                logits = head.out(h) + _projection(h, proj[:, :, None, None])
                spatial.append(logits.reshape(batch, -1))
            for feat, head in zip(features, self.temporal):
                c, hh, ww = int(feat.shape[1]), int(feat.shape[2]), int(feat.shape[3])
                seq = feat.reshape(batch, count, c, hh, ww).permute(0, 3, 4, 2, 1).reshape(batch * hh * ww, c, count)
                h = F.silu(head.conv(F.silu(head.norm(seq))))
                proj = head.cond(cond).repeat_interleave(hh * ww, 0)[:, :, None] + head.frame(index).t()[None]
                logits = head.out(h) + _projection(h, proj)
                temporal.append(logits.reshape(batch, -1))
            return spatial + temporal

    module = _Discriminator().to(device=device, dtype=torch.float32)
    return module


def discriminator_logits(disc: Any, x_noisy: Any, sigma: Any, inputs: DiscriminatorInputs) -> Any:
    """All heads' logits of ``disc`` concatenated per clip: ``(B, Σ n_i)``."""
    import torch

    return torch.cat(disc(x_noisy, sigma, inputs), dim=1)


def hinge_discriminator_loss(real: Any, fake: Any) -> Any:
    """``mean(relu(1 − real)) + mean(relu(1 + fake))``."""
    import torch.nn.functional as F

    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def pseudo_huber(prediction: Any, target: Any, c: float) -> Any:
    """Mean over clips of ``√(mse_clip + c²) − c`` (``c = 0``: the root mean square error)."""
    mse = ((prediction - target) ** 2).flatten(1).mean(1)
    return ((mse + c * c).sqrt() - c).mean()


# --- one SF-V step ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFVConfig:
    """Every setting that determines the trained weights.

    Attributes:
        steps, batch_size: Optimizer steps and clips per step.
        generator_lr, discriminator_lr: AdamW learning rates (constant).
        beta1, beta2, weight_decay: AdamW settings of both optimizers.
        generator_sigma: ``σ_G``, the generator's (only) noise level; sampling starts there.
        disc_p_mean, disc_p_std: ``ln σ' ~ N(disc_p_mean, disc_p_std²)`` for re-noising.
        lambda_recon, lambda_adv: Weights of the generator's reconstruction and adversarial losses.
        huber_c: The pseudo-Huber constant ``c`` of the reconstruction loss.
        fps, motion_bucket_id, noise_aug_strength: The first-frame conditioning of every clip.
        head_channels: Width of the discriminator heads.
        max_grad_norm: Gradient-norm clipping of each update (0: none).
        seed: Seeds every draw (posterior samples, augmentation noise, generator noise, σ', re-noising).
    """

    steps: int = 1000
    batch_size: int = 1
    generator_lr: float = 1e-5
    discriminator_lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    generator_sigma: float = SIGMA_MAX
    disc_p_mean: float = -1.0
    disc_p_std: float = 1.0
    lambda_recon: float = 1.0
    lambda_adv: float = 1.0
    huber_c: float = 0.00054
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    head_channels: int = 64
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be at least 1, got {self.steps} and {self.batch_size}")
        if not self.generator_sigma > 0:
            raise ValueError(f"generator_sigma must be > 0, got {self.generator_sigma}")
        if self.disc_p_std < 0 or self.huber_c < 0 or self.lambda_recon < 0 or self.lambda_adv < 0:
            raise ValueError("disc_p_std, huber_c, lambda_recon and lambda_adv must be ≥ 0")

    def plain(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SFVBatch:
    """One step's data: clean latents ``x0`` ``(B, F, C, h, w)`` and the bound first-frame
    conditioning (generator keyword inputs and image latents, shared with the discriminator)."""

    x0: Any
    inputs: DiscriminatorInputs


@dataclass
class SFVModels:
    """The trained modules and their optimizers."""

    generator: Any
    discriminator: Any
    opt_g: Any
    opt_d: Any
    g_params: dict[str, Any]
    d_params: dict[str, Any]


def make_models(unet: Any, config: SFVConfig, *, device: Any = None) -> SFVModels:
    """A trainable float32 copy of ``unet`` (the generator), a :class:`Discriminator` over a frozen
    copy of ``unet``'s encoder (heads initialised from torch's global generator), and an AdamW
    optimizer for each; ``unet`` is not changed."""
    import torch
    from dagfusion.nodes.diffusion.sampling import module_dtype

    generator = copy.deepcopy(unet)
    if module_dtype(generator) != torch.float32:
        generator = generator.to(dtype=torch.float32)
    if device is not None:
        generator = generator.to(device)
    generator.requires_grad_(True)
    generator.train()
    disc = build_discriminator(generator, hidden=config.head_channels)
    disc.train()
    g_params = {n: p for n, p in generator.named_parameters()}
    d_params = disc.head_parameters()
    betas = (config.beta1, config.beta2)
    opt_g = torch.optim.AdamW(list(g_params.values()), lr=config.generator_lr, betas=betas, weight_decay=config.weight_decay)
    opt_d = torch.optim.AdamW(list(d_params.values()), lr=config.discriminator_lr, betas=betas,
                              weight_decay=config.weight_decay)
    return SFVModels(generator, disc, opt_g, opt_d, g_params, d_params)


def generator_call(generator: Any, inputs: DiscriminatorInputs) -> Any:
    """``network(sample, timesteps)`` of the generator bound to ``inputs`` (a
    :class:`~dagfusion.nodes.video.edm.VideoModelCall`)."""
    from dagfusion.model import family_for
    from dagfusion.nodes.video.edm import VideoModelCall

    kwargs = {"encoder_hidden_states": inputs.encoder_hidden_states, "added_time_ids": inputs.added_time_ids}
    return VideoModelCall(generator, family_for(generator), kwargs, contextlib.nullcontext, concat=inputs.concat)


def generate(generator: Any, x_noisy: Any, sigma: float, inputs: DiscriminatorInputs) -> Any:
    """The one-step generator's clip: ``D_G(x_noisy; σ)`` for every row (EDM preconditioning)."""
    import torch
    from dagfusion.nodes.video.edm import denoise

    sigmas = torch.full((int(x_noisy.shape[0]),), float(sigma), dtype=torch.float32)
    return denoise(generator_call(generator, inputs), x_noisy, sigmas)


def _renoise(x: Any, sigma: Any, rng: Any) -> Any:
    import torch
    from dagfusion.nodes.video.edm import rows

    noise = torch.randn(tuple(x.shape), generator=rng, dtype=torch.float32).to(x.device)
    return x + rows(sigma, x) * noise


def sfv_step(models: SFVModels, batch: SFVBatch, config: SFVConfig, rng: Any, *, train_generator: bool = True,
             train_discriminator: bool = True) -> dict[str, float]:
    """One SF-V step: a generator update, then a discriminator update (either can be skipped).

    All draws come from ``rng`` (CPU), in this order: the generator's noise, ``σ'`` and the fake's
    re-noising for the generator's adversarial loss, then ``σ'``, the real's and the fake's
    re-noising for the discriminator. The discriminator sees the fake made before the generator
    update (detached). Returns the logged values: ``loss_g``, ``recon``, ``adv_g``, ``loss_d``,
    ``d_real``, ``d_fake`` (mean logits) and the mean ``sigma_d``.
    """
    import torch
    from dagfusion.nodes.training.optim import optimizer_step
    from dagfusion.nodes.video.edm import edm_sigmas

    gen, disc = models.generator, models.discriminator
    x0 = batch.x0
    rows_ = int(x0.shape[0])
    noise = torch.randn(tuple(x0.shape), generator=rng, dtype=torch.float32).to(x0.device)
    x_noisy = x0 + float(config.generator_sigma) * noise
    values: dict[str, float] = {}

    disc.requires_grad_(False)
    fake = generate(gen, x_noisy, config.generator_sigma, batch.inputs)
    recon = pseudo_huber(fake, x0, config.huber_c)
    sigma_g = edm_sigmas(rows_, rng, config.disc_p_mean, config.disc_p_std)
    adv = -discriminator_logits(disc, _renoise(fake, sigma_g, rng), sigma_g, batch.inputs).mean()
    loss_g = config.lambda_recon * recon + config.lambda_adv * adv
    values.update(loss_g=float(loss_g.detach()), recon=float(recon.detach()), adv_g=float(adv.detach()))
    if train_generator:
        optimizer_step(loss_g, models.opt_g, None, models.g_params, config.max_grad_norm)
    else:
        models.opt_g.zero_grad(set_to_none=True)
        gen.zero_grad(set_to_none=True)
    for p in models.d_params.values():
        p.requires_grad_(True)

    fake = fake.detach()
    sigma_d = edm_sigmas(rows_, rng, config.disc_p_mean, config.disc_p_std)
    real_noisy = _renoise(x0, sigma_d, rng)
    fake_noisy = _renoise(fake, sigma_d, rng)
    real = discriminator_logits(disc, real_noisy, sigma_d, batch.inputs)
    fake_logits = discriminator_logits(disc, fake_noisy, sigma_d, batch.inputs)
    loss_d = hinge_discriminator_loss(real, fake_logits)
    values.update(loss_d=float(loss_d.detach()), d_real=float(real.detach().mean()),
                  d_fake=float(fake_logits.detach().mean()), sigma_d=float(sigma_d.mean()))
    if train_discriminator:
        optimizer_step(loss_d, models.opt_d, None, models.d_params, config.max_grad_norm)
    else:
        models.opt_d.zero_grad(set_to_none=True)
    return values


def prepare_batch(clips: Any, *, clip_vision: Any, vae: Any, config: SFVConfig, rng: Any, device: Any,
                  motion_bucket_ids: Any = None) -> SFVBatch:
    """Latents and first-frame conditioning of clips ``(B, F, 3, H, W)`` in ``[0, 1]``; the VAE
    posterior sample and the augmentation noise are drawn from ``rng``. ``motion_bucket_ids`` (one
    per clip) replaces ``config.motion_bucket_id`` when given."""
    import torch
    from dagfusion.nodes.video.edm import encode_clips, first_frame_conditioning

    clips = clips.float()
    batch, frames = int(clips.shape[0]), int(clips.shape[1])
    x0 = encode_clips(vae, clips, rng, device=device)
    noise = torch.randn(tuple(clips[:, 0].shape), generator=rng)
    aug = torch.full((batch,), float(config.noise_aug_strength))
    cond = first_frame_conditioning(clip_vision, vae, clips[:, 0], noise=noise, noise_aug=aug, fps=config.fps,
                                    motion_bucket_id=config.motion_bucket_id if motion_bucket_ids is None
                                    else list(motion_bucket_ids)).positive
    image = cond["image_latents"].to(device=device, dtype=torch.float32).expand(-1, frames, -1, -1, -1)
    inputs = DiscriminatorInputs(cond["encoder_hidden_states"].to(device=device, dtype=torch.float32),
                                 cond["added_time_ids"].to(device=device, dtype=torch.float32), image.contiguous())
    return SFVBatch(x0, inputs)


# --- the one-step handle ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OneStepConfig:
    """The noise level a one-step generator was trained at, and by which method."""

    sigma: float
    method: str = "sf-v"


class OneStepPatch(ModelPatch):
    """Marks a model as a one-step generator: every sampling run must be one step whose noise level
    is ``sigma`` (otherwise ``begin`` raises ``ValueError`` naming what to do). Changes nothing else."""

    def __init__(self, sigma: float, method: str = "sf-v") -> None:
        self.config = OneStepConfig(float(sigma), method)

    @property
    def sigma(self) -> float:
        return float(self.config.sigma)

    def begin(self, run: Any) -> None:
        if run.steps != 1:
            raise ValueError(
                f"this model is a one-step generator ({self.config.method}, trained at sigma {self.sigma:g}); it cannot "
                f"follow a {run.steps}-step schedule — sample it with steps=1 (dagfusion.video.SampleOneStep)")
        sigmas = getattr(run.scheduler, "sigmas", None)
        first = float(sigmas[0]) if sigmas is not None and len(sigmas) else None
        if first is None or not math.isclose(first, self.sigma, rel_tol=1e-4):
            raise ValueError(
                f"this one-step generator was trained at sigma {self.sigma:g} but the scheduler starts at sigma "
                f"{first}; use dagfusion.video.SampleOneStep (or the model's own scheduler) so sampling matches training")


def one_step_scheduler(sigma: float) -> Any:
    """SVD's Euler scheduler with ``sigma_max = sigma``: one step runs from ``sigma`` to 0."""
    from dagfusion.nodes.diffusion.data import SchedulerSpec
    from dagfusion.nodes.video.edm import svd_scheduler_config

    return SchedulerSpec("EulerDiscreteScheduler", {**svd_scheduler_config(), "sigma_max": float(sigma)})


def one_step_patch(model: Any) -> OneStepPatch | None:
    """The :class:`OneStepPatch` on ``model``, or ``None``."""
    from dagfusion.model import applied_patch

    return applied_patch(model, OneStepPatch)


def one_step_sample(model: Any, conditioning: Any, latent: Any, *, seed: int, ctx: RunContext | None = None,
                    count_macs: bool = True) -> Any:
    """``(latent, report)`` of one sampling step of a one-step generator (see the module docstring);
    ``count_macs`` as :func:`~dagfusion.nodes.diffusion.sampling.run_sampling` takes it.

    :raises ValueError: ``model`` carries no :class:`OneStepPatch`.
    """
    from dagfusion.nodes.diffusion.sampling import run_sampling

    patch = one_step_patch(model)
    if patch is None:
        raise ValueError("expected a one-step generator (from dagfusion.video.TrainSFV), got a model without a "
                         "one-step mark; sample multi-step models with dagfusion.video.SampleVideo")
    return run_sampling(model, conditioning, latent, scheduler=one_step_scheduler(patch.sigma), steps=1,
                        guidance_scale=1.0, seed=seed, ctx=ctx, count_macs=count_macs)


# --- the training run ------------------------------------------------------------------------------


@dataclass
class SFVResult:
    """What :func:`train_sfv` returns: the one-step model handle, the per-step logged values of the
    steps this call ran, the mean generator/discriminator losses of the last :data:`RECENT`
    steps, the step it started from and the last checkpoint."""

    model: Any
    logs: list[dict[str, float]] = field(default_factory=list)
    loss_g: float = float("nan")
    loss_d: float = float("nan")
    start_step: int = 0
    checkpoint: Path | None = None


def train_sfv(
    model: Any,
    clip_vision: Any,
    vae: Any,
    clips: Any,
    config: SFVConfig,
    *,
    folder: Path | None = None,
    every: int = 0,
    keep: int = 2,
    resume: Path | None = None,
    key: str | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
    logger: logging.Logger | None = None,
    time_limit: float = 0.0,
) -> SFVResult:
    """Train a one-step generator from ``model`` (an SVD-layout video UNet handle) with SF-V.

    The input handle is not changed (its denoiser is copied). Step ``s`` reads clips
    ``s·B … s·B + B − 1`` of ``clips`` (:func:`as_video_clips`). Every draw comes from one CPU
    generator seeded by ``config.seed``; the global torch generators (the discriminator heads'
    initial weights) are seeded with it inside a forked state. With ``folder``, a checkpoint (safetensors + JSON, the shared format of
    :mod:`~dagfusion.nodes.training.checkpoint`: generator weights, ``@disc.`` head weights, both
    optimizers as ``g.``/``d.``, the random state) is written every ``every`` steps, at the end and on
    cancel; ``resume`` continues from one bit-exactly on the CPU (the discriminator's frozen encoder
    is rebuilt from the input model, which the training key includes).

    With ``time_limit`` (seconds, 0: none) a run that has trained longer saves a checkpoint and
    stops with :class:`~dagfusion.nodes.training.loop.TrainingPaused`; running again continues.

    :raises ValueError: the model carries patches (a one-step mark, a cache …), is not a video UNet,
        or the clips do not fit it.
    """
    import torch
    from dagfusion import RunCancelled
    from dagfusion.model import StaticRef
    from dagfusion.nodes.diffusion.sampling import module_dtype
    from dagfusion.nodes.training import checkpoint as ckpt
    from dagfusion.nodes.training.loop import TrainingPaused
    from dagfusion.nodes.training.optim import restore_state, rng_state

    log = logger or logging.getLogger("dagfusion.node")
    if model.patches:
        raise ValueError(f"expected a model without patches (SF-V trains the bare UNet), got patches "
                         f"[{', '.join(type(p).__name__ for p in model.patches)}]")
    source = as_video_clips(clips)
    device = torch.device(model.device)
    original = model.denoiser
    original_dtype = module_dtype(original)
    original_device = next(original.parameters()).device
    total = config.steps
    rng = torch.Generator("cpu").manual_seed(int(config.seed))
    recent_g: deque[float] = deque(maxlen=RECENT)
    recent_d: deque[float] = deque(maxlen=RECENT)
    logs: list[dict[str, float]] = []
    start = 0
    last: Path | None = None
    saved = -1
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []

    models: SFVModels

    def save(done: int) -> Path | None:
        nonlocal last, saved
        if folder is None:
            return None
        if saved == done:
            return last
        saved = done
        g_tensors, g_plain = ckpt.optimizer_state(models.opt_g)
        d_tensors, d_plain = ckpt.optimizer_state(models.opt_d)
        weights = dict(models.generator.state_dict())
        weights.update({f"@disc.{n}": p for n, p in models.d_params.items()})
        optimizer = {**{f"g.{k}": v for k, v in g_tensors.items()}, **{f"d.{k}": v for k, v in d_tensors.items()}}
        state = {"key": key, "total": total, "rng": rng_state(rng, device), "optimizer": {"g": g_plain, "d": d_plain},
                 "recent": {"g": list(recent_g), "d": list(recent_d)}, "config": config.plain(),
                 "method": "sf-v", "data": source.describe()}
        last = ckpt.save(folder, done, weights=weights, ema=None, optimizer=optimizer, state=state)
        ckpt.prune(folder, keep)
        return last

    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(int(config.seed))
        models = make_models(original, config, device=device)  # the heads' initial weights come from the seed
        if resume is not None:
            loaded = ckpt.load(resume, device)
            if key is not None and loaded.state.get("key") not in (None, key):
                log.warning("resuming from %s, a checkpoint of a different training configuration", resume)
            models.generator.load_state_dict({k: v for k, v in loaded.weights.items() if not k.startswith("@")}, strict=True)
            with torch.no_grad():
                for name, p in models.d_params.items():
                    if f"@disc.{name}" not in loaded.weights:
                        raise ValueError(f"the checkpoint {resume} has no discriminator parameter {name!r}")
                    p.copy_(loaded.weights[f"@disc.{name}"])
            plain = loaded.state["optimizer"]
            g_part = {k[2:]: v for k, v in loaded.optimizer.items() if k.startswith("g.")}
            d_part = {k[2:]: v for k, v in loaded.optimizer.items() if k.startswith("d.")}
            shim = _Loaded(g_part, {"optimizer": plain["g"], "rng": loaded.state["rng"]})
            restore_state(shim, optimizer=models.opt_g, scaler=None, ema=None, generator=rng, device=device)
            ckpt.restore_optimizer(models.opt_d, d_part, plain["d"])
            recent_g.extend(float(v) for v in loaded.state.get("recent", {}).get("g", []))
            recent_d.extend(float(v) for v in loaded.state.get("recent", {}).get("d", []))
            start = min(loaded.step, total)
            last = resume
            log.info("resuming SF-V training from %s (step %d of %d)", resume, loaded.step, total)
        began = time.monotonic()
        for step in range(start, total):
            if check_cancelled is not None:
                try:
                    check_cancelled()
                except RunCancelled:
                    if step > start:
                        save(step)
                    raise
            batch_clips = source.clips(step * config.batch_size, config.batch_size)
            _check_clips(batch_clips, models.generator)
            buckets = clip_buckets(source, step * config.batch_size, config.batch_size)
            batch = prepare_batch(batch_clips, clip_vision=clip_vision, vae=vae, config=config, rng=rng, device=device,
                                  motion_bucket_ids=buckets)
            values = sfv_step(models, batch, config, rng)
            for name in ("loss_g", "loss_d"):
                if not math.isfinite(values[name]):
                    raise FloatingPointError(f"{name} became {values[name]} at step {step + 1}; lower the learning rates")
            logs.append(values)
            recent_g.append(values["loss_g"])
            recent_d.append(values["loss_d"])
            done = step + 1
            if done < total and every > 0 and done % every == 0:
                save(done)
            if done < total and time_limit > 0 and time.monotonic() - began > time_limit:
                path = save(done)
                raise TrainingPaused(f"the time limit was reached at step {done} of {total}"
                                     + (f"; the checkpoint is in {path}: run again to continue" if path else ""))
            if progress is not None:
                try:
                    progress(done, total, values)
                except RunCancelled:
                    save(done)
                    raise
        if start < total or last is None:
            save(total)

    gen = models.generator
    gen.eval()
    gen.requires_grad_(False)
    if module_dtype(gen) != original_dtype:
        gen.to(dtype=original_dtype)
    gen.to(original_device)
    sigma = float(config.generator_sigma)
    handle = model.with_denoiser(
        StaticRef(gen, f"sfv:{key}" if key is not None else None),
        source=f"SF-V one-step {model.info.get('source', '?')}",
        one_step={"method": "sf-v", "sigma": sigma},
        training={"method": "sf-v", "steps": total, "key": key},
    ).with_scheduler(one_step_scheduler(sigma)).with_patch(OneStepPatch(sigma))
    return SFVResult(handle, logs, _mean(recent_g), _mean(recent_d), start, last)


@dataclass(frozen=True)
class _Loaded:
    """The part of a loaded checkpoint :func:`~dagfusion.nodes.training.optim.restore_state` reads."""

    optimizer: Mapping[str, Any]
    state: Mapping[str, Any]
    ema: Any = None


def _check_clips(clips: Any, unet: Any) -> None:
    shape = tuple(getattr(clips, "shape", ()))
    if len(shape) != 5 or shape[2] != 3:
        raise ValueError(f"the clip source must give (B, F, 3, H, W) clips, got shape {shape}")
    frames = int(getattr(unet.config, "num_frames", 25))
    if shape[1] > frames:
        raise ValueError(f"this video UNet supports at most {frames} frames, the clips have {shape[1]}")


def _mean(values: Any) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def sfv_key(parts: dict[str, Any]) -> str | None:
    """The fingerprint of everything that determines an SF-V training's result (``None``: some
    input cannot be fingerprinted)."""
    from dagfusion.fingerprint import fingerprint
    from dagfusion.nodes.training.checkpoint import FORMAT

    return fingerprint({"node": f"{TYPE_ID}@{VERSION}", "format": FORMAT, **parts})


# --- nodes -------------------------------------------------------------------------------------------


def _train_example() -> dict[str, Any]:
    import torch
    from dagfusion.nodes.video.svd import _tiny_cached

    parts = _tiny_cached()
    clips = torch.rand(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {"model": parts["model"], "clip_vision": parts["clip_vision"], "vae": parts["vae"], "clips": clips,
            "steps": 1, "checkpoint_every": 0, "head_channels": 8}


def _check_train(values: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    recon, adv = values.get("lambda_recon"), values.get("lambda_adv")
    if isinstance(recon, (int, float)) and isinstance(adv, (int, float)) and recon == 0 and adv == 0:
        problems.append(("lambda_adv", "expected lambda_recon or lambda_adv above 0, got both 0 (the generator would not train)"))
    return problems


@node(
    TYPE_ID,
    version=VERSION,
    category="video/training",
    inputs=[
        Input("model", MODEL, link_only=True, description="The multi-step image-to-video UNet (SVD layout); it is copied, never changed."),
        Input("clip_vision", "CLIP_VISION", link_only=True, description="The image encoder of the first-frame conditioning (frozen)."),
        Input("vae", VAE, link_only=True, description="The VAE mapping clips to latents (frozen)."),
        Input("clips", union(VIDEO, VIDEO_CLIPS), link_only=True,
              description="Training clips: a VIDEO batch (N, F, 3, H, W) in [0, 1], repeated in order, or a VIDEO_CLIPS source."),
        Input("steps", INT, 1000, min=1, max=10_000_000, description="Optimizer steps (each: one generator and one discriminator update)."),
        Input("batch_size", INT, 1, min=1, max=4096, description="Clips per step."),
        Input("generator_lr", FLOAT, 1e-5, min=0.0, max=1.0, description="AdamW learning rate of the generator."),
        Input("discriminator_lr", FLOAT, 1e-4, min=0.0, max=1.0, description="AdamW learning rate of the discriminator heads."),
        Input("generator_sigma", FLOAT, SIGMA_MAX, min=1e-3, max=1e5,
              description="The generator's noise level (sampling starts there): SVD's sigma_max, 700."),
        Input("disc_p_mean", FLOAT, -1.0, min=-10.0, max=10.0, description="Mean of ln sigma' for re-noising before the discriminator."),
        Input("disc_p_std", FLOAT, 1.0, min=0.0, max=10.0, description="Standard deviation of ln sigma' for re-noising."),
        Input("lambda_recon", FLOAT, 1.0, min=0.0, max=1e4, description="Weight of the pseudo-Huber reconstruction loss."),
        Input("lambda_adv", FLOAT, 1.0, min=0.0, max=1e4, description="Weight of the generator's adversarial (hinge) loss."),
        Input("head_channels", INT, 64, min=1, max=4096, description="Width of the discriminator's spatial and temporal heads."),
        Input("fps", INT, 7, min=1, max=120, description="Frames per second given as a micro-condition (the UNet sees fps - 1)."),
        Input("motion_bucket_id", INT, 127, min=0, max=1023,
              description="Motion micro-condition of every clip, unless the clip source gives one per clip (shapes-video does)."),
        Input("noise_aug_strength", FLOAT, 0.02, min=0.0, max=10.0, description="Noise added to the first frame before encoding it."),
        Input("max_grad_norm", FLOAT, 1.0, min=0.0, max=1e6, description="Clip each update's gradient norm to this (0 = no clipping)."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seeds every random draw of the run."),
        Input("checkpoint_every", INT, 500, min=0, max=10_000_000,
              description="Save a checkpoint every N steps, at the end and on cancel (0 = none, no auto-resume)."),
        Input("keep_checkpoints", INT, 2, min=0, max=100_000, description="Keep the newest N checkpoints (0 = all)."),
        Input("resume", PATH, optional=True, description="A checkpoint folder (or work folder: its newest) to continue from."),
        Input("auto_resume", BOOLEAN, True, description="Continue from this training's own newest checkpoint when there is one."),
        Input("time_limit", FLOAT, 0.0, min=0.0, max=1e7,
              description="Minutes after which to save a checkpoint and stop with an error; running again continues (0 = none)."),
    ],
    outputs=[
        Output("model", MODEL, "The one-step generator (sample it with dagfusion.video.SampleOneStep)."),
        Output("generator_loss", FLOAT, "Mean generator loss of the last 10 steps."),
        Output("discriminator_loss", FLOAT, "Mean discriminator hinge loss of the last 10 steps."),
        Output("checkpoint_dir", "STRING", "The folder of this training's checkpoints ('' without checkpoints)."),
    ],
    examples=[_train_example],
    check=_check_train,
    ui={"color": "#ff7043"},
)
def train_sfv_node(
    ctx: RunContext, model: Any, clip_vision: Any, vae: Any, clips: Any, steps: int, batch_size: int,
    generator_lr: float, discriminator_lr: float, generator_sigma: float, disc_p_mean: float, disc_p_std: float,
    lambda_recon: float, lambda_adv: float, head_channels: int, fps: int, motion_bucket_id: int,
    noise_aug_strength: float, max_grad_norm: float, seed: int, checkpoint_every: int, keep_checkpoints: int,
    resume: str | None, auto_resume: bool, time_limit: float,
) -> dict[str, Any]:
    """Fine-tune an image-to-video UNet into a one-step generator with SF-V (adversarial, latent space).

    The generator (a copy of the model) learns to give the clip from noise at sigma 700 in one
    forward pass, against a discriminator made of the frozen initial UNet encoder with trainable
    spatial and temporal heads, on re-noised real and generated latents; plus a reconstruction
    loss. Deterministic for a seed (bit-exact on the CPU); checkpoints in the cache folder's
    training area let a rerun continue; progress events carry both losses every step.
    """
    from dagfusion.fingerprint import fingerprint_path
    from dagfusion.nodes.training import checkpoint as ckpt
    from dagfusion.nodes.training.train import checkpoint_path, checkpoint_plan

    if "UNetSpatioTemporalConditionModel" not in {c.__name__ for c in type(model.denoiser).__mro__}:
        raise NodeInputError("model", f"expected a video UNet (UNetSpatioTemporalConditionModel), got {type(model.denoiser).__name__}")
    if model.patches:
        raise NodeInputError("model", f"expected a model without patches (SF-V trains the bare UNet), got patches "
                                      f"[{', '.join(type(p).__name__ for p in model.patches)}]")
    try:
        source = as_video_clips(clips)
    except (TypeError, ValueError) as exc:
        raise NodeInputError("clips", str(exc)) from exc
    config = SFVConfig(
        steps=steps, batch_size=batch_size, generator_lr=generator_lr, discriminator_lr=discriminator_lr,
        generator_sigma=generator_sigma, disc_p_mean=disc_p_mean, disc_p_std=disc_p_std, lambda_recon=lambda_recon,
        lambda_adv=lambda_adv, head_channels=head_channels, fps=fps, motion_bucket_id=motion_bucket_id,
        noise_aug_strength=noise_aug_strength, max_grad_norm=max_grad_norm, seed=seed,
    )
    sample = source.clips(0, 1)
    frames = int(getattr(model.denoiser.config, "num_frames", 25))
    if getattr(sample, "ndim", None) != 5 or sample.shape[2] != 3:
        raise NodeInputError("clips", f"expected clips (B, F, 3, H, W), got shape {tuple(getattr(sample, 'shape', ()))}")
    if sample.shape[1] > frames:
        raise NodeInputError("clips", f"expected at most {frames} frames (the UNet's num_frames), got {int(sample.shape[1])}")
    scale = model.vae_scale_factor
    if sample.shape[-1] % scale or sample.shape[-2] % scale:
        raise NodeInputError("clips", f"expected width and height multiples of {scale}, got {int(sample.shape[-1])}x{int(sample.shape[-2])}")
    explicit = ckpt.resolve(checkpoint_path(ctx, resume)) if resume else None
    key = sfv_key({"model": model, "clip_vision": clip_vision, "vae": vae, "clips": source, "config": config.plain(),
                   "resume": fingerprint_path(explicit) if explicit is not None else None})
    folder, start_from = checkpoint_plan(ctx, key, explicit, wanted=checkpoint_every > 0, auto_resume=auto_resume)

    def progress(step: int, total: int, values: dict[str, float]) -> None:
        ctx.progress(step, total, message="SF-V", **values)

    result = train_sfv(model, clip_vision, vae, source, config, folder=folder, every=checkpoint_every,
                       keep=keep_checkpoints, resume=start_from, key=key, progress=progress,
                       check_cancelled=ctx.check_cancelled, logger=ctx.logger, time_limit=time_limit * 60.0)
    return {"model": result.model, "generator_loss": result.loss_g, "discriminator_loss": result.loss_d,
            "checkpoint_dir": str(folder) if folder else ""}


def _sample_example() -> dict[str, Any]:
    from dagfusion.nodes.video.svd import (
        _conditioning_example,
        _tiny_cached,
        svd_conditioning,
    )

    parts = _tiny_cached()
    args = _conditioning_example()
    cond, latent = svd_conditioning(args["clip_vision"], args["vae"], args["image"], width=32, height=32, frames=2,
                                    fps=7, motion_bucket_id=127, noise_aug_strength=0.02, seed=0)
    marked = parts["model"].with_scheduler(one_step_scheduler(SIGMA_MAX)).with_patch(OneStepPatch(SIGMA_MAX))
    return {"model": marked, "conditioning": cond, "latent": latent, "seed": 0}


@node(
    "dagfusion.video.SampleOneStep",
    version="1.0.0",
    category="video",
    inputs=[
        Input("model", MODEL, link_only=True, description="A one-step generator (from dagfusion.video.TrainSFV)."),
        Input("conditioning", CONDITIONING, link_only=True, description="Image-to-video conditioning (dagfusion.video.ImageToVideoConditioning)."),
        Input("latent", LATENT, link_only=True, description="An empty video latent: only its shape counts."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed of the noise (a CPU generator)."),
    ],
    outputs=[Output("latent", LATENT, "The generated clip's latents."),
             Output("report", RUN_REPORT, "What the run did: one step, one denoiser call, its MACs and seconds.")],
    examples=[_sample_example],
)
def sample_one_step(ctx: RunContext, model: Any, conditioning: Any, latent: Any, seed: int) -> tuple[Any, Any]:
    """Generate a clip with one forward pass of a one-step generator, at the noise level it was trained at."""
    from dagfusion.nodes.video.svd import check_video_model

    problems = check_video_model(model, conditioning, latent)
    if problems:
        raise NodeInputError(problems[0][0], "; ".join(message for _, message in problems))
    if one_step_patch(model) is None:
        raise NodeInputError("model", "expected a one-step generator (the output of dagfusion.video.TrainSFV), got a "
                                      "model without a one-step mark; sample it with dagfusion.video.SampleVideo")
    return one_step_sample(model, conditioning, latent, seed=seed, ctx=ctx)


NODES = (train_sfv_node, sample_one_step)
"""SF-V's nodes, in palette order."""
