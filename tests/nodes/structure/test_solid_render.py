"""The shapes world's render styles: the flat renderer unchanged, the solid renderer's geometry."""

from __future__ import annotations

import math

import pytest
import torch

from dagfusion.nodes.shapes.dataset import ShapesDataset
from dagfusion.nodes.shapes.render import render_batch, render_scene
from dagfusion.nodes.shapes.solid import CAMERA_DISTANCE, LIGHT, SOLID_NEAR
from dagfusion.nodes.shapes.world import COLOURS, Scene, ShapeObject, scenes
from dagfusion.nodes.structure.data import Layout

# sums and sums of squares of image, mask and depth recorded from the flat renderer before the
# solid style, normals and layouts were added (the embedded models were trained on these pixels)
FLAT_REFERENCE = {
    (1, 32, 1, True): [(8973.85486163944, 7268.600336464917), (923.0625, 885.53515625), (5500.805551528931, 5303.099871502851)],
    (2, 64, 5, True): [(35804.669522928074, 28979.711901600793), (3050.125, 2938.6640625), (23050.79077476263, 22271.097251410378)],
    (1, 64, 0, False): [(35864.08446252346, 29263.473315962194), (3571.125, 3494.7421875), (22087.125266611576, 21346.83935368948)],
}


@pytest.mark.parametrize("key", list(FLAT_REFERENCE), ids=str)
def test_flat_renders_are_unchanged(key: tuple[int, int, int, bool]) -> None:
    objects, resolution, seed, jitter = key
    r = render_batch(scenes("train", objects)[3:9], resolution, seed, 10, jitter)
    for tensor, (total, squares) in zip((r.image, r.mask, r.depth), FLAT_REFERENCE[key]):
        assert float(tensor.double().sum()) == pytest.approx(total, rel=1e-9, abs=1e-6)
        assert float((tensor.double() ** 2).sum()) == pytest.approx(squares, rel=1e-9, abs=1e-6)


def test_flat_style_is_the_default_and_keeps_its_fingerprint() -> None:
    flat = ShapesDataset("train", 1, 32, seed=2)
    assert flat.style == "flat"
    assert flat.__dagfusion_fingerprint__() == "shapes:train:1:32:2:True"
    solid = ShapesDataset("train", 1, 32, seed=2, style="solid")
    assert solid.__dagfusion_fingerprint__() != flat.__dagfusion_fingerprint__()
    with pytest.raises(ValueError, match="style"):
        ShapesDataset(style="glossy")


def test_flat_normals_and_layout() -> None:
    batch = ShapesDataset("eval", 1, 32, seed=0, jitter=False).batch(0, 16)
    r = batch.rendered
    assert r.normal is not None and r.normal.shape == (16, 3, 32, 32)
    assert torch.allclose(r.normal.norm(dim=1), torch.ones(16, 32, 32), atol=1e-5)
    for normal, scene in zip(r.normal, batch.scenes):
        if scene.objects[0].shape != "circle":
            assert torch.equal(normal, torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 32, 32))
        else:  # the bulge's normals lean outwards
            assert float(normal[2].min()) < 0.7
    assert isinstance(r.layout, Layout) and len(r.layout) == 16
    assert r.layout.rows[0][0].label == f"{batch.scenes[0].objects[0].colour} {batch.scenes[0].objects[0].shape}"


