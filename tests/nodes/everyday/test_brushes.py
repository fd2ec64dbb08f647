"""Layered Diffusion Brushes on the tiny SD model: a layer changes only its region (exactly the
base outside it), costs round(strength * steps) denoiser calls, stacks with other layers, and is
deterministic; bad masks, samplers and models are refused."""

from __future__ import annotations

from typing import Any, Self

import pytest
import torch
from dagfusion.errors import NodeInputError
from dagfusion.nodes.everyday.brushes import (
    BrushState,
    brush_base,
    brush_layer,
    rerendered_steps,
)
from dagfusion.nodes.everyday.brushes_nodes import brush_base_node, brush_layer_node

STEPS = 6


@pytest.fixture(scope="module")
def sd() -> dict[str, Any]:
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.testing import models as tiny

    parts = dict(tiny.sd_handles())
    parts["edit"] = encode_prompt(parts["clip"], "a huge blue whale", "")
    return parts


@pytest.fixture(scope="module")
def base(sd: dict[str, Any]) -> BrushState:
    state, report = brush_base(sd["model"], sd["conditioning"], sd["latent"], steps=STEPS, guidance_scale=3.0,
                               sampler="ddim", seed=4)
    assert report["denoiser_calls"] == STEPS
    return state


def _mask(x0: int, x1: int) -> torch.Tensor:
    """A latent-size (16 x 16) mask: 1 in columns x0 … x1 - 1."""
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., x0:x1] = 1.0
    return mask


