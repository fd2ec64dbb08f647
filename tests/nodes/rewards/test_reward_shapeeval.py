"""The ShapeEval reward: differentiable, prefers correct renders, refuses non-captions and mismatched batches."""

from __future__ import annotations

import pytest
import torch

from dagfusion.errors import NodeInputError
from dagfusion.fingerprint import fingerprint
from dagfusion.nodes.metrics.evaluator import SHIPPED, load_shapeeval
from dagfusion.nodes.rewards.shapeeval import ShapeEvalReward
from dagfusion.nodes.shapes.dataset import ShapesDataset
from dagfusion.nodes.shapes.world import ATTRIBUTES, parse_caption

ALL = {name: 1.0 for name in ATTRIBUTES}


@pytest.fixture(scope="module")
def shipped() -> torch.nn.Module:
    return load_shapeeval(SHIPPED)


def _wrong(caption: str) -> str:
    """The caption with another colour and another shape."""
    labels = parse_caption(caption).labels()  # type: ignore[union-attr]
    colours, shapes = ATTRIBUTES["colour"], ATTRIBUTES["shape"]
    colour = colours[(colours.index(labels["colour"]) + 1) % len(colours)]
    shape = shapes[(shapes.index(labels["shape"]) + 1) % len(shapes)]
    return caption.replace(labels["colour"], colour, 1).replace(labels["shape"], shape, 1)


def test_gradients_reach_the_images(shipped: torch.nn.Module) -> None:
    data = ShapesDataset("eval", 1, 64, 0).batch(0, 4)
    images = data.images.clone().requires_grad_(True)
    scores = ShapeEvalReward(shipped, ALL).score(images, list(data.captions))
    assert scores.shape == (4,)
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert grad.abs().sum() > 0


def test_correct_renders_score_higher_than_wrong_prompts(shipped: torch.nn.Module) -> None:
    data = ShapesDataset("eval", 1, 64, 0).batch(0, 16)
    reward = ShapeEvalReward(shipped, ALL)
    with torch.no_grad():
        right = reward.score(data.images, list(data.captions))
        wrong = reward.score(data.images, [_wrong(c) for c in data.captions])
    assert (right > wrong).all()
    assert right.mean() > -1.0  # the shipped classifier is confident on renders


def test_score_is_the_weighted_sum_of_log_probabilities(shipped: torch.nn.Module) -> None:
    data = ShapesDataset("eval", 1, 64, 0).batch(0, 3)
    captions = list(data.captions)
    with torch.no_grad():
        logits = shipped(data.images)
        expected = torch.zeros(3)
        for i, caption in enumerate(captions):
            label = parse_caption(caption).labels()["colour"]  # type: ignore[union-attr]
            expected[i] = 2.0 * torch.log_softmax(logits["colour"][i], 0)[ATTRIBUTES["colour"].index(label)]
        got = ShapeEvalReward(shipped, {"colour": 2.0}).score(data.images, captions)
    torch.testing.assert_close(got, expected)


def test_other_image_sizes_are_resized(shipped: torch.nn.Module) -> None:
    data = ShapesDataset("eval", 1, 32, 0).batch(0, 2)
    with torch.no_grad():
        scores = ShapeEvalReward(shipped, ALL).score(data.images, list(data.captions))
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_the_callers_classifier_is_not_modified(shipped: torch.nn.Module) -> None:
    before = fingerprint(shipped)
    flags = [p.requires_grad for p in shipped.parameters()]
    reward = ShapeEvalReward(shipped, ALL)
    assert reward.model is not shipped
    assert fingerprint(shipped) == before and [p.requires_grad for p in shipped.parameters()] == flags
    assert not any(p.requires_grad for p in reward.model.parameters())


def test_fingerprint_follows_weights(shipped: torch.nn.Module) -> None:
    a = ShapeEvalReward(shipped, ALL)
    assert fingerprint(a) == fingerprint(ShapeEvalReward(shipped, ALL))
    assert fingerprint(a) != fingerprint(ShapeEvalReward(shipped, {**ALL, "size": 0.5}))


def test_a_prompt_that_is_not_a_caption_is_named(shipped: torch.nn.Module) -> None:
    data = ShapesDataset("eval", 1, 64, 0).batch(0, 2)
    with pytest.raises(NodeInputError, match="a photo of a cat") as info:
        ShapeEvalReward(shipped, ALL).score(data.images, [data.captions[0], "a photo of a cat"])
    assert info.value.input == "prompts"


def test_count_mismatch_is_a_node_input_error(shipped: torch.nn.Module) -> None:
    data = ShapesDataset("eval", 1, 64, 0).batch(0, 3)
    with pytest.raises(NodeInputError, match="2 prompts for 3 images"):
        ShapeEvalReward(shipped, ALL).score(data.images, list(data.captions[:2]))


def test_one_prompt_serves_every_image(shipped: torch.nn.Module) -> None:
    data = ShapesDataset("eval", 1, 64, 0).batch(0, 2)
    with torch.no_grad():
        scores = ShapeEvalReward(shipped, ALL).score(data.images, data.captions[0])
    assert scores.shape == (2,)


def test_unknown_attribute_weights_are_refused(shipped: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="texture"):
        ShapeEvalReward(shipped, {"texture": 1.0})
