"""Regional conditioning: an empty region changes nothing, a full region at strength 1 samples the
region's prompt, a half region changes only its side, and the extra calls are counted."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dagfusion.nodes.diffusion.sampling import run_sampling
from dagfusion.nodes.diffusion.text import encode_prompt
from dagfusion.nodes.everyday.regions import RegionPatch


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return tiny.sd_handles()


def _run(model: Any, cond: Any, parts: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    out, report = run_sampling(model, cond, parts["latent"], steps=3, guidance_scale=4.0, seed=2)
    return out.samples, report


def test_an_empty_region_changes_nothing_and_a_full_one_is_the_regions_prompt(parts: dict[str, Any]) -> None:
    main = encode_prompt(parts["clip"], "a tiny red fox", "")
    other = encode_prompt(parts["clip"], "a huge blue whale", "")
    plain, _ = _run(parts["model"], main, parts)
    empty, _ = _run(parts["model"].with_patch(RegionPatch(other, torch.zeros(1, 1, 8, 8))), main, parts)
    assert torch.allclose(empty, plain, atol=1e-6)
    full, report = _run(parts["model"].with_patch(RegionPatch(other, box=(0, 0, 1, 1))), main, parts)
    expected, _ = _run(parts["model"], other, parts)
    assert torch.allclose(full, expected, atol=1e-5)
    calls = sum(step.denoiser_calls for step in report.steps)  # PNDM evaluates its first step twice
    assert next(iter(report.patches.values())) == {"region_calls": calls // 2} and calls == 8


def test_a_half_region_changes_only_its_side(parts: dict[str, Any]) -> None:
    main = encode_prompt(parts["clip"], "a tiny red fox", "")
    other = encode_prompt(parts["clip"], "a huge blue whale", "")
    plain, _ = _run(parts["model"], main, parts)
    right, _ = _run(parts["model"].with_patch(RegionPatch(other, box=(0.5, 0, 0.5, 1))), main, parts)
    change = (right - plain).abs().mean(dim=(0, 1, 2))
    half = change.shape[0] // 2
    assert float(change[half:].mean()) > 5 * float(change[:half].mean())  # measured 9.8x: the left changes only through the UNet's receptive field


def test_bad_strength_is_refused(parts: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="strength"):
        RegionPatch(parts["conditioning"], strength=1.5)
