"""Latent structural diffusion: the model's construction invariants, its sampler family, the
joint training objective on the shared loop, sampling, and the file format."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
from dagfusion.nodes.training.data import TrainingData

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def parts():
    from dagfusion.testing import models as tiny

    return tiny.sd_handles()


@pytest.fixture(scope="module")
def unet(parts):
    return parts["model"].denoiser


def _text(parts, rows):
    return parts["conditioning"].positive["encoder_hidden_states"].expand(rows, -1, -1)


def _noise(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- construction ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout_channels", [0, 2])
def test_identical_inputs_give_the_unets_prediction_for_every_target(parts, unet, layout_channels):
    """Branches copied from the UNet, every target given the same latent: each target's prediction
    is the UNet's (the branch means are that feature; fresh layout channels are zero)."""
    from dagfusion.nodes.structure.structural_model import StructuralUNet

    model = StructuralUNet(unet, ("rgb", "depth", "normal"), layout_channels).eval()
    x = _noise(2, 4, 16, 16)
    layout = torch.rand(2, layout_channels, 32, 32) if layout_channels else None
    with torch.no_grad():
        reference = unet(x, 321, encoder_hidden_states=_text(parts, 2)).sample
        out = model(torch.cat([x, x, x], dim=1), 321, _text(parts, 2), layout=layout).sample
    assert out.shape == (2, 12, 16, 16)
    for name, prediction in model.split(out).items():
        torch.testing.assert_close(prediction, reference, rtol=0, atol=1e-5, msg=f"target {name}")


def test_other_targets_inputs_reach_the_rgb_prediction_through_the_shared_trunk(parts, unet):
    from dagfusion.nodes.structure.structural_model import StructuralUNet

    model = StructuralUNet(unet).eval()
    x, y = _noise(1, 4, 16, 16, seed=1), _noise(1, 4, 16, 16, seed=2)
    with torch.no_grad():
        reference = unet(x, 500, encoder_hidden_states=_text(parts, 1)).sample
        mixed = model.split(model(torch.cat([x, y, y], dim=1), 500, _text(parts, 1)).sample)
    assert (mixed["rgb"] - reference).abs().max() > 1e-3  # the trunk averages the branches
    assert (mixed["depth"] - mixed["normal"]).abs().max() < 1e-5  # equal branches, equal inputs


def test_a_single_target_model_is_the_unet_for_any_input(parts, unet):
    """With one branch nothing is averaged: every skip must reach the right up block for the
    prediction to equal the UNet's (a misrouted skip would change it)."""
    from dagfusion.nodes.structure.structural_model import StructuralUNet

    model = StructuralUNet(unet, ("rgb",)).eval()
    x = _noise(3, 4, 16, 16, seed=3)
    t = torch.tensor([10, 400, 900])
    with torch.no_grad():
        reference = unet(x, t, encoder_hidden_states=_text(parts, 3)).sample
        out = model(x, t, _text(parts, 3), return_dict=False)[0]
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


def test_branches_are_independent_copies_and_the_unet_is_unchanged(unet):
    from dagfusion.nodes.structure.structural_model import StructuralUNet

    before = {k: v.clone() for k, v in unet.state_dict().items()}
    model = StructuralUNet(unet)
    conv = {name: branch.conv_in.weight for name, branch in model.branches.items()}
    assert len({id(w) for w in conv.values()}) == 3 and all(w is not unet.conv_in.weight for w in conv.values())
    with torch.no_grad():
        model.branches["depth"].conv_in.weight.add_(1.0)
    assert torch.equal(model.branches["rgb"].conv_in.weight, unet.conv_in.weight)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    names = set(model.state_dict())
    assert not any(k.startswith(("trunk.conv_in", "trunk.down_blocks.0.", "trunk.conv_out")) for k in names)
    assert {"branches.rgb.conv_in.weight", "branches.normal.up.resnets.0.conv1.weight", "trunk.mid_block.resnets.0.conv1.weight"} <= names


