"""Depth estimators from local transformers folders (a tiny DPT built from a config)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dagfusion.errors import NodeInputError, ValidationError
from dagfusion.nodes.structure import estimators
from dagfusion.nodes.structure.layout import render_structure
from dagfusion.registry import Registry
from dagfusion.testing import run_workflow

REGISTRY = Registry.from_plugins(load_entrypoints=False, environ={})


@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return estimators.write_tiny_dpt(tmp_path_factory.mktemp("models") / "tiny-dpt")


def test_the_folder_is_safetensors_only(tiny_dpt: Path) -> None:
    names = sorted(p.name for p in tiny_dpt.iterdir())
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pth")) for n in names)


def test_estimate_depth_follows_the_depth_convention(tiny_dpt: Path) -> None:
    estimator = estimators.load_depth_estimator(tiny_dpt)
    images = render_structure(["a red circle above a blue square on a black background",
                               "a large green cross on the left on a white background"], 48)["image"]
    raw = estimator.predict(images)
    assert raw.shape == (2, 1, 48, 48)
    depth = estimators.estimate_depth(estimator, images)
    assert depth.shape == (2, 1, 48, 48)
    for d in depth:
        assert float(d.min()) == 0.0 and float(d.max()) == pytest.approx(1.0)
    # the largest prediction (nearest, for a disparity model) becomes 1; a distance model is flipped
    assert torch.equal(depth[0] == 1.0, raw[0] == raw[0].max())
    flipped = estimators.estimate_depth(estimator, images, "distance")
    assert torch.allclose(flipped, 1 - depth, atol=1e-5)
    with pytest.raises(ValueError, match="prediction"):
        estimators.estimate_depth(estimator, images, "height")


def test_nodes_load_from_allowed_folders_only(tiny_dpt: Path, tmp_path: Path) -> None:
    workflow = f"""
format_version: 1
nodes:
  estimator: {{type: dagfusion.structure.LoadDepthEstimator, inputs: {{path: "{tiny_dpt}", device: cpu}}}}
  scene: {{type: dagfusion.shapes.RenderStructure, inputs: {{prompts: "a red circle above a blue square on a black background", resolution: 32}}}}
  depth: {{type: dagfusion.structure.EstimateDepth, inputs: {{estimator: {{from: estimator.estimator}}, image: {{from: scene.image}}}}}}
"""
    from dagfusion.testing import make_settings

    allowed = make_settings(tmp_path).with_overrides(read_dirs=[tiny_dpt.parent])
    result = run_workflow(workflow, registry=REGISTRY, settings=allowed)
    assert result.output("depth.depth").shape == (1, 1, 32, 32)
    with pytest.raises(ValidationError, match="outside the allowed read folders"):
        run_workflow(workflow, registry=REGISTRY, tmp_path=tmp_path / "elsewhere")


def test_a_link_inside_the_folder_cannot_reach_outside_the_read_folders(tiny_dpt: Path, tmp_path: Path) -> None:
    import shutil

    from dagfusion import UnsafeOperationError
    from dagfusion.testing import make_settings

    allowed_root = tmp_path / "models"
    folder = allowed_root / "dpt"
    shutil.copytree(tiny_dpt, folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    weights = folder / "model.safetensors"
    shutil.move(str(weights), outside / "model.safetensors")
    weights.symlink_to(outside / "model.safetensors")
    settings = make_settings(tmp_path / "run").with_overrides(read_dirs=[allowed_root])

    class _Ctx:  # the node at run time: a path that came over a link is not checked by validation
        device = "cpu"

        def __init__(self) -> None:
            self.settings = settings

        def input_path(self, path: str) -> Path:
            return settings.check_readable(path)

    load = REGISTRY.get("dagfusion.structure.LoadDepthEstimator")
    with pytest.raises(UnsafeOperationError, match="outside the allowed read folders"):
        load.fn(_Ctx(), path=str(folder), device="cpu")


def test_nodes_name_bad_inputs(tiny_dpt: Path, tmp_path: Path) -> None:
    estimate = REGISTRY.get("dagfusion.structure.EstimateDepth")
    with pytest.raises(NodeInputError) as caught:
        estimate.fn(None, estimator=torch.nn.Linear(2, 2), image=torch.zeros(1, 3, 8, 8), prediction="disparity")
    assert caught.value.input == "estimator"
    with pytest.raises(NodeInputError) as caught:
        estimate.fn(None, estimator=estimators.load_depth_estimator(tiny_dpt), image=torch.zeros(1, 1, 8, 8), prediction="disparity")
    assert caught.value.input == "image" and "3 channel" in caught.value.message


def test_registering_the_pack_does_not_need_the_estimator_class() -> None:
    assert "estimator_class" in dir(estimators)
    assert estimators.DepthEstimator is estimators.estimator_class()
    assert sys.modules[estimators.__name__] is estimators
