"""The shapes world: a procedural dataset of coloured shapes with captions, labels, masks and
depth; the ShapeEval detector metric; and image fidelity metrics (PSNR, SSIM, FD-shapes).

Registering this pack imports neither torch nor the renderer; they load when a node runs.
The pack uses the ``IMAGE`` and ``MASK`` types of the diffusion pack.
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

_PKG = "dagfusion.nodes.shapes"


def _save_evaluator(value: Any, path: str) -> None:
    from dagfusion.nodes.shapes.evaluator import save_shapeeval

    save_shapeeval(value, path)


def _load_evaluator(path: str) -> Any:
    from dagfusion.nodes.shapes.evaluator import load_shapeeval

    return load_shapeeval(path)


SHAPES_DATASET = SocketType(
    "SHAPES_DATASET",
    python_types=(f"{_PKG}.dataset.ShapesDataset",),
    description="A split of the procedural shapes world (rendered on the fly, seeded).",
    color="#fff176",
)
SHAPE_EVALUATOR = SocketType(
    "SHAPE_EVALUATOR",
    parents=("MODULE",),
    python_types=(f"{_PKG}.evaluator.ShapeEvalNet",),
    description="The ShapeEval attribute classifier (reads colour, shape, position, size, background).",
    color="#dce775",
    serializer=Serializer(_save_evaluator, _load_evaluator),
)
DEPTH = SocketType(
    "DEPTH",
    parents=("TENSOR",),
    python_types=("torch.Tensor",),
    description="Depth maps: float tensor (B, 1, H, W) in [0, 1], larger is farther.",
    color="#a1887f",
)


def _dataset(**kwargs: Any) -> Any:
    from dagfusion.nodes.shapes.dataset import ShapesDataset

    return ShapesDataset(**kwargs)


@node(
    "dagfusion.shapes.Dataset",
    version="1.0.0",
    category="shapes",
    inputs=[
        Input("split", STRING, "train", choices=("train", "eval"), description="'eval' holds out attribute combinations never trained on."),
        Input("objects", INT, 1, choices=(1, 2), description="1: attribute scenes; 2: two objects in a relation (harder)."),
        Input("resolution", INT, 64, choices=(32, 64), description="Image side in pixels (64 for models, 32 for tests)."),
        Input("seed", SEED, 0, min=0, description="Seeds the scene order and every sample's jitter."),
        Input("jitter", BOOLEAN, True, description="Vary position, size and rotation slightly per sample."),
    ],
    outputs=[Output("dataset", SHAPES_DATASET), Output("scenes", INT, "Number of distinct scenes in the split.")],
    examples=[{"split": "eval", "resolution": 32}],
)
def dataset(ctx: RunContext, split: str, objects: int, resolution: int, seed: int, jitter: bool) -> tuple[Any, int]:
    """The procedural shapes dataset: captions like "a large red circle on the left on a black background"."""
    data = _dataset(split=split, objects=objects, resolution=resolution, seed=seed, jitter=jitter)
    return data, len(data)


def _render_example() -> dict[str, Any]:
    return {"dataset": _dataset(split="train", resolution=32), "first_index": 0, "count": 2}


@node(
    "dagfusion.shapes.Render",
    version="1.0.0",
    category="shapes",
    inputs=[
        Input("dataset", SHAPES_DATASET, link_only=True),
        Input("first_index", INT, 0, min=0, description="Index of the first sample in the dataset's endless stream."),
        Input("count", INT, 16, min=1, max=65536, description="How many samples to render."),
    ],
    outputs=[
        Output("images", "IMAGE", "(B, 3, H, W) in [0, 1]."),
        Output("captions", LIST, "One caption per image."),
        Output("labels", LIST, "Per-image attribute labels (single-object datasets), else empty dicts."),
        Output("mask", "MASK", "(B, 1, H, W): where any object is."),
        Output("object_masks", "TENSOR", "(B, K, H, W): one channel per object."),
        Output("depth", DEPTH, "(B, 1, H, W): 1 = background, objects closer."),
    ],
    examples=[_render_example],
)
def render(ctx: RunContext, dataset: Any, first_index: int, count: int) -> dict[str, Any]:
    """Render samples of a shapes dataset with their captions, labels, masks and depth."""
    batch = dataset.batch(first_index, count)
    masks = batch.rendered.mask
    return {
        "images": batch.images,
        "captions": list(batch.captions),
        "labels": [scene.labels() if len(scene.objects) == 1 else {} for scene in batch.scenes],
        "mask": masks.amax(dim=1, keepdim=True),
        "object_masks": masks,
        "depth": batch.rendered.depth,
    }


@node(
    "dagfusion.shapes.Prompts",
    version="1.0.0",
    category="shapes",
    inputs=[
        Input("dataset", SHAPES_DATASET, link_only=True),
        Input("limit", INT, 0, min=0, description="Keep at most this many (0: all), spread evenly over the split."),
    ],
    outputs=[Output("prompts", LIST, "Captions of the split's distinct scenes.")],
    examples=[lambda: {"dataset": _dataset(split="eval", resolution=32), "limit": 5}],
)
def prompts(ctx: RunContext, dataset: Any, limit: int) -> list[str]:
    """The captions of a split's distinct scenes (the evaluation prompts for generation)."""
    captions = dataset.prompts()
    if limit and limit < len(captions):
        step = len(captions) / limit
        captions = [captions[int(i * step)] for i in range(limit)]
    return captions


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
    from dagfusion.nodes.shapes.evaluator import SHIPPED, load_shapeeval

    if not path:
        if not SHIPPED.is_file():
            raise FileNotFoundError(f"the shipped ShapeEval weights are missing ({SHIPPED})")
        return load_shapeeval(SHIPPED)
    return load_shapeeval(ctx.input_path(path))


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
    from dagfusion.nodes.shapes.evaluator import train_shapeeval

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

    from dagfusion.nodes.shapes.evaluator import save_shapeeval

    path = ctx.output_path(filename)
    save_shapeeval(evaluator, path, dtype=torch.float16 if half else torch.float32)
    return str(path)