def test_layout_channels_start_at_zero_and_then_steer_the_prediction(parts, unet):
    from dagfusion.nodes.structure.structural_model import StructuralUNet

    model = StructuralUNet(unet, ("rgb", "depth"), 2).eval()
    assert model.branches["rgb"].conv_in.weight.shape[1] == 6
    assert model.branches["rgb"].conv_in.weight[:, 4:].abs().sum() == 0
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for branch in trained.branches.values():
            branch.conv_in.weight[:, 4:].normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    x = _noise(1, 8, 16, 16)
    layout = torch.zeros(1, 2, 32, 32)
    layout[:, 0, 4:20, 4:20] = 1
    with torch.no_grad():
        plain = trained(x, 100, _text(parts, 1)).sample
        steered = trained(x, 100, _text(parts, 1), layout=layout).sample
        empty = trained(x, 100, _text(parts, 1), layout=torch.zeros(1, 2, 16, 16)).sample
    assert (plain - steered).abs().max() > 1e-3
    torch.testing.assert_close(plain, empty)  # an absent layout is an all-zero raster
    with pytest.raises(ValueError, match=r"layout raster \(B, 2, H, W\)"):
        trained(x, 100, _text(parts, 1), layout=torch.zeros(1, 3, 16, 16))


def test_bad_inputs_are_named(parts, unet):
    from dagfusion.nodes.structure.structural_model import StructuralUNet, parse_targets

    model = StructuralUNet(unet, ("rgb", "depth"))
    with pytest.raises(ValueError, match=r"expected stacked latents \(B, 8, h, w\).*got shape \(1, 12, 16, 16\)"):
        model(torch.zeros(1, 12, 16, 16), 1, _text(parts, 1))
    with pytest.raises(ValueError, match="no layout conditioning"):
        model(torch.zeros(1, 8, 16, 16), 1, _text(parts, 1), layout=torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="more than once"):
        parse_targets("rgb, rgb")
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        StructuralUNet(torch.nn.Conv2d(4, 4, 1))
    parts_ = model.split(_noise(2, 8, 4, 4))
    assert torch.equal(model.stack(parts_), torch.cat([parts_["rgb"], parts_["depth"]], dim=1))
    with pytest.raises(ValueError, match=r"missing \['depth'\]"):
        model.stack({"rgb": parts_["rgb"]})


def test_the_sampler_family_drives_it(parts):
    from dagfusion.model import family_for
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.structure.structural import tiny_structural

    handle = tiny_structural(0)
    assert family_for(handle.denoiser).name == "structural"
    assert empty_latent(handle, 32, 32, 2).shape == (2, 12, 16, 16)
    assert handle.targets == ("rgb", "depth", "normal") and handle.latent_channels == 4
    assert family_for(parts["model"].denoiser).name == "unet"  # the UNet family is not taken over


def test_handle_fingerprints_follow_the_source_and_settings(parts):
    from dagfusion.fingerprint import fingerprint
    from dagfusion.nodes.structure.structural import structural_from_unet

    a = structural_from_unet(parts["model"], ("rgb", "depth", "normal"), 0)
    b = structural_from_unet(parts["model"], ("rgb", "depth", "normal"), 0)
    c = structural_from_unet(parts["model"], ("rgb", "depth"), 0)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    assert a.denoiser is not b.denoiser


# --- data and objective ---------------------------------------------------------------------------


def test_normals_from_depth_follow_the_normal_convention():
    from dagfusion.nodes.structure.structural_data import normals_from_depth

    flat = normals_from_depth(torch.full((1, 1, 8, 8), 0.3))
    torch.testing.assert_close(flat, torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8))
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 33), torch.linspace(-1, 1, 33), indexing="ij")
    bump = (1 - xs**2 - ys**2).clamp_min(0).sqrt().view(1, 1, 33, 33) * 0.2  # nearer in the middle
    normal = normals_from_depth(bump)
    torch.testing.assert_close(normal.norm(dim=1), torch.ones(1, 33, 33))
    assert normal[0, 0, 16, 24] > 0.2 and normal[0, 0, 16, 8] < -0.2  # right side faces right
    assert normal[0, 1, 8, 16] > 0.2 and normal[0, 1, 24, 16] < -0.2  # top (row 8) faces up


