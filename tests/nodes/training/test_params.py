"""Selecting what trains: all, module-name globs, or the parameters patches own; everything else frozen."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dagfusion.nodes.training.params import matches, patch_name, patterns, select  # noqa: E402


class _Gate:
    key = "test.gate"

    def __init__(self):
        self.gate = torch.nn.Parameter(torch.zeros(1))

    def trainable_parameters(self):
        return {"gate": self.gate}


def _net():
    return torch.nn.Sequential(
        torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    )


def test_patterns_and_matching():
    assert patterns(" *attn2*, conv_out  up.*") == ["*attn2*", "conv_out", "up.*"]
    assert matches("down.0.attn2.to_q.weight", ["*attn2*"])
    assert matches("conv_out.bias", ["conv_out"])  # a module name selects its parameters
    assert not matches("conv_out_extra.bias", ["conv_out"])


def test_all_match_and_patches():
    net, gate = _net(), _Gate()
    chosen = select(net, [gate], "all")
    assert set(chosen) == {n for n, _ in net.named_parameters()}
    assert not gate.gate.requires_grad
    chosen = select(net, [gate], "match", "1.1")
    assert set(chosen) == {"1.1.weight", "1.1.bias"}
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["1.1.weight", "1.1.bias"]
    chosen = select(net, [object(), gate], "patches")
    assert chosen == {patch_name(1, "gate"): gate.gate} and patch_name(1, "gate") == "@patch1.gate"
    assert gate.gate.requires_grad and not any(p.requires_grad for p in net.parameters())


def test_selections_that_choose_nothing_explain_why():
    with pytest.raises(ValueError, match="no pattern"):
        select(_net(), [], "match", "")
    with pytest.raises(ValueError, match="no parameter matches"):
        select(_net(), [], "match", "*attn*")
    with pytest.raises(ValueError, match="offer no parameters"):
        select(_net(), [object()], "patches")
    with pytest.raises(ValueError, match="expected trainable"):
        select(_net(), [], "some")
