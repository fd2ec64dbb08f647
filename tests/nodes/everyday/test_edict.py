"""EDICT: inversion then generation with the same prompt reproduces the latents within float
round-off (DDIM inversion does not); bad settings and step-hook patches are refused. Plain DDIM
inversion (η = 0), kept beside it to compare: DDIM's update run backwards with the noise taken at
the less noisy latent, so regenerating only approximates the input."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dagfusion.nodes.everyday.edict import (
    _check_finite,
    _prepare,
    ddim_generate,
    ddim_invert,
    ddim_schedule,
    edict_generate,
    edict_invert,
)


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return tiny.sd_handles()


def _latents() -> torch.Tensor:
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_inversion_then_generation_reconstructs_the_latents(parts: dict[str, Any], guidance: float) -> None:
    latents = _latents()
    x, y = edict_invert(parts["model"], parts["conditioning"], latents, steps=8, guidance_scale=guidance)
    assert not torch.allclose(x, latents, atol=0.05)  # it really went somewhere
    out, _ = edict_generate(parts["model"], parts["conditioning"], x, y, steps=8, guidance_scale=guidance)
    error = float((out - latents).abs().max())
    assert error < 1e-4, error  # measured 2.2e-5 (guidance 1) and 4.6e-5 (guidance 3): fp32 model calls, fp64 mixing


def test_ddim_inversion_does_not_reconstruct_as_well(parts: dict[str, Any]) -> None:
    """p = 1 with one sequence is plain DDIM inversion's approximation: its error is far larger."""
    from dagfusion.nodes.everyday.edict import _prepare

    latents = _latents().double()
    eps = _prepare(parts["model"], parts["conditioning"], tuple(latents.shape), 8, 1.0, 1e-4)
    x = latents.clone()
    total = len(eps.schedule.timesteps)
    for index in reversed(range(total)):  # DDIM inversion: ε taken at the *less* noisy latent
        a, b = eps.schedule.coefficients(index)
        x = (x - b * eps(x.float(), index).double()) / a
    for index in range(total):
        a, b = eps.schedule.coefficients(index)
        x = a * x + b * eps(x.float(), index).double()
    ddim_error = float((x - latents).abs().max())
    xe, ye = edict_invert(parts["model"], parts["conditioning"], latents.float(), steps=8)
    edict_error = float((edict_generate(parts["model"], parts["conditioning"], xe, ye, steps=8)[0] - latents.float()).abs().max())
    assert edict_error * 100 < ddim_error, (edict_error, ddim_error)


def test_an_edited_prompt_changes_the_reconstruction(parts: dict[str, Any]) -> None:
    from dagfusion.nodes.diffusion.text import encode_prompt

    latents = _latents()
    x, y = edict_invert(parts["model"], parts["conditioning"], latents, steps=6, guidance_scale=3.0)
    edited = encode_prompt(parts["clip"], "a huge blue whale", "")
    out, _ = edict_generate(parts["model"], edited, x, y, steps=6, guidance_scale=3.0)
    assert float((out - latents).abs().max()) > 1e-2


def test_zero_terminal_snr_needs_a_floor() -> None:
    from dagfusion.model import ModelHandle
    from dagfusion.nodes.diffusion.data import SchedulerSpec
    from dagfusion.testing import models as tiny

    spec = SchedulerSpec("DDIMScheduler", {**tiny.sd_scheduler_config(), "rescale_betas_zero_snr": True,
                                           "timestep_spacing": "trailing", "prediction_type": "v_prediction"})
    model = ModelHandle.from_module(tiny.sd_handles()["model"].denoiser, scheduler=spec, vae_scale_factor=2)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        _check_finite(ddim_schedule(model, 10, 0.0))
    with pytest.raises(ValueError, match="zero terminal SNR"):
        edict_invert(model, tiny.sd_handles()["conditioning"], _latents(), steps=4, min_alpha_cumprod=0.0)
    schedule = ddim_schedule(model, 10, 1e-4)
    assert schedule.alpha[0] == pytest.approx(1e-4) and schedule.prediction_type == "v_prediction"
    latents = _latents()
    x, y = edict_invert(model, tiny.sd_handles()["conditioning"], latents, steps=6)
    out, _ = edict_generate(model, tiny.sd_handles()["conditioning"], x, y, steps=6)
    assert float((out - latents).abs().max()) < 1e-3