class _Counter:
    """Counts the denoiser's forward calls (independently of the reports)."""

    def __init__(self, module: Any) -> None:
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *args: Any) -> None:
        self.calls += 1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def test_the_base_is_what_the_sampler_makes_and_records_every_step(sd, base):
    from dagfusion.nodes.diffusion.sampling import sample

    ref = sample(sd["model"], sd["conditioning"], sd["latent"], steps=STEPS, guidance_scale=3.0, sampler="ddim", seed=4)
    assert torch.equal(base.final, ref.samples.float())
    assert len(base.latents) == STEPS + 1 and len(base.predictions) == STEPS
    assert not torch.equal(base.latents[0], base.latents[STEPS // 2])


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_outside_the_mask_the_edit_equals_the_base_and_inside_it_differs(sd, sampler):
    state, _ = brush_base(sd["model"], sd["conditioning"], sd["latent"], steps=STEPS, guidance_scale=3.0,
                          sampler=sampler, seed=4)
    edited, report = brush_layer(sd["model"], state, sd["edit"], _mask(0, 8), strength=0.5, seed=9)
    assert torch.equal(edited.final[..., 8:], state.final[..., 8:])  # exactly
    assert float((edited.final[..., :8] - state.final[..., :8]).abs().max()) > 0.05
    assert report["start_step"] == 3 and report["rerendered_steps"] == 3
    # the recorded steps before the start are shared, the later ones keep the base outside the mask
    assert all(edited.latents[i] is state.latents[i] for i in range(3))
    for i in range(3, STEPS + 1):
        assert torch.equal(edited.latents[i][..., 8:], state.latents[i][..., 8:])


@pytest.mark.parametrize(("strength", "calls"), [(0.5, 3), (1 / 3, 2), (0.8, 5), (1.0, 6)])
def test_a_layer_calls_the_denoiser_round_strength_times_steps_times(sd, base, strength, calls):
    assert rerendered_steps(strength, STEPS) == calls
    with _Counter(sd["model"].denoiser) as counter:
        _, report = brush_layer(sd["model"], base, sd["edit"], _mask(0, 8), strength=strength, seed=1)
    assert counter.calls == calls  # one batched call per step (both guidance halves together)
    assert report["denoiser_calls"] == calls and report["start_step"] == STEPS - calls


def test_strength_one_redraws_the_region_from_fresh_noise(sd, base):
    edited, _ = brush_layer(sd["model"], base, sd["edit"], _mask(0, 8), strength=1.0, seed=9)
    noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(9))
    assert torch.equal(edited.latents[0][..., :8], noise[..., :8])  # init_noise_sigma is 1 for DDIM
    assert torch.equal(edited.latents[0][..., 8:], base.latents[0][..., 8:])


def test_stacked_layers_with_disjoint_masks_keep_both_edits(sd, base):
    first, _ = brush_layer(sd["model"], base, sd["edit"], _mask(0, 5), strength=0.5, seed=2)
    second, report = brush_layer(sd["model"], first, sd["conditioning"], _mask(11, 16), strength=0.7, seed=3)
    assert report["denoiser_calls"] == 4 and len(second.layers) == 2
    final = second.final
    assert torch.equal(final[..., :5], first.final[..., :5])  # the first layer's edit survives the second
    assert not torch.equal(final[..., :5], base.final[..., :5])
    assert not torch.equal(final[..., 11:], base.final[..., 11:])  # the second layer's edit
    assert torch.equal(final[..., 5:11], base.final[..., 5:11])  # untouched: the base exactly


def test_strength_zero_returns_the_base_unchanged(sd, base):
    with _Counter(sd["model"].denoiser) as counter:
        edited, report = brush_layer(sd["model"], base, sd["edit"], _mask(0, 16), strength=0.0, seed=5)
    assert counter.calls == 0 and report["denoiser_calls"] == 0
    assert torch.equal(edited.final, base.final)


def test_the_layer_node_refuses_a_mask_of_another_aspect_ratio_naming_both_sizes(sd, base):
    with pytest.raises(NodeInputError) as info:
        brush_layer_node.fn(None, model=sd["model"], brush=base, mask=torch.zeros(1, 1, 32, 48),
                            conditioning=sd["edit"], strength=0.5, seed=0, guidance_scale=None,
                            latent_resize="nearest")
    assert info.value.input == "mask"
    assert "48x32" in str(info.value) and "32x32" in str(info.value)


def test_the_layer_node_resizes_a_same_aspect_mask_and_outputs_latent_and_report(sd, base):
    from dagfusion.nodes.everyday.inpaint import rectangle_mask

    out = brush_layer_node.fn(None, model=sd["model"], brush=base, mask=rectangle_mask(64, 64, 0, 0, 32, 64),
                              conditioning=sd["edit"], strength=0.5, seed=0, guidance_scale=5.0,
                              latent_resize="nearest")
    # the 64 px mask is resized (antialiased) to the 32 px picture: its edge column is soft
    assert out["report"]["denoiser_calls"] == 3 and out["report"]["masked_fraction"] == pytest.approx(0.5, abs=0.02)
    assert torch.equal(out["latent"].samples[..., 9:], base.final[..., 9:])
    assert not torch.equal(out["latent"].samples[..., :8], base.final[..., :8])
    assert out["latent"].lineage["brush_layers"][0]["guidance_scale"] == 5.0


def test_same_seed_same_result_other_seed_other_result(sd, base):
    a, _ = brush_layer(sd["model"], base, sd["edit"], _mask(0, 8), strength=0.5, seed=7)
    b, _ = brush_layer(sd["model"], base, sd["edit"], _mask(0, 8), strength=0.5, seed=7)
    c, _ = brush_layer(sd["model"], base, sd["edit"], _mask(0, 8), strength=0.5, seed=8)
    assert torch.equal(a.final, b.final)
    assert not torch.equal(a.final[..., :8], c.final[..., :8])
    from dagfusion.fingerprint import fingerprint

    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_a_sampler_that_cannot_resume_and_step_hooks_are_refused(sd):
    with pytest.raises(NodeInputError, match="PNDMScheduler") as info:  # the tiny model's default
        brush_base_node.fn(None, model=sd["model"], conditioning=sd["conditioning"], latent=sd["latent"],
                           sampler="default", seed=0, steps=2, guidance_scale=1.0)
    assert "sampler" in str(info.value)
    from dagfusion.nodes.everyday.inpaint import blend_model

    hooked = blend_model(sd["model"], sd["latent"], torch.ones(1, 1, 32, 32))
    with pytest.raises(NodeInputError, match="BlendPatch"):
        brush_base_node.fn(None, model=hooked, conditioning=sd["conditioning"], latent=sd["latent"],
                           sampler="euler", seed=0, steps=2, guidance_scale=1.0)
