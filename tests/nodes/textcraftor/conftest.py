"""Shared pieces of the TextCraftor tests: tiny models and a mean-brightness reward."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from dagfusion.nodes.rewards.base import Reward

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


class Brightness(Reward):
    """Mean pixel value of each image: a simple differentiable reward."""

    name = "brightness"
    _fingerprint = "brightness"

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


@pytest.fixture
def parts() -> dict[str, Any]:
    """Private copies of the tiny SD handles (tests may check their weights are untouched)."""
    from dagfusion.model import ModelHandle, TextEncoderBundle, VAEHandle
    from dagfusion.testing import models as tiny

    base = tiny.sd_handles()
    unet = copy.deepcopy(base["model"].denoiser)
    model = ModelHandle.from_module(unet, scheduler=base["scheduler"], vae_scale_factor=2)
    vae = VAEHandle.from_module(copy.deepcopy(base["vae"].module))
    encoder = copy.deepcopy(base["clip"].encoders[0].get())
    clip = TextEncoderBundle.from_modules("clip", [encoder], [base["clip"].tokenizers[0].get()])
    return {"model": model, "vae": vae, "clip": clip}


@pytest.fixture
def brightness() -> Reward:
    return Brightness()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
