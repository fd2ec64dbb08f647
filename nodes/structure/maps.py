"""Depth, normal and object-mask maps: conversions, visualisation, resizing and segmentation.

Conventions are those of :mod:`dagfusion.nodes.structure.types`: ``DEPTH`` (B,1,H,W) in [0, 1]
with 1 = nearest; ``NORMAL`` (B,3,H,W) unit camera-space vectors (x right, y up, z towards the
viewer); ``OBJECT_MASK`` (B,K,H,W) in [0, 1], one channel per object.

- :func:`depth_from_distance` turns a renderer's distance ("larger is farther") into ``DEPTH``.
- :func:`normals_from_depth` reads ``DEPTH`` as a height field towards the viewer,
  ``z(x, y) = scale · depth`` with ``x, y`` measured in image widths, and takes central finite
  differences: ``n ∝ (-∂z/∂x, -∂z/∂y_up, 1)``. With ``scale = 1`` a depth step of 1 across the
  whole image width is a 45° slope. For the shapes world's solid renders made by
  ``dagfusion.shapes.RenderStructure`` one depth unit is exactly one image width (``scale = 1``
  recovers the renderer's geometry).
- :func:`segment_objects` is the object segmentation of ``ObjectMaskFromImage`` and of the
  ``MaskIoU`` metric: the background colour is the per-channel median of the image's border
  pixels (a ring ``border`` pixels wide); a pixel is foreground when its RGB Euclidean distance
  to that colour exceeds ``threshold`` (colours in [0, 1]); foreground pixels are grouped into
  8-connected components; components smaller than ``min_area`` (a fraction of the image) are
  dropped; the ``max_objects`` largest are kept, largest first. Objects that touch merge into one
  component, and objects coloured like the background are not found: it is meant for plain
  backgrounds such as the shapes world's.
"""

from __future__ import annotations

from typing import Any

from dagfusion import BOOLEAN, FLOAT, INT, LIST, STRING, Input, Output, RunContext, node, union
from dagfusion.errors import NodeInputError
from dagfusion.nodes.diffusion.types import IMAGE
from dagfusion.nodes.structure.types import DEPTH, NORMAL, OBJECT_MASK

MAX_MAP_SIDE = 8192
"""The largest side a map may be resized to."""


# --------------------------------------------------------------------------------------------
# input checks


