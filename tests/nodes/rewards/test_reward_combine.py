"""Weighted sums of rewards, the Score node, and the pack's registration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dagfusion.errors import NodeInputError
from dagfusion.fingerprint import fingerprint
from dagfusion.nodes.rewards.base import Reward, WeightedSum, check_batch
from dagfusion.testing import WorkflowRunFailed, make_registry, run_workflow

REWARD_NODES = (
    "dagfusion.reward.ShapeEval",
    "dagfusion.reward.LoadCLIP",
    "dagfusion.reward.Aesthetic",
    "dagfusion.reward.ImageStat",
    "dagfusion.reward.Combine",
    "dagfusion.reward.Score",
)
CAPTION = "a large red circle on the left on a black background"


class Brightness(Reward):
    """A toy reward: mean brightness times ``gain`` (prompts unused)."""

    def __init__(self, gain: float) -> None:
        self.gain = gain
        self.name = f"bright{gain:g}"
        self._fingerprint = str(gain)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.gain * images.mean(dim=(1, 2, 3))


def test_the_pack_registers_its_nodes_and_types() -> None:
    registry = make_registry()
    assert sorted(s.type_id for s in registry.nodes_of("dagfusion.builtin.rewards")) == sorted(REWARD_NODES)
    assert [t.name for t in registry.types_of("dagfusion.builtin.rewards")] == ["REWARD", "CLIP_REWARD"]


def test_weighted_sum_adds_weighted_scores_and_composes() -> None:
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    inner = WeightedSum([(Brightness(1.0), 2.0), (Brightness(3.0), -0.5)])
    outer = WeightedSum([(inner, 1.0), (Brightness(1.0), 4.0)])
    mean = images.mean(dim=(1, 2, 3))
    torch.testing.assert_close(outer.score(images, "x"), (2.0 - 1.5 + 4.0) * mean)
    (grad,) = torch.autograd.grad(outer.score(images, "x").sum(), images)
    assert grad.abs().sum() > 0
    assert outer.name == "1·2·bright1 + -0.5·bright3 + 4·bright1"
    assert fingerprint(inner) == fingerprint(WeightedSum([(Brightness(1.0), 2.0), (Brightness(3.0), -0.5)]))
    assert fingerprint(inner) != fingerprint(WeightedSum([(Brightness(1.0), 2.0), (Brightness(3.0), -0.25)]))


def test_check_batch() -> None:
    images = torch.rand(2, 3, 4, 4)
    assert check_batch(images, "p") == ["p", "p"]
    with pytest.raises(NodeInputError, match="3 prompts for 2 images"):
        check_batch(images, ["a", "b", "c"])
    with pytest.raises(NodeInputError, match=r"\(B, 3, H, W\)"):
        check_batch(torch.rand(2, 4, 4), ["a", "b"])
    with pytest.raises(NodeInputError, match="float"):
        check_batch(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ["a", "b"])
    with pytest.raises(NodeInputError, match="text prompts"):
        check_batch(images, ["a", 3])  # type: ignore[list-item]


def _workflow(prompts: Any, count: int = 2) -> dict[str, Any]:
    return {
        "format_version": 1,
        "nodes": {
            "evaluator": {"type": "dagfusion.metrics.LoadShapeEval"},
            "data": {"type": "dagfusion.shapes.Dataset", "inputs": {"split": "eval", "resolution": 64, "seed": 0}},
            "render": {"type": "dagfusion.shapes.Render", "inputs": {"dataset": {"from": "data.dataset"}, "count": count}},
            "all": {"type": "dagfusion.reward.ShapeEval", "inputs": {"evaluator": {"from": "evaluator.evaluator"}}},
            "colour": {"type": "dagfusion.reward.ShapeEval", "inputs": {
                "evaluator": {"from": "evaluator.evaluator"}, "shape": 0.0, "position": 0.0, "size": 0.0, "background": 0.0}},
            "pair": {"type": "dagfusion.reward.Combine", "inputs": {
                "reward_1": {"from": "all.reward"}, "reward_2": {"from": "colour.reward"}, "weight_2": 0.5}},
            "nested": {"type": "dagfusion.reward.Combine", "inputs": {"reward_1": {"from": "pair.reward"}, "weight_1": 2.0}},
            "score_all": {"type": "dagfusion.reward.Score", "inputs": {
                "reward": {"from": "all.reward"}, "images": {"from": "render.images"}, "prompts": prompts}},
            "score_colour": {"type": "dagfusion.reward.Score", "inputs": {
                "reward": {"from": "colour.reward"}, "images": {"from": "render.images"}, "prompts": prompts}},
            "score_nested": {"type": "dagfusion.reward.Score", "inputs": {
                "reward": {"from": "nested.reward"}, "images": {"from": "render.images"}, "prompts": prompts}},
        },
    }


def test_combine_and_score_compose_in_a_workflow(tmp_path: Path) -> None:
    result = run_workflow(_workflow({"from": "render.captions"}), registry=make_registry(), tmp_path=tmp_path)
    out = result.outputs
    a, c, n = (out[k]["scores"] for k in ("score_all", "score_colour", "score_nested"))
    assert len(a) == 2 and all(v <= 0 for v in a)
    assert n == pytest.approx([2 * (x + 0.5 * y) for x, y in zip(a, c)], rel=1e-5, abs=1e-6)
    assert out["score_all"]["mean"] == pytest.approx(sum(a) / 2)


def test_score_node_refuses_a_count_mismatch(tmp_path: Path) -> None:
    with pytest.raises(WorkflowRunFailed, match="input 'prompts': 2 prompts for 3 images") as info:
        run_workflow(_workflow([CAPTION, CAPTION], count=3), registry=make_registry(), tmp_path=tmp_path)
    assert isinstance(info.value.__cause__, NodeInputError)


def test_score_node_names_a_prompt_that_is_not_a_caption(tmp_path: Path) -> None:
    with pytest.raises(WorkflowRunFailed, match="not a single-object shapes caption: 'a photo of a dog'"):
        run_workflow(_workflow("a photo of a dog"), registry=make_registry(), tmp_path=tmp_path)
