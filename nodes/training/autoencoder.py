"""Training a VAE (``AutoencoderKL``) on images: the first stage of a latent diffusion model.

:func:`train_vae` trains a deep copy of the handle's VAE (the input never changes) with

    loss = L1(x̂, x) + MSE(x̂, x) + kl_weight · KL(q(z|x) ‖ N(0, I))

where ``x`` are images in [-1, 1], ``z`` a posterior sample and ``x̂`` its decoding; the KL is
averaged over latent elements. (Stable Diffusion's autoencoder adds perceptual and adversarial
terms, which matter for natural textures; the shapes world's flat colours and hard edges do not
need them.) AdamW with linear warmup and cosine decay, gradient clipping, all randomness from
one seeded CPU generator, so a run on the CPU is bit-reproducible and resumes bit-exactly.

At the end the latent *scaling factor* is measured, as Stable Diffusion's was: ``1 / std`` of
posterior samples over a fixed batch, written into the VAE's config (``scaling_factor``), so the
diffusion model sees latents of unit variance.

**Video.** A data source of clips ``(B, F, C, H, W)`` trains on their frames (``batch_size``
clips a step); a temporal-decoder VAE (``AutoencoderKLTemporalDecoder``, Stable Video Diffusion's)
decodes each clip's ``F`` frames together, so its temporal layers train too.

Checkpoints share the training loop's format (:mod:`~dagfusion.nodes.training.checkpoint`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dagfusion import BOOLEAN, FLOAT, INT, SEED, Input, Output, RunContext, RunCancelled, node, union
from dagfusion.nodes.training import checkpoint as ckpt
from dagfusion.nodes.training.loop import CheckpointPolicy, TrainingPaused, scheduled_lr
from dagfusion.nodes.training.optim import rng_state, set_rng_state
from dagfusion.nodes.training.types import TRAINING_DATA

TYPE_ID = "dagfusion.train.TrainVAE"
VERSION = "1.0.0"
SCALE_SAMPLES = 256
"""Images the latent scaling factor is measured on."""


@dataclass(frozen=True)
class VAETrainConfig:
    """Everything besides the inputs that determines the trained VAE."""

    steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 5e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    kl_weight: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be at least 1, got {self.steps} and {self.batch_size}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to 0 at ``steps``."""
        return scheduled_lr(step, self.learning_rate, self.warmup_steps, self.steps)


@dataclass
class VAEResult:
    """What :func:`train_vae` returns: the trained module (eval, no gradients), the mean of the
    last ten losses, reconstruction PSNR (dB) on the scale batch, and the scaling factor."""

    module: Any
    final_loss: float
    psnr: float
    scaling_factor: float
    start_step: int = 0


def _decode(module: Any, z: Any, frames: int) -> Any:
    """``module.decode(z)``; a temporal decoder (``AutoencoderKLTemporalDecoder``) is told that
    consecutive groups of ``frames`` rows are clips."""
    import inspect

    if "num_frames" in inspect.signature(module.decode).parameters:
        return module.decode(z, num_frames=frames).sample
    return module.decode(z).sample


def pixels(images: Any) -> tuple[Any, int]:
    """Images ``(B, C, H, W)`` or clips ``(B, F, C, H, W)`` in [0, 1] as RGB rows in [-1, 1] (clips'
    frames in order) and the frames per clip (1 for images)."""
    frames = 1
    if images.ndim == 5:
        frames = int(images.shape[1])
        images = images.flatten(0, 1)
    return images[:, :3] * 2 - 1, frames


def vae_loss(module: Any, x: Any, generator: Any, kl_weight: float, frames: int = 1) -> tuple[Any, dict[str, float]]:
    """The loss of the module docstring for images ``x`` in [-1, 1] (``frames`` consecutive rows per clip)."""
    import torch

    posterior = module.encode(x).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(x.device)
    z = posterior.mean + posterior.std * noise
    recon = _decode(module, z, frames)
    l1 = (recon - x).abs().mean()
    l2 = (recon - x).pow(2).mean()
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    return l1 + l2 + kl_weight * kl, {"l1": float(l1.detach()), "mse": float(l2.detach()), "kl": float(kl.detach())}


