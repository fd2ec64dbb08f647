"""Metrics: the ShapeEval attribute classifier (shipped weights, training, saving, loading),
ShapeEval accuracy of generated images against their prompts, the ShapeEval-pair classifier
for two-object images (:mod:`~dagfusion.nodes.metrics.pair_evaluator`), FD-shapes, image fidelity
(PSNR, SSIM, relative L1) of an accelerated run against a reference run, and the shapes-video
metrics (:mod:`~dagfusion.nodes.metrics.video`: motion accuracy, per-frame attributes with
ShapeEval-frames, FD-shapes-video).

Registering this pack imports neither torch nor the classifier; they load when a node runs.
The pack uses the ``IMAGE`` type of the diffusion pack; its examples render scenes of the
shapes world (:mod:`dagfusion.nodes.shapes`).
"""

from __future__ import annotations

from typing import Any

from dagfusion import (
    BOOLEAN,
    DICT,
    FLOAT,
    INT,
    LIST,
    PATH,
    SEED,
    STRING,
    Input,
    Output,
    RunContext,
    Serializer,
    SocketType,
    hookimpl,
    node,
    union,
)
from dagfusion.nodes.metrics import colour, video

_PKG = "dagfusion.nodes.metrics"


def _save_evaluator(value: Any, path: str) -> None:
    from dagfusion.nodes.metrics.evaluator import save_shapeeval
    from dagfusion.nodes.metrics.frame_evaluator import FrameEvalNet, save_frame_evaluator

    if isinstance(value, FrameEvalNet):
        save_frame_evaluator(value, path)
    else:
        save_shapeeval(value, path)


def _load_evaluator(path: str) -> Any:
    from safetensors import safe_open

    from dagfusion.nodes.metrics.evaluator import load_shapeeval
    from dagfusion.nodes.metrics.frame_evaluator import FORMAT, load_frame_evaluator

    with safe_open(path, framework="pt") as handle:
        kind = (handle.metadata() or {}).get("format")
    return load_frame_evaluator(path) if kind == FORMAT else load_shapeeval(path)


SHAPE_EVALUATOR = SocketType(
    "SHAPE_EVALUATOR",
    parents=("MODULE",),
    python_types=(f"{_PKG}.evaluator.ShapeEvalNet",),
    exclude=(f"{_PKG}.pair_evaluator.PairEvalNet",),
    description="The ShapeEval attribute classifier (reads colour, shape, position, size, background), or "
                "ShapeEval-frames (the same network reading video frames; no position).",
    color="#dce775",
    serializer=Serializer(_save_evaluator, _load_evaluator),
)


def _dataset(**kwargs: Any) -> Any:
    from dagfusion.nodes.shapes.dataset import ShapesDataset

    return ShapesDataset(**kwargs)


@node(
    "dagfusion.metrics.LoadShapeEval",
    version="1.0.0",
    category="metrics",
    inputs=[
        Input("path", PATH, optional=True, description="A ShapeEval safetensors file; empty: the classifier shipped with dagfusion."),
    ],
    outputs=[Output("evaluator", SHAPE_EVALUATOR)],
    examples=[{}],
)
def load_evaluator(ctx: RunContext, path: str | None) -> Any:
    """Load the ShapeEval classifier (the shipped one by default)."""
    from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval
    from dagfusion.nodes.metrics.shipped import load_shipped_or_path

    return load_shipped_or_path(ctx, path, SHIPPED, load_shapeeval, "ShapeEval")


@node(
    "dagfusion.metrics.TrainShapeEval",
    version="1.0.0",
    category="metrics",
    inputs=[
        Input("steps", INT, 1200, min=1, max=1_000_000),
        Input("batch_size", INT, 128, min=1, max=4096),
        Input("learning_rate", FLOAT, 2e-3, min=0.0, max=1.0),
        Input("pool_size", INT, 12288, min=16, max=1_000_000, description="Renders made once and reused with augmentation."),
        Input("seed", SEED, 0, min=0),
    ],
    outputs=[Output("evaluator", SHAPE_EVALUATOR), Output("final_loss", FLOAT)],
    persist=True,
    examples=[{"steps": 2, "batch_size": 4, "pool_size": 16}],
)
def train_evaluator(ctx: RunContext, steps: int, batch_size: int, learning_rate: float, pool_size: int, seed: int) -> tuple[Any, float]:
    """Train ShapeEval on renders of the training split (seeded; kept in the disk cache)."""
    from dagfusion.nodes.metrics.evaluator import train_shapeeval

    def progress(step: int, total: int, loss: float) -> None:
        ctx.progress(step, total, message="training ShapeEval", loss=loss)

    model, report = train_shapeeval(
        steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed, pool_size=pool_size,
        device=ctx.device, progress=progress,
    )
    return model, report.final_loss


