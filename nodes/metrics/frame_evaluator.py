"""ShapeEval-frames: ShapeEval's network read out on frames of the shapes-video world.

ShapeEval is trained on still renders at five positions; on video frames, where the object sits
anywhere along its lane, its shape head is right on only about 55 % of real frames (measured on
the held-out clips: colour 1.00, size 0.89, background 1.00, shape 0.55). ShapeEval-frames is
the same architecture (:class:`~dagfusion.nodes.metrics.evaluator.ShapeEvalNet`'s body and
feature layer) with heads for colour, shape, size and background only, trained on frames of the
training clips (every position along every lane), with ShapeEval's augmentation. It scores
whether a generated clip keeps its first frame's attributes in every frame; position is not read
(motion is scored from centroid tracks, :mod:`~dagfusion.nodes.metrics.video`).

Weights: safetensors with the vocabulary and the training provenance in the metadata
(``benchmarks/train_frame_evaluator.py`` reproduces the shipped file).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dagfusion.nodes.metrics.evaluator import FEATURES, ShapeEvalNet, _augment
from dagfusion.nodes.shapes.world import ATTRIBUTES

FRAME_ATTRIBUTES: dict[str, tuple[str, ...]] = {k: ATTRIBUTES[k] for k in ("colour", "shape", "size", "background")}
FORMAT = "dagfusion.shapeeval-frames/1"
SHIPPED = Path(__file__).with_name("weights") / "shapeeval_frames.safetensors"


class FrameEvalNet(ShapeEvalNet):
    """ShapeEval's body and features with one head per frame attribute (no position head)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__(width)
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURES, len(values)) for name, values in FRAME_ATTRIBUTES.items()})


def _frame_pool(count: int, seed: int, resolution: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``count`` clips' frames of the training split and their labels."""
    from dagfusion.nodes.shapes.motion import ShapesVideoDataset

    batch = ShapesVideoDataset("train", resolution=resolution, seed=seed).batch(0, count)
    frames = batch.video.flatten(0, 1)
    per_clip = batch.video.shape[1]
    targets = {
        name: torch.tensor([values.index(getattr(c, name)) for c in batch.clips]).repeat_interleave(per_clip)
        for name, values in FRAME_ATTRIBUTES.items()
    }
    return frames, targets


def train_frame_evaluator(
    *, steps: int = 600, batch_size: int = 128, learning_rate: float = 2e-3, seed: int = 0, clips: int = 1536,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[FrameEvalNet, float]:
    """Train ShapeEval-frames on ``clips`` training clips' frames (AdamW, warmup + cosine,
    ShapeEval's augmentation); returns the network and the seconds it took. Deterministic per seed."""
    torch.manual_seed(seed)
    model = FrameEvalNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    start = time.perf_counter()
    frames, targets = _frame_pool(clips, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    model.train()
    for step in range(steps):
        index = torch.randint(0, frames.shape[0], (batch_size,), generator=generator)
        logits = model(_augment(frames[index], generator))
        loss = sum(F.cross_entropy(logits[k], targets[k][index]) for k in FRAME_ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, steps, float(loss.detach()))
    return model.eval(), time.perf_counter() - start


@torch.no_grad()
def predict_frames(model: FrameEvalNet, frames: torch.Tensor, batch_size: int = 256) -> list[dict[str, str]]:
    """The frame attributes read from each frame ``(N, 3, H, W)`` in [0, 1]."""
    out: list[dict[str, str]] = []
    for chunk in frames.split(batch_size):
        logits = model(chunk.float())
        indices = {k: v.argmax(dim=1).tolist() for k, v in logits.items()}
        for i in range(chunk.shape[0]):
            out.append({k: FRAME_ATTRIBUTES[k][indices[k][i]] for k in FRAME_ATTRIBUTES})
    return out


@torch.no_grad()
def save_frame_evaluator(model: FrameEvalNet, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Save fp16 weights with the vocabulary and ``extra`` (provenance) in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "attributes": json.dumps(FRAME_ATTRIBUTES), **{k: str(v) for k, v in (extra or {}).items()}}
    save_file(state, str(path), metadata=metadata)


def load_frame_evaluator(path: str | Path = SHIPPED) -> FrameEvalNet:
    """Load weights saved by :func:`save_frame_evaluator` (float32, CPU); the vocabulary is checked."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ShapeEval-frames file (format {metadata.get('format')!r})")
    vocabulary = {k: tuple(v) for k, v in json.loads(metadata["attributes"]).items()}
    if vocabulary != FRAME_ATTRIBUTES:
        raise ValueError(f"{path} was trained on another vocabulary: {vocabulary}")
    model = FrameEvalNet()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()
