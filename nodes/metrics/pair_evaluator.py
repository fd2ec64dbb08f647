"""ShapeEval-pair: a small CNN that reads two-object shapes-world images, trained by dagfusion.

It reads, from an image of one or two objects (flat or solid render style):

- ``count``: 1 or 2 objects;
- ``colour_a``, ``shape_a``, ``colour_b``, ``shape_b``: the objects in **reading order** — ``a``
  is the upper object of a vertical pair and the left object of a horizontal pair (the only
  object of a single-object image);
- ``axis``: whether the pair is stacked (``vertical``) or side by side (``horizontal``).

An image cannot tell "a red circle above a blue square" from "a blue square below a red circle"
(they are the same picture), so the network reads the canonical description and
:func:`score` compares it with a prompt in the prompt's own terms: for a prompt whose relation
is ``below`` or ``right of``, its object 1 is the network's ``b`` and the predicted relation is
``below`` (vertical) or ``right of`` (horizontal); for ``above`` / ``left of``, object 1 is ``a``.
Heads a prompt does not have (object 2 and the relation of a single-object prompt) are not
scored.

Weights are safetensors with the head vocabulary and the training provenance in the metadata;
loading checks the vocabulary.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dagfusion.nodes.metrics.evaluator import FEATURES, ShapeEvalNet, _augment
from dagfusion.nodes.shapes.dataset import ShapesDataset
from dagfusion.nodes.shapes.world import COLOURS, GRAMMAR, SHAPES, Scene, parse_any_caption

HEADS: dict[str, tuple[str, ...]] = {
    "count": ("1", "2"),
    "colour_a": tuple(COLOURS),
    "shape_a": SHAPES,
    "colour_b": tuple(COLOURS),
    "shape_b": SHAPES,
    "axis": ("vertical", "horizontal"),
}
"""The network's heads and their classes, in prediction order."""

SCORED = ("count", "colour_1", "shape_1", "colour_2", "shape_2", "relation")
"""The per-head accuracies :func:`score` reports (in the prompt's terms), besides ``all_correct``."""

FORMAT = "dagfusion.shapeeval-pair/1"
IGNORE = -100
SHIPPED = Path(__file__).with_name("weights") / "shapeeval_pair.safetensors"


class PairEvalNet(ShapeEvalNet):
    """ShapeEval's body (four strided convolutions, a 128-d feature layer) with one linear head
    per entry of :data:`HEADS`."""

    def __init__(self, width: int = 32) -> None:
        super().__init__(width)
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURES, len(values)) for name, values in HEADS.items()})


def canonical(scene: Scene) -> dict[str, str | None]:
    """The reading-order description of a scene (``None`` for heads it does not have)."""
    if len(scene.objects) == 1:
        o = scene.objects[0]
        return {"count": "1", "colour_a": o.colour, "shape_a": o.shape, "colour_b": None, "shape_b": None, "axis": None}
    first, second = scene.objects
    flipped = scene.relation in ("below", "right of")
    a, b = (second, first) if flipped else (first, second)
    axis = "vertical" if scene.relation in ("above", "below") else "horizontal"
    return {"count": "2", "colour_a": a.colour, "shape_a": a.shape, "colour_b": b.colour, "shape_b": b.shape, "axis": axis}


def in_prompt_terms(predicted: dict[str, str], prompt: Scene) -> dict[str, str | None]:
    """A canonical prediction described in a prompt's terms (object 1 = the prompt's first
    object; the relation word of the prompt's direction), as :func:`score` compares them."""
    if len(prompt.objects) == 1:
        return {"count": predicted["count"], "colour_1": predicted["colour_a"], "shape_1": predicted["shape_a"]}
    flipped = prompt.relation in ("below", "right of")
    one, two = ("b", "a") if flipped else ("a", "b")
    words = {"vertical": ("above", "below"), "horizontal": ("left of", "right of")}[predicted["axis"]]
    return {
        "count": predicted["count"],
        "colour_1": predicted[f"colour_{one}"],
        "shape_1": predicted[f"shape_{one}"],
        "colour_2": predicted[f"colour_{two}"],
        "shape_2": predicted[f"shape_{two}"],
        "relation": words[1] if flipped else words[0],
    }


