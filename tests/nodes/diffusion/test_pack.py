"""The pack as a plugin: torch-free registration, its types, and the node contract for every node."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dagfusion.nodes.diffusion import NODES
from dagfusion.nodes.diffusion.types import TYPES

PACK_IDS = sorted(spec.type_id for spec in NODES)


def test_registering_the_pack_imports_no_heavy_library():
    code = textwrap.dedent("""
        import sys
        from dagfusion.registry import Registry
        registry = Registry.from_plugins(load_entrypoints=False, environ={})
        assert registry.get("dagfusion.sampling.Sample") is not None
        heavy = [m for m in ("torch", "diffusers", "transformers", "PIL") if m in sys.modules]
        print(",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_types_and_nodes_are_registered(registry):
    for socket_type in TYPES:
        assert socket_type.name in registry.types
    for name in ("IMAGE", "MASK", "VIDEO"):
        assert registry.types.accepts("TENSOR", name)
    assert not registry.types.accepts("IMAGE", "TENSOR")
    assert PACK_IDS == sorted(
        [
            "dagfusion.models.LoadDiffusers", "dagfusion.models.LoadFromHFCache", "dagfusion.models.LoadSingleFile",
            "dagfusion.text.Encode", "dagfusion.conditioning.ClassLabel", "dagfusion.latent.EmptyLatent",
            "dagfusion.sampling.Scheduler", "dagfusion.sampling.Sample", "dagfusion.vae.Decode", "dagfusion.vae.Encode",
            "dagfusion.image.LoadImage", "dagfusion.image.SaveImage", "dagfusion.image.PreviewImage",
        ]
    )
    for type_id in PACK_IDS:
        assert registry.get(type_id) is not None


@pytest.mark.parametrize("spec", NODES, ids=lambda s: s.type_id)
def test_declarations_are_documented(spec):
    assert spec.parsed_version.major == 1
    assert spec.summary and spec.category
    for socket in (*spec.inputs, *spec.outputs):
        assert socket.description or socket in spec.outputs, f"{spec.type_id}.{socket.name} has no description"
    if not spec.pure:
        assert spec.output_node


@pytest.mark.parametrize("type_id", PACK_IDS)
def test_node_contract(type_id, registry, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from dagfusion.testing import assert_node_contract

    assert_node_contract(type_id, registry, tmp_path=tmp_path)
