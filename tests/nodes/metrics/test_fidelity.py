from __future__ import annotations

import math

import pytest
import torch

from dagfusion.nodes.metrics.fidelity import psnr, relative_l1, ssim
from dagfusion.nodes.metrics.frechet import frechet_distance


def test_psnr_known_value() -> None:
    a = torch.zeros(1, 3, 8, 8)
    b = torch.full((1, 3, 8, 8), 0.1)
    assert float(psnr(a, b)) == pytest.approx(20.0)
    assert math.isinf(float(psnr(a, a)))


def test_ssim_bounds_and_ordering() -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    slightly = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    very = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert (ssim(x, slightly) > ssim(x, very)).all()
    with pytest.raises(ValueError, match="shape"):
        ssim(x, x[:, :, :16])


def test_relative_l1() -> None:
    ref = torch.ones(4)
    assert relative_l1(ref * 1.1, ref) == pytest.approx(0.1)


def test_frechet_distance_of_gaussians() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 4, generator=g)
    b = torch.randn(4000, 4, generator=g) * 2 + 1
    # closed form: |mu|^2 + tr(I + 4I - 2*2I) = 4 + 4
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
