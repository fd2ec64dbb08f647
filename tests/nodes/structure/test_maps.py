"""Depth/normal/mask maps: conversions, visualisation, resizing, segmentation, input checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dagfusion.errors import NodeInputError
from dagfusion.nodes.shapes.dataset import ShapesDataset
from dagfusion.nodes.shapes.solid import SOLID_NEAR
from dagfusion.nodes.structure import maps
from dagfusion.registry import Registry
from dagfusion.testing import run_workflow

REGISTRY = Registry.from_plugins(load_entrypoints=False, environ={})


def _solid(count: int = 8, objects: int = 2, resolution: int = 64, seed: int = 0) -> Any:
    return ShapesDataset("eval", objects, resolution, seed=seed, style="solid").batch(0, count).rendered


def test_depth_from_distance_follows_the_depth_convention() -> None:
    r = _solid(4)
    depth = maps.depth_from_distance(r.depth, SOLID_NEAR, 1.0)
    assert depth.shape == (4, 1, 64, 64) and float(depth.min()) >= 0 and float(depth.max()) <= 1
    background = r.mask.sum(dim=1, keepdim=True) == 0
    assert torch.all(depth[background] == 0)
    assert float(depth[~background].mean()) > 0.2  # objects are nearer: larger DEPTH
    flat = ShapesDataset("eval", 1, 32, seed=0).batch(0, 4).rendered
    assert torch.equal(maps.depth_from_distance(flat.depth), 1 - flat.depth)
    with pytest.raises(ValueError, match="far"):
        maps.depth_from_distance(flat.depth, 1.0, 1.0)


def test_normals_from_depth_recover_the_renderers_normals() -> None:
    r = _solid(8)
    depth = maps.depth_from_distance(r.depth, SOLID_NEAR, 1.0)
    normal = maps.normals_from_depth(depth, scale=1.0)
    assert torch.allclose(normal.norm(dim=1), torch.ones(8, 64, 64), atol=1e-5)
    inside = (r.mask.sum(dim=1, keepdim=True) > 0.999).float()
    interior = (-torch.nn.functional.max_pool2d(-inside, 5, stride=1, padding=2) > 0.5)[:, 0]
    cosine = (normal * r.normal).sum(dim=1)[interior]
    assert float(cosine.mean()) > 0.97
    # a wrong scale disagrees: the documented scale is what matches
    assert float((maps.normals_from_depth(depth, 4.0) * r.normal).sum(dim=1)[interior].mean()) < float(cosine.mean()) - 0.05


def test_normals_of_a_known_slope() -> None:
    width = 32
    ramp = torch.linspace(0, 1, width).view(1, 1, 1, width).expand(1, 1, 16, width) * (width - 1) / width
    normal = maps.normals_from_depth(ramp, scale=1.0)
    # z rises by (almost exactly) one image width across the image: a 45-degree slope facing left
    expected = torch.tensor([-1.0, 0.0, 1.0]) / 2**0.5
    assert torch.allclose(normal[0, :, 8, 16], expected, atol=1e-4)
    up = maps.normals_from_depth(ramp.transpose(-1, -2).contiguous().flip(-2), scale=1.0)
    # nearer towards the top, rising half an image width (16 px) over 32 rows: faces down, slope 1/2
    assert float(up[0, 1, 16, 8]) == pytest.approx(-(5**-0.5), abs=1e-4)


def test_resize_map_per_kind() -> None:
    r = _solid(2)
    mask = maps.resize_map(r.mask, "mask", 32, 48)
    assert mask.shape == (2, 2, 32, 48) and set(mask.unique().tolist()) <= set(r.mask.unique().tolist())
    normal = maps.resize_map(r.normal, "normal", 17, 23)
    assert torch.allclose(normal.norm(dim=1), torch.ones(2, 17, 23), atol=1e-5)
    depth = maps.resize_map(maps.depth_from_distance(r.depth, SOLID_NEAR), "depth", 128, 128)
    assert depth.shape == (2, 1, 128, 128) and float(depth.max()) <= 1


def test_normalise_depth_per_image() -> None:
    depth = torch.stack([torch.full((1, 4, 4), 0.3), torch.linspace(0.2, 0.6, 16).view(1, 4, 4)])
    out = maps.normalise_depth(depth)
    assert torch.equal(out[0], torch.zeros(1, 4, 4))
    assert float(out[1].min()) == 0.0 and float(out[1].max()) == pytest.approx(1.0)


@pytest.mark.parametrize("style", ["flat", "solid"])
def test_segmentation_finds_the_rendered_objects(style: str) -> None:
    batch = ShapesDataset("eval", 2, 64, seed=3, style=style).batch(0, 16)
    masks, counts = maps.segment_objects(batch.images)
    assert counts == [2] * 16
    truth = batch.rendered.mask > 0.5
    scores = []
    for found, wanted in zip(masks > 0.5, truth):
        for channel in found:
            scores.append(max(float((channel & w).sum()) / float((channel | w).sum()) for w in wanted))
    # small objects (radius ~9 px): anti-aliased edge pixels are the disagreement
    assert min(scores) > 0.7 and sum(scores) / len(scores) > 0.85


def test_segmentation_estimates_the_background_from_the_border() -> None:
    image = torch.full((1, 3, 20, 20), 0.9)
    image[:, :, 5:9, 5:9] = torch.tensor([0.1, 0.2, 0.9]).view(1, 3, 1, 1)
    image[:, :, 12:18, 3:6] = 0.0
    image[:, :, 15, 15] = 0.0  # one stray pixel: below min_area
    masks, counts = maps.segment_objects(image, threshold=0.2, min_area=0.005, max_objects=3)
    assert counts == [2]
    assert int(masks[0, 0].sum()) == 18 and int(masks[0, 1].sum()) == 16  # largest first
    assert int(masks[0, 2].sum()) == 0
    assert torch.allclose(maps.background_colour(image), torch.tensor([[0.9, 0.9, 0.9]]))


def test_connected_components_split_diagonal_and_separate_blobs() -> None:
    fg = torch.zeros(1, 6, 6, dtype=torch.bool)
    fg[0, 0, 0] = fg[0, 1, 1] = True  # diagonal neighbours: one component (8-connected)
    fg[0, 4, 4] = fg[0, 4, 5] = True
    labels = maps.connected_components(fg)
    assert labels[0, 0, 0] == labels[0, 1, 1] and labels[0, 4, 4] == labels[0, 4, 5]
    assert labels[0, 0, 0] != labels[0, 4, 4] and int(labels[0, 2, 2]) == 0


def _run_node(type_id: str, inputs: dict[str, Any]) -> Any:
    spec = REGISTRY.get(type_id)
    assert spec is not None, type_id
    full = {i.name: (i.default if not i.required else None) for i in spec.inputs}
    full.update(inputs)
    return spec.fn(None, **full)


@pytest.mark.parametrize(
    ("type_id", "inputs", "input_name", "expected"),
    [
        ("dagfusion.structure.NormalsFromDepth", {"depth": torch.zeros(1, 3, 8, 8)}, "depth", "1 channel"),
        ("dagfusion.structure.NormalsFromDepth", {"depth": torch.zeros(8, 8)}, "depth", "4 dimensions"),
        ("dagfusion.structure.VisualiseNormal", {"normal": torch.zeros(1, 1, 8, 8)}, "normal", "3 channel"),
        ("dagfusion.structure.VisualiseDepth", {"depth": "deep"}, "depth", "got str"),
        ("dagfusion.structure.ObjectMaskFromImage", {"image": torch.zeros(1, 4, 8, 8)}, "image", "got 4 channels"),
        ("dagfusion.structure.ResizeMap", {"map": torch.zeros(1, 1, 8, 8), "kind": "normal"}, "map", "3 channel"),
        ("dagfusion.structure.DepthFromDistance", {"distance": torch.zeros(1, 1, 8, 8), "near": 1.0, "far": 0.5}, "far", "far > near"),
        ("dagfusion.structure.NormaliseDepth", {"depth": torch.zeros(1, 1, 4, 4, dtype=torch.long)}, "depth", "floating-point"),
    ],
)
def test_nodes_name_the_bad_input(type_id: str, inputs: dict[str, Any], input_name: str, expected: str) -> None:
    with pytest.raises(NodeInputError) as caught:
        _run_node(type_id, inputs)
    assert caught.value.input == input_name and expected in caught.value.message


def test_map_nodes_in_a_workflow(tmp_path: Path) -> None:
    result = run_workflow(
        """
format_version: 1
nodes:
  scene:
    type: dagfusion.shapes.RenderStructure
    inputs: {prompts: "a red square left of a blue circle on a white background", resolution: 32}
  normals: {type: dagfusion.structure.NormalsFromDepth, inputs: {depth: {from: scene.depth}}}
  shown: {type: dagfusion.structure.VisualiseNormal, inputs: {normal: {from: normals.normal}}}
  masks: {type: dagfusion.structure.ObjectMaskFromImage, inputs: {image: {from: scene.image}}}
  bigger: {type: dagfusion.structure.ResizeMap, inputs: {map: {from: masks.masks}, kind: mask, width: 64, height: 64}}
""",
        registry=REGISTRY,
        tmp_path=tmp_path,
    )
    assert result.output("shown.image").shape == (1, 3, 32, 32)
    assert result.output("masks.counts") == [2]
    bigger = result.output("bigger.map")
    assert bigger.shape == (1, 2, 64, 64) and set(bigger.unique().tolist()) == {0.0, 1.0}
