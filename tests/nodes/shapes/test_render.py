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