@node(
    "dagfusion.metrics.SaveShapeEval",
    version="1.0.0",
    category="metrics",
    inputs=[
        Input("evaluator", SHAPE_EVALUATOR, link_only=True),
        Input("filename", STRING, "shapeeval.safetensors", description="Name inside the run's output folder."),
        Input("half", BOOLEAN, True, description="Store fp16 weights (the shipped form, < 1 MB)."),
    ],
    outputs=[Output("path", STRING)],
    pure=False,
    output_node=True,
)
def save_evaluator(ctx: RunContext, evaluator: Any, filename: str, half: bool) -> str:
    """Save a ShapeEval classifier as safetensors with its attribute vocabulary."""
    import torch

    from dagfusion.nodes.metrics.evaluator import save_shapeeval

    path = ctx.output_path(filename)
    save_shapeeval(evaluator, path, dtype=torch.float16 if half else torch.float32)
    return str(path)


def _untrained_evaluator() -> Any:
    """A seeded, untrained ShapeEval (examples must not depend on the shipped weights)."""
    import torch

    from dagfusion.nodes.metrics.evaluator import ShapeEvalNet

    torch.manual_seed(0)
    return ShapeEvalNet().eval()


def _scored_example() -> dict[str, Any]:
    data = _dataset(split="eval", resolution=32).batch(0, 2)
    return {"images": data.images, "prompts": list(data.captions), "evaluator": _untrained_evaluator()}


@node(
    "dagfusion.metrics.ShapeEval",
    version="1.1.0",
    category="metrics",
    inputs=[
        Input("images", "IMAGE", description="Generated images, (B, 3, H, W) in [0, 1]."),
        Input(
            "prompts",
            union(STRING, LIST),
            description="The single-object captions they were generated from: one per image, or one "
            "caption for every image (link the same text the prompt was encoded from).",
        ),
        Input("evaluator", SHAPE_EVALUATOR, link_only=True),
    ],
    outputs=[
        Output("scores", DICT, "Accuracy per attribute and 'all_correct', in [0, 1]."),
        Output("all_correct", FLOAT, "Fraction of images with every attribute right."),
    ],
    examples=[_scored_example],
)
def shape_eval(ctx: RunContext, images: Any, prompts: list[str], evaluator: Any) -> tuple[dict[str, float], float]:
    """Score images against their prompts: per-attribute and all-correct accuracy."""
    from dagfusion.nodes.metrics.evaluator import score

    captions = [prompts] * int(images.shape[0]) if isinstance(prompts, str) else list(prompts)
    scores = score(evaluator, images, captions)
    return scores, scores["all_correct"]


def _pair_example() -> dict[str, Any]:
    data = _dataset(split="eval", resolution=32).batch(0, 2)
    return {"images": data.images * 0.9, "reference": data.images}


@node(
    "dagfusion.metrics.Fidelity",
    version="1.0.0",
    category="metrics",
    inputs=[
        Input("images", "IMAGE", description="Images of an accelerated run."),
        Input("reference", "IMAGE", description="The full run's images with the same seeds."),
    ],
    outputs=[
        Output("psnr", FLOAT, "Mean PSNR in dB over images with a difference (inf if all identical)."),
        Output("ssim", FLOAT, "Mean SSIM."),
        Output("relative_l1", FLOAT, "|images - reference|₁ / |reference|₁."),
        Output("per_image", LIST, "[{psnr, ssim}] per image."),
    ],
    examples=[_pair_example],
)
def fidelity_node(ctx: RunContext, images: Any, reference: Any) -> dict[str, Any]:
    """PSNR, SSIM and relative L1 of images against a reference run."""
    import math

    from dagfusion.nodes.metrics.fidelity import psnr, relative_l1, ssim

    p = psnr(images, reference).tolist()
    s = ssim(images, reference).tolist()
    finite = [v for v in p if math.isfinite(v)]
    return {
        "psnr": sum(finite) / len(finite) if finite else float("inf"),
        "ssim": sum(s) / len(s),
        "relative_l1": relative_l1(images, reference),
        "per_image": [{"psnr": a, "ssim": b} for a, b in zip(p, s)],
    }


