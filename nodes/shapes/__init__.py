"""The shapes world: a procedural dataset of coloured shapes with captions, labels, masks and
depth, and the embedded shapes-world models (``dagfusion.models.LoadEmbedded``).

The metrics measured on this world (ShapeEval, FD-shapes, PSNR/SSIM) are the
:mod:`dagfusion.nodes.metrics` pack. Registering this pack imports neither torch nor the
renderer; they load when a node runs. The pack uses the ``IMAGE`` and ``MASK`` types of the
diffusion pack and the ``DEPTH``, ``NORMAL``, ``OBJECT_MASK`` and ``LAYOUT`` types of the
structure pack.
"""

from __future__ import annotations

from typing import Any

from dagfusion import (
    BOOLEAN,
    INT,
    LIST,
    SEED,
    STRING,
    Input,
    Output,
    RunContext,
    SocketType,
    hookimpl,
    node,
    union,
)

_PKG = "dagfusion.nodes.shapes"


SHAPES_DATASET = SocketType(
    "SHAPES_DATASET",
    python_types=(f"{_PKG}.dataset.ShapesDataset",),
    description="A split of the procedural shapes world (rendered on the fly, seeded).",
    color="#fff176",
)


def _dataset(**kwargs: Any) -> Any:
    from dagfusion.nodes.shapes.dataset import ShapesDataset

    return ShapesDataset(**kwargs)


@node(
    "dagfusion.shapes.Dataset",
    version="1.1.0",
    category="shapes",
    inputs=[
        Input("split", STRING, "train", choices=("train", "eval"), description="'eval' holds out attribute combinations never trained on."),
        Input("objects", INT, 1, choices=(1, 2), description="1: attribute scenes; 2: two objects in a relation (harder)."),
        Input("resolution", INT, 64, choices=(32, 64), description="Image side in pixels (64 for models, 32 for tests)."),
        Input("seed", SEED, 0, min=0, description="Seeds the scene order and every sample's jitter."),
        Input("jitter", BOOLEAN, True, description="Vary position, size and rotation slightly per sample."),
        Input("style", STRING, "flat", choices=("flat", "solid"),
              description="'flat': 2-D shapes (what the embedded models were trained on); 'solid': shaded 3-D solids with depth, normals and occlusion."),
    ],
    outputs=[Output("dataset", SHAPES_DATASET), Output("scenes", INT, "Number of distinct scenes in the split.")],
    examples=[{"split": "eval", "resolution": 32}, {"split": "eval", "resolution": 32, "objects": 2, "style": "solid"}],
)
def dataset(ctx: RunContext, split: str, objects: int, resolution: int, seed: int, jitter: bool, style: str) -> tuple[Any, int]:
    """The procedural shapes dataset: captions like "a large red circle on the left on a black background"."""
    data = _dataset(split=split, objects=objects, resolution=resolution, seed=seed, jitter=jitter, style=style)
    return data, len(data)


def _render_example() -> dict[str, Any]:
    return {"dataset": _dataset(split="train", resolution=32), "first_index": 0, "count": 2}


@node(
    "dagfusion.shapes.Render",
    version="1.2.0",
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
        Output("object_masks", "OBJECT_MASK", "(B, K, H, W): one channel per object."),
        Output("depth", "DEPTH", "(B, 1, H, W) in the DEPTH convention: 1 = nearest, the background 0."),
        Output("normal", "NORMAL", "(B, 3, H, W) camera-space unit normals: the solid renderer's own, "
                                   "else derived from the depth (flat shapes face the viewer)."),
        Output("layout", "LAYOUT", "The objects' boxes (and, solid, labels and depth order), in caption order."),
    ],
    examples=[_render_example],
)
def render(ctx: RunContext, dataset: Any, first_index: int, count: int) -> dict[str, Any]:
    """Render samples of a shapes dataset with their captions, labels, masks, depth, normals and layout."""
    from dagfusion.nodes.structure.structural_data import rendered_normals

    batch = dataset.batch(first_index, count)
    rendered = batch.rendered
    masks = rendered.mask
    depth = _depth_convention(rendered.depth, getattr(dataset, "style", "flat"))
    return {
        "images": batch.images,
        "captions": list(batch.captions),
        "labels": [scene.labels() if len(scene.objects) == 1 else {} for scene in batch.scenes],
        "mask": masks.amax(dim=1, keepdim=True),
        "object_masks": masks,
        "depth": depth,
        "normal": rendered_normals(rendered, depth),
        "layout": _layout(rendered),
    }


