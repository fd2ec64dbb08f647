"""ControlNet nodes through the engine: load (folder, single file, shipped configs), save round
trips, from-UNet, and the bad-input errors (validation problems and NodeInputError)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


def _run(engine, text: str, out: Path, *, ok: bool = True):
    from dagfusion.workflow import load_workflow

    result = engine.run(load_workflow("format_version: 1\n" + text, text=True), out=out)
    if ok:
        assert result.ok, {k: str(e.original) for k, e in result.errors.items()}
    return result


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from dagfusion.nodes.structure.controlnet import tiny_controlnet
    from dagfusion.nodes.structure.controlnet_model import save_folder, save_single_file
    from dagfusion.testing import models as tiny

    root = tmp_path_factory.mktemp("cn")
    handle = tiny_controlnet()
    sd = tiny.write_model("sd", root / "tiny-sd")
    folder = save_folder(handle, root / "cn-folder")
    single = save_single_file(handle, root / "cn.safetensors")
    # a single file without dagfusion metadata: read through from_single_file with a config folder
    from safetensors.torch import save_file

    plain = root / "cn-plain.safetensors"
    save_file({k: v.contiguous() for k, v in handle.module.state_dict().items()}, str(plain))
    return {"root": root, "sd": sd, "folder": folder, "single": single, "plain": plain, "handle": handle}


@pytest.fixture
def engine(files, tmp_path):
    from dagfusion import Engine, Settings
    from dagfusion.registry import Registry

    settings = Settings(output_dir=tmp_path / "outputs", cache_dir=tmp_path / "cache",
                        read_dirs=(files["root"], tmp_path), device="cpu", source="tests")
    return Engine(Registry.from_plugins(load_entrypoints=False, environ={}), settings)


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("which", ["folder", "single", "plain"])
def test_load_round_trips_exactly(which, files, engine, tmp_path):
    extra = f', config: "{files["folder"]}"' if which == "plain" else ""
    result = _run(engine, f"""
nodes:
  cn: {{type: dagfusion.structure.LoadControlNet, inputs: {{path: "{files[which]}", dtype: fp32, device: cpu{extra}}}}}
""", tmp_path / "run")
    handle = result.output("cn.control_net")
    _same_weights(handle.module, files["handle"].module)
    assert handle.info["cross_attention_dim"] == 32 and handle.conditioning_channels == 3


def test_save_then_load_both_formats(files, engine, tmp_path):
    result = _run(engine, f"""
nodes:
  cn: {{type: dagfusion.structure.LoadControlNet, inputs: {{path: "{files['folder']}", dtype: fp32, device: cpu}}}}
  a: {{type: dagfusion.structure.SaveControlNet, inputs: {{control_net: {{from: cn.control_net}}, filename: saved, format: diffusers}}}}
  b: {{type: dagfusion.structure.SaveControlNet, inputs: {{control_net: {{from: cn.control_net}}, filename: saved.safetensors, format: safetensors}}}}
""", tmp_path / "run")
    from dagfusion.nodes.structure.controlnet_model import METADATA_KEY, load_module, read_single_file

    folder, single = Path(result.output("a.path")), Path(result.output("b.path"))
    assert (folder / "config.json").is_file()
    _, metadata = read_single_file(single)
    assert json.loads(metadata[METADATA_KEY])["config"]["cross_attention_dim"] == 32
    for path in (folder, single):
        _same_weights(load_module(path, architecture="auto", config=None, dtype="fp32", device="cpu"),
                      files["handle"].module)


def test_shipped_single_file_configs_describe_sd15_and_sd21():
    from dagfusion.nodes.structure.controlnet_model import ARCHITECTURES, CONFIGS
    from diffusers import ControlNetModel

    for arch, width in ARCHITECTURES.items():
        config = ControlNetModel.load_config(str(CONFIGS / arch))
        assert config["cross_attention_dim"] == width
        assert config["block_out_channels"] == [320, 640, 1280, 1280]


def test_apply_through_the_engine_changes_the_sample(files, engine, tmp_path):
    text = f"""
