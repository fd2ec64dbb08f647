"""MaskIoU: segmented objects of generated images against object masks or layouts."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dagfusion.errors import NodeInputError
from dagfusion.nodes.structure.layout import render_structure
from dagfusion.nodes.structure.metrics import best_matching, mask_iou
from dagfusion.registry import Registry

REGISTRY = Registry.from_plugins(load_entrypoints=False, environ={})

CAPTIONS = [
    "a red circle above a blue square on a black background",
    "a green triangle left of a yellow cross on a white background",
    "a large purple square on the right on a gray background",
    "a orange cross below a red triangle on a gray background",
]
# the same objects elsewhere: relations turned by 90 degrees, the single object moved
MOVED = [
    "a red circle left of a blue square on a black background",
    "a green triangle above a yellow cross on a white background",
    "a large purple square on the left on a gray background",
    "a orange cross right of a red triangle on a gray background",
]


def _mask_iou(**inputs: Any) -> dict[str, Any]:
    spec = REGISTRY.get("dagfusion.structure.MaskIoU")
    full = {i.name: (i.default if not i.required else None) for i in spec.inputs}
    full.update(inputs)
    return spec.fn(None, **full)


@pytest.mark.parametrize("style", ["flat", "solid"])
def test_renders_match_their_own_structure_and_not_moved_structure(style: str) -> None:
    asked = render_structure(CAPTIONS, 64, style)
    moved = render_structure(MOVED, 64, style)
    drawn = render_structure(CAPTIONS, 64, style, jitter=True, seed=7)["image"]  # a little off, as generated images are
    own = _mask_iou(images=drawn, reference=asked["object_mask"])
    assert own["count"] == 4 and len(own["per_image"]) == 4
    assert own["mean"] > 0.6 and min(own["per_image"]) > 0.45
    exact = _mask_iou(images=asked["image"], reference=asked["object_mask"])
    assert exact["mean"] > 0.85
    wrong = _mask_iou(images=drawn, reference=moved["object_mask"])
    assert wrong["mean"] < 0.2
    boxes = _mask_iou(images=asked["image"], reference=asked["layout"])
    assert boxes["mean"] > 0.85
    assert _mask_iou(images=asked["image"], reference=moved["layout"])["mean"] < 0.2


def test_missing_and_extra_objects_cost() -> None:
    two = render_structure(["a red circle above a blue square on a black background"], 64, "flat")
    one = render_structure(["a small red circle at the top on a black background"], 64, "flat")
    missing = mask_iou(one["image"], two["object_mask"])[0]
    assert missing < 0.55  # one of two objects found: at most half
    extra = mask_iou(two["image"], one["object_mask"])[0]
    assert extra < 0.55
    union = mask_iou(two["image"], two["object_mask"], mode="union")[0]
    assert union > 0.85


def test_empty_images_against_empty_references_score_one() -> None:
    image = torch.zeros(1, 3, 16, 16)
    assert mask_iou(image, torch.zeros(1, 2, 16, 16)) == [1.0]
    assert mask_iou(image, torch.zeros(1, 1, 16, 16), mode="union") == [1.0]


def test_best_matching() -> None:
    assert best_matching([[0.1, 0.9], [0.8, 0.2]]) == pytest.approx(1.7)
    assert best_matching([[0.5, 0.4, 0.9]]) == pytest.approx(0.9)
    assert best_matching([[0.5], [0.7]]) == pytest.approx(0.7)
    assert best_matching([]) == 0.0
    diagonal = [[1.0 if r == c else 0.1 for c in range(9)] for r in range(9)]  # the greedy path
    assert best_matching(diagonal) == pytest.approx(9.0)


def test_mask_iou_checks_its_inputs() -> None:
    r = render_structure(CAPTIONS[:2], 32, "flat")
    with pytest.raises(NodeInputError) as caught:
        _mask_iou(images=r["image"], reference=r["object_mask"][:1])
    assert caught.value.input == "reference" and "one reference per image (2)" in caught.value.message
    with pytest.raises(NodeInputError) as caught:
        _mask_iou(images=r["image"][:, :1], reference=r["object_mask"])
    assert caught.value.input == "images" and "3 channel" in caught.value.message
    with pytest.raises(NodeInputError) as caught:
        _mask_iou(images=r["image"], reference=r["object_mask"][0])
    assert caught.value.input == "reference"
