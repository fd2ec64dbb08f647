"""Tests of the template plugin, written with dagfusion.testing (loaded by pytest automatically).

Run them after installing the plugin: ``pip install -e . && pytest``.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

import dagfusion_template
from dagfusion.testing import assert_node_contract, make_registry, run_workflow

PLUGIN = ("template", dagfusion_template)  # the entry-point name and the hook module
REGISTRY = make_registry(PLUGIN)  # dagfusion's built-in nodes plus this plugin
WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "sharpen.yaml"


@pytest.mark.parametrize("spec", REGISTRY.nodes_of("template"), ids=lambda spec: spec.type_id)
def test_node_contract(spec, tmp_path):
    """Declared types, defaults, docs, examples: every node of the plugin passes the contract."""
    assert_node_contract(spec, REGISTRY, tmp_path=tmp_path, require_input_docs=True)


def test_the_entry_point_is_installed():
    """pyproject.toml declares the entry point dagfusion discovers the plugin by."""
    (ep,) = [ep for ep in entry_points(group="dagfusion") if ep.name == "template"]
    assert ep.load() is dagfusion_template
    assert "template.Sharpen" in make_registry(entrypoints=True)


def test_workflow_sharpens(tmp_path):
    result = run_workflow(WORKFLOW, registry=REGISTRY, tmp_path=tmp_path)
    assert result.output("after.std") > result.output("before.std")


def test_sharpen_boosts_an_edge_and_keeps_flat_areas(dagfusion_run):
    text = """
format_version: 1
nodes:
  flat: {type: dagfusion.tensor.Noise, inputs: {seed: 1, channels: 1, height: 8, width: 8, distribution: uniform}}
  sharp: {type: template.Sharpen, inputs: {tensor: {from: flat.tensor}, amount: 0.0}}
"""
    result = dagfusion_run(text, plugins=[PLUGIN])
    noise = result.output("flat.tensor")
    assert torch.equal(result.output("sharp.tensor"), noise)  # amount 0 is the identity

    step = torch.zeros(1, 8, 8)
    step[:, :, 4:] = 1.0
    out = dagfusion_template.sharpen.fn(None, step, amount=1.0, sigma=1.0, threshold=0.0)
    assert out.shape == step.shape and out.dtype == step.dtype
    assert out[0, 0, 4] > 1.0 and out[0, 0, 3] < 0.0  # overshoot on both sides of the edge
    assert torch.equal(out[0, :, 0], step[0, :, 0])  # far from the edge nothing changes
    calm = dagfusion_template.sharpen.fn(None, step, amount=1.0, sigma=1.0, threshold=10.0)
    assert torch.equal(calm, step)


def test_integer_tensors_are_refused():
    with pytest.raises(ValueError, match="floating-point"):
        dagfusion_template.sharpen.fn(None, torch.zeros(1, 4, 4, dtype=torch.int64), 1.0, 1.0, 0.0)
