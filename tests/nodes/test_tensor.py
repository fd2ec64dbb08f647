from __future__ import annotations

import pytest
import torch

from dagfusion.nodes import tensor


def test_noise_is_seeded_and_shaped() -> None:
    a = tensor.noise.fn(None, seed=3, channels=2, height=5, width=7, distribution="normal")
    b = tensor.noise.fn(None, seed=3, channels=2, height=5, width=7, distribution="normal")
    assert a.shape == (2, 5, 7) and torch.equal(a, b)
    u = tensor.noise.fn(None, seed=3, channels=1, height=64, width=64, distribution="uniform")
    assert 0 <= float(u.min()) and float(u.max()) <= 1


def test_blur_preserves_mean_and_smooths() -> None:
    x = tensor.noise.fn(None, seed=0, channels=3, height=32, width=32, distribution="normal")
    y = tensor.blur.fn(None, tensor=x, sigma=2.0)
    assert y.shape == x.shape
    assert float(y.std()) < 0.5 * float(x.std())
    constant = torch.full((1, 16, 16), 0.25)
    assert torch.allclose(tensor.blur.fn(None, tensor=constant, sigma=3.0), constant, atol=1e-6)
    assert torch.equal(tensor.blur.fn(None, tensor=x, sigma=0.0), x)
    with pytest.raises(ValueError, match="shape"):
        tensor.blur.fn(None, tensor=torch.zeros(4), sigma=1.0)


def test_normalize_and_stats() -> None:
    x = torch.tensor([[[-2.0, 0.0], [2.0, 6.0]]])
    n = tensor.normalize.fn(None, tensor=x, low=0.0, high=1.0)
    assert float(n.min()) == 0.0 and float(n.max()) == 1.0
    s = tensor.stats.fn(None, tensor=x)
    assert s == {"mean": 1.5, "std": pytest.approx(float(x.std())), "min": -2.0, "max": 6.0}
