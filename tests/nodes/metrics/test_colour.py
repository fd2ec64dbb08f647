"""The object-colour metric (dagfusion.metrics.ObjectColour): renders of every colour, the six
world colours and pink, read as their own colour."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dagfusion import NodeInputError
from dagfusion.nodes.metrics.colour import (
    NONE,
    nearest_colour,
    object_colour,
    object_colours,
    palette,
)
from dagfusion.nodes.shapes.concept import concept_dataset
from dagfusion.nodes.shapes.render import render_batch
from dagfusion.nodes.shapes.world import COLOURS, single_object_scenes


def test_palette_is_the_world_and_pink() -> None:
    assert list(palette()) == [*COLOURS, "pink"]

@pytest.mark.parametrize("resolution", [32, 64])
def test_renders_of_every_colour_read_correctly(resolution: int) -> None:
    world = single_object_scenes()  # every combination of the six colours, jittered
    images = render_batch(world, resolution, seed=3, first_index=0).image
    names, rgb = object_colours(images)
    assert names == [s.objects[0].colour for s in world]
    pink = concept_dataset("pink", split="train", resolution=resolution, seed=3)
    batch = pink.batch(0, 2 * len(pink))
    names, rgb = object_colours(batch.images)
    assert names == ["pink"] * len(names)
    assert torch.allclose(rgb.mean(dim=0), torch.tensor(palette()["pink"]), atol=0.02)
    held = concept_dataset("pink", split="eval", resolution=resolution, seed=3, mix=0.5).batch(0, 100)
    assert object_colours(held.images)[0] == [s.objects[0].colour for s in held.scenes]

def test_nothing_found_and_custom_palette() -> None:
    blank = torch.zeros(2, 3, 32, 32)
    names, rgb = object_colours(blank)
    assert names == [NONE, NONE] and bool(torch.isnan(rgb).all())
    assert nearest_colour(torch.tensor([[0.8, 0.3, 0.4]]), {"red": (0.9, 0.2, 0.2), "pink": (0.8, 0.33, 0.41)}) == ["pink"]
    assert nearest_colour(torch.tensor([[0.8, 0.3, 0.4]])) == ["red"]

def test_node_fraction_and_bad_expected() -> None:
    batch = concept_dataset("pink", split="eval", resolution=32, mix=0.5).batch(0, 6)
    expected = [s.objects[0].colour for s in batch.scenes]
    out = object_colour.fn(None, images=batch.images, expected=expected)
    assert out["colours"] == expected and out["fraction"] == 1.0 and out["found"] == 1.0
    pink = object_colour.fn(None, images=batch.images, expected="pink")
    assert pink["fraction"] == expected.count("pink") / 6
    assert object_colour.fn(None, images=batch.images, expected="")["fraction"] == 0.0
    with pytest.raises(NodeInputError, match="unknown colour") as caught:
        object_colour.fn(None, images=batch.images, expected="teal")
    assert caught.value.input == "expected"
    with pytest.raises(NodeInputError, match="one colour per image"):
        object_colour.fn(None, images=batch.images, expected=["pink"])