nodes:
  load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{files['sd']}", dtype: fp32, device: cpu}}}}
  cn: {{type: dagfusion.structure.LoadControlNet, inputs: {{path: "{files['folder']}", dtype: fp32, device: cpu}}}}
  noise: {{type: dagfusion.tensor.Noise, inputs: {{seed: 1, height: 32, width: 32, distribution: uniform}}}}
  text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: a red fox}}}}
  latent: {{type: dagfusion.latent.EmptyLatent, inputs: {{model: {{from: load.model}}, width: 32, height: 32}}}}
  apply: {{type: dagfusion.structure.ApplyControlNet, inputs: {{model: {{from: load.model}}, control_net: {{from: cn.control_net}}, control: {{from: noise.tensor}}, strength: 1.0}}}}
  plain: {{type: dagfusion.sampling.Sample, inputs: {{model: {{from: load.model}}, conditioning: {{from: text.conditioning}}, latent: {{from: latent.latent}}, steps: 2, guidance_scale: 3.0}}}}
  controlled: {{type: dagfusion.sampling.Sample, inputs: {{model: {{from: apply.model}}, conditioning: {{from: text.conditioning}}, latent: {{from: latent.latent}}, steps: 2, guidance_scale: 3.0}}}}
"""
    result = _run(engine, text, tmp_path / "run")
    a, b = result.output("plain.latent").samples, result.output("controlled.latent").samples
    assert (a - b).abs().max() > 1e-4


def _apply_call(tmp_path, **inputs):
    from types import SimpleNamespace

    from dagfusion.nodes.structure.controlnet import apply_controlnet

    ctx = SimpleNamespace(settings=SimpleNamespace(max_image_pixels=inputs.pop("max_pixels", 64_000_000)))
    values = {"image": None, "depth": None, "normal": None, "mask": None, "control": None, "strength": 1.0,
              "start": 0.0, "end": 1.0, "guess_mode": False, **inputs}
    return apply_controlnet.fn(ctx, **values)


@pytest.fixture
def tiny_parts():
    from dagfusion.nodes.structure.controlnet import tiny_controlnet
    from dagfusion.testing import models as tiny

    return tiny.sd_handles()["model"], tiny_controlnet()


def test_wrong_channel_count_names_expected_and_got(tiny_parts, tmp_path):
    from dagfusion import NodeInputError

    model, cn = tiny_parts
    with pytest.raises(NodeInputError, match=r"takes 3 conditioning channels, got 5 \(image \(3\) \+ control \(2\)\)"):
        _apply_call(tmp_path, model=model, control_net=cn, image=torch.rand(1, 3, 32, 32), control=torch.rand(1, 2, 32, 32))
    with pytest.raises(NodeInputError, match="a DEPTH map has 1 channel, got 3"):
        _apply_call(tmp_path, model=model, control_net=cn, depth=torch.rand(1, 3, 32, 32))
    with pytest.raises(NodeInputError, match="give a control map"):
        _apply_call(tmp_path, model=model, control_net=cn)
    with pytest.raises(NodeInputError, match="expected a tensor"):
        _apply_call(tmp_path, model=model, control_net=cn, image="picture.png")


def test_depth_is_expanded_and_normals_shown(tiny_parts, tmp_path):
    model, cn = tiny_parts
    depth = torch.rand(1, 1, 32, 32)
    patched = _apply_call(tmp_path, model=model, control_net=cn, depth=depth)
    control = patched.patches[-1].control
    assert control.shape == (1, 3, 32, 32) and torch.equal(control[:, 1], depth[:, 0])
    from dagfusion.nodes.structure.controlnet_maps import stack_control

    normal = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert torch.equal(stack_control({"normal": normal}, 3)[0, :, 0, 0], torch.tensor([0.5, 0.5, 1.0]))


def test_controlnet_for_another_unet_is_refused(tiny_parts, tmp_path):
    from dagfusion import NodeInputError
    from dagfusion.nodes.structure.controlnet_model import ControlNetHandle

    model, cn = tiny_parts
    other = ControlNetHandle(cn.ref, {**cn.info, "cross_attention_dim": 768, "block_out_channels": [320, 640]})
    with pytest.raises(NodeInputError, match=r"cross-attention width 768, the UNet has 32.*block_out_channels \[320, 640\]"):
        _apply_call(tmp_path, model=model, control_net=other, image=torch.rand(1, 3, 32, 32))


def test_absurd_sizes_are_refused(tiny_parts, tmp_path):
    from dagfusion import NodeInputError
    from dagfusion.nodes.structure.controlnet_maps import ControlMapError, fit_control

    model, cn = tiny_parts
    with pytest.raises(NodeInputError, match="more than the limit"):
        _apply_call(tmp_path, model=model, control_net=cn, image=torch.rand(1, 3, 64, 64), max_pixels=1000)
    with pytest.raises(ControlMapError, match="aspect ratio"):
        fit_control(torch.rand(1, 3, 8, 200), 32, 32, 10**8)
    assert fit_control(torch.rand(1, 3, 48, 48), 32, 32, 10**8).shape == (1, 3, 32, 32)


def test_start_after_end_is_a_validation_problem(files, engine, tmp_path):
    from dagfusion import ValidationError

    with pytest.raises(ValidationError, match="end"):
        _run(engine, f"""
