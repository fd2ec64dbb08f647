"""The node contract catches patches whose key leaves a setting out (dagfusion.testing)."""

from __future__ import annotations

from typing import Any

import pytest

from dagfusion import INT, Input, Output, node
from dagfusion.model import ModelHandle, ModelPatch
from dagfusion.registry import Registry
from dagfusion.testing import check_node_contract

torch = pytest.importorskip("torch")

BUILTINS = Registry.from_plugins(load_entrypoints=False, environ={})


class Strength(ModelPatch):
    def __init__(self, strength: int, keyed: bool) -> None:
        self.strength = strength
        self.key = f"tests.strength:{strength}" if keyed else "tests.strength"


def _handle() -> ModelHandle:
    return ModelHandle.from_module(torch.nn.Linear(2, 2), info={"source": "tests"})


HANDLE = _handle()


def _spec(keyed: bool) -> Any:
    @node(
        "tests.Strength" + ("Keyed" if keyed else "Unkeyed"),
        version="1.0.0",
        category="tests",
        inputs=[Input("model", "MODEL", link_only=True), Input("strength", INT, 1, min=0, max=9)],
        outputs=[Output("model", "MODEL")],
        examples=[lambda: {"model": HANDLE, "strength": 1}, lambda: {"model": HANDLE, "strength": 2}],
    )
    def strength(ctx: Any, model: Any, strength: int) -> Any:
        """Attach a patch with a strength."""
        return model.with_patch(Strength(strength, keyed))

    return strength


def test_a_setting_missing_from_the_key_is_a_contract_problem(tmp_path: Any) -> None:
    problems = check_node_contract(_spec(keyed=False), BUILTINS, tmp_path=tmp_path / "a")
    assert any("example 1 and example 2" in p and "same fingerprint" in p for p in problems), problems
    assert check_node_contract(_spec(keyed=True), BUILTINS, tmp_path=tmp_path / "b") == []
