"""The weight-quantization patch on the tiny SD UNet: isolation, accuracy, layer selection, average bits."""

from __future__ import annotations

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dagfusion.testing import models as tiny
from dagfusion.nodes.diffusion.sampling import sample
from dagfusion.nodes.quant.formats import QuantSpec
from dagfusion.nodes.quant.patch import (
    DEFAULT_KEEP,
    WeightQuantPatch,
    average_bits,
    matching_pattern,
    parse_keep,
    plan_layers,
    quantize_module,
    report,
)


@pytest.fixture(scope="module")
def handles() -> dict[str, Any]:
    return tiny.sd_handles()


@pytest.fixture(scope="module")
def unet(handles: dict[str, Any]) -> Any:
    return handles["model"].denoiser


@pytest.fixture(scope="module")
def inputs() -> tuple[Any, Any, Any]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 500]), torch.randn(2, 7, 32, generator=g)


@pytest.fixture(scope="module")
def patches(unet: Any) -> dict[str, WeightQuantPatch]:
    return {name: quantize_module(unet, name) for name in ("int8", "int4", "fp8_e4m3")}


def _forward(unet: Any, inputs: tuple[Any, Any, Any]) -> Any:
    x, t, context = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=context).sample


def _relative_l1(a: Any, b: Any) -> float:
    return float((a - b).abs().sum() / b.abs().sum())


def _snapshot(module: Any) -> dict[str, tuple[int, Any]]:
    return {name: (id(p), p.detach().clone()) for name, p in module.named_parameters()}


def test_the_patch_changes_outputs_only_inside_apply(unet: Any, inputs: Any, patches: dict[str, Any]) -> None:
    before = _snapshot(unet)
    reference = _forward(unet, inputs)
    patch = patches["int4"]
    with patch.apply(unet):
        inside = _forward(unet, inputs)
        assert unet.down_blocks[1].resnets[0].conv2.weight is not before["down_blocks.1.resnets.0.conv2.weight"][0]
    after = _forward(unet, inputs)
    assert not torch.equal(inside, reference)
    assert torch.equal(after, reference)
    for name, p in unet.named_parameters():
        ident, value = before[name]
        assert id(p) == ident, name  # the very same Parameter objects are back
        assert torch.equal(p.detach(), value), name  # bit-identical


def test_apply_restores_after_an_error(unet: Any, patches: dict[str, Any]) -> None:
    before = _snapshot(unet)
    with pytest.raises(RuntimeError, match="boom"), patches["int8"].apply(unet):
        raise RuntimeError("boom")
    assert {n: id(p) for n, p in unet.named_parameters()} == {n: v[0] for n, v in before.items()}


def test_quantizing_reads_the_shared_weights_without_changing_them(unet: Any) -> None:
    before = _snapshot(unet)
    patch = quantize_module(unet, "int4")
    assert all(torch.equal(p.detach(), before[n][1]) for n, p in unet.named_parameters())
    # The patch holds copies: no tensor shares storage with the module.
    pointers = {p.data_ptr() for p in unet.parameters()}
    assert not any(t.data_ptr() in pointers for t in patch.kept.values())


def test_accuracy_int8_close_int4_worse_but_finite(unet: Any, inputs: Any, patches: dict[str, Any]) -> None:
    reference = _forward(unet, inputs)
    errors = {}
    for name, patch in patches.items():
        with patch.apply(unet):
            out = _forward(unet, inputs)
        assert torch.isfinite(out).all(), name
        errors[name] = _relative_l1(out, reference)
    assert errors["int8"] < 0.03
    assert errors["fp8_e4m3"] < 0.15
    assert errors["int8"] < errors["fp8_e4m3"] < errors["int4"] < 0.5
    # Per-layer weight errors are recorded, and int4's are larger.
    assert set(patches["int8"].errors) == set(patches["int8"].layers)
    mean8 = sum(patches["int8"].errors.values()) / len(patches["int8"].errors)
    mean4 = sum(patches["int4"].errors.values()) / len(patches["int4"].errors)
    assert 0 < mean8 < 0.01 < mean4 < 0.2


def test_sampling_with_a_quantized_handle(handles: dict[str, Any], patches: dict[str, Any]) -> None:
    model = handles["model"]
    quantized = model.with_patch(patches["int8"])
    assert model.patches == () and quantized.denoiser is model.denoiser
    kwargs = {"steps": 2, "guidance_scale": 2.0, "seed": 3}
    plain = sample(model, handles["conditioning"], handles["latent"], **kwargs).samples
    quant = sample(quantized, handles["conditioning"], handles["latent"], **kwargs).samples
    again = sample(model, handles["conditioning"], handles["latent"], **kwargs).samples
    assert not torch.equal(plain, quant)
    assert torch.equal(plain, again)
    assert _relative_l1(quant, plain) < 0.05


