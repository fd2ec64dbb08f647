"""The Train node: the generic training loop as a workflow step.

Caching — what the engine does with this node, and why it is declared ``pure=True,
persist=False``:

- *Pure*: equal inputs give equal weights — bit-identical on the CPU (all randomness is seeded
  from the ``seed`` input, see :mod:`~dagfusion.nodes.training.loop`); on a GPU equal up to the
  non-determinism of its kernels, which the cache treats as the same result. So the engine keeps
  the trained handle in its in-memory output cache and a second run of the workflow (or a sweep
  over downstream inputs) does not train again. The node writes nothing into the run's output
  folder (exporting is the SaveDiffusers node's job).
- *Not persist*: the engine's disk cache needs a safe serializer for every output, and a
  ``MODEL`` handle has none (it may carry arbitrary patches, and pickle is never used).
  Instead the node keeps its own durable, safe state: its checkpoints (safetensors + JSON) live
  in a *work folder* under the settings' ``cache_dir`` (``training/<key>``), keyed by the
  fingerprint of everything that determines the weights — the input handles, the data source,
  the objective and every training setting except the checkpointing and time-limit knobs, which
  do not change the result. Running the same training again — in a new process, after a crash,
  a cancel or a time limit — resumes from the newest checkpoint there; after a finished run it
  just loads the final weights. ``auto_resume`` turns this off.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dagfusion import BOOLEAN, FLOAT, INT, PATH, SEED, STRING, Input, Output, RunContext, node, union
from dagfusion.nodes.training.loop import PRECISIONS, SCHEDULES
from dagfusion.nodes.training.params import TRAINABLE_CHOICES
from dagfusion.nodes.training.types import OBJECTIVE, TRAINING_DATA

TYPE_ID = "dagfusion.train.Train"
VERSION = "1.0.0"


def training_key(parts: dict[str, Any]) -> str | None:
    """The fingerprint of everything that determines a training's result, or ``None`` if some
    input cannot be fingerprinted."""
    from dagfusion.fingerprint import fingerprint
    from dagfusion.nodes.training.checkpoint import FORMAT

    return fingerprint({"node": f"{TYPE_ID}@{VERSION}", "format": FORMAT, **parts})


def checkpoint_plan(
    ctx: RunContext, key: str | None, explicit: Path | None, *, wanted: bool, auto_resume: bool
) -> tuple[Path | None, Path | None]:
    """Where a training node keeps its checkpoints and what it starts from: ``(folder, start)``.

    The folder is the training's work area in the cache folder (by ``key``), or a folder of this
    run only when an input cannot be fingerprinted; ``None`` when no checkpoints are ``wanted``.
    With ``auto_resume``, the newest checkpoint of the same training replaces ``explicit``.
    """
    from dagfusion.nodes.training import checkpoint as ckpt

    folder = None
    if wanted:
        if key is not None:
            folder = ckpt.work_folder(ctx.settings.cache_dir, key)
        else:
            ctx.logger.warning("an input of the training cannot be fingerprinted: checkpoints go to a folder of this run only")
            safe = re.sub(r"[^A-Za-z0-9_-]", "-", f"{ctx.run_id}-{ctx.node_id}")
            folder = Path(ctx.settings.cache_dir) / "training" / f"run-{safe}"
    start_from = explicit
    if folder is not None and auto_resume and key is not None:
        own = ckpt.latest(folder)
        if own is not None:
            start_from = own
            ctx.logger.info("found this training's checkpoint %s; continuing from it", own)
    return folder, start_from


def checkpoint_path(ctx: RunContext, path: str) -> Path:
    """A checkpoint to resume from: inside this node's work area of the cache folder (written by
    dagfusion itself), or under the allowed read folders."""
    from dagfusion.confinement import check_tree_readable
    from dagfusion.context import is_within

    candidate = Path(path).expanduser()
    training_root = Path(ctx.settings.cache_dir) / "training"
    if candidate.is_absolute() and is_within(candidate, [training_root]):
        resolved = candidate.resolve()
        check_tree_readable(resolved, (training_root,))
        return resolved
    return ctx.settings.check_tree_readable(ctx.input_path(path))


def _example(objective: str) -> Any:
    def build() -> dict[str, Any]:
        from dagfusion.testing import models as tiny
        from dagfusion.nodes.shapes.dataset import ShapesDataset
        from dagfusion.nodes.training.objectives import RectifiedFlowObjective, VPredictionObjective

        parts = tiny.sd_handles()
        common = {"model": parts["model"], "clip": parts["clip"], "vae": parts["vae"],
                  "data": ShapesDataset(split="train", resolution=32, seed=0), "steps": 2, "batch_size": 2}
        if objective == "v":
            return {**common, "objective": VPredictionObjective(zero_terminal_snr=True), "ema_decay": 0.9,
                    "schedule": "cosine", "warmup_steps": 1, "checkpoint_every": 1}
        return {**common, "objective": RectifiedFlowObjective(), "trainable": "match", "match": "*attn2*",
                "checkpoint_every": 0, "caption_dropout": 0.5}

    return build


@node(
    TYPE_ID,
    version=VERSION,
    category="training",
    inputs=[
        Input("model", "MODEL", link_only=True, description="The model to train (it is copied; the input handle never changes)."),
        Input("data", union("SHAPES_DATASET", TRAINING_DATA), link_only=True,
              description="Training data: a shapes dataset or any TRAINING_DATA source (images with captions)."),
        Input("clip", union("CLIP", "CLIP_VISION"), link_only=True,
              description="The frozen encoder of the conditions: the text encoder bundle for captions, or an image "
                          "encoder for objectives that condition on images (video on its first frame)."),
        Input("vae", "VAE", optional=True, link_only=True,
              description="The VAE that maps images to the model's latents (frozen); absent: the model works on pixels in [-1, 1]."),
        Input("objective", OBJECTIVE, link_only=True, description="What to minimise (Epsilon, VPrediction, RectifiedFlow, or a plug-in objective)."),
        Input("trainable", STRING, "all", choices=TRAINABLE_CHOICES,
              description="Which parameters train: 'all', those whose module names 'match' the globs, or those the model's 'patches' own."),
        Input("match", STRING, "", description="With trainable 'match': glob patterns over parameter/module names, comma-separated ('*attn2*, conv_out')."),
        Input("steps", INT, 1000, min=1, max=10_000_000, description="Number of optimizer steps."),
        Input("batch_size", INT, 16, min=1, max=65536, description="Samples per step (step s reads samples s·B … s·B+B−1 of the data)."),
        Input("learning_rate", FLOAT, 1e-4, min=0.0, max=1.0, description="Peak AdamW learning rate."),
        Input("schedule", STRING, "constant", choices=SCHEDULES, description="Learning-rate schedule after warmup: constant, or cosine decay to 0."),
        Input("warmup_steps", INT, 0, min=0, max=10_000_000, description="Linear learning-rate warmup over this many steps."),
        Input("weight_decay", FLOAT, 0.01, min=0.0, max=10.0, description="AdamW decoupled weight decay."),
        Input("beta1", FLOAT, 0.9, min=0.0, max=0.999999, description="AdamW beta1 (first-moment decay)."),
        Input("beta2", FLOAT, 0.999, min=0.0, max=0.999999, description="AdamW beta2 (second-moment decay)."),
        Input("max_grad_norm", FLOAT, 1.0, min=0.0, max=1e6, description="Clip the gradient norm to this (0 = no clipping)."),
        Input("caption_dropout", FLOAT, 0.1, min=0.0, max=1.0,
              description="Probability of training on an empty caption (makes classifier-free guidance work)."),
        Input("precision", STRING, "auto", choices=PRECISIONS,
              description="Autocast on CUDA: 'auto' (bf16 where supported, else fp16), 'bf16', 'fp16' (with a gradient scaler) or 'fp32'. Always fp32 on the CPU."),
        Input("ema_decay", FLOAT, 0.0, min=0.0, max=0.999999,
              description="EMA of the trained weights with this decay (0 = off); the output model then holds the EMA weights."),
        Input("gradient_checkpointing", BOOLEAN, False,
              description="Recompute activations in the backward pass to save memory (models that support it)."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seeds every random draw of the run (noise, timesteps, dropout, VAE samples)."),
        Input("checkpoint_every", INT, 500, min=0, max=10_000_000,
              description="Save a checkpoint every N steps, at the end and on cancel (0 = no checkpoints, no auto-resume)."),
        Input("keep_checkpoints", INT, 2, min=0, max=100_000, description="Keep the newest N checkpoints (0 = all)."),
        Input("resume", PATH, optional=True,
              description="A checkpoint folder (or a work folder: its newest checkpoint) to continue from."),
        Input("auto_resume", BOOLEAN, True,
              description="Continue from this training's own newest checkpoint when one exists (after a cancel, crash or time limit)."),
        Input("time_limit", FLOAT, 0.0, min=0.0, max=1e7,
              description="Minutes after which to save a checkpoint and stop with an error; running again continues (0 = none)."),
    ],
    outputs=[
        Output("model", "MODEL", "The trained model: a new handle over the trained copy, with the objective's sampling scheduler."),
        Output("final_loss", FLOAT, "Mean loss over the last 10 steps."),
        Output("checkpoint_dir", STRING, "The folder holding this training's checkpoints ('' without checkpoints)."),
        Output("clip", "CLIP",
               "The text encoder bundle with its trained patches (a textual-inversion embedding, with trainable "
               "'patches'); else the input bundle (none when an image encoder was given)."),
    ],
    examples=[_example("v"), _example("flow")],
    ui={"color": "#ff7043"},
)
def train_node(
    ctx: RunContext,
    model: Any,
    data: Any,
    clip: Any,
    vae: Any,
    objective: Any,
    trainable: str,
    match: str,
    steps: int,
    batch_size: int,
    learning_rate: float,
    schedule: str,
    warmup_steps: int,
    weight_decay: float,
    beta1: float,
    beta2: float,
    max_grad_norm: float,
    caption_dropout: float,
    precision: str,
    ema_decay: float,
    gradient_checkpointing: bool,
    seed: int,
    checkpoint_every: int,
    keep_checkpoints: int,
    resume: str | None,
    auto_resume: bool,
    time_limit: float,
) -> dict[str, Any]:
    """Train a diffusion model's denoiser on a dataset with a pluggable objective (AdamW, EMA, checkpoints).

    The input model is copied, never changed; the output is a new handle over the trained copy
    whose scheduler matches the objective. Training runs where the model handle computes (its
    loader's device); the text encoder and VAE stay frozen — with trainable 'patches', trainable
    patches on the text encoder bundle (dagfusion.text.TrainableEmbedding) train too and come out
    on the ``clip`` output. Seeded training is deterministic (bit-exact on the
    CPU) and cached in memory; checkpoints (safetensors + JSON, never pickle) go to a work folder
    in the cache folder keyed by the training's inputs, so running the same training again
    resumes where it stopped — after a cancel (which saves the step it finished), a crash or the
    time limit — or loads the finished weights. Progress events carry the loss every step.
    """
    from dagfusion.fingerprint import fingerprint_path
    from dagfusion.nodes.training import checkpoint as ckpt
    from dagfusion.nodes.training.data import as_training_data
    from dagfusion.nodes.training.loop import CheckpointPolicy, TrainConfig, train

    config = TrainConfig(
        steps=steps, batch_size=batch_size, learning_rate=learning_rate, schedule=schedule, warmup_steps=warmup_steps,
        weight_decay=weight_decay, beta1=beta1, beta2=beta2, max_grad_norm=max_grad_norm,
        caption_dropout=caption_dropout, precision=precision, ema_decay=ema_decay,
        gradient_checkpointing=gradient_checkpointing, trainable=trainable, match=match, seed=seed,
    )
    source = as_training_data(data)
    explicit = ckpt.resolve(checkpoint_path(ctx, resume)) if resume else None
    key = training_key({
        "model": model, "data": source, "clip": clip, "vae": vae, "objective": objective, "config": config.plain(),
        "resume": fingerprint_path(explicit) if explicit is not None else None,
    })
    folder, start_from = checkpoint_plan(
        ctx, key, explicit, wanted=checkpoint_every > 0 or time_limit > 0, auto_resume=auto_resume
    )

    def progress(step: int, total: int, values: dict[str, float]) -> None:
        ctx.progress(step, total, message="training", **values)

    result = train(
        model, source, clip, vae, objective, config,
        checkpoints=CheckpointPolicy(folder=folder, every=checkpoint_every, keep=keep_checkpoints, time_limit=time_limit * 60.0),
        resume=start_from, key=key, progress=progress, check_cancelled=ctx.check_cancelled, logger=ctx.logger,
    )
    return {"model": result.model, "final_loss": result.final_loss, "checkpoint_dir": str(folder) if folder else "",
            "clip": _text_bundle(result.clip if result.clip is not None else clip)}


def _text_bundle(clip: Any) -> Any:
    """The ``clip`` output: a text encoder bundle; an image encoder (video) gives none."""
    from dagfusion.model import TextEncoderBundle

    return clip if isinstance(clip, TextEncoderBundle) else None


NODES = (train_node,)