def _fd_example() -> dict[str, Any]:
    data = _dataset(split="eval", resolution=32)
    return {"images": data.batch(0, 4).images, "reference": data.batch(4, 4).images, "evaluator": _untrained_evaluator()}


@node(
    "dagfusion.metrics.FDShapes",
    version="1.0.0",
    category="metrics",
    inputs=[
        Input("images", "IMAGE", description="Generated images."),
        Input("reference", "IMAGE", description="Rendered (or full-precision) images to compare with."),
        Input("evaluator", SHAPE_EVALUATOR, link_only=True),
    ],
    outputs=[Output("fd", FLOAT, "Fréchet distance on ShapeEval features (FD-shapes; not FID).")],
    examples=[_fd_example],
)
def fd_shapes(ctx: RunContext, images: Any, reference: Any, evaluator: Any) -> float:
    """FD-shapes: Fréchet distance between ShapeEval features of two image sets."""
    import torch

    from dagfusion.nodes.metrics.frechet import frechet_distance

    with torch.no_grad():
        return frechet_distance(evaluator.embed(images), evaluator.embed(reference))


def _save_pair(value: Any, path: str) -> None:
    from dagfusion.nodes.metrics.pair_evaluator import save_pair_evaluator

    save_pair_evaluator(value, path)


def _load_pair(path: str) -> Any:
    from dagfusion.nodes.metrics.pair_evaluator import load_pair_evaluator

    return load_pair_evaluator(path)


PAIR_EVALUATOR = SocketType(
    "PAIR_EVALUATOR",
    parents=("MODULE",),
    python_types=(f"{_PKG}.pair_evaluator.PairEvalNet",),
    description="The ShapeEval-pair classifier (reads object count, both objects' colour and shape, and their relation).",
    color="#c0ca33",
    serializer=Serializer(_save_pair, _load_pair),
)


@node(
    "dagfusion.metrics.LoadShapeEvalPair",
    version="1.0.0",
    category="metrics",
    inputs=[
        Input("path", PATH, optional=True, description="A ShapeEval-pair safetensors file; empty: the classifier shipped with dagfusion."),
    ],
    outputs=[Output("evaluator", PAIR_EVALUATOR)],
    examples=[{}],
)
def load_pair_evaluator(ctx: RunContext, path: str | None) -> Any:
    """Load the ShapeEval-pair classifier (the shipped one by default)."""
    from dagfusion.nodes.metrics.pair_evaluator import SHIPPED, load_pair_evaluator as load
    from dagfusion.nodes.metrics.shipped import load_shipped_or_path

    return load_shipped_or_path(ctx, path, SHIPPED, load, "ShapeEval-pair")


@node(
    "dagfusion.metrics.TrainShapeEvalPair",
    version="1.0.0",
    category="metrics",
    inputs=[
        Input("steps", INT, 2000, min=1, max=1_000_000),
        Input("batch_size", INT, 96, min=1, max=4096),
        Input("learning_rate", FLOAT, 2e-3, min=0.0, max=1.0),
        Input("pairs", INT, 4096, min=1, max=1_000_000, description="Two-object renders per style (flat, solid) made once and reused with augmentation."),
        Input("singles", INT, 1024, min=0, max=1_000_000, description="Single-object renders per style (they teach the count head 1)."),
        Input("seed", SEED, 0, min=0, description="Seeds the initialisation and the batches."),
        Input("data_seed", SEED, 0, min=0, description="Seeds the training renders."),
    ],
    outputs=[Output("evaluator", PAIR_EVALUATOR), Output("final_loss", FLOAT)],
    persist=True,
    examples=[{"steps": 2, "batch_size": 4, "pairs": 8, "singles": 4}],
)
def train_pair_evaluator(
    ctx: RunContext, steps: int, batch_size: int, learning_rate: float, pairs: int, singles: int, seed: int, data_seed: int
) -> tuple[Any, float]:
    """Train ShapeEval-pair on two- and single-object renders of the training split, both styles (seeded)."""
    from dagfusion.nodes.metrics.pair_evaluator import train_pair_evaluator as train

    def progress(step: int, total: int, loss: float) -> None:
        ctx.progress(step, total, message="training ShapeEval-pair", loss=loss)

    model, report = train(
        steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed, data_seed=data_seed,
        pairs=pairs, singles=singles, device=ctx.device, progress=progress,
    )
    return model, report.final_loss


