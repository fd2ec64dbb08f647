"""The structure-guided refiner's condition: stacking depth, normals and a layout raster into one
control map (channel order, absent conditions as zeros, mismatches named), and the refiner
wired after latent structural diffusion through the ControlNet nodes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _maps(rows=2, size=(16, 16), seed=0):
    from dagfusion.nodes.structure.structural_data import normals_from_depth

    generator = torch.Generator().manual_seed(seed)
    depth = torch.rand(rows, 1, *size, generator=generator)
    mask = (torch.rand(rows, 2, *size, generator=generator) > 0.5).float()
    return depth, normals_from_depth(depth), mask


def test_channels_follow_the_documented_order():
    from dagfusion.nodes.structure.refiner import channel_ranges, structure_condition

    depth, normal, mask = _maps()
    control, report = structure_condition(depth, normal, mask, layout_channels=2)
    assert control.shape == (2, 6, 16, 16)
    assert torch.equal(control[:, 0:1], depth)
    torch.testing.assert_close(control[:, 1:4], (normal + 1) / 2)
    assert torch.equal(control[:, 4:6], mask)
    assert report["ranges"] == {"depth": [0, 1], "normal": [1, 4], "layout": [4, 6]}
    assert report["given"] == ["depth", "normal", "layout"] and report["layout_from"] == "mask"
    assert channel_ranges(3)["layout"] == (4, 7)


def test_absent_conditions_are_zero_channels_like_a_dropped_condition():
    from dagfusion.nodes.structure.refiner import structure_condition

    depth, normal, mask = _maps()
    full, _ = structure_condition(depth, normal, mask, layout_channels=2)
    only_normal, report = structure_condition(normal=normal, layout_channels=2)
    assert only_normal.shape == full.shape and report["given"] == ["normal"]
    assert only_normal[:, 0].abs().sum() == 0 and only_normal[:, 4:].abs().sum() == 0
    assert torch.equal(only_normal[:, 1:4], full[:, 1:4])
    dropped = full.clone()
    dropped[:, 0:1] = 0
    dropped[:, 4:] = 0
    assert torch.equal(only_normal, dropped)


def test_masks_fit_the_layout_channels_and_layouts_are_rasterised_by_boxes():
    from dagfusion.nodes.structure.data import Layout, LayoutObject
    from dagfusion.nodes.structure.refiner import structure_condition

    depth, _, _ = _maps(rows=1, size=(8, 8))
    three = torch.zeros(1, 3, 8, 8)
    three[0, 1, 0, 0] = 1
    three[0, 2, 7, 7] = 1
    control, _ = structure_condition(depth, mask=three, layout_channels=2)
    assert control[0, 5, 0, 0] == 1 and control[0, 5, 7, 7] == 1  # objects beyond K share the last channel
    layout = Layout(((LayoutObject((0.0, 0.0, 0.5, 1.0)), LayoutObject((0.5, 0.5, 1.0, 1.0))),), size=(8, 8))
    control, report = structure_condition(depth, layout=layout, layout_channels=2)
    assert report["layout_from"] == "boxes"
    assert control[0, 4, :, :4].min() == 1 and control[0, 4, :, 4:].max() == 0
    assert control[0, 5, 4:, 4:].min() == 1 and control[0, 5, :4].max() == 0


@pytest.mark.parametrize(
    ("kwargs", "input", "message"),
    [
        ({"normal": torch.zeros(2, 3, 8, 8)}, "normal", r"normal is \(8, 8\) \(H, W\) but depth is \(16, 16\)"),
        ({"mask": torch.zeros(3, 2, 16, 16)}, "mask", "mask has 3 rows but depth has 2"),
        ({"normal": torch.zeros(2, 1, 16, 16)}, "normal", r"expected 3 channel\(s\), got 1"),
        ({"mask": torch.zeros(2, 2, 16, 16), "layout": "both"}, "layout", "not both"),
    ],
)
def test_mismatches_name_the_input(kwargs, input, message):
    from dagfusion import NodeInputError
    from dagfusion.nodes.structure.data import Layout
    from dagfusion.nodes.structure.refiner import structure_condition

    depth, _, _ = _maps()
    if kwargs.get("layout") == "both":
        kwargs["layout"] = Layout(((), ()))
    with pytest.raises(NodeInputError, match=message) as caught:
        structure_condition(depth, **kwargs)
    assert caught.value.input == input


def test_layout_rows_and_missing_maps_are_refused():
    from dagfusion import NodeInputError
    from dagfusion.nodes.structure.data import Layout
    from dagfusion.nodes.structure.refiner import structure_condition

    depth, _, _ = _maps()
    with pytest.raises(NodeInputError, match="the layout has 1 rows but depth has 2") as caught:
        structure_condition(depth, layout=Layout(((),)))
    assert caught.value.input == "layout"
    with pytest.raises(NodeInputError, match="at least one map"):
        structure_condition(layout=Layout(((),)))


@pytest.mark.slow
def test_the_refiner_runs_on_the_predicted_structure(tmp_path):
    """Stage one predicts depth and normals; StructureCondition stacks them with the layout into the
    control map of a ControlNet (conditioning_channels = 4 + K) that steers the image model."""
    pytest.importorskip("diffusers")
    from dagfusion.registry import Registry
    from dagfusion.testing import make_settings, run_workflow
    from dagfusion.testing import models as tiny

    registry = Registry.from_plugins(load_entrypoints=False, environ={})
    if "dagfusion.structure.ControlNetFromUNet" not in registry or "dagfusion.structure.ApplyControlNet" not in registry:
        pytest.skip("the ControlNet nodes are not available")
    folder = tiny.write_model("sd", tmp_path / "tiny-sd")
    result = run_workflow(f"""
format_version: 1
nodes:
  load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", device: cpu, dtype: fp32}}}}
  text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: a red circle}}}}
  joint: {{type: dagfusion.structure.StructuralFromUNet, inputs: {{model: {{from: load.model}}}}}}
  structure:
    type: dagfusion.structure.SampleStructural
    inputs: {{model: {{from: joint.model}}, conditioning: {{from: text.conditioning}}, vae: {{from: load.vae}},
             width: 32, height: 32, steps: 2, guidance_scale: 1.0}}
  condition:
    type: dagfusion.structure.StructureCondition
    inputs: {{depth: {{from: structure.depth}}, normal: {{from: structure.normal}}, layout_channels: 2}}
  control_net: {{type: dagfusion.structure.ControlNetFromUNet, inputs: {{model: {{from: load.model}}, conditioning_channels: 6}}}}
  controlled:
    type: dagfusion.structure.ApplyControlNet
    inputs: {{model: {{from: load.model}}, control_net: {{from: control_net.control_net}}, control: {{from: condition.control}}}}
  latent: {{type: dagfusion.latent.EmptyLatent, inputs: {{model: {{from: load.model}}, width: 32, height: 32}}}}
  refine:
    type: dagfusion.sampling.Sample
    inputs: {{model: {{from: controlled.model}}, conditioning: {{from: text.conditioning}}, latent: {{from: latent.latent}},
             steps: 2, guidance_scale: 1.0, sampler: euler}}
""", registry=registry, settings=make_settings(tmp_path), out=tmp_path / "out")
    assert result.output("condition.control").shape == (1, 6, 32, 32)
    assert result.output("condition.report")["given"] == ["depth", "normal"]
    assert result.output("refine.latent").shape == (1, 4, 16, 16)