def check_map(value: Any, input: str, kind: str, channels: int | None = None) -> Any:
    """``value`` as a float (B,C,H,W) tensor of ``channels`` channels (any count if ``None``).

    :raises NodeInputError: it is not a tensor, not 4-D, or has another channel count.
    """
    import torch

    if not isinstance(value, torch.Tensor):
        raise NodeInputError(input, f"expected a {kind} tensor (B, C, H, W), got {type(value).__name__}")
    if value.dim() != 4:
        raise NodeInputError(input, f"expected a {kind} tensor of 4 dimensions (B, C, H, W), got shape {tuple(value.shape)}")
    if channels is not None and value.shape[1] != channels:
        raise NodeInputError(input, f"expected a {kind} with {channels} channel(s) (B, {channels}, H, W), got {value.shape[1]} channels (shape {tuple(value.shape)})")
    if value.shape[0] < 1 or value.shape[2] < 1 or value.shape[3] < 1:
        raise NodeInputError(input, f"expected a non-empty {kind}, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise NodeInputError(input, f"expected a floating-point {kind}, got dtype {value.dtype}")
    return value


def check_image(value: Any, input: str = "image") -> Any:
    """An IMAGE (B,3,H,W) float tensor; :raises NodeInputError: otherwise."""
    return check_map(value, input, "IMAGE", 3)


# --------------------------------------------------------------------------------------------
# functions


def depth_from_distance(distance: Any, near: float = 0.0, far: float = 1.0) -> Any:
    """``DEPTH`` (1 = nearest) from a distance map ("larger is farther"):
    ``clamp((far - distance) / (far - near), 0, 1)``.

    The shapes renderers' ``depth`` is a distance with the background at 1.0: the flat style's
    objects lie in ``[0.2, 0.6]`` (use ``near = 0``), the solid style's in
    ``[SOLID_NEAR, 1]`` = ``[0.5, 1]`` (use ``near = 0.5``: then one ``DEPTH`` unit is one
    image width).
    """
    if not far > near:
        raise ValueError(f"far must be greater than near, got near={near}, far={far}")
    return ((far - distance.float()) / (far - near)).clamp(0, 1)


def normals_from_depth(depth: Any, scale: float = 1.0) -> Any:
    """Unit normals (B,3,H,W) of ``DEPTH`` read as a height field ``z = scale · depth`` (x, y in
    image widths), by central differences (one-sided at the border)."""
    import torch
    from torch.nn import functional as F

    z = depth.float() * scale * depth.shape[-1]  # height in pixels
    padded = F.pad(z, (1, 1, 1, 1), mode="replicate")
    dzdx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    dzdy_down = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    # at the border replicate padding halves the difference: undo that
    dzdx[..., :, 0] *= 2
    dzdx[..., :, -1] *= 2
    dzdy_down[..., 0, :] *= 2
    dzdy_down[..., -1, :] *= 2
    if depth.shape[-1] == 1:
        dzdx = torch.zeros_like(dzdx)
    if depth.shape[-2] == 1:
        dzdy_down = torch.zeros_like(dzdy_down)
    n = torch.cat([-dzdx, dzdy_down, torch.ones_like(z)], dim=1)
    return n / n.norm(dim=1, keepdim=True)


def normalise_normals(normal: Any) -> Any:
    """Normals rescaled to unit length (zero vectors become ``(0, 0, 1)``)."""
    import torch

    length = normal.norm(dim=1, keepdim=True)
    facing = torch.zeros_like(normal)
    facing[:, 2] = 1.0
    return torch.where(length > 1e-6, normal / length.clamp(min=1e-6), facing)


def resize_map(value: Any, kind: str, height: int, width: int) -> Any:
    """Resize a map: ``"mask"`` nearest-neighbour, ``"depth"`` bilinear, ``"normal"`` bilinear
    then renormalised to unit length."""
    from torch.nn import functional as F

    if kind == "mask":
        return F.interpolate(value.float(), size=(height, width), mode="nearest-exact")
    resized = F.interpolate(value.float(), size=(height, width), mode="bilinear", align_corners=False)
    if kind == "depth":
        return resized.clamp(0, 1)
    if kind == "normal":
        return normalise_normals(resized)
    raise ValueError(f"kind must be 'depth', 'normal' or 'mask', got {kind!r}")


def normalise_depth(depth: Any) -> Any:
    """Min–max normalisation per image to [0, 1] (a constant image becomes 0)."""
    flat = depth.float().flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
    span = (hi - lo).clamp(min=1e-12)
    return ((depth.float() - lo) / span).where(hi > lo, depth.float() * 0)


def background_colour(images: Any, border: int = 2) -> Any:
    """Per-image background colour (B,3): the per-channel median of the border ring."""
    import torch

    h, w = images.shape[-2:]
    k = max(1, min(border, h // 2, w // 2))
    ring = torch.ones(h, w, dtype=torch.bool)
    ring[k : h - k, k : w - k] = False
    return images.float()[:, :, ring].median(dim=2).values


def connected_components(foreground: Any, max_iterations: int = 4096) -> Any:
    """8-connected component labels (B,H,W) of a boolean (B,H,W) map: 0 = background, components
    labelled by the largest flat index (+1) they contain (labels are not consecutive)."""
    import torch
    from torch.nn import functional as F

    b, h, w = foreground.shape
    index = torch.arange(1, h * w + 1, dtype=torch.float64).view(1, h, w).expand(b, h, w)
    labels = torch.where(foreground, index, torch.zeros(()).double())
    for _ in range(max_iterations):
        grown = F.max_pool2d(labels.unsqueeze(1), 3, stride=1, padding=1).squeeze(1)
        grown = torch.where(foreground, grown, torch.zeros(()).double())
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def segment_objects(
    images: Any, threshold: float = 0.2, min_area: float = 0.002, max_objects: int = 2, border: int = 2
) -> tuple[Any, list[int]]:
    """Object masks of images on a plain background (see the module docstring).

    Returns ``(masks, counts)``: ``masks`` (B, max_objects, H, W) in {0, 1}, the largest component
    first (empty channels when fewer were found), and the number of objects found per image
    (at most ``max_objects``).
    """
    import torch

    b, _, h, w = images.shape
    colour = background_colour(images, border)
    distance = (images.float() - colour.view(b, 3, 1, 1)).norm(dim=1)
    foreground = distance > threshold
    labels = connected_components(foreground)
    masks = torch.zeros(b, max_objects, h, w)
    counts = []
    smallest = max(1, round(min_area * h * w))
    for i in range(b):
        values, sizes = torch.unique(labels[i][labels[i] > 0], return_counts=True)
        keep = [(int(s), int(v)) for v, s in zip(values.tolist(), sizes.tolist()) if s >= smallest]
        keep.sort(key=lambda item: (-item[0], item[1]))
        keep = keep[:max_objects]
        for k, (_, value) in enumerate(keep):
            masks[i, k] = (labels[i] == value).float()
        counts.append(len(keep))
    return masks, counts


# --------------------------------------------------------------------------------------------
# examples


def _solid_structure(count: int = 2, resolution: int = 32) -> dict[str, Any]:
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.shapes.solid import SOLID_NEAR

    batch = ShapesDataset("eval", 1, resolution, seed=0, jitter=False, style="solid").batch(0, count)
    r = batch.rendered
    return {
        "image": r.image,
        "distance": r.depth,
        "depth": depth_from_distance(r.depth, SOLID_NEAR, 1.0),
        "normal": r.normal,
        "mask": r.mask,
    }


# --------------------------------------------------------------------------------------------
# nodes



@node(
    "dagfusion.structure.DepthFromDistance",
    version="1.0.0",
    category="structure",
    inputs=[
        Input("distance", "TENSOR", description="Distance map (B, 1, H, W), larger is farther (the shapes renderers' depth)."),
        Input("near", FLOAT, 0.0, description="Distance that becomes DEPTH 1 (nearest)."),
        Input("far", FLOAT, 1.0, description="Distance that becomes DEPTH 0 (farthest; the shapes background is at 1)."),
    ],
    outputs=[Output("depth", DEPTH, "(far - distance) / (far - near), clamped to [0, 1]: 1 = nearest.")],
    check=lambda v: _near_far_problems(v),
    examples=[lambda: {"distance": _solid_structure()["distance"], "near": 0.5, "far": 1.0}],
)
def depth_from_distance_node(ctx: RunContext, distance: Any, near: float, far: float) -> Any:
    """Convert a renderer's distance map ("larger is farther") to the DEPTH convention (1 = nearest)."""
    check_map(distance, "distance", "distance map", 1)
    if not far > near:
        raise NodeInputError("far", f"expected far > near, got near={near}, far={far}")
    return depth_from_distance(distance, near, far)


def _near_far_problems(values: dict[str, Any]) -> list[Any]:
    from dagfusion.errors import Problem

    near, far = values.get("near"), values.get("far")
    if isinstance(near, (int, float)) and isinstance(far, (int, float)) and not far > near:
        return [Problem("invalid-input", f"far ({far}) must be greater than near ({near})", input="far")]
    return []


@node(
    "dagfusion.structure.NormalsFromDepth",
    version="1.0.0",
    category="structure",
    inputs=[
        Input("depth", DEPTH, description="Depth (B, 1, H, W), 1 = nearest."),
        Input("scale", FLOAT, 1.0, min=0.0, max=1000.0,
              description="Height of one DEPTH unit in image widths (1: the solid shapes renders' scale)."),
    ],
    outputs=[Output("normal", NORMAL, "Unit normals by central differences of z = scale · depth.")],
    examples=[lambda: {"depth": _solid_structure()["depth"]}],
)
def normals_from_depth_node(ctx: RunContext, depth: Any, scale: float) -> Any:
    """Surface normals of a depth map read as a height field (finite differences)."""
    check_map(depth, "depth", "DEPTH", 1)
    return normals_from_depth(depth, scale)


@node(
    "dagfusion.structure.VisualiseDepth",
    version="1.0.0",
    category="structure",
    inputs=[
        Input("depth", DEPTH, description="Depth (B, 1, H, W), 1 = nearest."),
        Input("normalise", BOOLEAN, False, description="Stretch each image's depth to [0, 1] first."),
    ],
    outputs=[Output("image", IMAGE, "Grey image: white = nearest, black = farthest.")],
    examples=[lambda: {"depth": _solid_structure()["depth"], "normalise": True}],
)
def visualise_depth(ctx: RunContext, depth: Any, normalise: bool) -> Any:
    """Show depth as a grey image (white = nearest)."""
    check_map(depth, "depth", "DEPTH", 1)
    shown = normalise_depth(depth) if normalise else depth.float().clamp(0, 1)
    return shown.expand(-1, 3, -1, -1).contiguous()


@node(
    "dagfusion.structure.VisualiseNormal",
    version="1.0.0",
    category="structure",
    inputs=[Input("normal", NORMAL, description="Normals (B, 3, H, W) in [-1, 1].")],
    outputs=[Output("image", IMAGE, "(n + 1) / 2 as RGB: red = right, green = up, blue = towards the viewer.")],
    examples=[lambda: {"normal": _solid_structure()["normal"]}],
)
def visualise_normal(ctx: RunContext, normal: Any) -> Any:
    """Show normals as an image, (n + 1) / 2."""
    check_map(normal, "normal", "NORMAL", 3)
    return ((normal.float() + 1) / 2).clamp(0, 1)


@node(
    "dagfusion.structure.ResizeMap",
    version="1.0.0",
    category="structure",
    inputs=[
        Input("map", union(DEPTH, NORMAL, OBJECT_MASK), description="The map to resize."),
        Input("kind", STRING, "depth", choices=("depth", "normal", "mask"),
              description="What the map is: 'depth' (bilinear), 'normal' (bilinear, renormalised), 'mask' (nearest)."),
        Input("width", INT, 64, min=1, max=MAX_MAP_SIDE),
        Input("height", INT, 64, min=1, max=MAX_MAP_SIDE),
    ],
    outputs=[Output("map", "ANY", "The resized map (the input's type: DEPTH, NORMAL or OBJECT_MASK).")],
    examples=[
        lambda: {"map": _solid_structure()["normal"], "kind": "normal", "width": 48, "height": 40},
        lambda: {"map": _solid_structure()["mask"], "kind": "mask", "width": 16, "height": 16},
    ],
)
def resize_map_node(ctx: RunContext, map: Any, kind: str, width: int, height: int) -> Any:
    """Resize a depth (bilinear), normal (bilinear, renormalised) or object-mask (nearest) map."""
    channels = {"depth": 1, "normal": 3, "mask": None}[kind]
    check_map(map, "map", {"depth": "DEPTH", "normal": "NORMAL", "mask": "OBJECT_MASK"}[kind], channels)
    return resize_map(map, kind, height, width)


@node(
    "dagfusion.structure.NormaliseDepth",
    version="1.0.0",
    category="structure",
    inputs=[Input("depth", DEPTH, description="Depth (B, 1, H, W).")],
    outputs=[Output("depth", DEPTH, "Each image stretched to [0, 1] (min → 0, max → 1; constant → 0).")],
    examples=[lambda: {"depth": _solid_structure()["depth"]}],
)
def normalise_depth_node(ctx: RunContext, depth: Any) -> Any:
    """Min–max normalise each depth map to [0, 1]."""
    check_map(depth, "depth", "DEPTH", 1)
    return normalise_depth(depth)


@node(
    "dagfusion.structure.ObjectMaskFromImage",
    version="1.0.0",
    category="structure",
    inputs=[
        Input("image", IMAGE, description="Images (B, 3, H, W) of objects on a plain background."),
        Input("threshold", FLOAT, 0.2, min=0.0, max=2.0, description="RGB distance to the background colour above which a pixel is an object."),
        Input("max_objects", INT, 2, min=1, max=64, description="Channels of the output: the largest objects, largest first."),
        Input("min_area", FLOAT, 0.002, min=0.0, max=1.0, description="Smallest object kept, as a fraction of the image."),
        Input("border", INT, 2, min=1, max=64, description="Width in pixels of the border ring the background colour is estimated from."),
    ],
    outputs=[
        Output("masks", OBJECT_MASK, "(B, max_objects, H, W): one channel per object found, empty channels after."),
        Output("union", OBJECT_MASK, "(B, 1, H, W): every object."),
        Output("counts", LIST, "Objects found per image."),
    ],
    examples=[lambda: {"image": _solid_structure()["image"]}],
)
def object_mask_from_image(ctx: RunContext, image: Any, threshold: float, max_objects: int, min_area: float, border: int) -> dict[str, Any]:
    """Segment objects against a plain background: border-median background colour, colour
    distance threshold, 8-connected components."""
    check_image(image)
    masks, counts = segment_objects(image, threshold, min_area, max_objects, border)
    return {"masks": masks, "union": masks.amax(dim=1, keepdim=True), "counts": counts}


NODES = (
    depth_from_distance_node,
    normals_from_depth_node,
    visualise_depth,
    visualise_normal,
    resize_map_node,
    normalise_depth_node,
    object_mask_from_image,
)
