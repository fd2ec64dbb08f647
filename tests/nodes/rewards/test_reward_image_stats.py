"""Image-statistics rewards (brightness, darkness, saturation, contrast) and their node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dagfusion.errors import NodeInputError, ValidationError
from dagfusion.fingerprint import fingerprint
from dagfusion.nodes.rewards.image_stats import STATISTICS, ImageStatReward
from dagfusion.testing import make_registry, run_workflow


def _solid(*rgb: float, size: int = 4) -> torch.Tensor:
    """One (1, 3, size, size) image of a single colour."""
    return torch.tensor(rgb, dtype=torch.float32)[None, :, None, None].expand(1, 3, size, size).clone()


def _half_black_half_white(size: int = 4) -> torch.Tensor:
    image = torch.zeros(1, 3, size, size)
    image[..., size // 2 :] = 1.0
    return image


def _score(statistic: str, images: torch.Tensor, target: float | None = None) -> list[float]:
    return ImageStatReward(statistic, target).score(images, "ignored").tolist()


def test_brightness_is_mean_rec709_luma() -> None:
    images = torch.cat([_solid(1, 1, 1), _solid(0, 0, 0), _solid(1, 0, 0), _solid(0, 1, 0), _solid(0, 0, 1), _half_black_half_white()])
    assert _score("brightness", images) == pytest.approx([1.0, 0.0, 0.2126, 0.7152, 0.0722, 0.5], abs=1e-6)


def test_darkness_is_one_minus_brightness() -> None:
    images = torch.cat([_solid(1, 1, 1), _solid(0, 0, 0), _solid(0, 1, 0)])
    assert _score("darkness", images) == pytest.approx([0.0, 1.0, 1 - 0.7152], abs=1e-6)
    noise = torch.rand(3, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    both = [b + d for b, d in zip(_score("brightness", noise), _score("darkness", noise))]
    assert both == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def test_saturation_is_mean_chroma() -> None:
    images = torch.cat([_solid(1, 0, 0), _solid(1, 1, 1), _solid(0.5, 0.5, 0.5), _solid(0.2, 0.9, 0.5), _half_black_half_white()])
    assert _score("saturation", images) == pytest.approx([1.0, 0.0, 0.0, 0.7, 0.0], abs=1e-6)
    half_red = _solid(0, 0, 0)
    half_red[:, 0, :2] = 1.0  # the top half red, the bottom half black
    assert _score("saturation", half_red) == pytest.approx([0.5], abs=1e-6)


def test_contrast_is_the_standard_deviation_of_luma() -> None:
    images = torch.cat([_half_black_half_white(), _solid(1, 1, 1), _solid(0.3, 0.6, 0.1)])
    assert _score("contrast", images) == pytest.approx([0.5, 0.0, 0.0], abs=1e-6)
    noise = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    y = 0.2126 * noise[:, 0] + 0.7152 * noise[:, 1] + 0.0722 * noise[:, 2]
    expected = y.flatten(1).std(dim=1, unbiased=False).tolist()
    assert _score("contrast", noise) == pytest.approx(expected, abs=1e-6)


def test_a_target_scores_minus_the_distance_to_it() -> None:
    images = torch.cat([_solid(1, 1, 1), _solid(0, 0, 0), _half_black_half_white()])
    assert _score("brightness", images, target=0.5) == pytest.approx([-0.5, -0.5, 0.0], abs=1e-6)
    assert _score("contrast", images, target=0.25) == pytest.approx([-0.25, -0.25, -0.25], abs=1e-6)
    assert _score("darkness", images, target=1.0) == pytest.approx([-1.0, 0.0, -0.5], abs=1e-6)


@pytest.mark.parametrize("statistic", STATISTICS)
@pytest.mark.parametrize("target", [None, 0.9])
def test_gradients_reach_the_images(statistic: str, target: float | None) -> None:
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    (grad,) = torch.autograd.grad(ImageStatReward(statistic, target).score(images, ["a", "b"]).sum(), images)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


def test_gradient_directions_and_a_constant_image() -> None:
    images = torch.full((1, 3, 4, 4), 0.5, requires_grad=True)
    (bright,) = torch.autograd.grad(ImageStatReward("brightness").score(images, "x").sum(), images)
    (dark,) = torch.autograd.grad(ImageStatReward("darkness").score(images, "x").sum(), images)
    assert (bright > 0).all() and (dark < 0).all()
    (flat,) = torch.autograd.grad(ImageStatReward("contrast").score(images, "x").sum(), images)
    assert torch.isfinite(flat).all()  # the standard deviation's derivative at 0 is not NaN


def test_half_precision_images_score_in_float32() -> None:
    scores = ImageStatReward("brightness").score(_solid(1, 1, 1).half(), "x")
    assert scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx([1.0], abs=1e-3)


def test_prompts_are_ignored_but_the_batch_is_checked() -> None:
    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    reward = ImageStatReward("saturation")
    assert reward.score(images, ["a red square", "a dog"]).tolist() == reward.score(images, "x").tolist()
    with pytest.raises(NodeInputError, match="3 prompts for 2 images"):
        reward.score(images, ["a", "b", "c"])


def test_an_unknown_statistic_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="'hue'.*'brightness', 'darkness', 'saturation', 'contrast'"):
        ImageStatReward("hue")


def test_names_and_fingerprints_follow_the_settings() -> None:
    assert ImageStatReward("brightness").name == "brightness"
    assert "0.5" in ImageStatReward("brightness", 0.5).name
    prints = {fingerprint(ImageStatReward(s, t)) for s in STATISTICS for t in (None, 0.25, 0.5)}
    assert len(prints) == len(STATISTICS) * 3 and None not in prints
    assert fingerprint(ImageStatReward("contrast", 0.25)) == fingerprint(ImageStatReward("contrast", 0.25))


def test_the_node_offers_every_statistic() -> None:
    spec = make_registry().get("dagfusion.reward.ImageStat")
    inputs = {i.name: i for i in spec.inputs}
    assert tuple(inputs["statistic"].choices) == STATISTICS
    assert inputs["target"].optional


def _workflow(statistic: Any = "brightness") -> dict[str, Any]:
    return {
        "format_version": 1,
        "nodes": {
            "data": {"type": "dagfusion.shapes.Dataset", "inputs": {"split": "eval", "resolution": 32, "seed": 0}},
            "render": {"type": "dagfusion.shapes.Render", "inputs": {"dataset": {"from": "data.dataset"}, "count": 3}},
            "bright": {"type": "dagfusion.reward.ImageStat", "inputs": {"statistic": statistic}},
            "half": {"type": "dagfusion.reward.ImageStat", "inputs": {"statistic": "brightness", "target": 0.5}},
            "sat": {"type": "dagfusion.reward.ImageStat", "inputs": {"statistic": "saturation"}},
            "mix": {"type": "dagfusion.reward.Combine", "inputs": {
                "reward_1": {"from": "bright.reward"}, "reward_2": {"from": "sat.reward"}, "weight_2": -2.0}},
            **{
                f"score_{name}": {"type": "dagfusion.reward.Score", "inputs": {
                    "reward": {"from": f"{name}.reward"}, "images": {"from": "render.images"}, "prompts": {"from": "render.captions"}}}
                for name in ("bright", "half", "sat", "mix")
            },
        },
    }


def test_the_node_scores_images_in_a_workflow(tmp_path: Path) -> None:
    out = run_workflow(_workflow(), registry=make_registry(), tmp_path=tmp_path).outputs
    bright, half, sat, mix = (out[f"score_{k}"]["scores"] for k in ("bright", "half", "sat", "mix"))
    assert len(bright) == 3 and all(0.0 <= b <= 1.0 for b in bright)
    assert half == pytest.approx([-abs(b - 0.5) for b in bright], abs=1e-6)
    assert mix == pytest.approx([b - 2.0 * s for b, s in zip(bright, sat)], abs=1e-6)
    images = out["render"]["images"]
    assert bright == pytest.approx(ImageStatReward("brightness").score(images, "x").tolist(), abs=1e-6)


def test_the_node_refuses_an_unknown_statistic(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="hue"):
        run_workflow(_workflow("hue"), registry=make_registry(), tmp_path=tmp_path)
