"""A colour outside the shapes world (dagfusion.shapes.ConceptDataset): captions, renders, the
held-out split, prior-preservation mixing and bad inputs."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from dagfusion import NodeInputError
from dagfusion.nodes.shapes.concept import (
    CONCEPT_COLOURS,
    MIN_DISTANCE,
    ConceptDataset,
    ConceptInputError,
    concept_dataset,
    concept_dataset_node,
    concept_scenes,
    parse_concept_caption,
    resolve_colour,
)
from dagfusion.nodes.shapes.dataset import ShapesDataset
from dagfusion.nodes.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    parse_caption,
)

PINK = CONCEPT_COLOURS["pink"]


def combination(scene):
    labels = scene.labels()
    return tuple(labels[k] for k in ("shape", "position", "size", "background"))


def test_pink_is_far_from_the_world_colours_and_backgrounds() -> None:
    for ref in [*COLOURS.values(), *BACKGROUNDS.values()]:
        assert math.dist(PINK, ref) >= 0.4
    assert "pink" not in COLOURS  # the world (and the shipped ShapeEval) keep their six colours


def test_splits_cover_every_combination_once_and_are_disjoint() -> None:
    train, held = concept_scenes("pink", "train"), concept_scenes("pink", "eval")
    train_combos, held_combos = {combination(s) for s in train}, {combination(s) for s in held}
    assert not train_combos & held_combos
    assert len(train_combos | held_combos) == len(SHAPES) * len(POSITIONS) * len(SIZES) * len(BACKGROUNDS)
    assert len(held) >= 48  # enough held-out prompts for the benchmark
    for values, key in ((SHAPES, "shape"), (POSITIONS, "position"), (SIZES, "size"), (BACKGROUNDS, "background")):
        assert {s.labels()[key] for s in train} == set(values)
        assert {s.labels()[key] for s in held} == set(values)


def test_train_stream_never_shows_a_held_out_pink_combination() -> None:
    held = {combination(s) for s in concept_scenes("pink", "eval")}
    data = concept_dataset("pink", split="train", resolution=32, mix=0.25)
    seen = [data.scene_at(i) for i in range(400)]
    pink = [s for s in seen if s.objects[0].colour == "pink"]
    assert pink and not {combination(s) for s in pink} & held
    world = [s for s in seen if s.objects[0].colour != "pink"]
    assert len(world) == 100  # exactly a quarter: floor((i + 1) mix) > floor(i mix)
    assert {s.caption for s in world} <= set(ShapesDataset(split="train").prompts())


def test_captions_parse_and_match_the_scenes() -> None:
    data = concept_dataset("pink", split="eval", resolution=32, mix=0.5)
    batch = data.batch(0, 16)
    for caption, scene in zip(batch.captions, batch.scenes):
        assert scene.caption == caption
        assert parse_concept_caption(caption, "pink") == scene
        if scene.objects[0].colour == "pink":
            assert caption.split()[2] == "pink"
            assert parse_caption(caption) is None  # not a world caption
    assert parse_concept_caption("a large pink circle on the left on a black background", "pink").labels() == {
        "colour": "pink", "shape": "circle", "position": "left", "size": "large", "background": "black"}
    assert parse_concept_caption("a pink blob", "pink") is None
    assert data.prompts() == [s.caption for s in concept_scenes("pink", "eval")]


def test_renders_have_the_new_colour_exactly_where_the_object_is() -> None:
    data = concept_dataset("pink", split="train", resolution=32, mix=0.25)
    batch = data.batch(5, 12)
    for i, scene in enumerate(batch.scenes):
        image, mask = batch.images[i], batch.rendered.mask[i, 0]
        colour = PINK if scene.objects[0].colour == "pink" else COLOURS[scene.objects[0].colour]
        inside = mask > 0.999
        assert inside.sum() > 4
        assert torch.allclose(image[:, inside].mean(dim=1), torch.tensor(colour), atol=1e-5)
        outside = mask < 1e-6
        assert torch.allclose(image[:, outside], torch.tensor(BACKGROUNDS[scene.background]).view(3, 1), atol=1e-6)
        assert batch.rendered.layout.rows[i][0].label.startswith(scene.objects[0].colour)
    # the same stream is rebuilt exactly
    again = data.batch(5, 12)
    assert torch.equal(again.images, batch.images)


def test_other_colours_and_the_node() -> None:
    ctx = None
    data, count = concept_dataset_node.fn(ctx, colour="teal", rgb="0.1, 0.6, 0.6", split="eval", resolution=32, seed=0, mix=0.0)
    assert isinstance(data, ShapesDataset) and isinstance(data, ConceptDataset)
    assert count == len(concept_scenes("teal", "eval"))
    assert data.rgb == (0.1, 0.6, 0.6)
    image = data.batch(0, 1).images[0]
    assert torch.allclose(image[:, data.batch(0, 1).rendered.mask[0, 0] > 0.999].mean(dim=1), torch.tensor([0.1, 0.6, 0.6]), atol=1e-5)
    assert resolve_colour("pink", [0.98, 0.45, 0.75]) == ("pink", PINK)
    other = concept_dataset("pink", split="train", resolution=32, seed=1)
    assert other.__dagfusion_fingerprint__() != concept_dataset("pink", split="train", resolution=32).__dagfusion_fingerprint__()


@pytest.mark.parametrize(
    ("colour", "rgb", "input", "words"),
    [
        ("teal", "", "rgb", "unknown"),
        ("pink", "1.2, 0.5, 0.5", "rgb", "[0, 1]"),
        ("pink", "0.5, 0.5", "rgb", "three"),
        ("pink", "a,b,c", "rgb", "three numbers"),
        ("pink", "0.9, 0.17, 0.17", "rgb", "red"),
        ("crimson", "0.9, 0.16, 0.16", "rgb", "red"),
        ("mint", "0.98, 0.98, 0.98", "rgb", "white background"),
        ("red", "", "colour", "already a world colour"),
        ("circle", "0.98, 0.45, 0.75", "colour", "shapes world"),
        ("Light pink", "", "colour", "one lowercase word"),
    ],
)
def test_bad_colours_are_refused_naming_the_input(colour: str, rgb: str, input: str, words: str) -> None:
    with pytest.raises(ConceptInputError) as caught:
        resolve_colour(colour, rgb)
    assert caught.value.input == input and words in str(caught.value)
    with pytest.raises(NodeInputError) as node_error:
        concept_dataset_node.fn(None, colour=colour, rgb=rgb, split="train", resolution=32, seed=0, mix=0.25)
    assert node_error.value.input == input
    assert MIN_DISTANCE > 0.2


def test_bad_mix_and_split() -> None:
    with pytest.raises(ConceptInputError, match="mix"):
        concept_dataset("pink", mix=1.0)
    with pytest.raises(ConceptInputError, match="split"):
        concept_dataset("pink", split="test")
