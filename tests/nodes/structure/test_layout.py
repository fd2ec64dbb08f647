"""Layouts from prompts, rasterised layouts, layouts from masks, and shapes.RenderStructure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dagfusion.errors import NodeInputError
from dagfusion.nodes.shapes.world import COLOURS, GRAMMAR, parse_pair_caption, two_object_scenes
from dagfusion.nodes.structure import layout as layouts
from dagfusion.nodes.structure.data import Layout, LayoutObject
from dagfusion.registry import Registry
from dagfusion.testing import run_workflow

REGISTRY = Registry.from_plugins(load_entrypoints=False, environ={})


def _node(type_id: str, **inputs: Any) -> Any:
    spec = REGISTRY.get(type_id)
    assert spec is not None, type_id
    full = {i.name: (i.default if not i.required else None) for i in spec.inputs}
    full.update(inputs)
    return spec.fn(None, **full)


def test_pair_captions_parse_back_to_their_scenes() -> None:
    assert all(parse_pair_caption(scene.caption) == scene for scene in two_object_scenes()[::37])
    assert parse_pair_caption("a red circle above a red circle on a black background") is not None
    assert parse_pair_caption("a red circle beside a blue square on a black background") is None
    assert parse_pair_caption("a large red circle on the left on a black background") is None


@pytest.mark.parametrize("style", ["flat", "solid"])
@pytest.mark.parametrize(
    ("relation", "first_is"),
    [("above", "higher"), ("below", "lower"), ("left of", "lefter"), ("right of", "righter")],
)
def test_layout_from_prompt_places_objects_by_relation(style: str, relation: str, first_is: str) -> None:
    caption = f"a red circle {relation} a blue square on a black background"
    out = _node("dagfusion.structure.LayoutFromPrompt", prompt=caption, resolution=32, style=style)
    layout = out["layout"]
    assert isinstance(layout, Layout) and len(layout) == 1 and layout.background == ("black",)
    first, second = layout.rows[0]
    assert (first.label, second.label) == ("red circle", "blue square")
    assert first.attribute("colour") == "red" and second.attribute("shape") == "square"
    (x1, y1), (x2, y2) = first.centre, second.centre
    assert {"higher": y1 < y2 - 0.2, "lower": y1 > y2 + 0.2, "lefter": x1 < x2 - 0.2, "righter": x1 > x2 + 0.2}[first_is]
    assert sorted([first.depth, second.depth]) == [0.0, 1.0]
    assert out["object_mask"].shape == (1, 2, 32, 32)
    assert out["depth"].shape == (1, 1, 32, 32) and out["normal"].shape == (1, 3, 32, 32)
    cover = out["object_mask"].sum(dim=1, keepdim=True)
    assert float(out["depth"][cover > 0.99].min()) > float(out["depth"][cover == 0].max())  # 1 = nearest


def test_layout_boxes_contain_the_object_masks() -> None:
    captions = ["a large green triangle on the left on a white background", "a yellow cross below a purple square on a gray background"]
    out = _node("dagfusion.structure.LayoutFromPrompt", prompt=captions, resolution=64, style="solid")
    assert out["object_mask"].shape == (2, 2, 64, 64)  # padded to the most objects of a caption
    assert len(out["layout"].rows[0]) == 1 and float(out["object_mask"][0, 1].sum()) == 0
    read = layouts.layout_from_masks(out["object_mask"], threshold=0.0)
    for wanted_row, read_row in zip(out["layout"].rows, read.rows):
        assert len(wanted_row) == len(read_row)
        for wanted, found in zip(wanted_row, read_row):
            # visible masks lie within the footprint box (to a pixel) and, unoccluded, fill it
            assert all(abs(a - b) <= 1 / 64 + 1e-6 for a, b in zip(wanted.box, found.box)), (wanted.box, found.box)


def test_solid_and_flat_structure_differ() -> None:
    caption = "a small orange square in the center on a black background"
    flat = _node("dagfusion.structure.LayoutFromPrompt", prompt=caption, resolution=32, style="flat")
    solid = _node("dagfusion.structure.LayoutFromPrompt", prompt=caption, resolution=32, style="solid")
    assert torch.all(flat["normal"][:, 2] == 1.0)
    assert float(solid["normal"][:, 2].min()) < 0.8


def test_a_caption_outside_the_grammar_quotes_the_grammar() -> None:
    with pytest.raises(NodeInputError) as caught:
        _node("dagfusion.structure.LayoutFromPrompt", prompt="a cat on a mat")
    assert caught.value.input == "prompt"
    assert "'a cat on a mat'" in caught.value.message and GRAMMAR in caught.value.message
    with pytest.raises(NodeInputError, match="at least one caption"):
        _node("dagfusion.structure.LayoutFromPrompt", prompt=[])
    with pytest.raises(NodeInputError) as caught:
        _node("dagfusion.shapes.RenderStructure", prompts=["a red circle above a blue square on a black background", "a pink blob"])
    assert caught.value.input == "prompts" and "a pink blob" in caught.value.message


def test_rasterise_layout_fills_and_draws_boxes() -> None:
    layout = Layout(
        ((LayoutObject((0.25, 0.25, 0.5, 0.75), "red circle", (("colour", "red"),)), LayoutObject((0.5, 0.0, 1.0, 0.5), "thing")),),
        size=(8, 8),
    )
    masks, drawing = _node("dagfusion.structure.RasteriseLayout", layout=layout)
    assert masks.shape == (1, 2, 8, 8) and drawing.shape == (1, 3, 8, 8)
    assert masks[0, 0].nonzero().tolist() == [[y, x] for y in range(2, 6) for x in range(2, 4)]
    assert int(masks[0, 1].sum()) == 16
    assert torch.allclose(drawing[0, :, 2, 2], torch.tensor(COLOURS["red"]))  # the outline, in its colour
    assert float(drawing[0, :, 0, 0].abs().sum()) == 0.0  # outside every box: black
    bigger, _ = _node("dagfusion.structure.RasteriseLayout", layout=layout, width=16, height=32)
    assert bigger.shape == (1, 2, 32, 16) and int(bigger[0, 0].sum()) == 4 * 16  # 0.25 of 16 columns × 0.5 of 32 rows
    with pytest.raises(NodeInputError, match="Layout"):
        _node("dagfusion.structure.RasteriseLayout", layout={"rows": []})


def test_layout_from_mask_round_trip() -> None:
    masks = torch.zeros(2, 3, 16, 16)
    masks[0, 0, 2:5, 3:9] = 1
    masks[0, 2, 10:16, 0:2] = 0.8
    masks[1, 1, 0:16, 0:16] = 1
    layout = _node("dagfusion.structure.LayoutFromMask", object_mask=masks, labels=["a", "b", "c"])
    assert [len(r) for r in layout.rows] == [2, 1]
    assert layout.rows[0][0].box == (3 / 16, 2 / 16, 9 / 16, 5 / 16) and layout.rows[0][0].label == "a"
    assert layout.rows[0][1].label == "c" and layout.rows[1][0].box == (0.0, 0.0, 1.0, 1.0)
    again, _ = layouts.rasterise(layout, 16, 16)
    assert torch.equal(again[0, 0], masks[0, 0])
    assert Layout.from_json(layout.to_json()) == layout
    with pytest.raises(NodeInputError) as caught:
        _node("dagfusion.structure.LayoutFromMask", object_mask=torch.zeros(16, 16))
    assert caught.value.input == "object_mask"


def test_render_structure_node(tmp_path: Path) -> None:
    result = run_workflow(
        """
format_version: 1
nodes:
  still:
    type: dagfusion.shapes.RenderStructure
    inputs: {prompts: ["a blue triangle right of a green cross on a white background"], resolution: 32}
  moved:
    type: dagfusion.shapes.RenderStructure
    inputs: {prompts: ["a blue triangle right of a green cross on a white background"], resolution: 32, jitter: true, seed: 4}
  asked:
    type: dagfusion.structure.LayoutFromPrompt
    inputs: {prompt: "a blue triangle right of a green cross on a white background", resolution: 32}
  boxes: {type: dagfusion.structure.RasteriseLayout, inputs: {layout: {from: still.layout}}}
""",
        registry=REGISTRY,
        tmp_path=tmp_path,
    )
    still = {k: result.output(f"still.{k}") for k in ("image", "depth", "normal", "object_mask", "layout")}
    assert still["image"].shape == (1, 3, 32, 32)
    assert torch.equal(still["depth"], result.output("asked.depth"))
    assert still["layout"] == result.output("asked.layout")
    assert not torch.equal(still["image"], result.output("moved.image"))
    assert result.output("boxes.object_mask").shape == (1, 2, 32, 32)