def expected_terms(prompt: Scene) -> dict[str, str | None]:
    """What a prompt states, in the keys of :data:`SCORED`."""
    first = prompt.objects[0]
    out: dict[str, str | None] = {"count": str(len(prompt.objects)), "colour_1": first.colour, "shape_1": first.shape}
    if len(prompt.objects) == 2:
        second = prompt.objects[1]
        out.update({"colour_2": second.colour, "shape_2": second.shape, "relation": prompt.relation})
    return out


def _targets(scene_list: Any) -> dict[str, torch.Tensor]:
    described = [canonical(s) for s in scene_list]
    return {
        name: torch.tensor([values.index(d[name]) if d[name] is not None else IGNORE for d in described])  # type: ignore[arg-type]
        for name, values in HEADS.items()
    }


@dataclass
class PairTrainReport:
    steps: int
    final_loss: float
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


def training_pool(data_seed: int, pairs: int, singles: int, resolution: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training renders: ``pairs`` two-object and ``singles`` single-object renders of the
    training split per style (flat and solid), jittered, seeded by ``data_seed``."""
    images, scene_list = [], []
    for style_index, style in enumerate(("flat", "solid")):
        for objects, count in ((2, pairs), (1, singles)):
            if count <= 0:
                continue
            data = ShapesDataset("train", objects, resolution, data_seed + 17 * style_index + objects, True, style)
            batch = data.batch(0, count)
            images.append(batch.images)
            scene_list.extend(batch.scenes)
    return torch.cat(images), _targets(scene_list)


def train_pair_evaluator(
    *,
    steps: int = 2000,
    batch_size: int = 96,
    learning_rate: float = 2e-3,
    seed: int = 0,
    data_seed: int = 0,
    pairs: int = 4096,
    singles: int = 1024,
    device: str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[PairEvalNet, PairTrainReport]:
    """Train ShapeEval-pair on training-split renders of both styles (AdamW, warm-up + cosine,
    ShapeEval's augmentation).

    The pool (:func:`training_pool`: ``pairs`` two-object and ``singles`` single-object renders
    per style) is rendered once; batches are drawn from it with fresh augmentation each step.
    Deterministic for given arguments on a given device and thread count.
    ``progress(step, steps, loss)`` is called every step (it may raise to cancel).
    """
    torch.manual_seed(seed)
    model = PairEvalNet().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    start = time.perf_counter()
    pool_images, pool_targets = training_pool(data_seed, pairs, singles)
    size = pool_images.shape[0]
    generator = torch.Generator().manual_seed(seed + 1)
    loss_value = float("nan")
    model.train()
    for step in range(steps):
        index = torch.randint(0, size, (batch_size,), generator=generator)
        images = _augment(pool_images[index], generator).to(device)
        logits = model(images)
        loss = sum(
            F.cross_entropy(logits[k], pool_targets[k][index].to(device), ignore_index=IGNORE)
            for k in HEADS
            if bool((pool_targets[k][index] != IGNORE).any())
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())  # type: ignore[union-attr]
        if progress is not None:
            progress(step + 1, steps, loss_value)
    model.eval()
    settings = {"steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
                "data_seed": data_seed, "pairs": pairs, "singles": singles}
    return model.cpu(), PairTrainReport(steps, loss_value, time.perf_counter() - start, settings)


@torch.no_grad()
def predict(model: PairEvalNet, images: torch.Tensor, batch_size: int = 256) -> list[dict[str, str]]:
    """The canonical description (:data:`HEADS`) the network reads from each image."""
    out: list[dict[str, str]] = []
    device = next(model.parameters()).device
    for chunk in images.split(batch_size):
        logits = model(chunk.to(device))
        indices = {k: v.argmax(dim=1).tolist() for k, v in logits.items()}
        for i in range(chunk.shape[0]):
            out.append({k: HEADS[k][indices[k][i]] for k in HEADS})
    return out


def parse_prompts(prompts: list[str]) -> list[Scene]:
    """The scenes of shapes-world captions; ``ValueError`` naming the first that is not one."""
    scenes = []
    for prompt in prompts:
        scene = parse_any_caption(prompt)
        if scene is None:
            raise ValueError(f"not a shapes-world caption: {prompt!r}; captions follow {GRAMMAR}")
        scenes.append(scene)
    return scenes


def judge(model: PairEvalNet, images: torch.Tensor, prompts: list[str]) -> list[dict[str, bool]]:
    """Per image, whether each head its prompt has (keys of :data:`SCORED`) reads right, in the
    prompt's terms (see the module docstring)."""
    if images.shape[0] != len(prompts):
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    judged = []
    for p, scene in zip(predict(model, images), parse_prompts(prompts)):
        read = in_prompt_terms(p, scene)
        judged.append({k: read[k] == v for k, v in expected_terms(scene).items()})
    return judged


def score(model: PairEvalNet, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Per-head accuracy (keys of :data:`SCORED`) and ``all_correct`` of images against one- or
    two-object prompts, in the prompts' terms (see the module docstring).

    A head is averaged over the images whose prompt has it (``colour_2``, ``shape_2`` and
    ``relation``: two-object prompts only; ``nan`` when none has); ``all_correct`` is the
    fraction of images with every head their prompt has right.
    """
    hits: dict[str, list[bool]] = {k: [] for k in SCORED}
    all_right = []
    for right in judge(model, images, prompts):
        for k, ok in right.items():
            hits[k].append(ok)
        all_right.append(all(right.values()))
    result = {k: (sum(v) / len(v) if v else float("nan")) for k, v in hits.items()}
    result["all_correct"] = sum(all_right) / len(all_right)
    return result


def held_out_set(count: int, data_seed: int = 2026, resolution: int = 64) -> tuple[torch.Tensor, list[str]]:
    """``count`` jittered renders of held-out (eval split) scenes: per style (flat, solid) 3/4
    two-object and 1/4 single-object renders, with their captions (``count`` a multiple of 8)."""
    if count % 8:
        raise ValueError(f"count must be a multiple of 8, got {count}")
    images, captions = [], []
    for style_index, style in enumerate(("flat", "solid")):
        for objects, n in ((2, count * 3 // 8), (1, count // 8)):
            batch = ShapesDataset("eval", objects, resolution, data_seed + 31 * style_index + objects, True, style).batch(0, n)
            images.append(batch.images)
            captions.extend(batch.captions)
    return torch.cat(images), captions


def save_pair_evaluator(
    model: PairEvalNet, path: str | Path, extra: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> None:
    """Save weights as safetensors (``dtype``; the shipped file is fp16) with the head
    vocabulary and ``extra`` (provenance) in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "heads": json.dumps(HEADS), **{k: str(v) for k, v in (extra or {}).items()}}
    save_file(state, str(path), metadata=metadata)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a saved ShapeEval-pair file (format, heads, provenance)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def load_pair_evaluator(path: str | Path) -> PairEvalNet:
    """Load weights saved by :func:`save_pair_evaluator` (float32 on the CPU); refuses another
    format or head vocabulary."""
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ShapeEval-pair checkpoint (format {metadata.get('format')!r})")
    vocabulary = {k: tuple(v) for k, v in json.loads(metadata["heads"]).items()}
    if vocabulary != HEADS:
        raise ValueError(f"{path} was trained on another head vocabulary: {vocabulary}")
    model = PairEvalNet()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()
