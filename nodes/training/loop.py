"""The training loop, written once for every objective, data source and denoiser family.

:func:`train` never changes its inputs: it trains a deep copy of the handle's denoiser (and
copies of patches that own parameters), so the engine's cached, shared modules stay as they
were. Each optimizer step ``s``:

1. sets the learning rate of step ``s`` (:func:`lr_at`: linear warmup, then constant or cosine);
2. reads samples ``s·B … s·B + B − 1`` from the data source (so a batch depends only on the step);
3. drops captions to ``""`` with probability ``caption_dropout`` (for classifier-free guidance);
4. encodes the images to the denoiser's space with the VAE (a posterior sample, scaled) — or maps
   pixels to [-1, 1] without one — and the captions with the frozen text encoder (each distinct
   caption once, then reused) — or, when the text encoder bundle has trainable patches (a
   textual-inversion embedding) and ``trainable`` is ``"patches"``, with copies of those patches,
   every step, with gradients flowing into their parameters (the encoder's weights stay frozen);
5. asks the objective for the loss (:mod:`~dagfusion.nodes.training.objectives`), under autocast
   (bf16/fp16 on CUDA; fp32 on the CPU), with the model's patches applied to the module;
6. backpropagates, clips the gradient norm, steps AdamW (fp16 with a gradient scaler), updates
   the EMA, reports progress (which raises if the run was cancelled) and saves a checkpoint every
   ``checkpoint_every`` steps.

All randomness — timesteps, noise, caption dropout, VAE posterior samples — comes from one CPU
generator seeded by ``seed``; the global torch generators (dropout inside the model) are seeded
too, inside a forked RNG state so the caller's are untouched. Checkpoints hold all of these
states (:mod:`~dagfusion.nodes.training.checkpoint`), so on the CPU a run resumed from step ``k``
gives bit-identical weights to one that never stopped. On cancel the loop writes a checkpoint of
the step it finished before re-raising; checkpoints already written are never removed by a
cancel or a failure.

The output module is in eval mode, without gradients, in the input denoiser's dtype and on its
device; with EMA its trained parameters hold the EMA values. :attr:`TrainResult.clip` is the
text-encoder bundle with its trained patches (the input bundle when none trained).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dagfusion import RunCancelled
from dagfusion.nodes.training import checkpoint as ckpt
from dagfusion.nodes.training.optim import optimizer_step, restore_state, rng_state
from dagfusion.nodes.training.params import patch_parameters, select

SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RECENT = 10
"""The final loss is the mean of the last this-many step losses."""


class TrainingPaused(RuntimeError):
    """The time limit was reached: a checkpoint was saved; running again continues from it."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything besides the inputs' identities that determines the trained weights."""

    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float = 1.0
    caption_dropout: float = 0.1
    precision: str = "auto"
    ema_decay: float = 0.0
    gradient_checkpointing: bool = False
    trainable: str = "all"
    match: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be at least 1, got {self.steps} and {self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"expected a schedule in {list(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"expected a precision in {list(PRECISIONS)}, got {self.precision!r}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")

    def plain(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CheckpointPolicy:
    """Where and how often to checkpoint; none of this changes the trained weights.

    Attributes:
        folder: The work folder (``None``: write no checkpoint).
        every: Save every this many steps (and at the end, and on cancel); 0 with a folder: only
            at the end and on cancel.
        keep: Keep the newest this many checkpoints (0: all).
        time_limit: Seconds after which to save and stop with :class:`TrainingPaused` (0: none).
    """

    folder: Path | None = None
    every: int = 0
    keep: int = 2
    time_limit: float = 0.0


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: The new model handle (the trained copy; the input handle is unchanged).
        final_loss: Mean loss of the last :data:`RECENT` steps (across a resume).
        losses: Per-step losses of the steps this call ran.
        start_step: The step this call started from (> 0 after a resume).
        checkpoint: The last checkpoint written or resumed from, or ``None``.
        clip: The text-encoder bundle with its trained patches (the input bundle when none trained).
    """

    model: Any
    final_loss: float
    losses: list[float] = field(default_factory=list)
    start_step: int = 0
    checkpoint: Path | None = None
    clip: Any = None


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup_steps``,
    then constant, or a cosine decay to 0 at ``steps``."""
    return scheduled_lr(step, config.learning_rate, config.warmup_steps, config.steps, config.schedule)


def scheduled_lr(step: int, base: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """``base`` warmed up linearly over ``warmup`` steps, then constant or cosine-decayed to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def amp_dtype(precision: str, device: Any) -> Any:
    """The autocast dtype for ``precision`` on ``device`` (``None``: fp32; always on the CPU)."""
    import torch

    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


class _TextCache:
    """Embeddings of recent distinct captions (at most ``limit``, least recently used dropped),
    computed with the frozen text encoder; recomputing one gives the same tensors. With
    ``trains`` (the bundle's patches train) every caption is encoded afresh, keeping its graph."""

    def __init__(self, clip: Any, device: Any, limit: int = 4096, trains: bool = False) -> None:
        self.clip = clip
        self.device = device
        self.kind = getattr(clip, "kind", None)  # an image encoder has none: its objective prepares batches
        self.limit = limit
        self.trains = trains
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def conditioning(self, captions: tuple[str, ...]) -> Any:
        import torch

        from dagfusion.nodes.diffusion.data import Conditioning
        from dagfusion.nodes.diffusion.text import encode_prompt

        rows = {}
        for caption in dict.fromkeys(captions):
            if caption in self._cache:
                self._cache.move_to_end(caption)
            elif self.trains:
                rows[caption] = {k: v.to(self.device) for k, v in encode_prompt(self.clip, caption, "").positive.items()}
                continue
            else:
                encoded = encode_prompt(self.clip, caption, "")
                self._cache[caption] = {k: v.detach().to(self.device) for k, v in encoded.positive.items()}
            rows[caption] = self._cache[caption]
        while len(self._cache) > self.limit:
            self._cache.popitem(last=False)
        keys = rows[captions[0]].keys()
        positive = {k: torch.cat([rows[c][k] for c in captions]) for k in keys}
        return Conditioning(self.kind, positive, None, {})


def _encoder(vae: Any, device: Any) -> Callable[[Any, Any], Any]:
    """``encode(images in [0, 1], generator) -> x0`` (float32 on ``device``)."""
    import torch

    if vae is None:
        return lambda images, generator: images.to(device=device, dtype=torch.float32) * 2 - 1

    from dagfusion.nodes.diffusion.vae import from_vae_space

    def encode(images: Any, generator: Any) -> Any:
        module = vae.module
        with vae.patched(module), torch.no_grad():
            param = next(module.parameters())
            x = images.to(device=param.device, dtype=param.dtype) * 2 - 1
            z = module.encode(x).latent_dist.sample(generator=generator)
            return from_vae_space(module, z).to(device=device, dtype=torch.float32)

    return encode


def _copy_for_training(model: Any) -> tuple[Any, list[Any], list[int]]:
    """Deep copies of the denoiser and of the patches that own parameters (copied together, so
    references between them stay shared), the patch list to train with, and the copied indices."""
    patches = list(model.patches)
    owning = [i for i, p in enumerate(patches) if patch_parameters(p) is not None]
    module, copies = copy.deepcopy((model.denoiser, [patches[i] for i in owning]))
    for i, patch in zip(owning, copies):
        patches[i] = patch
    return module, patches, owning


def _clip_for_training(clip: Any, trainable: str) -> tuple[Any, list[int]]:
    """With ``trainable`` ``"patches"``: a bundle like ``clip`` whose parameter-owning patches are
    copies (to train), and their indices; else ``clip`` unchanged and no index."""
    patches = list(getattr(clip, "patches", ()) or ())
    owning = [i for i, p in enumerate(patches) if patch_parameters(p) is not None] if trainable == "patches" else []
    if not owning:
        return clip, []
    copies = copy.deepcopy([patches[i] for i in owning])
    for i, patch in zip(owning, copies):
        patches[i] = patch
    return clip.with_patches(patches), owning


def train(
    model: Any,
    data: Any,
    clip: Any,
    vae: Any,
    objective: Any,
    config: TrainConfig,
    *,
    checkpoints: CheckpointPolicy | None = None,
    resume: Path | None = None,
    key: str | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
    logger: logging.Logger | None = None,
) -> TrainResult:
    """Train a copy of ``model``'s denoiser; see the module docstring.

    :param data: A data source (:func:`~dagfusion.nodes.training.data.as_training_data` adapts it).
    :param clip: The text encoder bundle (frozen). :param vae: The VAE (frozen), or ``None`` for pixel space.
    :param objective: An :class:`~dagfusion.nodes.training.objectives.Objective`.
    :param resume: A checkpoint folder to continue from.
    :param key: The training's identity (written into checkpoints and the output's fingerprint).
    :param progress: ``progress(step, total, values)`` after every step; it may raise
        :class:`~dagfusion.RunCancelled`.
    :param check_cancelled: Called before every step; it may raise :class:`~dagfusion.RunCancelled`.
        On a cancel from either, the last finished step is checkpointed (when checkpointing) first.
    :raises TrainingPaused: the policy's time limit was reached (a checkpoint was written).
    """
    import torch

    from dagfusion.model import StaticRef, apply_patches, family_for
    from dagfusion.nodes.diffusion.sampling import module_dtype
    from dagfusion.nodes.training.data import as_training_data
    from dagfusion.nodes.training.ema import EMA
    from dagfusion.nodes.training.objectives import ModelCall, TrainBatch, TrainStep

    log = logger or logging.getLogger("dagfusion.node")
    policy = checkpoints or CheckpointPolicy()
    source = as_training_data(data)
    device = torch.device(model.device)
    family = family_for(model.denoiser)
    original_dtype = module_dtype(model.denoiser)
    original_device = next(model.denoiser.parameters()).device
    total = config.steps

    module, patches, owning = _copy_for_training(model)
    _place(module, device, torch.float32)
    for i in owning:
        for p in patch_parameters(patches[i]).values():
            p.data = p.data.to(device=device, dtype=torch.float32)
    clip, clip_owning = _clip_for_training(clip, config.trainable)
    clip_params: dict[str, Any] = {}
    clip_devices: dict[str, Any] = {}
    for i in clip_owning:
        for name, p in patch_parameters(clip.patches[i]).items():
            clip_devices[f"@clip{i}.{name}"] = p.device
            p.data = p.data.to(device=device, dtype=torch.float32)
            clip_params[f"@clip{i}.{name}"] = p
    params = select(module, patches, config.trainable, config.match, extra=clip_params)
    module.train()
    checkpointing = False
    if config.gradient_checkpointing:
        if callable(getattr(module, "enable_gradient_checkpointing", None)):
            module.enable_gradient_checkpointing()
            checkpointing = True
        else:
            log.warning("%s does not support gradient checkpointing; training without it", type(module).__name__)

    optimizer = torch.optim.AdamW(
        list(params.values()), lr=config.learning_rate, betas=(config.beta1, config.beta2),
        weight_decay=config.weight_decay,
    )
    ema = EMA(params.items(), config.ema_decay) if config.ema_decay > 0 else None
    low = amp_dtype(config.precision, device)
    scaler = torch.amp.GradScaler("cuda") if low == torch.float16 else None
    autocast = (lambda: torch.autocast(device.type, dtype=low)) if low is not None else contextlib.nullcontext
    generator = torch.Generator("cpu").manual_seed(int(config.seed))
    text = _TextCache(clip, device, trains=bool(clip_params))
    encode = _encoder(vae, device)
    scale = model.vae_scale_factor if vae is not None else 1
    recent: deque[float] = deque(maxlen=RECENT)
    losses: list[float] = []
    start = 0

    def prepare(captions: tuple[str, ...], shape: tuple[int, ...]) -> Any:
        """The denoiser's keyword inputs for ``captions`` at latent ``shape`` (no CFG doubling)."""
        return family.prepare(
            module, text.conditioning(captions), batch=len(captions), cfg=False, device=device,
            dtype=torch.float32, latent_shape=shape, scale=scale, guidance_scale=1.0,
        )
    last_checkpoint: Path | None = None
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []

    def weights() -> dict[str, Any]:
        out = dict(module.state_dict())
        for name, p in params.items():
            if name.startswith("@"):
                out[name] = p
        return out

    def state(done: int) -> dict[str, Any]:
        tensors, plain = ckpt.optimizer_state(optimizer)
        document = {
            "key": key, "total": total, "recent_losses": list(recent), "rng": rng_state(generator, device),
            "optimizer": plain, "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "config": config.plain(), "objective": objective.describe(), "data": source.describe(),
            "parameters": list(params), "model": {"source": model.info.get("source"), "class": type(module).__name__},
        }
        if done >= total:
            document["final_loss"] = _mean(recent)
        return {"tensors": tensors, "document": document}

    saved_step = -1

    def save(done: int) -> Path | None:
        nonlocal last_checkpoint, saved_step
        if policy.folder is None:
            return None
        if saved_step == done:
            return last_checkpoint
        saved_step = done
        snapshot = state(done)
        last_checkpoint = ckpt.save(
            policy.folder, done, weights=weights(), ema=ema.state() if ema is not None else None,
            optimizer=snapshot["tensors"], state=snapshot["document"],
        )
        ckpt.prune(policy.folder, policy.keep)
        return last_checkpoint

    resumed: Mapping[str, Any] = {}
    with torch.random.fork_rng(devices=fork_devices):
        torch.default_generator.manual_seed(int(config.seed))
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(int(config.seed))
        if resume is not None:
            loaded = ckpt.load(resume, device)
            resumed = loaded.state
            if key is not None and loaded.state.get("key") not in (None, key):
                log.warning("resuming from %s, a checkpoint of a different training configuration", resume)
            own = {k: v for k, v in loaded.weights.items() if not k.startswith("@")}
            module.load_state_dict(own, strict=True)
            with torch.no_grad():
                for name, p in params.items():
                    if name.startswith("@"):
                        if name not in loaded.weights:
                            raise ValueError(f"the checkpoint {resume} has no parameter {name!r}")
                        p.copy_(loaded.weights[name])
            restore_state(loaded, optimizer=optimizer, scaler=scaler, ema=ema, generator=generator, device=device)
            recent.extend(float(v) for v in loaded.state.get("recent_losses", []))
            start = min(loaded.step, total)
            last_checkpoint = resume
            if loaded.step > total:
                log.warning("the checkpoint is at step %d, beyond the %d steps asked for; using its weights", loaded.step, total)
            log.info("resuming training from %s (step %d of %d)", resume, loaded.step, total)
        else:
            log.info(
                "training %d parameter tensors (%d values) of %s on %s for %d steps",
                len(params), sum(p.numel() for p in params.values()), type(module).__name__, device, total,
            )

        began = time.monotonic()
        with apply_patches(patches, module):
            for step in range(start, total):
                if check_cancelled is not None:
                    try:
                        check_cancelled()
                    except RunCancelled:
                        if step > start:
                            save(step)
                        raise
                lr = lr_at(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                examples = source.examples(step * config.batch_size, config.batch_size)
                captions = tuple(examples.captions)
                custom = objective.batch_inputs(examples, vae=vae, encoder=clip, device=device, generator=generator)
                if custom is not None:  # the objective prepared the batch (e.g. video on its first frame)
                    x0 = custom.x0
                    bound = family.prepare(
                        module, custom.conditioning, batch=int(x0.shape[0]), cfg=False, device=device,
                        dtype=torch.float32, latent_shape=tuple(x0.shape), scale=scale, guidance_scale=1.0,
                    )
                    call = ModelCall(module, family, bound.kwargs, autocast, None, concat=bound.concat)
                else:
                    if config.caption_dropout > 0:
                        drop = torch.rand((len(captions),), generator=generator) < config.caption_dropout
                        captions = tuple("" if d else c for c, d in zip(captions, drop.tolist()))
                    images = examples.images[:, :3] if examples.images.shape[1] == 4 else examples.images
                    x0 = encode(images, generator)
                    shape = tuple(x0.shape)
                    prepared = prepare(captions, shape)
                    if prepared.concat is not None:
                        raise ValueError(
                            f"training {family.name} models (with concatenated image latents) needs an objective that "
                            "prepares its batches (batch_inputs), such as the video EDM objective"
                        )
                    empty = ("",) * len(captions)
                    call = ModelCall(module, family, prepared.kwargs, autocast,
                                     lambda empty=empty, shape=shape: prepare(empty, shape).kwargs)
                loss, logs = objective.loss(call, TrainBatch(x0, captions, examples), TrainStep(step, total), generator)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"the loss became {value} at step {step + 1}; lower the learning rate, clip gradients "
                        "(max_grad_norm) or train in fp32"
                    )
                values = {"loss": value, "lr": lr, **{k: float(v) for k, v in logs.items()}}
                norm = optimizer_step(loss, optimizer, scaler, params, config.max_grad_norm, ema)
                if norm is not None:
                    values["grad_norm"] = norm
                losses.append(value)
                recent.append(value)
                done = step + 1
                if done < total and policy.every > 0 and done % policy.every == 0:
                    save(done)
                if done < total and policy.time_limit > 0 and time.monotonic() - began > policy.time_limit:
                    path = save(done)
                    raise TrainingPaused(
                        f"the time limit was reached at step {done} of {total}"
                        + (f"; the checkpoint is in {path}: run again to continue from it" if path else "")
                    )
                if progress is not None:
                    try:
                        progress(done, total, values)
                    except RunCancelled:
                        save(done)
                        raise
            if start < total or last_checkpoint is None:
                save(total)

    module.eval()
    if checkpointing and callable(getattr(module, "disable_gradient_checkpointing", None)):
        module.disable_gradient_checkpointing()
    if ema is not None:
        ema.copy_to(params)
    module.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(False)
    _place(module, original_device, original_dtype)
    for i in owning:
        for p in patch_parameters(patches[i]).values():
            p.data = p.data.to(device=original_device)
    for name, p in clip_params.items():
        p.data = p.data.to(device=clip_devices[name])

    final_loss = _mean(recent)
    if start >= total and "final_loss" in resumed:
        final_loss = float(resumed["final_loss"])
    fingerprint = f"trained:{key}" if key is not None else None
    info = {
        "source": f"trained {model.info.get('source', '?')}",
        "training": {"objective": objective.describe().get("objective"), "steps": total, "key": key},
    }
    handle = model.with_denoiser(StaticRef(module, fingerprint), **info)
    scheduler = objective.sampling_scheduler(model.scheduler)
    if scheduler is not None:
        handle = handle.with_scheduler(scheduler)
    if owning:
        handle = handle.with_patches(patches)
    return TrainResult(handle, final_loss, losses, start, last_checkpoint, clip=clip)


def _place(module: Any, device: Any, dtype: Any) -> None:
    """Move ``module`` to ``device`` and ``dtype``, naming a dtype only when it changes (diffusers
    warns about every explicit dtype cast)."""
    from dagfusion.nodes.diffusion.sampling import module_dtype

    if module_dtype(module) != dtype:
        module.to(dtype=dtype)
    module.to(device)


def _mean(values: Any) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")
