"""The TextCraftor training loop: reward fine-tuning of a text encoder (Li et al., CVPR 2024).

:func:`train_encoder` never changes its inputs: the encoder trains as a copy (or as a new LoRA
patch, :mod:`~dagfusion.nodes.textcraftor.encoder`); the denoiser, the VAE and the reward stay
frozen, and the ``requires_grad`` flags of the shared denoiser and VAE are switched off for the
run and restored after it, so gradients reach only the trained parameters. Each step ``s``:

1. sets the learning rate (:func:`~dagfusion.nodes.training.loop.scheduled_lr`);
2. takes prompts ``s·B … s·B + B − 1`` of a seeded permutation of the prompt list (cycled);
3. encodes them, and ``""`` for guidance, with the trained encoder (with gradients) and the
   prompts with the original encoder (without: the alignment reference);
4. makes latents, per ``variant``:

   - ``"direct"``: a no-grad DDIM generation (N steps) with the current encoder gives ``x0``; it is
     noised to a uniform random timestep ``t`` and ``x̂0`` is predicted in one step with gradients;
   - ``"prompt"``: a DDIM chain of N steps from noise, gradients through the last K;

5. decodes with the VAE, scores with the reward, and minimises
   ``loss = −mean(reward) + alignment_weight · mean((e_θ(p) − e_0(p))²)`` (the embedding constraint
   keeping the encoder near the original, against reward hacking/collapse);
6. stops with :class:`FloatingPointError` naming the step when the reward or loss is not finite
   (before any update, so the last checkpoint is the last good state); otherwise backpropagates,
   clips, steps AdamW, updates the EMA, reports progress (which may cancel) and checkpoints.

All randomness (noise, timesteps) comes from one CPU generator seeded by ``seed``; the global
generators are seeded inside a forked RNG state. Checkpoints (the shared training checkpoint
format: safetensors + JSON) hold the trained parameters, optimizer, EMA and generator states and
the whole loss/reward curve, so on the CPU a resumed run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dagfusion import RunCancelled
from dagfusion.nodes.textcraftor.encoder import DEFAULT_TARGETS, TRAINABLE

VARIANTS = ("direct", "prompt")
#: The denoiser's attention projections a UNet LoRA trains by default (diffusers' names).
UNET_TARGETS = "to_q, to_k, to_v, to_out.0"
#: Checkpoint names of the UNet LoRA's parameters start with this.
UNET_PREFIX = "denoiser:"


@dataclass(frozen=True)
class CraftConfig:
    """Everything besides the inputs' identities that determines the trained encoder."""

    variant: str = "prompt"
    sample_steps: int = 25
    grad_steps: int = 5
    guidance: float = 4.0
    resolution: int = 512
    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    alignment_weight: float = 1.0
    precision: str = "auto"
    ema_decay: float = 0.0
    gradient_checkpointing: bool = True
    trainable: str = "all"
    match: str = ""
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: str = DEFAULT_TARGETS
    unet_lora_rank: int = 0
    unet_lora_targets: str = UNET_TARGETS
    unet_learning_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"expected a variant in {list(VARIANTS)}, got {self.variant!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"expected trainable in {list(TRAINABLE)}, got {self.trainable!r}")
        if self.steps < 1 or self.batch_size < 1 or self.sample_steps < 1:
            raise ValueError("steps, batch_size and sample_steps must be at least 1")
        if not 1 <= self.grad_steps <= self.sample_steps:
            raise ValueError(f"grad_steps (K) must be in [1, sample_steps={self.sample_steps}], got {self.grad_steps}")
        if self.trainable == "none" and self.unet_lora_rank < 1:
            raise ValueError("trainable 'none' trains nothing unless a UNet LoRA does: set unet_lora_rank ≥ 1")

    def plain(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CraftResult:
    """What :func:`train_encoder` returns.

    Attributes:
        clip: The new bundle with the fine-tuned encoder (the input bundle is unchanged).
        model: The input model plus the trained UNet LoRA patch, or the input model itself
            when no UNet LoRA trained.
        losses: Per-step losses of the whole run (across a resume).
        rewards: Per-step mean rewards of the whole run (across a resume).
        start_step: The step this call started from (> 0 after a resume).
        checkpoint: The last checkpoint written or resumed from, or ``None``.
    """

    clip: Any
    model: Any = None
    losses: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    start_step: int = 0
    checkpoint: Path | None = None


def read_prompts(prompts: Sequence[str]) -> list[str]:
    """The non-empty, stripped prompts. :raises ValueError: none is left."""
    out = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not out:
        raise ValueError("expected at least one non-empty prompt")
    return out


def train_encoder(
    model: Any,
    clip: Any,
    vae: Any,
    reward: Any,
    prompts: Sequence[str],
    config: CraftConfig,
    *,
    checkpoints: Any = None,
    resume: Path | None = None,
    key: str | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
    logger: logging.Logger | None = None,
) -> CraftResult:
    """Fine-tune ``clip``'s encoder against ``reward``; see the module docstring.

    :param checkpoints: A :class:`~dagfusion.nodes.training.loop.CheckpointPolicy` (``None``: none).
    :raises FloatingPointError: the reward or loss became NaN/inf (the message names the step).
    :raises TrainingPaused: the policy's time limit was reached (a checkpoint was written).
    """
    import torch

    from dagfusion.model import apply_patches, family_for
    from dagfusion.nodes.diffusion.sampling import module_dtype
    from dagfusion.nodes.textcraftor import denoise, encoder
    from dagfusion.nodes.training import checkpoint as ckpt
    from dagfusion.nodes.training.ema import EMA
    from dagfusion.nodes.training.loop import CheckpointPolicy, TrainingPaused, amp_dtype, scheduled_lr
    from dagfusion.nodes.training.optim import optimizer_step, restore_state, rng_state

    log = logger or logging.getLogger("dagfusion.node")
    policy = checkpoints or CheckpointPolicy()
    texts = read_prompts(prompts)
    device = torch.device(model.device)
    total = config.steps
    unet = model.denoiser
    family = family_for(unet)
    scale = model.vae_scale_factor
    if config.resolution % scale:
        raise ValueError(f"resolution must be a multiple of {scale} for this model, got {config.resolution}")
    shape = family.latent_shape(unet, config.batch_size, config.resolution, config.resolution, scale)
    original, tokenizer = encoder.clip_parts(clip)
    trained = encoder.prepare(clip, config.trainable, device, match=config.match, rank=config.lora_rank,
                              alpha=config.lora_alpha, targets=config.lora_targets, seed=config.seed)
    unet_lora = denoiser_lora(unet, config) if config.unet_lora_rank > 0 else None
    params = dict(trained.params)
    if unet_lora is not None:
        params.update({UNET_PREFIX + n: p for n, p in unet_lora.trainable_parameters().items()})
    unet_lr = config.unet_learning_rate or config.learning_rate
    groups = [{"params": list(trained.params.values()), "base_lr": config.learning_rate},
              {"params": [p for n, p in params.items() if n.startswith(UNET_PREFIX)], "base_lr": unet_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    ema = EMA(params.items(), config.ema_decay) if config.ema_decay > 0 else None
    low = amp_dtype(config.precision, device)
    scaler = torch.amp.GradScaler("cuda") if low == torch.float16 else None
    autocast = (lambda: torch.autocast(device.type, dtype=low)) if low is not None else contextlib.nullcontext
    den = denoise.Denoiser(unet, family, denoise.make_scheduler(model), module_dtype(unet), config.guidance, autocast,
                           kind=clip.kind, scale=scale)
    timesteps = int(den.scheduler.config.num_train_timesteps)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(int(config.seed))).tolist()
    generator = torch.Generator("cpu").manual_seed(int(config.seed))
    references: dict[str, Any] = {}
    losses: list[float] = []
    rewards: list[float] = []
    start = 0
    last: Path | None = None
    saved_step = -1

    def reference(batch: list[str]) -> Any:
        missing = [p for p in dict.fromkeys(batch) if p not in references]
        if missing:
            with torch.no_grad(), clip.patched(original):
                rows = encoder.encode(clip, original, tokenizer, missing, next(original.parameters()).device)
            hidden = rows["encoder_hidden_states"]
            references.update({p: r[None].to(device=device, dtype=torch.float32) for p, r in zip(missing, hidden)})
        return torch.cat([references[p] for p in batch])

    def save(done: int) -> Path | None:
        nonlocal last, saved_step
        if policy.folder is None:
            return None
        if saved_step == done:
            return last
        saved_step = done
        tensors, plain = ckpt.optimizer_state(optimizer)
        document = {
            "key": key, "total": total, "losses": list(losses), "rewards": list(rewards),
            "rng": rng_state(generator, device), "optimizer": plain, "config": config.plain(),
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "objective": {"objective": "textcraftor", "reward": getattr(reward, "name", "reward")},
            "parameters": list(params), "prompts": len(texts),
        }
        last = ckpt.save(policy.folder, done, weights=dict(params), ema=ema.state() if ema is not None else None,
                         optimizer=tensors, state=document)
        ckpt.prune(policy.folder, policy.keep)
        return last

    fork = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork), encoder.frozen_flags(unet, vae.module):
        torch.manual_seed(int(config.seed))
        if resume is not None:
            loaded = ckpt.load(resume, device)
            if key is not None and loaded.state.get("key") not in (None, key):
                log.warning("resuming from %s, a checkpoint of a different training configuration", resume)
            absent = sorted(set(params) - set(loaded.weights))
            if absent:
                raise ValueError(f"the checkpoint {resume} has no parameter {absent[0]!r}; it is not of this training")
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(loaded.weights[name])
            restore_state(loaded, optimizer=optimizer, scaler=scaler, ema=ema, generator=generator, device=device)
            losses.extend(float(v) for v in loaded.state.get("losses", []))
            rewards.extend(float(v) for v in loaded.state.get("rewards", []))
            start, last = min(loaded.step, total), resume
            log.info("resuming TextCraftor training from %s (step %d of %d)", resume, loaded.step, total)
        else:
            log.info("TextCraftor (%s): training %d tensors (%d values) of the text encoder for %d steps",
                     config.variant, len(params), sum(p.numel() for p in params.values()), total)
        began = time.monotonic()
        own = [p for p in model.patches if hasattr(p, "apply")] + ([unet_lora] if unet_lora is not None else [])
        with model.use(unet), apply_patches(own, unet), vae.patched(vae.module):
            for step in range(start, total):
                if check_cancelled is not None:
                    try:
                        check_cancelled()
                    except RunCancelled:
                        if step > start:
                            save(step)
                        raise
                lr = scheduled_lr(step, config.learning_rate, config.warmup_steps, total, config.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = scheduled_lr(step, group["base_lr"], config.warmup_steps, total, config.schedule)
                batch = [texts[order[(step * config.batch_size + i) % len(texts)]] for i in range(config.batch_size)]
                with trained.applied() as module:
                    cond = encoder.encode(clip, module, tokenizer, batch, device)
                    uncond = encoder.encode(clip, module, tokenizer, [""], device)
                noise = torch.randn(shape, generator=generator).to(device)
                if config.variant == "direct":
                    with torch.no_grad():
                        x0 = denoise.ddim_chain(den, noise, config.sample_steps, 0, detached(cond), detached(uncond))
                    t = torch.randint(0, timesteps, (1,), generator=generator)[0]
                    again = torch.randn(shape, generator=generator).to(device)
                    latents = denoise.one_step_x0(den, x0.float(), again, t, cond, uncond)
                else:
                    latents = denoise.ddim_chain(den, noise, config.sample_steps, config.grad_steps, cond, uncond,
                                                 config.gradient_checkpointing)
                images = denoise.decode(vae, latents.float(), config.gradient_checkpointing)
                score = reward.score(images, batch).float().mean()
                alignment = ((cond["encoder_hidden_states"] - reference(batch)) ** 2).mean()
                loss = -score + config.alignment_weight * alignment
                values = {"loss": float(loss.detach()), "reward": float(score.detach()),
                          "alignment": float(alignment.detach()), "lr": lr}
                for what in ("reward", "loss"):
                    if not math.isfinite(values[what]):
                        kept = f"; the last good checkpoint is {last}" if last is not None else ""
                        raise FloatingPointError(
                            f"the {what} became {values[what]} at step {step + 1}; training stopped{kept} "
                            "(lower the learning rate or train in fp32)"
                        )
                norm = optimizer_step(loss, optimizer, scaler, params, config.max_grad_norm, ema)
                if norm is not None:
                    values["grad_norm"] = norm
                losses.append(values["loss"])
                rewards.append(values["reward"])
                done = step + 1
                if done < total and policy.every > 0 and done % policy.every == 0:
                    save(done)
                if done < total and policy.time_limit > 0 and time.monotonic() - began > policy.time_limit:
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

    if ema is not None:
        ema.copy_to(params)
    info = {"source": f"textcraftor {clip.info.get('source', '?')}",
            "training": {"objective": "textcraftor", "variant": config.variant, "steps": total, "key": key}}
    out = encoder.result_bundle(clip, trained, f"textcraftor:{key}" if key is not None else None, **info)
    tuned = model
    if unet_lora is not None:
        for p in unet_lora.trainable_parameters().values():
            p.requires_grad_(False)
        tuned = model.with_patch(unet_lora)
    return CraftResult(out, tuned, losses, rewards, start, last)


def detached(inputs: dict[str, Any]) -> dict[str, Any]:
    """The text inputs without gradient history."""
    return {k: v.detach() for k, v in inputs.items()}


def denoiser_lora(unet: Any, config: CraftConfig) -> Any:
    """A fresh trainable LoRA (rank ``unet_lora_rank``, α = rank) on the denoiser's Linear layers
    named by ``unet_lora_targets``, seeded from ``seed + 1``; its ``up`` starts at zero.

    :raises ValueError: the targets match no Linear layer of the denoiser.
    """
    from dagfusion.nodes.lora.patch import TrainableLoraPatch, new_layers
    from dagfusion.nodes.textcraftor.encoder import lora_targets

    names = lora_targets(unet, config.unet_lora_targets, "the denoiser")
    patch = TrainableLoraPatch(new_layers(unet, names, config.unet_lora_rank, float(config.unet_lora_rank),
                                          config.seed + 1), component="denoiser")
    for p in patch.trainable_parameters().values():
        p.requires_grad_(True)
    return patch