def _untrained_evaluator() -> Any:
    """A seeded, untrained ShapeEval (examples must not depend on the shipped weights)."""
    import torch

    from dagfusion.nodes.shapes.evaluator import ShapeEvalNet

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
    from dagfusion.nodes.shapes.evaluator import score

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
def fidelity(ctx: RunContext, images: Any, reference: Any) -> dict[str, Any]:
    """PSNR, SSIM and relative L1 of images against a reference run."""
    import math

    from dagfusion.nodes.shapes.metrics import psnr, relative_l1, ssim

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

    from dagfusion.nodes.shapes.metrics import frechet_distance

    with torch.no_grad():
        return frechet_distance(evaluator.embed(images), evaluator.embed(reference))


def _embedded_example() -> dict[str, Any]:
    return {"model": "shapes-sd", "device": "cpu", "dtype": "fp32"}


@node(
    "dagfusion.models.LoadEmbedded",
    version="1.0.0",
    category="models",
    inputs=[
        Input("model", STRING, "shapes-sd", choices=("shapes-sd", "shapes-dit"),
              description="'shapes-sd' (Stable Diffusion 1 layout) or 'shapes-dit' (PixArt-alpha layout): the shapes-world models shipped with dagfusion."),
        Input("device", STRING, "auto", choices=("auto", "cpu", "cuda", "mps"),
              description="Where to compute; 'auto' takes the settings' device, else cuda > mps > cpu."),
        Input("dtype", STRING, "auto", choices=("auto", "fp32", "fp16", "bf16"),
              description="Weight precision; 'auto' is fp16 on a GPU and fp32 on the CPU."),
    ],
    outputs=[
        Output("model", "MODEL", "The denoiser handle with the model's scheduler."),
        Output("clip", "CLIP", "The text encoder and the shapes world's tokenizer."),
        Output("vae", "VAE", "The VAE."),
        Output("scheduler", "SCHEDULER", "The model's own scheduler configuration."),
    ],
    examples=[_embedded_example],
)
def load_embedded(ctx: RunContext, model: str, device: str, dtype: str) -> dict[str, Any]:
    """Load an embedded shapes-world model (trained by dagfusion, shipped in the package) offline."""
    from dagfusion.nodes.diffusion.loaders import placement
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.shapes.models import folder

    device, dtype = placement(ctx, device, dtype)
    loaded = load_diffusers_folder(folder(model), dtype=dtype, device=device, source=f"embedded:{model}")
    return {"model": loaded.model, "clip": loaded.clip, "vae": loaded.vae, "scheduler": loaded.scheduler}


NODES = (dataset, render, prompts, load_embedded, load_evaluator, train_evaluator, save_evaluator, shape_eval, fidelity, fd_shapes)


@hookimpl
def register_types(register: Any) -> None:
    for socket_type in (SHAPES_DATASET, SHAPE_EVALUATOR, DEPTH):
        register(socket_type)


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)
