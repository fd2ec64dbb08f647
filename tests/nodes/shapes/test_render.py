from __future__ import annotations

import torch

from dagfusion.nodes.shapes.dataset import ShapesDataset
from dagfusion.nodes.shapes.world import BACKGROUNDS, COLOURS, parse_caption


def test_same_seed_same_pixels_different_seed_different_jitter() -> None:
    a = ShapesDataset("train", 1, 32, seed=1).batch(5, 4)
    b = ShapesDataset("train", 1, 32, seed=1).batch(5, 4)
    c = ShapesDataset("train", 1, 32, seed=2).batch(5, 4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (4, 3, 32, 32)


def test_render_matches_its_caption() -> None:
    data = ShapesDataset("eval", 1, 64, seed=0, jitter=False)
    batch = data.batch(0, len(data))
    for image, mask, depth, scene in zip(batch.images, batch.rendered.mask, batch.rendered.depth, batch.scenes):
        labels = scene.labels()
        inside = mask[0] > 0.99
        outside = mask[0] < 0.01
        colour = image[:, inside].mean(dim=1)
        assert torch.allclose(colour, torch.tensor(COLOURS[labels["colour"]]), atol=0.02), scene.caption
        assert torch.allclose(image[:, outside].mean(dim=1), torch.tensor(BACKGROUNDS[labels["background"]]), atol=0.02)
        ys, xs = torch.nonzero(inside, as_tuple=True)
        cx, cy = xs.float().mean() / 64, ys.float().mean() / 64
        expected = {"left": (cx < 0.4), "right": (cx > 0.6), "top": (cy < 0.4), "bottom": (cy > 0.6),
                    "center": (0.4 < cx < 0.6 and 0.4 < cy < 0.6)}[labels["position"]]
        assert expected, (scene.caption, float(cx), float(cy))
        area = inside.float().mean()
        assert (area > 0.08) if labels["size"] == "large" else (area < 0.08), (scene.caption, float(area))
        assert float(depth[0][outside].mean()) == 1.0 and float(depth[0][inside].max()) < 0.7
    assert parse_caption(batch.captions[0]) == batch.scenes[0]


def test_two_object_masks_and_relations() -> None:
    batch = ShapesDataset("train", 2, 64, seed=0, jitter=False).batch(0, 8)
    assert batch.rendered.mask.shape == (8, 2, 64, 64)
    for masks, scene in zip(batch.rendered.mask, batch.scenes):
        centres = []
        for m in masks:
            ys, xs = torch.nonzero(m > 0.5, as_tuple=True)
            centres.append((xs.float().mean(), ys.float().mean()))
        (x1, y1), (x2, y2) = centres
        assert {"above": y1 < y2, "below": y1 > y2, "left of": x1 < x2, "right of": x1 > x2}[scene.relation], scene.caption


def test_the_render_node_gives_the_structure_that_structure_conditions_are_made_of() -> None:
    from dagfusion.nodes.structure.layout import layout_from_masks, render_structure
    from dagfusion.registry import Registry

    render = Registry.from_plugins(load_entrypoints=False, environ={}).get("dagfusion.shapes.Render")
    Data = ShapesDataset

    solid = Data("train", 2, 32, seed=0, jitter=True, style="solid")
    out = render.fn(None, solid, 3, 2)
    batch = solid.batch(3, 2)
    # the solid renderer's own normals and layout, the same scenes the images show
    assert torch.equal(out["normal"], batch.rendered.normal.float())
    assert out["layout"] == batch.rendered.layout and len(out["layout"]) == 2
    assert all(len(row) == 2 for row in out["layout"].rows)
    again = render_structure(out["captions"], 32, "solid")
    assert again["normal"].shape == out["normal"].shape

    flat = Data("train", 1, 32, seed=0, jitter=True, style="flat")
    out = render.fn(None, flat, 0, 3)
    # flat shapes face the viewer; the layout's boxes are the objects'
    assert torch.allclose(out["normal"][:, 2].mean(), torch.tensor(1.0), atol=0.05)
    assert torch.allclose(out["normal"].norm(dim=1), torch.ones(3, 32, 32), atol=1e-5)
    from_masks = layout_from_masks(out["object_masks"])
    for row, expected in zip(out["layout"].rows, from_masks.rows):
        assert len(row) == len(expected) == 1
        for got, box in zip(row, expected):
            assert torch.allclose(torch.tensor(got.box), torch.tensor(box.box), atol=2 / 32)
