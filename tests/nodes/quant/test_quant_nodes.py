"""The quantization nodes: outputs, errors, backends, and a save → load workflow through the engine."""

from __future__ import annotations

import copy
import types
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dagfusion import NodeInputError
from dagfusion.model import FunctionPatch, ModelHandle
from dagfusion.nodes.quant import backend as backends
from dagfusion.nodes.quant.formats import QuantSpec
from dagfusion.nodes.quant.nodes import load_quantized, save_quantized, weight_only
from dagfusion.nodes.quant.patch import DEFAULT_KEEP_TEXT, WeightQuantPatch
from dagfusion.testing import NodeCallContext, make_settings, models as tiny, run_workflow

HAS_TORCHAO = backends.torchao_available()
HAS_CUDA = torch.cuda.is_available()


def _quantize(model: Any, ctx: Any, **changes: Any) -> dict[str, Any]:
    inputs = {"model": model, "format": "int8", "group_size": 64, "keep": DEFAULT_KEEP_TEXT, "min_params": 1024,
              "backend": "torch"}
    inputs.update(changes)
    return weight_only.fn(ctx, **inputs)


@pytest.fixture(scope="module")
def handles() -> dict[str, Any]:
    return tiny.sd_handles()


def test_weight_only_returns_a_new_handle_bits_and_report(handles: dict[str, Any], tmp_path: Path) -> None:
    model = handles["model"]
    ctx = NodeCallContext(tmp_path)
    out = _quantize(model, ctx, format="int4", group_size=32)
    quantized = out["model"]
    assert model.patches == () and quantized.denoiser is model.denoiser
    (patch,) = quantized.patches
    assert isinstance(patch, WeightQuantPatch) and patch.settings["spec"]["group_size"] == 32
    assert 4.0 < out["average_bits"] < 5.0
    assert out["report"]["average_bits"] == out["average_bits"] and out["report"]["format"] == "int4"
    assert ctx.steps and ctx.steps[-1][0] == ctx.steps[-1][1] == len(patch.layers)
    # group_size only applies to int4: int8 stays per channel.
    int8 = _quantize(model, ctx, format="int8", group_size=32)["model"].patches[0]
    assert int8.settings["spec"] == QuantSpec.parse("int8").to_dict()


def test_quantizing_again_replaces_the_quantization_but_keeps_other_patches(handles: dict[str, Any], tmp_path: Path) -> None:
    ctx = NodeCallContext(tmp_path)
    other = FunctionPatch(lambda call, forward: forward(call), key="test.identity")
    first = _quantize(handles["model"].with_patch(other), ctx, format="int8")["model"]
    second = _quantize(first, ctx, format="int4")["model"]
    assert second.patches[0] is other
    assert [p.settings["format"] for p in second.patches[1:]] == ["int4"]


def test_a_model_that_is_not_a_diffusers_denoiser_is_refused(tmp_path: Path) -> None:
    model = ModelHandle.from_module(torch.nn.Linear(4, 4))
    with pytest.raises(NodeInputError, match="input 'model': expected a diffusers denoiser.*got a Linear") as info:
        _quantize(model, NodeCallContext(tmp_path))
    assert info.value.input == "model"
    with pytest.raises(NodeInputError, match="input 'model'.*got a Linear") as info:
        load_quantized.fn(NodeCallContext(tmp_path), model=model, path=str(tmp_path / "x.safetensors"))
    assert info.value.input == "model"


