"""The reward contract and the weighted sum of rewards.

A reward is a differentiable function of generated images and their prompts::

    reward.score(images, prompts) -> tensor of shape (B,)

``images`` is a float tensor (B, 3, H, W) with values in [0, 1] on any device; ``prompts`` is one
string per image (or one string for all of them). The scores are on the images' device and
``torch.autograd.grad(scores.sum(), images)`` is defined (gradients reach the images; the
reward's own weights are frozen). Larger is better.

Every reward has a ``name`` (for reports) and ``__dagfusion_fingerprint__()``: a digest of what
determines its scores (weights, settings), so the engine caches nodes that take or give one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dagfusion.errors import NodeInputError
from dagfusion.fingerprint import fingerprint


def check_batch(images: Any, prompts: str | Sequence[str]) -> list[str]:
    """Check ``images`` is a (B, 3, H, W) float tensor and return one prompt per image.

    A single string is repeated for every image. Raises :class:`NodeInputError` (naming the
    input) for a wrong image shape or dtype, a prompt that is not a string, or a count mismatch.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise NodeInputError("images", f"expected images of shape (B, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise NodeInputError("images", f"expected float images in [0, 1], got dtype {images.dtype}")
    count = int(images.shape[0])
    if isinstance(prompts, str):
        return [prompts] * count
    captions = list(prompts)
    bad = [p for p in captions if not isinstance(p, str)]
    if bad:
        raise NodeInputError("prompts", f"expected text prompts, got {type(bad[0]).__name__} {bad[0]!r}")
    if len(captions) != count:
        raise NodeInputError("prompts", f"{len(captions)} prompts for {count} images (give one per image, or one for all)")
    return captions


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in eval mode with gradients off for its parameters (returned for chaining)."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


class Reward:
    """Base class of rewards: checks the batch, then calls :meth:`_score`.

    Subclasses set ``name`` and ``_fingerprint`` (a string computed once, at construction) and
    implement ``_score(images, prompts)`` returning a (B,) float tensor.
    """

    name: str = "reward"
    _fingerprint: str = ""

    def score(self, images: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        """Scores of ``images`` against ``prompts``, shape (B,), differentiable w.r.t. ``images``."""
        captions = check_batch(images, prompts)
        scores = self._score(images, captions)
        if scores.shape != (images.shape[0],):
            raise RuntimeError(f"reward {self.name!r} returned scores of shape {tuple(scores.shape)}, expected ({images.shape[0]},)")
        return scores

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __dagfusion_fingerprint__(self) -> str:
        return f"{type(self).__qualname__}:{self._fingerprint}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class WeightedSum(Reward):
    """``sum(weight_i * reward_i.score(images, prompts))`` over its terms."""

    def __init__(self, terms: Sequence[tuple[Reward, float]]) -> None:
        if not terms:
            raise ValueError("a weighted sum needs at least one reward")
        self.terms: tuple[tuple[Reward, float], ...] = tuple((r, float(w)) for r, w in terms)
        self.name = " + ".join(f"{w:g}·{r.name}" for r, w in self.terms)
        self._fingerprint = fingerprint([[r.__dagfusion_fingerprint__(), w] for r, w in self.terms]) or ""

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total: torch.Tensor | None = None
        for reward, weight in self.terms:
            part = weight * reward.score(images, prompts).to(device=images.device, dtype=torch.float32)
            total = part if total is None else total + part
        assert total is not None
        return total
