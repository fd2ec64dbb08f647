"""Image-statistics rewards: brightness, darkness, saturation and contrast of each image.

With ``R, G, B`` the channels of an image (values in [0, 1]) and ``Y`` its Rec.709 luma,

    Y           = 0.2126 R + 0.7152 G + 0.0722 B
    brightness  = mean over pixels of Y                          in [0, 1]
    darkness    = 1 − brightness                                 in [0, 1]
    saturation  = mean over pixels of max(R, G, B) − min(R, G, B)  (HSV-style chroma, in [0, 1])
    contrast    = standard deviation of Y over the pixels        in [0, 0.5]

With a ``target`` the score is ``−|statistic − target|`` instead (0 is best), so a reward can ask
for "brightness 0.5" rather than "as bright as possible".

These are simple, prompt-independent rewards (prompts are checked for the batch, then ignored)
meant for controllable and interpolation experiments: for example, tune one text encoder toward
the ShapeEval reward and another toward brightness, then interpolate between the two. Every
statistic is differentiable with respect to the images (``amax``/``amin`` pass gradients to the
selected channel; a constant image has contrast 0 and a zero contrast gradient, never NaN).
"""

from __future__ import annotations

import torch

from dagfusion.fingerprint import fingerprint
from dagfusion.nodes.rewards.base import Reward

#: The statistics :class:`ImageStatReward` computes.
STATISTICS = ("brightness", "darkness", "saturation", "contrast")

#: Rec.709 luma weights of R, G, B.
LUMA = (0.2126, 0.7152, 0.0722)


def luma(images: torch.Tensor) -> torch.Tensor:
    """Rec.709 luma of (B, 3, H, W) images: (B, H, W)."""
    weights = torch.tensor(LUMA, device=images.device, dtype=images.dtype)
    return torch.einsum("bchw,c->bhw", images, weights)


def image_statistic(images: torch.Tensor, statistic: str) -> torch.Tensor:
    """``statistic`` (one of :data:`STATISTICS`) of each of (B, 3, H, W) images: (B,) float32."""
    images = images.float()
    if statistic == "brightness":
        return luma(images).mean(dim=(1, 2))
    if statistic == "darkness":
        return 1.0 - luma(images).mean(dim=(1, 2))
    if statistic == "saturation":
        return (images.amax(dim=1) - images.amin(dim=1)).mean(dim=(1, 2))
    if statistic == "contrast":
        y = luma(images).flatten(1)
        variance = (y - y.mean(dim=1, keepdim=True)).square().mean(dim=1)
        positive = variance > 0
        # sqrt has an infinite derivative at 0: take it only where the variance is positive.
        return torch.where(positive, torch.where(positive, variance, torch.ones_like(variance)).sqrt(), torch.zeros_like(variance))
    raise ValueError(f"unknown image statistic {statistic!r}; expected one of {list(STATISTICS)}")


class ImageStatReward(Reward):
    """An image statistic as a reward: the statistic itself, or ``−|statistic − target|``."""

    def __init__(self, statistic: str, target: float | None = None) -> None:
        if statistic not in STATISTICS:
            raise ValueError(f"unknown image statistic {statistic!r}; expected one of {list(STATISTICS)}")
        self.statistic = statistic
        self.target = None if target is None else float(target)
        self.name = statistic if self.target is None else f"{statistic}→{self.target:g}"
        self._fingerprint = fingerprint([self.statistic, self.target]) or ""

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        value = image_statistic(images, self.statistic)
        if self.target is None:
            return value
        return -(value - self.target).abs()