def test_structural_data_gives_depth_normals_and_box_layouts():
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.structure.structural_data import StructuralShapesData

    data = StructuralShapesData(ShapesDataset(objects=2, resolution=32, seed=0), layout_channels=2)
    examples = data.examples(0, 3)
    raw = examples.raw
    assert examples.images.shape == (3, 3, 32, 32) and len(examples.captions) == 3
    assert raw.depth.shape == (3, 1, 32, 32) and raw.normal.shape == (3, 3, 32, 32) and raw.layout.shape == (3, 2, 32, 32)
    masks = raw.source.rendered.mask
    # nearest convention: the background (renderer depth 1 = far) is 0, objects nearer
    assert raw.depth[0, 0, 0, 0] == 0 and raw.depth[masks[:, :1] >= 0.999].min() > 0.35
    torch.testing.assert_close(raw.normal.norm(dim=1), torch.ones(3, 32, 32))
    # each layout channel is a filled box around its object's mask
    box = raw.layout[0, 0]
    assert torch.all(box[masks[0, 0] > 0.5] == 1)
    rows, cols = box.nonzero()[:, 0], box.nonzero()[:, 1]
    assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].min() == 1
    again = StructuralShapesData(ShapesDataset(objects=2, resolution=32, seed=0), layout_channels=2)
    assert torch.equal(again.examples(0, 3).raw.normal, raw.normal)


def test_structural_data_prefers_the_renderers_normals():
    from types import SimpleNamespace

    from dagfusion.nodes.structure.structural_data import StructuralShapesData

    normal = torch.zeros(1, 3, 8, 8)
    normal[:, 0] = 1.0  # facing right everywhere: not what the flat depth would give
    rendered = SimpleNamespace(image=torch.rand(1, 3, 8, 8), mask=torch.ones(1, 1, 8, 8), depth=torch.ones(1, 1, 8, 8),
                               normal=normal)
    source = SimpleNamespace(batch=lambda first, count: SimpleNamespace(rendered=rendered, captions=("x",)),
                             __dagfusion_fingerprint__=lambda: "fake")
    assert torch.equal(StructuralShapesData(source).examples(0, 1).raw.normal, normal)
    derived = StructuralShapesData(source, normals="depth").examples(0, 1).raw.normal
    assert torch.equal(derived[:, 2], torch.ones(1, 8, 8))


class _Fixed(TrainingData):
    """The same batch at every index (to overfit a fixed batch)."""

    def __init__(self, data, count):
        self.data, self.count = data, count
        self.examples_ = data.examples(0, count)

    def examples(self, first, count):
        assert count == self.count
        return self.examples_

    def describe(self):
        return {"source": "fixed"}

    def __dagfusion_fingerprint__(self):
        return "fixed-batch"


def _joint_loss(handle, clip, objective, examples, seed=123):
    """The objective's loss of ``handle`` on ``examples`` with a fixed generator (no training)."""
    from dagfusion.model import family_for
    from dagfusion.nodes.training.loop import _TextCache
    from dagfusion.nodes.training.objectives import ModelCall, TrainBatch, TrainStep

    module = handle.denoiser
    family = family_for(module)
    generator = torch.Generator().manual_seed(seed)
    x0 = objective._encode(examples.images, generator, torch.device("cpu"))
    cond = _TextCache(clip, torch.device("cpu")).conditioning(tuple(examples.captions))
    prepared = family.prepare(module, cond, batch=x0.shape[0], cfg=False, device=torch.device("cpu"),
                              dtype=torch.float32, latent_shape=tuple(x0.shape), scale=2, guidance_scale=1.0)
    call = ModelCall(module, family, prepared.kwargs, contextlib.nullcontext)
    with torch.no_grad():
        loss, logs = objective.loss(call, TrainBatch(x0, tuple(examples.captions), examples), TrainStep(0, 1), generator)
    return float(loss), logs


def test_a_few_training_steps_lower_the_joint_loss_on_a_fixed_batch(parts):
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.structure.structural import tiny_structural
    from dagfusion.nodes.structure.structural_data import (
        StructuralObjective,
        StructuralShapesData,
    )
    from dagfusion.nodes.training.loop import TrainConfig, train
    from dagfusion.nodes.training.objectives import EpsilonObjective

    handle = tiny_structural(2)
    data = _Fixed(StructuralShapesData(ShapesDataset(objects=2, resolution=32, seed=0), layout_channels=2), 2)
    objective = StructuralObjective(EpsilonObjective(), (("depth", 0.5),), 0.0, parts["vae"])
    before, logs = _joint_loss(handle, parts["clip"], objective, data.examples_)
    assert set(logs) == {"loss_rgb", "loss_depth", "loss_normal"}
    assert before == pytest.approx(logs["loss_rgb"] + 0.5 * logs["loss_depth"] + logs["loss_normal"], rel=1e-5)
    config = TrainConfig(steps=5, batch_size=2, learning_rate=2e-3, caption_dropout=0.0, seed=0)
    result = train(handle, data, parts["clip"], parts["vae"], objective, config)
    after, _ = _joint_loss(result.model, parts["clip"], objective, data.examples_)
    assert type(result.model).__name__ == "StructuralHandle" and result.model.targets == handle.targets
    assert result.model.denoiser is not handle.denoiser  # the input handle's weights are untouched
    assert after < 0.7 * before, (before, after, result.losses)


