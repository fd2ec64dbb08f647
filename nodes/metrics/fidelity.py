"""Image fidelity metrics of an accelerated run against a reference: PSNR, SSIM, relative L1.

PSNR and SSIM take two batches of the same shape, ``(B, C, H, W)`` with values in
``[0, data_range]``, and raise ``ValueError`` when the shapes differ or are not 4-d.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(a.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB (identical images give +inf)."""
    _check_pair(a, b)
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 7) -> torch.Tensor:
    """Per-image mean SSIM (Wang et al. 2004) with a Gaussian window (σ = 1.5), averaged over channels."""
    _check_pair(a, b)
    x, y = a.double(), b.double()
    c = x.shape[1]
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(dim=1)


def relative_l1(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``|output - reference|_1 / |reference|_1`` (e.g. of denoiser outputs per step)."""
    return float((output.double() - reference.double()).abs().sum() / reference.double().abs().sum().clamp_min(1e-12))