def test_step_hook_patches_and_bad_mix_are_refused(parts: dict[str, Any]) -> None:
    from dagfusion.nodes.cache.deepcache import DeepCacheConfig, DeepCachePatch

    cached = parts["model"].with_patch(DeepCachePatch(DeepCacheConfig(interval=2)))
    with pytest.raises(ValueError, match="DeepCachePatch"):
        edict_invert(cached, parts["conditioning"], _latents(), steps=2)
    with pytest.raises(ValueError, match="mixing parameter"):
        edict_invert(parts["model"], parts["conditioning"], _latents(), steps=2, mix=0.0)


def test_a_partial_inversion_reconstructs_and_stays_nearer_the_picture(parts: dict[str, Any]) -> None:
    latents = _latents()
    full = edict_invert(parts["model"], parts["conditioning"], latents, steps=10)
    part = edict_invert(parts["model"], parts["conditioning"], latents, steps=10, strength=0.5)
    assert float((part[0] - latents).abs().mean()) < float((full[0] - latents).abs().mean())
    out, _ = edict_generate(parts["model"], parts["conditioning"], *part, steps=10, strength=0.5)
    assert float((out - latents).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="strength"):
        edict_invert(parts["model"], parts["conditioning"], latents, steps=10, strength=0.0)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_the_steps_are_ddims_update_run_backwards_then_forwards(parts: dict[str, Any], guidance: float) -> None:
    latents = _latents()
    eps = _prepare(parts["model"], parts["conditioning"], tuple(latents.shape), 6, guidance, 1e-4)
    x = latents.double()
    for index in reversed(range(6)):
        a, b = eps.schedule.coefficients(index)
        x = (x - b * eps(x.float(), index).double()) / a
    noise = ddim_invert(parts["model"], parts["conditioning"], latents, steps=6, guidance_scale=guidance)
    torch.testing.assert_close(noise, x.float(), rtol=1e-5, atol=1e-5)
    for index in range(6):
        a, b = eps.schedule.coefficients(index)
        x = a * x + b * eps(x.float(), index).double()
    out = ddim_generate(parts["model"], parts["conditioning"], noise, steps=6, guidance_scale=guidance)
    torch.testing.assert_close(out, x.float(), rtol=1e-5, atol=1e-5)


def test_regenerating_only_approximates_the_input_where_edict_is_exact(parts: dict[str, Any]) -> None:
    latents = _latents()
    noise = ddim_invert(parts["model"], parts["conditioning"], latents, steps=8)
    assert not torch.allclose(noise, latents, atol=0.05)
    ddim_error = float((ddim_generate(parts["model"], parts["conditioning"], noise, steps=8) - latents).abs().max())
    x, y = edict_invert(parts["model"], parts["conditioning"], latents, steps=8)
    edict_error = float((edict_generate(parts["model"], parts["conditioning"], x, y, steps=8)[0] - latents).abs().max())
    assert torch.isfinite(noise).all()
    assert edict_error * 100 < ddim_error, (edict_error, ddim_error)


def test_strength_inverts_only_the_last_steps(parts: dict[str, Any]) -> None:
    latents = _latents()
    calls: list[int] = []
    real = parts["model"].denoiser.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    parts["model"].denoiser.forward = counting
    try:
        partial = ddim_invert(parts["model"], parts["conditioning"], latents, steps=10, strength=0.3)
    finally:
        del parts["model"].denoiser.forward
    assert len(calls) == 3
    full = ddim_invert(parts["model"], parts["conditioning"], latents, steps=10)
    assert float((partial - latents).abs().mean()) < float((full - latents).abs().mean())
    with pytest.raises(ValueError, match="strength"):
        ddim_invert(parts["model"], parts["conditioning"], latents, steps=10, strength=0.0)