def test_the_objective_refuses_plain_images_and_unknown_targets(parts):
    from dagfusion.nodes.structure.structural import tiny_structural
    from dagfusion.nodes.structure.structural_data import StructuralObjective
    from dagfusion.nodes.training.data import Examples
    from dagfusion.nodes.training.objectives import (
        EpsilonObjective,
        TrainBatch,
        VPredictionObjective,
    )

    module = tiny_structural(0).denoiser
    images = torch.rand(1, 3, 32, 32)
    plain = TrainBatch(torch.zeros(1, 4, 16, 16), ("a",), Examples(images, ("a",)))
    with pytest.raises(ValueError, match="StructuralData"):
        StructuralObjective(EpsilonObjective(), vae=parts["vae"]).latents(module, plain, torch.Generator())
    with pytest.raises(TypeError, match="rectified-flow objective as the base"):
        StructuralObjective(object())
    objective = StructuralObjective(VPredictionObjective(), (("albedo", 1.0),))
    from dagfusion.nodes.structure.structural_data import StructuralBatch

    batch = TrainBatch(torch.zeros(1, 4, 16, 16), ("a",),
                       Examples(images, ("a",), StructuralBatch(torch.zeros(1, 1, 32, 32), torch.zeros(1, 3, 32, 32))))
    with pytest.raises(ValueError, match=r"targets \['albedo'\] the model does not have"):
        objective.latents(module, batch, torch.Generator())
    assert "albedo" in objective.key() and objective.key() != StructuralObjective(VPredictionObjective()).key()


# --- sampling -------------------------------------------------------------------------------------


def test_sampling_returns_three_maps_in_their_conventions(parts):
    from dagfusion.nodes.structure.structural import sample_structural, tiny_structural

    handle = tiny_structural(0)
    kwargs = {"width": 32, "height": 32, "batch_size": 2, "steps": 3, "guidance_scale": 3.0, "sampler": "euler"}
    out = sample_structural(None, handle, parts["conditioning"], parts["vae"], seed=5, **kwargs)
    assert out["image"].shape == (2, 3, 32, 32) and out["depth"].shape == (2, 1, 32, 32) and out["normal"].shape == (2, 3, 32, 32)
    assert 0 <= out["image"].min() and out["image"].max() <= 1 and 0 <= out["depth"].min() and out["depth"].max() <= 1
    torch.testing.assert_close(out["normal"].norm(dim=1), torch.ones(2, 32, 32))
    assert out["latent"].shape == (2, 12, 16, 16)
    assert out["report"].info["family"] == "structural" and out["report"].info["cfg"] is True
    again = sample_structural(None, handle, parts["conditioning"], parts["vae"], seed=5, **kwargs)
    other = sample_structural(None, handle, parts["conditioning"], parts["vae"], seed=6, **kwargs)
    assert torch.equal(again["depth"], out["depth"]) and not torch.equal(other["depth"], out["depth"])


def test_sampling_runs_step_hooks_and_honours_cancel(parts):
    from dagfusion import RunCancelled
    from dagfusion.model import ModelPatch, StepHook
    from dagfusion.nodes.structure.structural import sample_structural, tiny_structural

    class Count(StepHook):
        def __init__(self):
            self.shapes = []

        def denoise(self, call, forward):
            self.shapes.append(tuple(call.sample.shape))
            return forward(call)

        def end(self):
            return {"shapes": [list(s) for s in self.shapes]}

    class CountPatch(ModelPatch):
        key = "test.count"

        def begin(self, run):
            return Count()

    handle = tiny_structural(0).with_patch(CountPatch())
    assert type(handle).__name__ == "StructuralHandle"
    out = sample_structural(None, handle, parts["conditioning"], parts["vae"], width=32, height=32, steps=2,
                            guidance_scale=2.0, sampler="ddim")
    assert out["report"].patch("test.count") == {"shapes": [[2, 12, 16, 16]] * 2}

    class Cancelling:
        handler = None

        def check_cancelled(self):
            raise RunCancelled("stop")

    with pytest.raises(RunCancelled):
        sample_structural(Cancelling(), tiny_structural(0), parts["conditioning"], parts["vae"], width=32, height=32, steps=2)