def test_default_keep_patterns_and_min_params(unet: Any) -> None:
    plan = plan_layers(unet)
    assert {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"} <= set(plan.kept)
    assert "conv_in" not in plan.quantize and "down_blocks.1.attentions.0.proj_out" in plan.quantize
    everything = plan_layers(unet, keep=(), min_params=0)
    assert not everything.kept
    assert len(everything.quantize) == len(plan.quantize) + len(plan.kept)
    # min_params keeps small layers (the 64 x 32 cross-attention keys/values have 2048).
    small = plan_layers(unet, keep=(), min_params=2049)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in small.kept
    assert "fewer than min_params 2049" in small.kept["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k" in small.quantize
    assert plan_layers(unet, keep=(), min_params=10**9).quantize == ()


def test_keep_patterns_are_globs_over_module_names(unet: Any) -> None:
    assert parse_keep("conv_in, *attn2* ,,") == ("conv_in", "*attn2*")
    assert parse_keep("default, *ff*") == (*DEFAULT_KEEP, "*ff*")
    assert matching_pattern("time_embedding.linear_1", ["time_embedding"]) == "time_embedding"
    assert matching_pattern("down_blocks.1.attentions.0.proj_out", DEFAULT_KEEP) is None  # only the top-level proj_out
    assert matching_pattern("proj_out", DEFAULT_KEEP) == "proj_out"
    assert matching_pattern("transformer_blocks.0.norm1.linear", DEFAULT_KEEP) == "*norm*.linear"
    patch = quantize_module(unet, "int8", keep=parse_keep("*attn2*, mid_block"), min_params=0)
    assert patch.layers and all("attn2" not in n and not n.startswith("mid_block") for n in patch.layers)
    assert "conv_in" in patch.layers  # not in this keep list
    kept = patch.kept["mid_block.resnets.0.conv1.weight"]
    assert kept.dtype == torch.float16  # kept layers are stored in 16 bits
    assert patch.kept_layers["mid_block.resnets.0.conv1"] == "matches keep pattern 'mid_block'"


def test_other_models_keep_their_first_and_last_layers() -> None:
    pixart = tiny._cached_pipeline("pixart", 0).transformer
    plan = plan_layers(pixart, min_params=0)
    for name in ("pos_embed.proj", "proj_out", "adaln_single.linear", "caption_projection.linear_1",
                 "adaln_single.emb.timestep_embedder.linear_1"):
        assert name in plan.kept, name
    assert "transformer_blocks.0.attn1.to_q" in plan.quantize


def test_average_bits_counts_every_byte(unet: Any, patches: dict[str, Any]) -> None:
    half = copy.deepcopy(unet).half()
    assert average_bits(half) == 16.0
    assert average_bits(half, quantize_module(half, "int8", min_params=10**9)) == 16.0
    assert average_bits(unet) == 32.0
    # Nothing quantized: every parameter is kept, in 16 bits.
    assert average_bits(unet, quantize_module(unet, "int4", min_params=10**9)) == 16.0
    bits8 = average_bits(unet, patches["int8"])
    bits4 = average_bits(unet, patches["int4"])
    bits_fp8 = average_bits(unet, patches["fp8_e4m3"])
    assert 8.0 < bits8 < 9.0 and bits_fp8 == bits8
    assert 4.0 < bits4 < 5.0
    # By hand: codes + scales + zero-points of quantized weights, 16 bits for everything else.
    patch = patches["int4"]
    params = sum(p.numel() for p in unet.parameters())
    by_hand = sum(qt.nbytes for qt in patch.layers.values()) * 8 + 16 * sum(t.numel() for t in patch.kept.values())
    assert bits4 == pytest.approx(by_hand / params)
    assert patch.numel == params and patch.nbytes * 8 == pytest.approx(bits4 * params)


def test_report_lists_layers_bits_and_errors(unet: Any, patches: dict[str, Any]) -> None:
    summary = report(unet, patches["int4"])
    assert summary["format"] == "int4" and summary["group_size"] == 64 and summary["backend"] == "torch"
    assert summary["average_bits"] == average_bits(unet, patches["int4"])
    layer = summary["layers"]["down_blocks.1.resnets.0.conv2"]  # 64 x 576 as a matrix
    assert layer["bits"] == 4 and layer["group_size"] == 64 and layer["format"] == "int4"
    assert layer["bits_per_weight"] == pytest.approx(4 + 16 / 64 + 4 / 64)
    assert 0 < layer["relative_error"] < 0.2
    assert summary["layers"]["conv_in"]["kept"] == "matches keep pattern 'conv_in'"
    assert summary["layers"]["conv_in"]["bits"] == 16
    assert summary["quantized_layers"] == len(patches["int4"].layers)
    assert 0 < summary["mean_relative_error"] < 0.2


def test_keys_identify_settings_and_content(unet: Any, patches: dict[str, Any]) -> None:
    assert patches["int8"].key.startswith("dagfusion.quant.WeightOnly:")
    assert len({p.key for p in patches.values()}) == 3
    assert quantize_module(unet, "int8").key == patches["int8"].key  # deterministic
    assert quantize_module(unet, QuantSpec.parse("int4", group_size=32)).key != patches["int4"].key
    assert quantize_module(unet, "int8", min_params=0).key != patches["int8"].key


def test_a_patch_for_another_model_fails_clearly(patches: dict[str, Any]) -> None:
    pixart = tiny._cached_pipeline("pixart", 0).transformer
    with pytest.raises(ValueError, match="made for a UNet2DConditionModel.*does not fit"), patches["int8"].apply(pixart):
        pass  # pragma: no cover
