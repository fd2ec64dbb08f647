"""EMA math: s <- decay*s + (1-decay)*p after each step, from the initial values; state round trip."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dagfusion.nodes.training.ema import EMA  # noqa: E402


def test_ema_follows_its_definition():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = EMA([("p", p)], decay=0.9)
    expected = torch.tensor([1.0, -2.0], dtype=torch.float64)
    for value in ([3.0, 0.0], [0.0, 4.0], [-1.0, 1.0]):
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        ema.update()
        expected = 0.9 * expected + 0.1 * torch.tensor(value, dtype=torch.float64)
        torch.testing.assert_close(ema.shadow["p"].double(), expected, rtol=0, atol=1e-6)
    assert ema.shadow["p"].dtype == torch.float32


def test_zero_decay_copies_and_half_parameters_keep_fp32_shadows():
    p = torch.nn.Parameter(torch.tensor([0.5, 0.25], dtype=torch.float16))
    ema = EMA([("p", p)], decay=0.0)
    with torch.no_grad():
        p.mul_(2)
    ema.update()
    assert ema.shadow["p"].dtype == torch.float32
    assert torch.equal(ema.shadow["p"], p.float())


def test_state_load_and_copy_to():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("p", p)], decay=0.5)
    saved = {"p": torch.tensor([1.0, 2.0, 3.0])}
    ema.load(saved)
    assert torch.equal(ema.state()["p"], saved["p"])
    ema.copy_to({"p": p})
    assert torch.equal(p.detach(), saved["p"])
    with pytest.raises(ValueError, match="does not match"):
        ema.load({"q": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        ema.load({"p": torch.zeros(4)})
    with pytest.raises(ValueError, match="decay"):
        EMA([("p", p)], decay=1.0)