def test_sampling_passes_the_layout_to_both_guidance_halves(parts):
    from dagfusion.nodes.structure.data import Layout, LayoutObject
    from dagfusion.nodes.structure.structural import (
        layout_raster,
        sample_structural,
        tiny_structural,
    )

    handle = tiny_structural(2)
    layout = Layout(((LayoutObject((0.0, 0.0, 0.5, 0.5)), LayoutObject((0.5, 0.5, 1.0, 1.0))),), size=(32, 32))
    raster = layout_raster(layout, (32, 32), 2, 1)
    assert raster[0, 0, :16, :16].min() == 1 and raster[0, 0, 16:, :].max() == 0 and raster[0, 1, 16:, 16:].min() == 1
    seen = {}
    module = handle.denoiser
    forward = module.forward

    def spy(*args, **kwargs):
        seen["layout"] = kwargs.get("layout")
        return forward(*args, **kwargs)

    module.forward = spy
    try:
        sample_structural(None, handle, parts["conditioning"], parts["vae"], width=32, height=32, steps=1,
                          guidance_scale=2.0, layout=layout)
    finally:
        del module.forward
    assert seen["layout"].shape == (2, 2, 32, 32) and torch.equal(seen["layout"][0], seen["layout"][1])


def test_sample_node_errors_name_the_input(parts, tmp_path):
    from dagfusion import NodeInputError
    from dagfusion.nodes.structure.structural import (
        sample_structural,
        structural_from_unet,
        tiny_structural,
    )

    with pytest.raises(NodeInputError) as caught:
        sample_structural(None, tiny_structural(0), parts["conditioning"], parts["vae"], width=32, height=32,
                          layout=torch.zeros(1, 2, 32, 32))
    assert caught.value.input == "layout"
    with pytest.raises(NodeInputError) as caught:
        sample_structural(None, structural_from_unet(parts["model"], ("depth", "normal"), 0), parts["conditioning"],
                          parts["vae"], width=32, height=32)
    assert caught.value.input == "model" and "rgb and depth" in str(caught.value)
    with pytest.raises(NodeInputError) as caught:
        sample_structural(None, tiny_structural(2), parts["conditioning"], parts["vae"], width=32, height=32,
                          layout=torch.zeros(1, 3, 32, 32))
    assert caught.value.input == "layout" and "2 channels" in str(caught.value)


# --- files ----------------------------------------------------------------------------------------


