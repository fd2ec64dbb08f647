"""Tests of dagfusion-imagefilters (run after installing it: ``pip install -e . && pytest``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dagfusion import ValidationError
from dagfusion.testing import assert_node_contract, make_registry, run_workflow
from dagfusion_imagefilters import plugin

REGISTRY = make_registry(("imagefilters", plugin))
WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "edges.yaml"


@pytest.mark.parametrize("spec", REGISTRY.nodes_of("imagefilters"), ids=lambda spec: spec.type_id)
def test_node_contract(spec, tmp_path):
    assert_node_contract(spec, REGISTRY, tmp_path=tmp_path, require_input_docs=True)


def test_edge_map_is_a_registered_subtype_of_tensor():
    assert [t.name for t in REGISTRY.types_of("imagefilters")] == ["EDGE_MAP"]
    assert REGISTRY.types.accepts("TENSOR", "EDGE_MAP")
    assert not REGISTRY.types.accepts("EDGE_MAP", "TENSOR")


def test_workflow_runs(tmp_path):
    result = run_workflow(WORKFLOW, registry=REGISTRY, tmp_path=tmp_path)
    assert result.output("stats.max") == pytest.approx(1.0)
    assert 0.0 < result.output("mask.coverage") < 0.5
    assert len(torch.unique(result.output("poster.tensor"))) <= 3


def test_a_plain_tensor_cannot_feed_edge_mask(tmp_path):
    text = """
format_version: 1
nodes:
  noise: {type: dagfusion.tensor.Noise, inputs: {height: 8, width: 8}}
  mask: {type: imagefilters.EdgeMask, inputs: {edges: {from: noise.tensor}}}
"""
    with pytest.raises(ValidationError, match="expected EDGE_MAP, got TENSOR from noise.tensor"):
        run_workflow(text, registry=REGISTRY, tmp_path=tmp_path)


def test_sobel_finds_a_vertical_edge():
    step = torch.zeros(1, 6, 6)
    step[:, :, 3:] = 1.0
    edges = plugin.sobel.fn(None, step, normalize=True)
    assert edges.shape == (1, 6, 6)
    assert torch.all(edges[0, :, 2:4] == 1.0)
    assert torch.all(edges[0, :, 0] == 0.0) and torch.all(edges[0, :, 5] == 0.0)
    assert torch.all(plugin.sobel.fn(None, torch.ones(2, 3, 5, 5), normalize=True) == 0.0)


def test_posterize_levels():
    ramp = torch.linspace(0, 1, 101).view(1, 1, 101)
    out = plugin.posterize.fn(None, ramp, levels=5)
    assert sorted(torch.unique(out).tolist()) == [0.0, 0.25, 0.5, 0.75, 1.0]