def test_solid_is_deterministic_per_seed_and_index() -> None:
    a = ShapesDataset("train", 2, 32, seed=4, style="solid").batch(3, 4).rendered
    b = ShapesDataset("train", 2, 32, seed=4, style="solid").batch(3, 4).rendered
    c = ShapesDataset("train", 2, 32, seed=5, style="solid").batch(3, 4).rendered
    for name in ("image", "mask", "depth", "normal"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.layout == b.layout
    assert not torch.equal(a.image, c.image)
    # the same index in a longer batch renders the same pixels
    longer = ShapesDataset("train", 2, 32, seed=4, style="solid").batch(1, 6).rendered
    assert torch.equal(longer.image[2:], a.image)


def test_solid_maps_follow_their_conventions() -> None:
    batch = ShapesDataset("eval", 2, 64, seed=1, style="solid").batch(0, 12)
    r = batch.rendered
    assert r.image.shape == (12, 3, 64, 64) and r.mask.shape == (12, 2, 64, 64)
    assert torch.allclose(r.normal.norm(dim=1), torch.ones(12, 64, 64), atol=1e-4)
    background = r.mask.sum(dim=1) == 0
    assert torch.all(r.depth[:, 0][background] == 1.0)
    assert torch.all(r.normal[:, 2][background] == 1.0)
    objects = r.mask.sum(dim=1) > 0.999
    assert float(r.depth[:, 0][objects].max()) < 1.0 and float(r.depth.min()) >= SOLID_NEAR
    assert float(r.mask.sum(dim=1).max()) <= 1.0 + 1e-6  # visible masks never overlap
    # solids are shaded: the normals on an object vary (flat style: (0, 0, 1) for squares)
    assert float(r.normal[:, 2][objects].min()) < 0.8


def _object(colour: str, shape: str, position: str = "center", size: str = "large") -> ShapeObject:
    return ShapeObject(colour, shape, position, size)


def test_occlusion_the_nearest_surface_wins() -> None:
    # two objects at the same place: without jitter the second object stands higher (nearer);
    # the sphere's front is nearer than the thin cross slab behind it, whose arms show around it
    scene = Scene((_object("red", "cross"), _object("blue", "circle", size="small")), "black", "above")
    r = render_scene(scene, 64, torch.Generator().manual_seed(0), jitter=False, style="solid")
    masks = r.mask[0]
    centre = (slice(28, 36), slice(28, 36))
    assert float(masks[1][centre].min()) == 1.0 and float(masks[0][centre].max()) == 0.0
    assert float(masks[0].sum()) > 50  # the cube still shows around the sphere
    blue, red = torch.tensor(COLOURS["blue"]), torch.tensor(COLOURS["red"])
    pixel = r.image[0, :, 32, 32]
    assert torch.dot(pixel, blue) / pixel.norm() / blue.norm() > torch.dot(pixel, red) / pixel.norm() / red.norm()
    (cross, sphere) = r.layout.rows[0]
    assert (sphere.depth, cross.depth) == (0.0, 1.0)
    # the depth at the centre is the sphere's front (lift 0.30 + radius 0.14 + sphere radius)
    front = (CAMERA_DISTANCE - 0.30 - 0.14 - 0.92 * 0.14) / CAMERA_DISTANCE
    assert float(r.depth[0, 0, 32, 32]) == pytest.approx(front, abs=0.005)


def test_two_object_scenes_have_different_depths() -> None:
    batch = ShapesDataset("train", 2, 64, seed=3, style="solid").batch(0, 16)
    orders = set()
    for depth, masks, row in zip(batch.rendered.depth, batch.rendered.mask, batch.rendered.layout.rows):
        means = [float(depth[0][m > 0.99].mean()) for m in masks]
        assert abs(means[0] - means[1]) > 0.02
        nearer = 0 if means[0] < means[1] else 1
        assert row[nearer].depth == 0.0 and row[1 - nearer].depth == 1.0
        orders.add(nearer)
    assert orders == {0, 1}  # with jitter either object may be the nearer one


def test_solid_colours_stay_recognisable() -> None:
    data = ShapesDataset("eval", 1, 64, seed=0, jitter=False, style="solid")
    batch = data.batch(0, len(data))  # every held-out single-object scene
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names])
    palette = palette / palette.norm(dim=1, keepdim=True)
    for image, mask, scene in zip(batch.images, batch.rendered.mask, batch.scenes):
        mean = image[:, mask[0] > 0.99].mean(dim=1)
        guess = names[int((palette @ (mean / mean.norm())).argmax())]
        assert guess == scene.objects[0].colour, scene.caption


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "cross"])
def test_each_solid_has_its_geometry(shape: str) -> None:
    scene = Scene((_object("green", shape),), "gray")
    r = render_scene(scene, 64, torch.Generator().manual_seed(0), jitter=False, style="solid")
    inside = r.mask[0, 0] > 0.99
    normals = r.normal[0][:, inside]
    area = float(inside.float().mean())
    assert 0.03 < area < 0.35, area
    light = torch.tensor(LIGHT) / torch.tensor(LIGHT).norm()
    if shape == "circle":
        radius = 0.92 * 0.27
        assert area == pytest.approx(math.pi * radius**2, rel=0.08)
        # a sphere's depth at its centre is its front: centre distance minus its radius
        front = (CAMERA_DISTANCE - 0.12 - 0.27 - radius) / CAMERA_DISTANCE
        assert float(r.depth[0, 0, 32, 32]) == pytest.approx(front, abs=0.01)
    if shape in ("square", "cross"):
        # flat faces: a few distinct normals, one of them a top face seen from above
        distinct = torch.unique((normals.T * 20).round(), dim=0)
        assert float(normals[1].max()) > 0.3
        assert len(distinct) < 40
    if shape == "triangle":  # a cone, apex up: narrow at the top, wide near the base
        rows = inside.any(dim=1).nonzero()
        top, bottom = int(rows[0]), int(rows[-1])
        widths = inside.sum(dim=1)
        upper, lower = top + (bottom - top) // 4, top + 3 * (bottom - top) // 4
        assert int(widths[upper]) * 2 < int(widths[lower])
    shade = (normals * light.view(3, 1)).sum(0)
    assert float(shade.max() - shade.min()) > 0.2  # shading varies over the solid