def test_save_needs_a_quantized_model(handles: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(NodeInputError, match="input 'model': expected a model quantized by .*WeightOnly.*got a model without") as info:
        save_quantized.fn(NodeCallContext(tmp_path), model=handles["model"], filename="q.safetensors")
    assert info.value.input == "model"


def test_save_and_load_nodes_sample_identically(handles: dict[str, Any], tmp_path: Path) -> None:
    from dagfusion.nodes.diffusion.sampling import sample

    ctx = NodeCallContext(tmp_path)
    quantized = _quantize(handles["model"], ctx, format="int4")["model"]
    saved = save_quantized.fn(ctx, model=quantized, filename="models/q.safetensors")
    assert Path(saved["path"]) == tmp_path / "models" / "q.safetensors"
    assert saved["bytes"] == Path(saved["path"]).stat().st_size
    loaded = load_quantized.fn(ctx, model=handles["model"], path=saved["path"])
    assert loaded.patches[0].key == quantized.patches[0].key
    kwargs = {"steps": 2, "guidance_scale": 2.0, "seed": 5}
    a = sample(quantized, handles["conditioning"], handles["latent"], **kwargs).samples
    b = sample(loaded, handles["conditioning"], handles["latent"], **kwargs).samples
    assert torch.equal(a, b)


def test_backend_choice() -> None:
    int8, int4 = QuantSpec.parse("int8"), QuantSpec.parse("int4")
    assert backends.resolve_backend("auto", "cpu", int8) == "torch"
    assert backends.resolve_backend("torch", "cuda", int8) == "torch"
    assert backends.resolve_backend("auto", "cuda", int4) == "torch"  # torchao is used for int8/fp8 only
    assert backends.resolve_backend("auto", "cuda", int8) == ("torchao" if HAS_TORCHAO else "torch")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve_backend("tensorrt", "cpu", int8)
    with pytest.raises(ValueError, match="use backend 'torch'"):
        backends.resolve_backend("torchao", "cuda", int4)


@pytest.mark.skipif(HAS_TORCHAO, reason="torchao is installed")
def test_asking_for_torchao_without_it_says_how_to_install(handles: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ImportError, match=r"pip install dagfusion\[gpu\]"):
        _quantize(handles["model"], NodeCallContext(tmp_path), backend="torchao")


def test_the_torchao_path_quantizes_linear_layers_of_a_copy(
    handles: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plumbing of the torchao backend, with a stand-in for torchao's public API (runs on CPU)."""
    import importlib.machinery
    import sys

    calls: list[tuple[Any, Any, list[str]]] = []

    class Int8WeightOnlyConfig:
        pass

    class Float8WeightOnlyConfig:
        def __init__(self, weight_dtype: Any = None) -> None:
            self.weight_dtype = weight_dtype

    def quantize_(model: Any, config: Any, filter_fn: Any = None) -> None:
        chosen = [name for name, layer in model.named_modules() if filter_fn(layer, name)]
        calls.append((model, config, chosen))
        with torch.no_grad():
            for name in chosen:
                model.get_submodule(name).weight.mul_(0.5)  # in place, as torchao converts weights

    fake = types.ModuleType("torchao")
    fake.__spec__ = importlib.machinery.ModuleSpec("torchao", None)
    quantization = types.ModuleType("torchao.quantization")
    quantization.quantize_ = quantize_
    quantization.Int8WeightOnlyConfig = Int8WeightOnlyConfig
    quantization.Float8WeightOnlyConfig = Float8WeightOnlyConfig
    fake.quantization = quantization
    monkeypatch.setitem(sys.modules, "torchao", fake)
    monkeypatch.setitem(sys.modules, "torchao.quantization", quantization)

    model = handles["model"]
    unet = model.denoiser
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    out = _quantize(model, NodeCallContext(tmp_path), format="fp8_e4m3", backend="torchao")
    (copied, config, chosen), = calls
    assert copied is out["model"].denoiser and copied is not unet
    assert isinstance(config, Float8WeightOnlyConfig) and config.weight_dtype == torch.float8_e4m3fn
    assert chosen and all(isinstance(unet.get_submodule(n), torch.nn.Linear) for n in chosen)
    assert "time_embedding.linear_1" not in chosen  # kept by the default patterns
    assert all(torch.equal(p.detach(), before[n]) for n, p in unet.named_parameters())  # the shared model is untouched
    quantized = out["model"]
    assert quantized.patches == () and quantized.info["quantization"] == "torchao:fp8_e4m3"
    assert quantized.__dagfusion_fingerprint__() != model.__dagfusion_fingerprint__()
    report = out["report"]
    assert report["backend"] == "torchao" and report["quantized_layers"] == len(chosen)
    assert "Linear layers only" in report["layers"]["down_blocks.0.resnets.0.conv1"]["kept"]
    assert 8.0 < out["average_bits"] < 32.0  # the fp32 Conv layers stay fp32 here
    with pytest.raises(NodeInputError, match="already quantized by torchao"):
        _quantize(quantized, NodeCallContext(tmp_path), format="int8", backend="torch")


@pytest.mark.skipif(not (HAS_CUDA and HAS_TORCHAO), reason="needs CUDA and torchao")
@pytest.mark.parametrize("format", ["int8", "fp8_e4m3"])
def test_torchao_quantizes_a_copy_on_cuda(handles: dict[str, Any], tmp_path: Path, format: str) -> None:
    if format == "fp8_e4m3" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 weights need compute capability 8.9 or newer")
    unet = copy.deepcopy(handles["model"].denoiser).to("cuda", torch.bfloat16)
    model = ModelHandle.from_module(unet, vae_scale_factor=2)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    out = _quantize(model, NodeCallContext(tmp_path), format=format, backend="auto")
    quantized = out["model"]
    assert quantized.denoiser is not unet and quantized.patches == ()
    assert quantized.info["quantization"] == f"torchao:{format}"
    assert out["report"]["backend"] == "torchao" and 8.0 < out["average_bits"] < 16.0
    assert all(torch.equal(p.detach(), before[n]) for n, p in unet.named_parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g).to("cuda", torch.bfloat16)
    context = torch.randn(1, 5, 32, generator=g).to("cuda", torch.bfloat16)
    t = torch.tensor([400], device="cuda")
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=context).sample.float()
        got = quantized.denoiser(x, t, encoder_hidden_states=context).sample.float()
    assert float((got - ref).abs().sum() / ref.abs().sum()) < 0.15
    with pytest.raises(NodeInputError, match="without a weight-quantization patch"):
        save_quantized.fn(NodeCallContext(tmp_path), model=quantized, filename="q.safetensors")


def test_workflow_quantize_save_then_load(tmp_path: Path) -> None:
    folder = tiny.write_model("sd", tmp_path / "tiny-sd")
    settings = make_settings(tmp_path)
    common = f"""
format_version: 1
nodes:
  load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", device: cpu, dtype: fp32}}}}
  text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: a red circle}}}}
  latent: {{type: dagfusion.latent.EmptyLatent, inputs: {{model: {{from: load.model}}, width: 32, height: 32}}}}
"""
    sampler = "{type: dagfusion.sampling.Sample, inputs: {model: {from: %s}, conditioning: {from: text.conditioning}, latent: {from: latent.latent}, steps: 2, seed: 1}}"
    first = run_workflow(
        common
        + "  quant: {type: dagfusion.quant.WeightOnly, inputs: {model: {from: load.model}, format: int4}}\n"
        + "  save: {type: dagfusion.quant.Save, inputs: {model: {from: quant.model}, filename: q.safetensors}}\n"
        + "  sample: " + sampler % "quant.model" + "\n",
        settings=settings, out=tmp_path / "run1",
    )
    path = first.output("save.path")
    assert Path(path).is_file() and first.output("save.bytes") == Path(path).stat().st_size
    assert 4.0 < first.output("quant.average_bits") < 5.0
    # Nominal and file bits: the file's bits (header and index included) are what WeightOnly
    # predicted, a little above the nominal ones; Save reports both.
    params = sum(p.numel() for p in first.output("load.model").denoiser.parameters())
    assert first.output("save.file_bits") == first.output("save.bytes") * 8 / params
    assert first.output("quant.file_bits") == first.output("save.file_bits")
    assert first.output("quant.report")["file_bytes"] == first.output("save.bytes")
    assert first.output("quant.average_bits") < first.output("quant.file_bits") < first.output("quant.average_bits") + 0.5
    assert first.output("save.average_bits") == first.output("quant.average_bits")
    second = run_workflow(
        common
        + f'  qload: {{type: dagfusion.quant.Load, inputs: {{model: {{from: load.model}}, path: "{path}"}}}}\n'
        + "  sample: " + sampler % "qload.model" + "\n",
        settings=settings, out=tmp_path / "run2",
    )
    assert torch.equal(first.output("sample.latent").samples, second.output("sample.latent").samples)
