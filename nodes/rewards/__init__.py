"""Rewards: differentiable scores of generated images against their prompts, as nodes.

A ``REWARD`` value has ``score(images, prompts) -> (B,)`` (images (B, 3, H, W) in [0, 1] on any
device; gradients flow to the images), a ``name`` and a content fingerprint, so nodes taking
or giving one are cached like any other (:mod:`dagfusion.nodes.rewards.base`). The pack gives:

- the ShapeEval reward (weighted log-probability of a shapes caption's attributes),
- CLIP score from a local ``CLIPModel`` folder (PickScore/HPSv2 checkpoints are CLIP models too),
- aesthetic-style MLP heads over CLIP image embeddings,
- image statistics (brightness, darkness, saturation, contrast), prompt-independent,
- weighted sums of rewards, and a node that scores images with any reward.

Registering this pack imports neither torch nor transformers; they load when a node runs.
See docs/rewards.md for formats and the one-time conversion of pickle checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dagfusion import FLOAT, LIST, PATH, STRING, Input, Output, RunContext, SocketType, hookimpl, node, union

_PKG = "dagfusion.nodes.rewards"
_WEIGHT = dict(min=0.0, max=100.0)

REWARD = SocketType(
    "REWARD",
    python_types=(f"{_PKG}.base.Reward",),
    description="A differentiable reward: score(images, prompts) -> (B,) scores, larger is better.",
    color="#ffb74d",
)
CLIP_REWARD = SocketType(
    "CLIP_REWARD",
    parents=("REWARD",),
    python_types=(f"{_PKG}.clip.CLIPReward",),
    description="A CLIP-score reward; its image encoder also feeds aesthetic-style heads.",
    color="#ffa726",
)


def _untrained_evaluator() -> Any:
    """A seeded, untrained ShapeEval (examples must not depend on the shipped weights)."""
    import torch

    from dagfusion.nodes.metrics.evaluator import ShapeEvalNet

    torch.manual_seed(0)
    return ShapeEvalNet().eval()


def _shapes_batch(count: int = 2) -> Any:
    from dagfusion.nodes.shapes.dataset import ShapesDataset

    return ShapesDataset(split="eval", resolution=32).batch(0, count)


def _shapeeval_reward(**weights: float) -> Any:
    from dagfusion.nodes.rewards.shapeeval import ShapeEvalReward
    from dagfusion.nodes.shapes.world import ATTRIBUTES

    return ShapeEvalReward(_untrained_evaluator(), {name: weights.get(name, 1.0) for name in ATTRIBUTES})


@node(
    "dagfusion.reward.ShapeEval",
    version="1.0.0",
    category="reward",
    inputs=[
        Input("evaluator", "SHAPE_EVALUATOR", link_only=True, description="The classifier (dagfusion.metrics.LoadShapeEval)."),
        Input("colour", FLOAT, 1.0, **_WEIGHT, description="Weight of the colour's log-probability."),
        Input("shape", FLOAT, 1.0, **_WEIGHT, description="Weight of the shape's log-probability."),
        Input("position", FLOAT, 1.0, **_WEIGHT, description="Weight of the position's log-probability."),
        Input("size", FLOAT, 1.0, **_WEIGHT, description="Weight of the size's log-probability."),
        Input("background", FLOAT, 1.0, **_WEIGHT, description="Weight of the background's log-probability."),
    ],
    outputs=[Output("reward", REWARD, "Sum of weighted log-probabilities of the caption's labels (0 is best).")],
    examples=[lambda: {"evaluator": _untrained_evaluator()}, lambda: {"evaluator": _untrained_evaluator(), "colour": 2.0, "size": 0.0}],
)
def shapeeval_reward(
    ctx: RunContext, evaluator: Any, colour: float, shape: float, position: float, size: float, background: float
) -> Any:
    """The ShapeEval reward: weighted log-probability of a shapes caption's attributes.

    Prompts must be single-object shapes captions; any other prompt fails naming it.
    """
    from dagfusion.nodes.rewards.shapeeval import ShapeEvalReward

    weights = {"colour": colour, "shape": shape, "position": position, "size": size, "background": background}
    return ShapeEvalReward(evaluator, weights)


def _clip_example(folder: Path) -> dict[str, Any]:
    from dagfusion.nodes.rewards.tiny import write_tiny_clip

    return {"path": str(write_tiny_clip(folder / "clip"))}


@node(
    "dagfusion.reward.LoadCLIP",
    version="1.0.0",
    category="reward",
    inputs=[
        Input("path", PATH, description="A CLIPModel folder: config.json, model.safetensors, tokenizer files, preprocessor_config.json."),
        Input("dtype", STRING, "float32", choices=["float32", "float16", "bfloat16"], description="Weight precision."),
    ],
    outputs=[Output("reward", CLIP_REWARD, "logit_scale · cosine(image, text) under the model.")],
    examples=[_clip_example],
)
def load_clip(ctx: RunContext, path: str, dtype: str) -> Any:
    """CLIP score from a local CLIPModel folder (OpenAI CLIP, PickScore, converted HPSv2), offline.

    Images of any size are resized and center-cropped in torch as CLIPImageProcessor does.
    """
    from dagfusion.nodes.rewards.clip import load_clip_reward

    folder = ctx.settings.check_tree_readable(ctx.input_path(path))
    return load_clip_reward(folder, dtype)


def _aesthetic_example(folder: Path) -> dict[str, Any]:
    from dagfusion.nodes.rewards.clip import load_clip_reward
    from dagfusion.nodes.rewards.tiny import write_tiny_clip, write_tiny_head

    clip = load_clip_reward(write_tiny_clip(folder / "clip"))
    return {"clip": clip, "path": str(write_tiny_head(folder / "head"))}


@node(
    "dagfusion.reward.Aesthetic",
    version="1.0.0",
    category="reward",
    inputs=[
        Input("clip", CLIP_REWARD, link_only=True, description="The CLIP model whose image embeddings the head reads."),
        Input("path", PATH, description="A head folder: config.json (layers, activation, normalize) and model.safetensors."),
    ],
    outputs=[Output("reward", REWARD, "The head's score of each image (prompts unused).")],
    examples=[_aesthetic_example],
)
def aesthetic(ctx: RunContext, clip: Any, path: str) -> Any:
    """An aesthetic-style reward: an MLP head over CLIP image embeddings (LAION aesthetic style).

    A head whose input size differs from the CLIP embedding size fails naming both sizes.
    """
    from dagfusion.fingerprint import fingerprint_path
    from dagfusion.nodes.rewards.aesthetic import AestheticReward, load_head

    folder = ctx.settings.check_tree_readable(ctx.input_path(path))
    return AestheticReward(clip, load_head(folder), name=f"aesthetic:{folder.name}", fingerprint=fingerprint_path(folder))


#: The statistics of dagfusion.reward.ImageStat (``image_stats.STATISTICS``; kept here so
#: registering the pack does not import torch).
_STATISTICS = ("brightness", "darkness", "saturation", "contrast")


@node(
    "dagfusion.reward.ImageStat",
    version="1.0.0",
    category="reward",
    inputs=[
        Input("statistic", STRING, "brightness", choices=_STATISTICS,
              description="brightness: mean Rec.709 luma; darkness: 1 − brightness; saturation: mean max(R,G,B) − min(R,G,B); "
                          "contrast: standard deviation of luma."),
        Input("target", FLOAT, optional=True, min=0.0, max=1.0,
              description="Score −|statistic − target| instead (not set: the statistic itself, larger is better)."),
    ],
    outputs=[Output("reward", REWARD, "The statistic of each image, or −|statistic − target| (prompts unused).")],
    examples=[lambda: {"statistic": "brightness"}, lambda: {"statistic": "contrast", "target": 0.25}],
)
def image_stat(ctx: RunContext, statistic: str, target: float | None) -> Any:
    """A simple, prompt-independent reward: an image statistic, or its distance to a target.

    Brightness, darkness, saturation or contrast of each image, differentiable in the images;
    with a target the score is −|statistic − target| (0 is best). Useful for controllable and
    interpolation experiments, alone or in a Combine with other rewards.
    """
    from dagfusion.nodes.rewards.image_stats import ImageStatReward

    return ImageStatReward(statistic, target)


def _combine_example() -> dict[str, Any]:
    return {"reward_1": _shapeeval_reward(), "reward_2": _shapeeval_reward(shape=0.0), "weight_2": 0.5}


@node(
    "dagfusion.reward.Combine",
    version="1.0.0",
    category="reward",
    inputs=[
        Input("reward_1", REWARD, link_only=True),
        Input("weight_1", FLOAT, 1.0, min=-100.0, max=100.0),
        Input("reward_2", REWARD, optional=True, link_only=True),
        Input("weight_2", FLOAT, 1.0, min=-100.0, max=100.0),
        Input("reward_3", REWARD, optional=True, link_only=True),
        Input("weight_3", FLOAT, 1.0, min=-100.0, max=100.0),
        Input("reward_4", REWARD, optional=True, link_only=True),
        Input("weight_4", FLOAT, 1.0, min=-100.0, max=100.0),
    ],
    outputs=[Output("reward", REWARD, "Σ weight_i · reward_i over the connected rewards.")],
    examples=[_combine_example],
)
def combine(ctx: RunContext, **inputs: Any) -> Any:
    """A weighted sum of up to four rewards (itself a reward, so sums compose)."""
    from dagfusion.nodes.rewards.base import WeightedSum

    terms = [(inputs[f"reward_{i}"], inputs[f"weight_{i}"]) for i in range(1, 5) if inputs.get(f"reward_{i}") is not None]
    return WeightedSum(terms)


def _score_example() -> dict[str, Any]:
    data = _shapes_batch()
    return {"reward": _shapeeval_reward(), "images": data.images, "prompts": list(data.captions)}


@node(
    "dagfusion.reward.Score",
    version="1.0.0",
    category="reward",
    inputs=[
        Input("reward", REWARD, link_only=True),
        Input("images", "IMAGE", description="Images, (B, 3, H, W) in [0, 1]."),
        Input("prompts", union(STRING, LIST), description="One prompt per image, or one for every image."),
    ],
    outputs=[
        Output("scores", LIST, "The score of each image."),
        Output("mean", FLOAT, "The mean score."),
    ],
    examples=[_score_example],
)
def score(ctx: RunContext, reward: Any, images: Any, prompts: Any) -> tuple[list[float], float]:
    """Score images with a reward (no gradients): per-image scores and their mean.

    A prompt count that differs from the image count fails naming the input ``prompts``.
    """
    import torch

    from dagfusion.nodes.rewards.base import check_batch

    captions = check_batch(images, prompts)
    with torch.no_grad():
        values = reward.score(images.to(ctx.device), captions).float().cpu().tolist()
    return values, sum(values) / len(values) if values else float("nan")


NODES = (shapeeval_reward, load_clip, aesthetic, image_stat, combine, score)


@hookimpl
def register_types(register: Any) -> None:
    register(REWARD)
    register(CLIP_REWARD)


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)
