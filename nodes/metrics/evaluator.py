"""ShapeEval: a small CNN that reads a shapes-world image's attributes, trained by dagfusion.

The network predicts colour, shape, position, size and background of a single-object image
(one softmax head per attribute). It scores generated images against their prompts
(per-attribute and all-correct accuracy), provides the features for FD-shapes, and — being an
ordinary differentiable module — can serve as a reward model.

Weights are saved as safetensors with the attribute vocabulary in the metadata; loading checks
the vocabulary, so a classifier never silently scores with a different label order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dagfusion.nodes.shapes.dataset import ShapesDataset
from dagfusion.nodes.shapes.world import ATTRIBUTES, parse_caption

INPUT_SIZE = 64
FEATURES = 128


class ShapeEvalNet(nn.Module):
    """Four strided convolutions, a 128-d feature layer and one linear head per attribute."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
        )
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, FEATURES), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURES, len(values)) for name, values in ATTRIBUTES.items()})

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] at any size → the network's normalised 64×64 input."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return x * 2 - 1

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The 128-d features of images in [0, 1] (used by FD-shapes)."""
        return self.features(self.body(self.prepare(images)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for images in [0, 1]."""
        h = self.embed(images)
        return {name: head(h) for name, head in self.heads.items()}


def _targets(scenes: Any) -> dict[str, torch.Tensor]:
    labels = [scene.labels() for scene in scenes]
    return {name: torch.tensor([values.index(l[name]) for l in labels]) for name, values in ATTRIBUTES.items()}


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild corruptions generated images show: noise, blur, colour and contrast shifts."""
    b = images.shape[0]
    noise = torch.rand(b, 1, 1, 1, generator=generator) * 0.08
    x = images + noise * torch.randn(images.shape, generator=generator)
    blur = torch.rand(b, generator=generator) < 0.3
    if blur.any():
        x[blur] = F.avg_pool2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=generator) - 0.5) * 0.15
    shift = (torch.rand(b, 3, 1, 1, generator=generator) - 0.5) * 0.1
    return (x * gain + shift).clamp(0, 1)


@dataclass
class TrainReport:
    steps: int
    final_loss: float
    seconds: float


def train_shapeeval(
    *,
    steps: int = 1500,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
    resolution: int = 64,
    pool_size: int = 16384,
    device: str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[ShapeEvalNet, TrainReport]:
    """Train ShapeEval on the training split's renders (AdamW, cosine schedule, augmentation).

    ``pool_size`` jittered renders are made once (about 25 per training scene) and batches
    are drawn from them with fresh augmentation each step. Deterministic for a given seed on a
    given device. ``progress(step, steps, loss)`` is called every step (it may raise to cancel).
    """
    import time

    torch.manual_seed(seed)
    model = ShapeEvalNet().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    start = time.perf_counter()
    pool = ShapesDataset("train", 1, resolution, seed).batch(0, pool_size)
    pool_images = pool.images
    pool_targets = _targets(pool.scenes)
    generator = torch.Generator().manual_seed(seed + 1)
    loss_value = float("nan")
    model.train()
    for step in range(steps):
        index = torch.randint(0, pool_size, (batch_size,), generator=generator)
        images = _augment(pool_images[index], generator).to(device)
        logits = model(images)
        loss = sum(F.cross_entropy(logits[k], pool_targets[k][index].to(device)) for k in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        if progress is not None:
            progress(step + 1, steps, loss_value)
    model.eval()
    return model.cpu(), TrainReport(steps, loss_value, time.perf_counter() - start)


@torch.no_grad()
def predict(model: ShapeEvalNet, images: torch.Tensor, batch_size: int = 256) -> list[dict[str, str]]:
    """The attribute labels the classifier reads from each image (the model is not modified;
    it has no dropout or batch statistics, so train and eval mode agree)."""
    out: list[dict[str, str]] = []
    for chunk in images.split(batch_size):
        logits = model(chunk.to(next(model.parameters()).device))
        indices = {k: v.argmax(dim=1).tolist() for k, v in logits.items()}
        for i in range(chunk.shape[0]):
            out.append({k: ATTRIBUTES[k][indices[k][i]] for k in ATTRIBUTES})
    return out


def misread(model: ShapeEvalNet, images: torch.Tensor, prompts: list[str]) -> list[dict[str, str]]:
    """For each image, the attributes the classifier reads differently from its single-object
    prompt, as ``{attribute: what it read}`` (empty when it reads every attribute right).

    Raises ``ValueError`` naming the first prompt that is not a single-object shapes caption.
    """
    if images.shape[0] != len(prompts):
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    expected = []
    for prompt in prompts:
        scene = parse_caption(prompt)
        if scene is None:
            raise ValueError(f"not a single-object shapes caption: {prompt!r}")
        expected.append(scene.labels())
    return [{k: p[k] for k in ATTRIBUTES if p[k] != e[k]} for p, e in zip(predict(model, images), expected)]


def score(model: ShapeEvalNet, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Per-attribute and all-correct accuracy of images against single-object prompts.

    Raises ``ValueError`` naming the first prompt that is not a single-object shapes caption.
    """
    wrong = misread(model, images, prompts)
    result: dict[str, float] = {name: sum(name not in w for w in wrong) / len(prompts) for name in ATTRIBUTES}
    result["all_correct"] = sum(not w for w in wrong) / len(prompts)
    return result


def save_shapeeval(
    model: ShapeEvalNet, path: str | Path, extra: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> None:
    """Save weights as safetensors (``dtype``; the shipped file is fp16) with the attribute
    vocabulary in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "dagfusion.shapeeval/1", "attributes": json.dumps(ATTRIBUTES), **{k: str(v) for k, v in (extra or {}).items()}}
    save_file(state, str(path), metadata=metadata)


def load_shapeeval(path: str | Path) -> ShapeEvalNet:
    """Load weights saved by :func:`save_shapeeval` (float32 on the CPU)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
    if metadata.get("format") != "dagfusion.shapeeval/1":
        raise ValueError(f"{path} is not a ShapeEval checkpoint (format {metadata.get('format')!r})")
    vocabulary = {k: tuple(v) for k, v in json.loads(metadata["attributes"]).items()}
    if vocabulary != ATTRIBUTES:
        raise ValueError(f"{path} was trained on another attribute vocabulary: {vocabulary}")
    model = ShapeEvalNet()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


SHIPPED = Path(__file__).with_name("weights") / "shapeeval.safetensors"