def test_save_load_round_trip(parts, tmp_path):
    from dagfusion.fingerprint import fingerprint
    from dagfusion.nodes.structure import structural_io
    from dagfusion.nodes.structure.structural import tiny_structural
    from safetensors import safe_open

    handle = tiny_structural(2)
    folder = structural_io.save(handle, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "dagfusion.structural" and config["targets"] == ["rgb", "depth", "normal"]
    assert config["layout_channels"] == 2 and config["latent_channels"] == 4 and config["scheduler"]["class_name"]
    with safe_open(str(folder / "structural.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["dagfusion_config"])["unet"] == config["unet"]
    loaded = structural_io.load(folder)
    assert loaded.targets == handle.targets and loaded.layout_channels == 2
    assert loaded.scheduler.class_name == handle.scheduler.class_name
    original, restored = handle.denoiser.state_dict(), loaded.denoiser.state_dict()
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    x, layout = _noise(1, 12, 16, 16), torch.rand(1, 2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoiser(x, 7, _text(parts, 1), layout).sample,
                                   handle.denoiser(x, 7, _text(parts, 1), layout).sample, rtol=0, atol=0)
    assert fingerprint(structural_io.load(folder / "structural.safetensors")) == fingerprint(loaded)
    half = structural_io.load(structural_io.save(handle, tmp_path / "half", "fp16"))
    assert half.denoiser.dtype == torch.float16


def test_loading_refuses_what_is_not_a_structural_model(parts, tmp_path):
    from dagfusion.nodes.structure import structural_io
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="no such file"):
        structural_io.read_config(tmp_path)
    (tmp_path / "other").mkdir()
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other" / "structural.safetensors"),
              metadata={"dagfusion_config": json.dumps({"format": "something"})})
    with pytest.raises(ValueError, match="expected a dagfusion.structural model"):
        structural_io.load(tmp_path / "other")


def test_nodes_through_the_engine(tmp_path):
    from dagfusion.testing import make_settings, run_workflow
    from dagfusion.testing import models as tiny

    folder = tiny.write_model("sd", tmp_path / "tiny-sd")
    settings = make_settings(tmp_path)
    base = f"""
format_version: 1
nodes:
  load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", device: cpu, dtype: fp32}}}}
  text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: a red circle}}}}
  joint: {{type: dagfusion.structure.StructuralFromUNet, inputs: {{model: {{from: load.model}}, layout: true}}}}
  save: {{type: dagfusion.structure.SaveStructural, inputs: {{model: {{from: joint.model}}, folder: joint}}}}
  sample:
    type: dagfusion.structure.SampleStructural
    inputs: {{model: {{from: joint.model}}, conditioning: {{from: text.conditioning}}, vae: {{from: load.vae}},
             width: 32, height: 32, steps: 2, guidance_scale: 3.0}}
"""
    result = run_workflow(base, settings=settings, out=tmp_path / "out")
    assert result.output("sample.depth").shape == (1, 1, 32, 32)
    saved = Path(result.output("save.path"))
    assert (saved / "config.json").is_file() and result.output("save.bytes") > 0
    loaded = run_workflow(f"""
format_version: 1
nodes:
  load: {{type: dagfusion.structure.LoadStructural, inputs: {{path: "{saved}", device: cpu}}}}
""", settings=settings, out=tmp_path / "out2")
    assert loaded.output("load.report")["targets"] == ["rgb", "depth", "normal"]
    bad = run_workflow(base.replace("layout: true", "targets: 'rgb, rgb'"), settings=settings, out=tmp_path / "out3",
                       raise_on_error=False)
    error = bad.errors["joint"].original
    assert getattr(error, "input", None) == "targets" and "more than once" in str(error)


@pytest.mark.slow
def test_training_through_the_train_node(tmp_path):
    """StructuralAsModel → dagfusion.train.Train (StructuralData, StructuralLoss) → StructuralFromModel → sampling."""
    from dagfusion.testing import make_settings, run_workflow
    from dagfusion.testing import models as tiny

    folder = tiny.write_model("sd", tmp_path / "tiny-sd")
    result = run_workflow(f"""
format_version: 1
nodes:
  load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", device: cpu, dtype: fp32}}}}
  joint: {{type: dagfusion.structure.StructuralFromUNet, inputs: {{model: {{from: load.model}}, layout: true}}}}
  as_model: {{type: dagfusion.structure.StructuralAsModel, inputs: {{model: {{from: joint.model}}}}}}
  shapes: {{type: dagfusion.shapes.Dataset, inputs: {{objects: 2, resolution: 32}}}}
  data: {{type: dagfusion.structure.StructuralData, inputs: {{dataset: {{from: shapes.dataset}}}}}}
  base: {{type: dagfusion.train.VPrediction, inputs: {{zero_terminal_snr: true}}}}
  loss: {{type: dagfusion.structure.StructuralLoss, inputs: {{objective: {{from: base.objective}}, vae: {{from: load.vae}}}}}}
  train:
    type: dagfusion.train.Train
    inputs: {{model: {{from: as_model.model}}, data: {{from: data.data}}, clip: {{from: load.clip}}, vae: {{from: load.vae}},
             objective: {{from: loss.objective}}, steps: 2, batch_size: 2, checkpoint_every: 0}}
  trained: {{type: dagfusion.structure.StructuralFromModel, inputs: {{model: {{from: train.model}}}}}}
  text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: a red circle above a blue square}}}}
  sample:
    type: dagfusion.structure.SampleStructural
    inputs: {{model: {{from: trained.model}}, conditioning: {{from: text.conditioning}}, vae: {{from: load.vae}},
             width: 32, height: 32, steps: 2, guidance_scale: 1.0}}
""", settings=make_settings(tmp_path), out=tmp_path / "out")
    trained = result.output("trained.model")
    assert trained.targets == ("rgb", "depth", "normal") and trained.layout_channels == 2
    assert trained.scheduler.config["prediction_type"] == "v_prediction"
    assert result.output("sample.normal").shape == (1, 3, 32, 32)


def test_structural_images_interleave_the_targets_pictures():
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.structure.structural_data import (
        StructuralImages,
        StructuralShapesData,
        target_images,
    )

    dataset = ShapesDataset(objects=2, resolution=32, seed=0)
    images = StructuralImages(dataset)
    examples = images.examples(2, 5)  # rgb/depth/normal of scene 0, then of scene 1 …
    assert examples.images.shape == (5, 3, 32, 32)
    reference = StructuralShapesData(dataset, layout="none").examples(0, 3)
    raw = reference.raw
    assert torch.equal(examples.images[0], target_images("normal", raw.normal[:1])[0])  # index 2: scene 0, normal
    assert torch.equal(examples.images[1], reference.images[1])  # index 3: scene 1, rgb
    assert torch.equal(examples.images[2], raw.depth[1].expand(3, -1, -1))  # index 4: scene 1, depth
    assert examples.captions[1] == examples.captions[3] == reference.captions[1]
    with pytest.raises(ValueError, match="distinct targets"):
        StructuralImages(dataset, ("rgb", "albedo"))


@pytest.mark.slow
def test_train_vae_fine_tunes_on_structure_pictures(parts):
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.structure.structural_data import StructuralImages
    from dagfusion.nodes.training.autoencoder import VAETrainConfig, train_vae

    data = StructuralImages(ShapesDataset(objects=2, resolution=32, seed=0))
    result = train_vae(parts["vae"], data, VAETrainConfig(steps=2, batch_size=3, warmup_steps=0))
    assert result.scaling_factor > 0 and result.module is not parts["vae"].module


def test_equal_models_give_byte_identical_files(tmp_path):
    from dagfusion.nodes.structure import structural_io
    from dagfusion.nodes.structure.structural import tiny_structural

    files = [structural_io.save(tiny_structural(2), tmp_path / name) / "structural.safetensors" for name in "ab"]
    assert files[0].read_bytes() == files[1].read_bytes()


def test_with_the_same_seed_a_single_target_model_samples_what_the_unet_samples(parts):
    """The shared sampler drives the structural model like the UNet: one target, same seed, same latents."""
    from dagfusion.nodes.diffusion.data import Latent
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.structure.structural import structural_from_unet

    single = structural_from_unet(parts["model"], ("rgb",), 0)
    kwargs = {"steps": 3, "guidance_scale": 3.0, "sampler": "euler", "seed": 11}
    reference = sample(parts["model"], parts["conditioning"], Latent(torch.zeros(2, 4, 16, 16)), **kwargs)
    joint = sample(single, parts["conditioning"], Latent(torch.zeros(2, 4, 16, 16)), **kwargs)
    torch.testing.assert_close(joint.samples, reference.samples, rtol=0, atol=1e-5)


def test_derived_normals_and_depth_agree_with_the_pack_conversions():
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.structure.structural_data import StructuralShapesData, depth_from_far, normals_from_depth

    maps = pytest.importorskip("dagfusion.nodes.structure.maps")
    depth = torch.rand(2, 1, 9, 7, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(normals_from_depth(depth, 0.5), maps.normals_from_depth(depth, 0.5))
    distance = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(5)) * 0.5 + 0.5
    torch.testing.assert_close(depth_from_far(distance, 0.5), maps.depth_from_distance(distance, 0.5, 1.0))
    try:
        solid = ShapesDataset(objects=2, resolution=32, seed=0, style="solid")
    except TypeError:
        pytest.skip("the shapes dataset has no solid style")
    raw = StructuralShapesData(solid).examples(0, 2).raw
    assert torch.equal(raw.normal, raw.source.rendered.normal)  # the renderer's own normals
    assert raw.depth.max() <= 1 and raw.depth[raw.source.rendered.mask[:, :1] > 0.99].min() > 0


def test_an_rgb_only_model_samples_when_depth_is_not_required(parts):
    """The RGB-only baseline of the joint-vs-RGB comparison is built and sampled the same way."""
    from dagfusion import NodeInputError
    from dagfusion.nodes.structure.structural import sample_structural, structural_from_unet

    rgb_only = structural_from_unet(parts["model"], ("rgb",), 2)
    out = sample_structural(None, rgb_only, parts["conditioning"], parts["vae"], width=32, height=32, steps=2,
                            layout=torch.zeros(1, 2, 32, 32), require_depth=False)
    assert out["image"].shape == (1, 3, 32, 32) and out["depth"] is None and out["normal"] is None
    with pytest.raises(NodeInputError, match="rgb and depth"):
        sample_structural(None, rgb_only, parts["conditioning"], parts["vae"], width=32, height=32, steps=2)
