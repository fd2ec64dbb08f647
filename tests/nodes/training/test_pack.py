"""The pack as a plugin: torch-free registration, its types and seams, documented declarations.

(The node contract for every node of the pack runs in tests/nodes/test_contract.py.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dagfusion import SocketType
from dagfusion.types import TypeSystem
from dagfusion.nodes.training import NODES
from dagfusion.nodes.training.types import TYPES

PACK_IDS = sorted(spec.type_id for spec in NODES)


def test_registering_the_pack_imports_no_heavy_library():
    code = textwrap.dedent("""
        import sys
        from dagfusion.registry import Registry
        registry = Registry.from_plugins(load_entrypoints=False, environ={})
        assert registry.get("dagfusion.train.Train") is not None
        print(",".join(m for m in ("torch", "diffusers", "transformers", "safetensors") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_types_nodes_and_the_data_seam(registry):
    for socket_type in TYPES:
        assert socket_type.name in registry.types
    assert PACK_IDS == sorted(
        ["dagfusion.train.Train", "dagfusion.train.TrainVAE", "dagfusion.train.NewModel", "dagfusion.train.ImageData",
         "dagfusion.train.ReplaceInCaptions", "dagfusion.train.SaveDiffusers",
         "dagfusion.train.Epsilon", "dagfusion.train.VPrediction", "dagfusion.train.RectifiedFlow"]
    )
    data = registry.get("dagfusion.train.Train").input("data").type
    assert registry.types.accepts(data, "SHAPES_DATASET") and registry.types.accepts(data, "TRAINING_DATA")
    assert not registry.types.accepts(data, "IMAGE")
    # another pack's dataset type plugs in as a subtype of TRAINING_DATA (on a copy: the registry is shared)
    types = TypeSystem(list(registry.types))
    types.add(SocketType("TEST_DATASET", parents=("TRAINING_DATA",)))
    assert types.accepts(data, "TEST_DATASET")


@pytest.mark.parametrize("spec", NODES, ids=lambda s: s.type_id)
def test_declarations_are_documented(spec):
    assert spec.version == "1.0.0"
    assert spec.summary and spec.category
    for socket in spec.inputs:
        assert socket.description, f"{spec.type_id}.{socket.name} has no description"
    if not spec.pure:
        assert spec.output_node
    assert not spec.persist  # MODEL has no serializer: see dagfusion.nodes.training.train