@node(
    "dagfusion.metrics.SaveShapeEvalPair",
    version="1.0.0",
    category="metrics",
    inputs=[
        Input("evaluator", PAIR_EVALUATOR, link_only=True),
        Input("filename", STRING, "shapeeval_pair.safetensors", description="Name inside the run's output folder."),
        Input("half", BOOLEAN, True, description="Store fp16 weights (the shipped form, < 1 MB)."),
    ],
    outputs=[Output("path", STRING)],
    pure=False,
    output_node=True,
)
def save_pair_evaluator(ctx: RunContext, evaluator: Any, filename: str, half: bool) -> str:
    """Save a ShapeEval-pair classifier as safetensors with its head vocabulary."""
    import torch

    from dagfusion.nodes.metrics.pair_evaluator import save_pair_evaluator as save

    path = ctx.output_path(filename)
    save(evaluator, path, dtype=torch.float16 if half else torch.float32)
    return str(path)


def _untrained_pair_evaluator() -> Any:
    """A seeded, untrained ShapeEval-pair (examples must not depend on the shipped weights)."""
    import torch

    from dagfusion.nodes.metrics.pair_evaluator import PairEvalNet

    torch.manual_seed(0)
    return PairEvalNet().eval()


def _pair_scored_example() -> dict[str, Any]:
    pairs = _dataset(split="eval", objects=2, resolution=32, style="solid").batch(0, 2)
    return {"images": pairs.images, "prompts": list(pairs.captions), "evaluator": _untrained_pair_evaluator()}


@node(
    "dagfusion.metrics.ShapeEvalPair",
    version="1.0.0",
    category="metrics",
    inputs=[
        Input("images", "IMAGE", description="Generated images, (B, 3, H, W) in [0, 1]."),
        Input(
            "prompts",
            union(STRING, LIST),
            description="The captions they were generated from (two objects in a relation, or single objects): "
            "one per image, or one caption for every image.",
        ),
        Input("evaluator", PAIR_EVALUATOR, link_only=True),
    ],
    outputs=[
        Output("scores", DICT, "Accuracy per head (count, colour_1, shape_1, colour_2, shape_2, relation) and 'all_correct', in [0, 1]."),
        Output("all_correct", FLOAT, "Fraction of images with every head their prompt states right."),
    ],
    examples=[_pair_scored_example],
)
def shape_eval_pair(ctx: RunContext, images: Any, prompts: Any, evaluator: Any) -> tuple[dict[str, float], float]:
    """Score images against two-object prompts: object count, each object's colour and shape, the relation."""
    import torch

    from dagfusion.errors import NodeInputError
    from dagfusion.nodes.metrics.pair_evaluator import score

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise NodeInputError("images", f"expected an IMAGE tensor (B, 3, H, W), got {got}")
    captions = [prompts] * int(images.shape[0]) if isinstance(prompts, str) else list(prompts)
    if len(captions) != int(images.shape[0]):
        raise NodeInputError("prompts", f"expected one caption per image ({images.shape[0]}) or a single caption, got {len(captions)}")
    try:
        scores = score(evaluator, images, captions)
    except ValueError as error:
        raise NodeInputError("prompts", str(error)) from None
    return scores, scores["all_correct"]


NODES = (
    load_evaluator, train_evaluator, save_evaluator, shape_eval, fidelity_node, fd_shapes,
    load_pair_evaluator, train_pair_evaluator, save_pair_evaluator, shape_eval_pair,
    *video.NODES, *colour.NODES,
)


@hookimpl
def register_types(register: Any) -> None:
    register(SHAPE_EVALUATOR)
    register(PAIR_EVALUATOR)


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)
