"""Plain DDIM inversion (η = 0) next to EDICT's: it follows DDIM's update backwards with the noise
taken at the less noisy latent, so regenerating only approximates the input (EDICT is exact)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dagfusion.nodes.everyday.edict import (
    _prepare,
    ddim_generate,
    ddim_invert,
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
