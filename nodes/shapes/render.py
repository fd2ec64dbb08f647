"""Rendering scenes of the shapes world into images, masks and depth maps (torch, CPU).

Shapes are drawn by signed distance on a 4× supersampled grid and averaged down, so edges are
anti-aliased. Each sample is jittered (centre, radius, a few degrees of rotation) by its own
seeded generator, so the same ``(seed, index)`` always gives the same pixels.

Depth follows the convention "larger is farther": the background is at 1.0 and objects are
closer the larger they are; circles bulge like spheres, other shapes are flat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch

from dagfusion.nodes.shapes.world import BACKGROUNDS, COLOURS, POSITIONS, SIZES, Scene, ShapeObject

SUPERSAMPLE = 4


@dataclass(frozen=True)
class Rendered:
    """A batch of renders: ``image`` (B,3,H,W) in [0,1], ``mask`` (B,K,H,W) one channel per
    object, ``depth`` (B,1,H,W) with 1 = far."""

    image: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor


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


def render_scene(scene: Scene, resolution: int, generator: torch.Generator, jitter: bool = True) -> Rendered:
    """Render one scene (batch of one)."""
    n = resolution * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    image = torch.empty(3, n, n)
    image[:] = torch.tensor(BACKGROUNDS[scene.background]).view(3, 1, 1)
    depth = torch.ones(1, n, n)
    masks = []
    for obj in scene.objects:
        cover, obj_depth = _draw(obj, xs, ys, generator, jitter)
        colour = torch.tensor(COLOURS[obj.colour]).view(3, 1, 1)
        image = image * (1 - cover) + colour * cover
        depth = torch.where(cover > 0.5, torch.minimum(depth, obj_depth), depth)
        masks.append(cover)
    pool = torch.nn.functional.avg_pool2d
    image = pool(image.unsqueeze(0), SUPERSAMPLE)
    depth = pool(depth.unsqueeze(0), SUPERSAMPLE)
    mask = pool(torch.cat(masks).unsqueeze(0), SUPERSAMPLE)
    return Rendered(image.clamp(0, 1), mask.clamp(0, 1), depth.clamp(0, 1))


def _draw(obj: ShapeObject, xs: torch.Tensor, ys: torch.Tensor, generator: torch.Generator, jitter: bool) -> tuple[torch.Tensor, torch.Tensor]:
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
    else:
        obj_depth = torch.full_like(cover, base)
    return cover, obj_depth


def render_batch(scene_list: list[Scene], resolution: int, seed: int, first_index: int, jitter: bool = True) -> Rendered:
    """Render scenes; sample ``i`` uses a generator seeded by ``(seed, first_index + i)``."""
    images, masks, depths = [], [], []
    width = max(len(s.objects) for s in scene_list)
    for offset, scene in enumerate(scene_list):
        generator = torch.Generator().manual_seed(_sample_seed(seed, first_index + offset))
        r = render_scene(scene, resolution, generator, jitter)
        mask = r.mask
        if mask.shape[1] < width:
            mask = torch.cat([mask, torch.zeros(1, width - mask.shape[1], resolution, resolution)], dim=1)
        images.append(r.image)
        masks.append(mask)
        depths.append(r.depth)
    return Rendered(torch.cat(images), torch.cat(masks), torch.cat(depths))


def _sample_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 12_345) % (2**63 - 1)