def _layout(rendered: Any) -> Any:
    """The renderer's layout when it made one, else the boxes of the object masks."""
    if rendered.layout is not None:
        return rendered.layout
    from dagfusion.nodes.structure.layout import layout_from_masks

    return layout_from_masks(rendered.mask)


def _depth_convention(distance: Any, style: str) -> Any:
    """The renderer's distance (background 1.0) in the DEPTH convention (1 = nearest): ``1 - d``
    for the flat style, the solid style's range ``[SOLID_NEAR, 1]`` stretched to ``[1, 0]``."""
    from dagfusion.nodes.shapes.solid import SOLID_NEAR
    from dagfusion.nodes.structure.maps import depth_from_distance

    return depth_from_distance(distance, SOLID_NEAR if style == "solid" else 0.0, 1.0)


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


def _embedded_example() -> dict[str, Any]:
    return {"model": "shapes-sd", "device": "cpu", "dtype": "fp32"}


@node(
    "dagfusion.models.LoadEmbedded",
    version="1.1.0",
    category="models",
    inputs=[
        Input("model", STRING, "shapes-sd", choices=("shapes-sd", "shapes-dit", "shapes-sd-two-objects"),
              description="'shapes-sd' (Stable Diffusion 1 layout), 'shapes-dit' (PixArt-alpha layout) or "
                          "'shapes-sd-two-objects' (shapes-sd fine-tuned on two-object scenes, with the structure VAE): "
                          "the shapes-world models shipped with dagfusion."),
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


@node(
    "dagfusion.shapes.RenderStructure",
    version="1.0.0",
    category="shapes",
    inputs=[
        Input("prompts", union(STRING, LIST),
              description="Shapes-world captions (single objects or two objects in a relation): one, or a list (one image each)."),
        Input("resolution", INT, 64, min=8, max=1024, description="Image side in pixels."),
        Input("style", STRING, "solid", choices=("flat", "solid"), description="'solid': shaded 3-D solids; 'flat': the 2-D shapes the embedded models know."),
        Input("jitter", BOOLEAN, False, description="Vary position, size, rotation (and, solid, turn, tilt and height) per image."),
        Input("seed", SEED, 0, min=0, description="Seeds each image's jitter (image i: the generator of (seed, i))."),
    ],
    outputs=[
        Output("image", "IMAGE", "(B, 3, H, W) in [0, 1]."),
        Output("depth", "DEPTH", "(B, 1, H, W), 1 = nearest."),
        Output("normal", "NORMAL", "(B, 3, H, W) camera-space unit normals (x right, y up, z towards the viewer)."),
        Output("object_mask", "OBJECT_MASK", "(B, K, H, W): each object's visible pixels, in caption order."),
        Output("layout", "LAYOUT", "Boxes, labels, attributes and depth order of the objects."),
    ],
    examples=[
        {"prompts": "a red circle above a blue square on a black background", "resolution": 32},
        {"prompts": ["a large green triangle on the left on a white background", "a yellow cross right of a purple square on a gray background"],
         "resolution": 32, "style": "flat", "jitter": True, "seed": 3},
    ],
)
def render_structure(ctx: RunContext, prompts: Any, resolution: int, style: str, jitter: bool, seed: int) -> dict[str, Any]:
    """Render shapes-world captions with their structure: image, depth, normals, object masks, layout."""
    from dagfusion.nodes.structure.layout import captions_of
    from dagfusion.nodes.structure.layout import render_structure as render_captions

    return render_captions(captions_of(prompts, "prompts"), resolution, style, jitter, seed, input="prompts")


from dagfusion.nodes.shapes.concept import concept_dataset_node  # noqa: E402  (after SHAPES_DATASET: no torch)

NODES = (dataset, render, prompts, load_embedded, render_structure, concept_dataset_node)


@hookimpl
def register_types(register: Any) -> None:
    for socket_type in (SHAPES_DATASET,):
        register(socket_type)


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)