nodes:
  load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{files['sd']}", dtype: fp32, device: cpu}}}}
  cn: {{type: dagfusion.structure.LoadControlNet, inputs: {{path: "{files['folder']}", dtype: fp32, device: cpu}}}}
  apply: {{type: dagfusion.structure.ApplyControlNet, inputs: {{model: {{from: load.model}}, control_net: {{from: cn.control_net}}, start: 0.8, end: 0.2}}}}
""", tmp_path / "run", ok=False)


def test_from_unet_is_deterministic_and_fits(tiny_parts):
    from dagfusion.nodes.structure.controlnet import controlnet_from_unet
    from dagfusion.nodes.structure.controlnet_model import fit_problems

    model, _ = tiny_parts
    a = controlnet_from_unet.fn(None, model=model, conditioning_channels=5, seed=3)
    b = controlnet_from_unet.fn(None, model=model, conditioning_channels=5, seed=3)
    assert a.__dagfusion_fingerprint__() == b.__dagfusion_fingerprint__()
    _same_weights(a.module, b.module)
    assert a.conditioning_channels == 5 and fit_problems(a.info, model.denoiser) == []
    # the encoder is the UNet's; the zero convolutions are zero
    assert torch.equal(a.module.conv_in.weight, model.denoiser.conv_in.weight)
    assert all(float(p.abs().max()) == 0 for p in a.module.controlnet_down_blocks.parameters())


def test_original_layout_files_are_recognised(tmp_path):
    from dagfusion.nodes.structure.controlnet_model import detect_single_file, read_single_file
    from safetensors.torch import save_file

    for width, arch, channels in ((768, "sd15", 3), (1024, "sd21", 1)):
        path = tmp_path / f"{arch}.safetensors"
        save_file({"control_model.input_hint_block.0.weight": torch.zeros(16, channels, 3, 3),
                   "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, width)},
                  str(path))
        assert detect_single_file(path, read_single_file(path)[0]) == (arch, channels)


def test_a_file_of_another_architecture_asks_for_a_config(files):
    from dagfusion.nodes.structure.controlnet_model import load_module

    with pytest.raises(ValueError, match="cross-attention width 32.*pass a config folder"):
        load_module(files["plain"], architecture="auto", config=None, dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match="expected a ControlNet folder or a .safetensors file"):
        load_module(files["root"] / "weights.ckpt", architecture="auto", config=None, dtype="fp32", device="cpu")