def measure_scale(module: Any, images: Any, generator: Any) -> tuple[float, float]:
    """``(1 / std of posterior samples, reconstruction PSNR in dB)`` on ``images`` (or clips) in [0, 1]."""
    import torch

    with torch.no_grad():
        x, frames = pixels(images)
        x = x.to(next(module.parameters()).device)
        posterior = module.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(x.device)
        z = posterior.mean + posterior.std * noise
        recon = _decode(module, posterior.mean, frames).clamp(-1, 1)
        mse = float(((recon - x) / 2).pow(2).mean())
    return 1.0 / float(z.float().std()), 10 * math.log10(1.0 / max(mse, 1e-12))


def train_vae(
    vae: Any,
    data: Any,
    config: VAETrainConfig,
    *,
    checkpoints: CheckpointPolicy | None = None,
    resume: Path | None = None,
    key: str | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    logger: logging.Logger | None = None,
) -> VAEResult:
    """Train a copy of ``vae``'s module on ``data`` (any training data source); see the module docstring.

    :raises TrainingPaused: the policy's time limit was reached (a checkpoint was written).
    """
    import torch

    from dagfusion.nodes.training.data import as_training_data

    log = logger or logging.getLogger("dagfusion.node")
    policy = checkpoints or CheckpointPolicy()
    source = as_training_data(data)
    original = vae.module
    param = next(original.parameters())
    device, dtype = param.device, param.dtype
    module = copy.deepcopy(original).to(dtype=torch.float32).train()
    module.requires_grad_(True)
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator("cpu").manual_seed(int(config.seed))
    recent: deque[float] = deque(maxlen=10)
    start = 0

    def save(done: int) -> Path | None:
        if policy.folder is None:
            return None
        tensors, plain = ckpt.optimizer_state(optimizer)
        document = {"key": key, "total": config.steps, "recent_losses": list(recent), "optimizer": plain,
                    "rng": rng_state(generator, device), "config": asdict(config), "data": source.describe()}
        path = ckpt.save(policy.folder, done, weights=module.state_dict(), ema=None, optimizer=tensors, state=document)
        ckpt.prune(policy.folder, policy.keep)
        return path

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.seed))
        if resume is not None:
            loaded = ckpt.load(resume, device)
            module.load_state_dict(loaded.weights, strict=True)
            ckpt.restore_optimizer(optimizer, loaded.optimizer, loaded.state["optimizer"])
            set_rng_state(loaded.state["rng"], generator, device)
            recent.extend(float(v) for v in loaded.state.get("recent_losses", []))
            start = min(loaded.step, config.steps)
            log.info("resuming VAE training from %s (step %d of %d)", resume, loaded.step, config.steps)
        began = time.monotonic()
        for step in range(start, config.steps):
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, frames = pixels(source.examples(step * config.batch_size, config.batch_size).images)
            loss, logs = vae_loss(module, x.to(device=device, dtype=torch.float32), generator, config.kl_weight, frames)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the VAE loss became {value} at step {step + 1}; lower the learning rate")
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            recent.append(value)
            done = step + 1
            if done < config.steps and policy.every > 0 and done % policy.every == 0:
                save(done)
            if done < config.steps and policy.time_limit > 0 and time.monotonic() - began > policy.time_limit:
                path = save(done)
                raise TrainingPaused(f"the time limit was reached at step {done} of {config.steps}"
                                     + (f"; the checkpoint is in {path}: run again to continue" if path else ""))
            if progress is not None:
                try:
                    progress(done, config.steps, {"loss": value, "lr": lr, **logs})
                except RunCancelled:
                    save(done)
                    raise
        if start < config.steps or resume is None:
            save(config.steps)

        module.eval().requires_grad_(False)
        probe = source.examples(10_000_000, 1).images
        if probe.ndim == 5:  # clips: as many frames as SCALE_SAMPLES images
            probe = source.examples(10_000_000, max(1, SCALE_SAMPLES // int(probe.shape[1]))).images
        else:
            probe = source.examples(10_000_000, SCALE_SAMPLES).images
        scale, psnr = measure_scale(module, probe, torch.Generator("cpu").manual_seed(int(config.seed) + 1))
    module.register_to_config(scaling_factor=scale)
    module.to(dtype=dtype)
    final = float(sum(recent) / len(recent)) if recent else float("nan")
    log.info("VAE trained: loss %.5f, reconstruction PSNR %.2f dB, scaling factor %.4f", final, psnr, scale)
    return VAEResult(module, final, psnr, scale, start)


def _example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny
    from dagfusion.nodes.shapes.dataset import ShapesDataset

    return {"vae": tiny.sd_handles()["vae"], "data": ShapesDataset(split="train", resolution=32, seed=0),
            "steps": 2, "batch_size": 2, "checkpoint_every": 0}


@node(
    TYPE_ID,
    version=VERSION,
    category="training",
    inputs=[
        Input("vae", "VAE", link_only=True, description="The VAE to train (copied; the input never changes), e.g. NewModel's."),
        Input("data", union("SHAPES_DATASET", TRAINING_DATA), link_only=True, description="Images to reconstruct."),
        Input("steps", INT, 2000, min=1, max=10_000_000, description="Number of optimizer steps."),
        Input("batch_size", INT, 16, min=1, max=65536, description="Images per step."),
        Input("learning_rate", FLOAT, 5e-4, min=0.0, max=1.0, description="Peak AdamW learning rate (warmup, then cosine decay)."),
        Input("warmup_steps", INT, 50, min=0, max=10_000_000, description="Linear learning-rate warmup steps."),
        Input("kl_weight", FLOAT, 1e-4, min=0.0, max=10.0, description="Weight of the KL term (per latent element) against L1 + MSE."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seeds every random draw (posterior samples)."),
        Input("checkpoint_every", INT, 500, min=0, max=10_000_000,
              description="Save a checkpoint every N steps and at the end (0 = none, no auto-resume)."),
        Input("auto_resume", BOOLEAN, True, description="Continue from this training's newest checkpoint when one exists."),
        Input("time_limit", FLOAT, 0.0, min=0.0, max=1e7,
              description="Minutes after which to save and stop with an error; running again continues (0 = none)."),
    ],
    outputs=[
        Output("vae", "VAE", "The trained VAE, its scaling_factor measured on the data."),
        Output("final_loss", FLOAT, "Mean loss over the last 10 steps."),
        Output("psnr", FLOAT, "Reconstruction PSNR (dB) of posterior means on 256 further images of the data."),
    ],
    examples=[_example],
    ui={"color": "#ff7043"},
)
def train_vae_node(
    ctx: RunContext, vae: Any, data: Any, steps: int, batch_size: int, learning_rate: float, warmup_steps: int,
    kl_weight: float, seed: int, checkpoint_every: int, auto_resume: bool, time_limit: float,
) -> dict[str, Any]:
    """Train an AutoencoderKL to reconstruct images (L1 + MSE + KL) and measure its latent scaling factor.

    Deterministic for a seed; checkpoints (safetensors + JSON) go to a work folder in the cache
    folder keyed by the inputs, so running again resumes or loads the finished weights.
    """
    from dagfusion.fingerprint import fingerprint
    from dagfusion.model import StaticRef, VAEHandle
    from dagfusion.nodes.training.data import as_training_data

    config = VAETrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=warmup_steps,
                            kl_weight=kl_weight, seed=seed)
    source = as_training_data(data)
    key = fingerprint({"node": f"{TYPE_ID}@{VERSION}", "format": ckpt.FORMAT, "vae": vae, "data": source,
                       "config": asdict(config)})
    folder = ckpt.work_folder(ctx.settings.cache_dir, key) if (checkpoint_every > 0 or time_limit > 0) and key else None
    start_from = ckpt.latest(folder) if folder is not None and auto_resume else None

    def progress(step: int, total: int, values: dict[str, float]) -> None:
        ctx.progress(step, total, message="training the VAE", **values)

    result = train_vae(vae, source, config, checkpoints=CheckpointPolicy(folder, checkpoint_every, 2, time_limit * 60.0),
                       resume=start_from, key=key, progress=progress, logger=ctx.logger)
    # the scaling factor lives in the module's config; it stays out of ``info`` (the handle's fingerprint), which
    # the checkpoint key already determines: a float measured again on reload must not change downstream keys
    info = {**vae.info, "source": f"trained {vae.info.get('source', '?')}"}
    handle = VAEHandle(StaticRef(result.module, f"trained-vae:{key}" if key else None), info=info)
    return {"vae": handle, "final_loss": result.final_loss, "psnr": result.psnr}


NODES = (train_vae_node,)
