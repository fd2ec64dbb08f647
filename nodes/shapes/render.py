"""Rendering scenes of the shapes world into images, masks and depth maps (torch, CPU).

Shapes are drawn by signed distance on a 4× supersampled grid and averaged down, so edges are
anti-aliased. Each sample is jittered (centre, radius, a few degrees of rotation) by its own
seeded generator, so the same ``(seed, index)`` always gives the same pixels.

Depth follows the convention "larger is farther": the background is at 1.0 and objects are
closer the larger they are; circles bulge like spheres, other shapes are flat.

Two render styles exist:

- ``"flat"`` (the default, what the embedded models and ShapeEval were trained on): filled 2-D
  shapes, later objects painted over earlier ones. Its depth is flat per object (circles bulge);
  its normals are ``(0, 0, 1)`` everywhere except on circles, which get the normals of the
  spherical bulge their depth describes (``n ∝ (x, y, sqrt(R² - x² - y²))`` in camera space, x
  right, y up). Its layout's depth order follows the painting (the last painted object is
  nearest).
- ``"solid"``: shaded 3-D solids with per-pixel depth, normals and occlusion, see
  :mod:`dagfusion.nodes.shapes.solid`.

Both styles also give a :class:`~dagfusion.nodes.structure.data.Layout` (per object: the box
of its whole footprint, its label "red circle", attributes colour/shape/position/size and its
depth order, 0 = nearest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dagfusion.nodes.shapes.world import BACKGROUNDS, COLOURS, POSITIONS, SIZES, Scene, ShapeObject

if TYPE_CHECKING:
    from dagfusion.nodes.structure.data import Layout, LayoutObject

SUPERSAMPLE = 4
STYLES = ("flat", "solid")
"""The render styles: ``"flat"`` (default, 2-D shapes) and ``"solid"`` (shaded 3-D solids)."""


@dataclass(frozen=True)
class Rendered:
    """A batch of renders: ``image`` (B,3,H,W) in [0,1], ``mask`` (B,K,H,W) one channel per
    object, ``depth`` (B,1,H,W) with 1 = far; ``normal`` (B,3,H,W) unit camera-space normals
    (x right, y up, z towards the viewer) and ``layout`` (one row per image) when the renderer
    made them (``None`` otherwise)."""

    image: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    normal: torch.Tensor | None = None
    layout: Layout | None = None


def _signed_distance(shape: str, x: torch.Tensor, y: torch.Tensor, radius: float) -> torch.Tensor:
    """Negative inside the shape (x, y already centred and rotated; units of the image side)."""
    if shape == "circle":
        return torch.sqrt(x**2 + y**2) - radius
    if shape == "square":
        return torch.maximum(x.abs(), y.abs()) - radius * 0.85
    if shape == "triangle":
        # equilateral, pointing up, circumradius ~ radius
        r = radius * 1.05
        k = math.sqrt(3.0)
        d1 = (k * x - y) / 2 - r / 2  # right edge
        d2 = (-k * x - y) / 2 - r / 2  # left edge
        d3 = y - r / 2  # bottom edge (y grows downwards)
        return torch.maximum(torch.maximum(d1, d2), d3)
    if shape == "cross":
        arm = radius * 0.36
        horizontal = torch.maximum(x.abs() - radius, y.abs() - arm)
        vertical = torch.maximum(x.abs() - arm, y.abs() - radius)
        return torch.minimum(horizontal, vertical)
    raise ValueError(f"unknown shape {shape!r}")


def layout_row(scene: Scene, boxes: list[tuple[float, float, float, float]], order: list[int]) -> tuple[LayoutObject, ...]:
    """The layout objects of one rendered scene: footprint boxes, labels, attributes, depth order."""
    from dagfusion.nodes.structure.data import LayoutObject

    return tuple(
        LayoutObject(
            box=box,
            label=f"{obj.colour} {obj.shape}",
            attributes=(("colour", obj.colour), ("shape", obj.shape), ("position", obj.position), ("size", obj.size)),
            depth=float(rank),
        )
        for obj, box, rank in zip(scene.objects, boxes, order)
    )


def _footprint_box(cover: torch.Tensor) -> tuple[float, float, float, float] | None:
    """The box of a supersampled (1, n, n) coverage as fractions of the image, ``None`` if empty."""
    hit = cover[0] > 0.5
    n = hit.shape[-1]
    rows, cols = hit.any(dim=1).nonzero(), hit.any(dim=0).nonzero()
    if rows.numel() == 0:
        return None
    return (float(cols[0]) / n, float(rows[0]) / n, float(cols[-1] + 1) / n, float(rows[-1] + 1) / n)


def render_scene(scene: Scene, resolution: int, generator: torch.Generator, jitter: bool = True, style: str = "flat") -> Rendered:
    """Render one scene (batch of one) in ``style`` (``"flat"`` or ``"solid"``)."""
    from dagfusion.nodes.structure.data import Layout

    if style == "solid":
        from dagfusion.nodes.shapes.solid import render_solid_scene

        r = render_solid_scene(scene, resolution, generator, jitter, SUPERSAMPLE)
        layout = Layout((layout_row(scene, r["boxes"], r["order"]),), (resolution, resolution), (scene.background,))  # type: ignore[arg-type]
        return Rendered(r["image"], r["mask"], r["depth"], r["normal"], layout)  # type: ignore[arg-type]
    if style != "flat":
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    n = resolution * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    image = torch.empty(3, n, n)
    image[:] = torch.tensor(BACKGROUNDS[scene.background]).view(3, 1, 1)
    depth = torch.ones(1, n, n)
    normal: torch.Tensor | None = None  # built only when a circle bulges: all (0, 0, 1) otherwise
    masks = []
    boxes = []
    for obj in scene.objects:
        cover, obj_depth, obj_normal = _draw(obj, xs, ys, generator, jitter)
        colour = torch.tensor(COLOURS[obj.colour]).view(3, 1, 1)
        image = image * (1 - cover) + colour * cover
        depth = torch.where(cover > 0.5, torch.minimum(depth, obj_depth), depth)
        if obj_normal is not None:
            if normal is None:
                normal = torch.zeros(3, n, n)
                normal[2] = 1.0
            normal = torch.where(cover > 0.5, obj_normal, normal)
        elif normal is not None:
            normal = torch.where(cover > 0.5, torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1), normal)
        masks.append(cover)
        box = _footprint_box(cover)
        boxes.append(box if box is not None else (POSITIONS[obj.position] * 2)[:4])
    pool = torch.nn.functional.avg_pool2d
    image = pool(image.unsqueeze(0), SUPERSAMPLE)
    depth = pool(depth.unsqueeze(0), SUPERSAMPLE)
    mask = pool(torch.cat(masks).unsqueeze(0), SUPERSAMPLE)
    if normal is None:
        normal = torch.zeros(1, 3, resolution, resolution)
        normal[:, 2] = 1.0
    else:
        normal = pool(normal.unsqueeze(0), SUPERSAMPLE)
        normal = normal / (normal * normal).sum(dim=1, keepdim=True).sqrt().clamp(min=1e-6)
    count = len(scene.objects)
    order = [count - 1 - k for k in range(count)]  # painted last = on top = nearest
    layout = Layout((layout_row(scene, boxes, order),), (resolution, resolution), (scene.background,))
    return Rendered(image.clamp(0, 1), mask.clamp(0, 1), depth.clamp(0, 1), normal, layout)


def _draw(
    obj: ShapeObject, xs: torch.Tensor, ys: torch.Tensor, generator: torch.Generator, jitter: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    cx, cy = POSITIONS[obj.position]
    radius = SIZES[obj.size]
    angle = 0.0
    if jitter:
        u = torch.rand(4, generator=generator)
        cx += float(u[0] - 0.5) * 0.08
        cy += float(u[1] - 0.5) * 0.08
        radius *= 1.0 + float(u[2] - 0.5) * 0.2
        angle = float(u[3] - 0.5) * math.radians(16)
    dx, dy = xs - cx, ys - cy
    c, s = math.cos(angle), math.sin(angle)
    rx, ry = c * dx + s * dy, -s * dx + c * dy
    sdf = _signed_distance(obj.shape, rx, ry, radius)
    cover = (sdf <= 0).float().unsqueeze(0)
    base = 0.35 if obj.size == "large" else 0.6
    if obj.shape == "circle":
        bulge = torch.sqrt(torch.clamp(1 - (dx**2 + dy**2) / radius**2, min=0.0))
        obj_depth = (base - 0.15 * bulge).unsqueeze(0)
        # the normals of the sphere the bulge stands for (camera space: y up)
        # (unit length wherever the circle covers: (dx² + dy²) / r² + bulge² = 1)
        obj_normal = torch.stack([dx / radius, -dy / radius, bulge])
    else:
        obj_depth = torch.full_like(cover, base)
        obj_normal = None  # flat: (0, 0, 1)
    return cover, obj_depth, obj_normal


def render_batch(
    scene_list: list[Scene], resolution: int, seed: int, first_index: int, jitter: bool = True, style: str = "flat"
) -> Rendered:
    """Render scenes in ``style``; sample ``i`` uses a generator seeded by ``(seed, first_index + i)``.

    Masks are padded with empty channels to the batch's largest object count. The flat style's
    image, mask and depth do not depend on the normals and layout computed beside them.
    """
    from dagfusion.nodes.structure.data import Layout

    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    images, masks, depths, normals, rows = [], [], [], [], []
    width = max(len(s.objects) for s in scene_list)
    for offset, scene in enumerate(scene_list):
        generator = torch.Generator().manual_seed(_sample_seed(seed, first_index + offset))
        r = render_scene(scene, resolution, generator, jitter, style)
        mask = r.mask
        if mask.shape[1] < width:
            mask = torch.cat([mask, torch.zeros(1, width - mask.shape[1], resolution, resolution)], dim=1)
        images.append(r.image)
        masks.append(mask)
        depths.append(r.depth)
        normals.append(r.normal)
        rows.append(r.layout.rows[0] if r.layout is not None else ())
    layout = Layout(tuple(rows), (resolution, resolution), tuple(s.background for s in scene_list))
    return Rendered(torch.cat(images), torch.cat(masks), torch.cat(depths), torch.cat(normals), layout)


def _sample_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 12_345) % (2**63 - 1)

