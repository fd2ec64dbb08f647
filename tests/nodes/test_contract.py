"""The node contract (dagfusion.testing) over every built-in node.

Parametrized over the built-in registry, so every node pack added to
``dagfusion.nodes.BUILTIN_PLUGINS`` is covered without touching this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dagfusion.registry import Registry
from dagfusion.testing import assert_node_contract

BUILTINS = Registry.from_plugins(load_entrypoints=False, environ={})


def test_there_are_builtin_nodes() -> None:
    assert len(BUILTINS) >= 10


#: Nodes whose contract run trains for seconds: part of the full suite, not of ``-m "not slow"``.
SLOW = frozenset({"dagfusion.train.TrainVAE"})


@pytest.mark.parametrize(
    "type_id", [pytest.param(t, marks=pytest.mark.slow) if t in SLOW else t for t in BUILTINS.node_types()]
)
def test_node_contract(type_id: str, tmp_path: Path) -> None:
    assert_node_contract(BUILTINS.get(type_id), BUILTINS, tmp_path=tmp_path)


@pytest.mark.parametrize("pack", ["cache", "quant"])
def test_node_type_ids_follow_their_pack(pack: str) -> None:
    """Every node a pack registers is in the pack's namespace (a moved node keeps its old id as a former id)."""
    import importlib

    module = importlib.import_module(f"dagfusion.nodes.{pack}")
    outside = [spec.type_id for spec in module.NODES if not spec.type_id.startswith(f"dagfusion.{pack}.")]
    assert outside == []
