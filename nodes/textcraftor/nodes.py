"""The TextCraftor nodes: Train, InterpolateEncoders and SaveEncoder.

Train is cached like ``dagfusion.train.Train`` (``pure=True, persist=False``): equal inputs give
an equal encoder (bit-identical on the CPU), so the engine keeps the result in memory; its
checkpoints go to a work folder ``<cache_dir>/training/<key>`` keyed by everything that
determines the weights, and running the same training again resumes from the newest one (or
loads the finished weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dagfusion import BOOLEAN, FLOAT, INT, LIST, PATH, SEED, STRING, Input, Output, RunContext, node, union
from dagfusion.errors import NodeInputError
from dagfusion.nodes.textcraftor.encoder import DEFAULT_TARGETS, TRAINABLE
from dagfusion.nodes.textcraftor.loop import UNET_TARGETS, VARIANTS
from dagfusion.nodes.training.loop import PRECISIONS

TYPE_ID = "dagfusion.textcraftor.Train"
VERSION = "1.1.0"
_COLOR = "#8d6e63"


def _tiny_reward() -> Any:
    import torch

    from dagfusion.nodes.metrics.evaluator import ShapeEvalNet
    from dagfusion.nodes.rewards.shapeeval import ShapeEvalReward
    from dagfusion.nodes.shapes.world import ATTRIBUTES

    torch.manual_seed(0)
    return ShapeEvalReward(ShapeEvalNet().eval(), {name: 1.0 for name in ATTRIBUTES})


def _train_example(variant: str) -> Any:
    def build() -> dict[str, Any]:
        from dagfusion.testing import models as tiny

        parts = tiny.sd_handles()
        common = {"model": parts["model"], "clip": parts["clip"], "vae": parts["vae"], "reward": _tiny_reward(),
                  "prompts": ["a large red circle on the left on a black background", "a small blue square at the top on a white background"],
                  "variant": variant, "sample_steps": 2, "grad_steps": 1, "resolution": 32, "steps": 2,
                  "batch_size": 1}
        if variant == "direct":
            return {**common, "trainable": "lora", "lora_rank": 2, "checkpoint_every": 1}
        if variant == "unet":
            return {**common, "variant": "prompt", "trainable": "none", "unet_lora_rank": 2, "checkpoint_every": 0}
        return {**common, "trainable": "match", "match": "*layers.1.*", "checkpoint_every": 0}

    return build


def read_prompt_input(ctx: RunContext, prompts: Any) -> list[str]:
    """The prompt list: a LIST of strings, or a text file path (one prompt per non-empty line)."""
    if isinstance(prompts, str):
        path = ctx.input_path(prompts)
        if not path.is_file():
            raise NodeInputError("prompts", f"expected a list of prompts or a text file, got {prompts!r} (no such file)")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise NodeInputError("prompts", f"expected text prompts, got {type(bad[0]).__name__} {bad[0]!r}")
    if not [p for p in prompts if p.strip()]:
        raise NodeInputError("prompts", "expected at least one non-empty prompt")
    return list(prompts)


@node(
    TYPE_ID,
    version=VERSION,
    category="training/textcraftor",
    inputs=[
        Input("model", "MODEL", link_only=True, description="The text-to-image model (its denoiser stays frozen)."),
        Input("clip", "CLIP", link_only=True, description="The single-CLIP text encoder bundle to fine-tune (copied; the input never changes)."),
        Input("vae", "VAE", link_only=True, description="The VAE decoding latents to images for the reward (frozen)."),
        Input("reward", "REWARD", link_only=True, description="The differentiable reward to maximise (dagfusion.reward.ShapeEval, Combine …)."),
        Input("prompts", union(LIST, STRING), description="Training prompts: a list, or a text file with one prompt per line."),
        Input("variant", STRING, "prompt", choices=VARIANTS,
              description="'direct': one-step x0 prediction from a noised generation; 'prompt': DDIM chain from noise, gradients through the last K steps."),
        Input("sample_steps", INT, 25, min=1, max=1000, description="N: DDIM steps of the generation."),
        Input("grad_steps", INT, 5, min=1, max=1000, description="K: the last K steps carry gradients (variant 'prompt')."),
        Input("guidance", FLOAT, 4.0, min=0.0, max=50.0, description="Classifier-free guidance scale during training (≤ 1: none)."),
        Input("resolution", INT, 512, min=8, max=4096, description="Side of the generated square images in pixels."),
        Input("steps", INT, 1000, min=1, max=10_000_000, description="Number of optimizer steps."),
        Input("batch_size", INT, 4, min=1, max=4096, description="Prompts per step."),
        Input("learning_rate", FLOAT, 1e-6, min=0.0, max=1.0, description="AdamW learning rate."),
        Input("alignment_weight", FLOAT, 1.0, min=0.0, max=1e6,
              description="Weight of the L2 penalty keeping the prompt embeddings near the original encoder's."),
        Input("max_grad_norm", FLOAT, 1.0, min=0.0, max=1e6, description="Clip the gradient norm to this (0 = no clipping)."),
        Input("trainable", STRING, "all", choices=TRAINABLE,
              description="What of the encoder trains: 'all' weights, those whose names 'match' globs, a new 'lora', the bundle's trainable 'patches', or 'none' (a UNet LoRA alone)."),
        Input("match", STRING, "", description="With trainable 'match': glob patterns over parameter names ('*layers.11.*')."),
        Input("lora_rank", INT, 4, min=1, max=1024, description="With trainable 'lora': the rank."),
        Input("lora_alpha", FLOAT, 4.0, exclusive_min=0.0, max=65536.0, description="With trainable 'lora': the scale numerator."),
        Input("lora_targets", STRING, DEFAULT_TARGETS, description="With trainable 'lora': Linear layer names, suffixes or globs."),
        Input("unet_lora_rank", INT, 0, min=0, max=1024,
              description="Also train a LoRA of this rank (α = rank) on the denoiser (0: the denoiser stays as it is)."),
        Input("unet_lora_targets", STRING, UNET_TARGETS, description="With a UNet LoRA: the denoiser's Linear layers (names, suffixes or globs)."),
        Input("unet_learning_rate", FLOAT, 0.0, min=0.0, max=1.0,
              description="With a UNet LoRA: its AdamW learning rate (0: learning_rate)."),
        Input("precision", STRING, "auto", choices=PRECISIONS, description="Autocast on CUDA ('auto': bf16 where supported); fp32 on the CPU."),
        Input("ema_decay", FLOAT, 0.0, min=0.0, max=0.999999, description="EMA of the trained weights (0 = off); the output holds the EMA values."),
        Input("gradient_checkpointing", BOOLEAN, True, description="Recompute the denoiser and VAE activations in the backward pass."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seeds the prompt order, noise and timesteps."),
        Input("checkpoint_every", INT, 100, min=0, max=10_000_000,
              description="Save a checkpoint every N steps, at the end and on cancel (0 = none, no auto-resume)."),
        Input("keep_checkpoints", INT, 2, min=0, max=100_000, description="Keep the newest N checkpoints (0 = all)."),
        Input("resume", PATH, optional=True, description="A checkpoint folder (or a work folder: its newest) to continue from."),
        Input("auto_resume", BOOLEAN, True, description="Continue from this training's own newest checkpoint when one exists."),
    ],
    outputs=[
        Output("clip", "CLIP", "The bundle with the fine-tuned text encoder (a new module, or the input plus the trained LoRA)."),
        Output("model", "MODEL", "The input model plus the trained UNet LoRA patch (the input model itself without one)."),
        Output("rewards", LIST, "Mean reward of every step."),
        Output("losses", LIST, "Loss of every step (−reward + alignment penalty)."),
        Output("checkpoint_dir", STRING, "The folder holding this training's checkpoints ('' without checkpoints)."),
    ],
    examples=[_train_example("prompt"), _train_example("direct"), _train_example("unet")],
    ui={"color": _COLOR},
)
def train_node(ctx: RunContext, model: Any, clip: Any, vae: Any, reward: Any, prompts: Any, variant: str,
               sample_steps: int, grad_steps: int, guidance: float, resolution: int, steps: int, batch_size: int,
               learning_rate: float, alignment_weight: float, max_grad_norm: float, trainable: str, match: str,
               lora_rank: int, lora_alpha: float, lora_targets: str, unet_lora_rank: int, unet_lora_targets: str,
               unet_learning_rate: float, precision: str, ema_decay: float,
               gradient_checkpointing: bool, seed: int, checkpoint_every: int, keep_checkpoints: int,
               resume: str | None, auto_resume: bool) -> dict[str, Any]:
    """TextCraftor: fine-tune the text encoder end to end with a reward and prompts only (UNet and VAE frozen,
    or a UNet LoRA trained with it).

    Reward fine-tuning of the text encoder after Li et al. (CVPR 2024): images are generated from
    the prompts with the encoder being trained, decoded and scored, and the reward is
    back-propagated into the encoder — through a one-step x0 prediction ('direct') or the last K
    steps of a DDIM chain ('prompt'). An L2 penalty keeps the prompt embeddings close to the
    original encoder's. CLIP (SD 1.x/2.x) and T5 (PixArt) encoders; with unet_lora_rank > 0 a
    LoRA on the denoiser trains as well (trainable 'none': the UNet LoRA alone, DRaFT-style). Seeded and deterministic, checkpointed (resumable, also after a cancel),
    with progress events carrying loss and reward; a NaN reward or loss stops the run naming the step.
    """
    from dagfusion.fingerprint import fingerprint, fingerprint_path
    from dagfusion.nodes.textcraftor.loop import CraftConfig, train_encoder
    from dagfusion.nodes.training import checkpoint as ckpt
    from dagfusion.nodes.training.loop import CheckpointPolicy
    from dagfusion.nodes.training.train import checkpoint_path, checkpoint_plan

    texts = read_prompt_input(ctx, prompts)
    try:
        config = CraftConfig(
            variant=variant, sample_steps=sample_steps, grad_steps=grad_steps, guidance=guidance, resolution=resolution,
            steps=steps, batch_size=batch_size, learning_rate=learning_rate, max_grad_norm=max_grad_norm,
            alignment_weight=alignment_weight, precision=precision, ema_decay=ema_decay,
            gradient_checkpointing=gradient_checkpointing, trainable=trainable, match=match, lora_rank=lora_rank,
            lora_alpha=lora_alpha, lora_targets=lora_targets, unet_lora_rank=unet_lora_rank,
            unet_lora_targets=unet_lora_targets, unet_learning_rate=unet_learning_rate, seed=seed,
        )
    except ValueError as exc:
        raise NodeInputError("trainable" if "unet_lora_rank" in str(exc) else "grad_steps", str(exc)) from exc
    explicit = ckpt.resolve(checkpoint_path(ctx, resume)) if resume else None
    key = fingerprint({
        "node": f"{TYPE_ID}@{VERSION}", "format": ckpt.FORMAT, "model": model, "clip": clip, "vae": vae,
        "reward": reward, "prompts": texts, "config": config.plain(),
        "resume": fingerprint_path(explicit) if explicit is not None else None,
    })
    folder, start_from = checkpoint_plan(ctx, key, explicit, wanted=checkpoint_every > 0, auto_resume=auto_resume)

    def progress(step: int, total: int, values: dict[str, float]) -> None:
        ctx.progress(step, total, message="textcraftor", **values)

    result = train_encoder(
        model, clip, vae, reward, texts, config,
        checkpoints=CheckpointPolicy(folder=folder, every=checkpoint_every, keep=keep_checkpoints),
        resume=start_from, key=key, progress=progress, check_cancelled=ctx.check_cancelled, logger=ctx.logger,
    )
    return {"clip": result.clip, "model": result.model, "rewards": result.rewards, "losses": result.losses,
            "checkpoint_dir": str(folder) if folder else ""}


def _interpolate_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    clip = tiny.sd_handles()["clip"]
    return {"clip_a": clip, "clip_b": clip, "alpha": 0.5}


@node(
    "dagfusion.textcraftor.InterpolateEncoders",
    version="1.0.0",
    category="training/textcraftor",
    inputs=[
        Input("clip_a", "CLIP", link_only=True, description="The first bundle (its tokenizer and options are kept)."),
        Input("clip_b", "CLIP", link_only=True, description="The second bundle (same tokenizer and width)."),
        Input("alpha", FLOAT, 0.5, min=0.0, max=1.0, description="Weight of clip_a's embeddings: α·e_a + (1 − α)·e_b."),
    ],
    outputs=[Output("clip", "CLIP", "A bundle whose embeddings interpolate the two encoders'.")],
    examples=[_interpolate_example],
    ui={"color": _COLOR},
)
def interpolate_node(ctx: RunContext, clip_a: Any, clip_b: Any, alpha: float) -> Any:
    """Interpolate two text encoders' embeddings: α·e_a + (1 − α)·e_b (embedding interpolation, not weights).

    Both bundles must share a tokenizer and width (a clear error names both otherwise). Sweep alpha
    to trade the fine-tuned encoder's style against the original's; α = 1 gives clip_a exactly,
    α = 0 clip_b.
    """
    from dagfusion.nodes.textcraftor.interpolate import interpolate

    return interpolate(clip_a, clip_b, alpha)


def _save_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"clip": tiny.sd_handles()["clip"], "folder": "encoder"}


@node(
    "dagfusion.textcraftor.SaveEncoder",
    version="1.0.0",
    category="training/textcraftor",
    inputs=[
        Input("clip", "CLIP", link_only=True, description="The bundle whose (fine-tuned) encoder to write; LoRA patches are fused."),
        Input("folder", STRING, "textcraftor", description="Folder inside the run's output folder."),
    ],
    outputs=[Output("path", STRING, "The folder holding text_encoder/ and tokenizer/.")],
    pure=False,
    output_node=True,
    examples=[_save_example],
    ui={"color": _COLOR},
)
def save_node(ctx: RunContext, clip: Any, folder: str) -> str:
    """Write the text encoder as safetensors in the diffusers layout: folder/text_encoder (config.json +
    model.safetensors) and folder/tokenizer, ready to replace those of a diffusers SD folder."""
    from dagfusion.nodes.textcraftor.save import save_encoder

    try:
        target = ctx.output_path(Path(folder) / "text_encoder" / "config.json").parent.parent
        return str(save_encoder(clip, target))
    except ValueError as exc:
        raise NodeInputError("clip", str(exc)) from exc


def _load_example(folder: Path) -> dict[str, Any]:
    from dagfusion.nodes.textcraftor.save import save_encoder
    from dagfusion.testing import models as tiny

    clip = tiny.sd_handles()["clip"]
    save_encoder(clip, folder / "encoder")
    return {"clip": clip, "path": str(folder / "encoder")}


@node(
    "dagfusion.textcraftor.LoadEncoder",
    version="1.0.0",
    category="training/textcraftor",
    inputs=[
        Input("clip", "CLIP", link_only=True, description="The model's bundle (its tokenizer, options and patches are kept)."),
        Input("path", PATH, description="A folder holding text_encoder/ (config.json + safetensors) and optionally tokenizer/."),
    ],
    outputs=[Output("clip", "CLIP", "The bundle with the loaded encoder in place of its own.")],
    examples=[_load_example],
    ui={"color": _COLOR},
)
def load_node(ctx: RunContext, clip: Any, path: str) -> Any:
    """Load a fine-tuned text encoder (SaveEncoder's or a diffusers folder's text_encoder/) into a bundle.

    The encoder must fit the bundle: the same class, width and vocabulary, and when the folder has
    a tokenizer/ it must equal the bundle's (a clear error names both sides otherwise). Only
    safetensors weights are read; the folder is confined to the readable folders like every loader.
    """
    from dagfusion.nodes.textcraftor.load import EncoderMismatch, load_encoder

    folder = ctx.input_path(path)
    try:
        return load_encoder(clip, folder)
    except FileNotFoundError as exc:
        raise NodeInputError("path", str(exc)) from exc
    except (EncoderMismatch, ValueError) as exc:
        raise NodeInputError("clip", str(exc)) from exc


NODES = (train_node, interpolate_node, save_node, load_node)
