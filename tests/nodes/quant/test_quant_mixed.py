"""Mixed-precision quantization (BitsFusion): sensitivity, bit allocation under a budget, the nodes."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest

from dagfusion import NodeInputError
from dagfusion.testing import NodeCallContext

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dagfusion.model import FunctionPatch
from dagfusion.nodes.diffusion.sampling import sample
from dagfusion.nodes.quant import storage
from dagfusion.testing import models as tiny
from dagfusion.nodes.quant.mixed import (
    QuantSensitivity,
    allocate,
    choose_bits,
    load_sensitivity,
    measure_sensitivity,
    output_mse,
    parse_bits,
    quantize_allocation,
    record_calls,
    save_sensitivity,
    spec_for_bits,
    swapped_weight,
)
from dagfusion.nodes.quant.nodes import load_quantized, mixed_precision, save_quantized, sensitivity
from dagfusion.nodes.quant.patch import DEFAULT_KEEP_TEXT, WeightQuantPatch, average_bits, plan_layers, quantize_module

BITS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def handles() -> dict[str, Any]:
    return tiny.sd_handles()


@pytest.fixture(scope="module")
def latent() -> Any:
    """8 x 8 latents: a quarter of the examples' pixels keeps the many forward passes quick."""
    from dagfusion.nodes.diffusion.data import Latent

    return Latent(torch.zeros(1, 4, 8, 8))


@pytest.fixture(scope="module")
def measured(handles: dict[str, Any], latent: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Sensitivity node on the tiny SD UNet (one recorded call of two rows, four widths)."""
    ctx = NodeCallContext(tmp_path_factory.mktemp("sensitivity"))
    out = sensitivity.fn(
        ctx, model=handles["model"], conditioning=handles["conditioning"], latent=latent, sampler="euler",
        steps=4, calibration_steps=1, guidance_scale=4.0, seed=1, bits=",".join(map(str, BITS)), group_size=64,
        keep=DEFAULT_KEEP_TEXT, min_params=1024,
    )
    return {**out, "steps": ctx.steps}


@pytest.fixture(scope="module")
def eval_calls(handles: dict[str, Any], latent: Any) -> list[Any]:
    """Denoiser calls of another seed and other steps than the calibration's (to judge allocations)."""
    return record_calls(handles["model"], handles["conditioning"], latent, steps=6, count=2,
                        sampler="euler", guidance_scale=4.0, seed=7)


def _snapshot(module: Any) -> dict[str, tuple[int, Any]]:
    return {name: (id(p), p.detach().clone()) for name, p in module.named_parameters()}


def _unchanged(module: Any, before: dict[str, tuple[int, Any]]) -> bool:
    return all(id(p) == before[n][0] and torch.equal(p.detach(), before[n][1]) for n, p in module.named_parameters())


# --- sensitivity ------------------------------------------------------------------------------


def test_sensitivity_is_larger_at_fewer_bits(handles: dict[str, Any], measured: dict[str, Any]) -> None:
    sens = measured["sensitivity"]
    unet = handles["model"].denoiser
    assert isinstance(sens, QuantSensitivity) and sens.bits == BITS
    assert sens.layers == plan_layers(unet).quantize  # every quantizable layer, in module order
    assert sens.architecture == "UNet2DConditionModel" and sens.reference_power > 0
    assert sens.calibration["recorded_steps"] == [2] and sens.calibration["rows"] == 2  # the two guidance halves
    totals = [sum(row[b] for row in sens.errors.values()) for b in BITS]
    assert all(a > b for a, b in itertools.pairwise(totals)), totals
    for name, row in sens.errors.items():
        if row[1] > 1e-9 * sens.reference_power:  # a few layers of the random model barely reach the output
            assert row[1] > row[2] > row[8] >= 0, name
    monotone = sum(row[2] > row[4] > row[8] for row in sens.errors.values())
    assert monotone >= 0.9 * len(sens.errors)
    assert sens.sizes["down_blocks.1.resnets.0.conv2"] == 64 * 64 * 9
    assert measured["steps"][-1] == (len(sens.layers), len(sens.layers))
    report = json.loads(measured["report"])
    assert report["layers_measured"] == len(sens.layers) and set(report["summed_mse_by_bits"]) == {"1", "2", "4", "8"}


def test_measuring_never_changes_the_shared_weights(handles: dict[str, Any], latent: Any) -> None:
    unet = handles["model"].denoiser
    before = _snapshot(unet)
    calls = record_calls(handles["model"], handles["conditioning"], latent, steps=2, count=1, sampler="euler")
    seen: list[int] = []

    def stop(done: int, total: int) -> None:
        seen.append(done)
        if done == 3:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        measure_sensitivity(unet, calls, bits=(2,), progress=stop)
    assert seen == [1, 2, 3] and _unchanged(unet, before)
    layer = "mid_block.resnets.0.conv1"
    zeros = torch.zeros_like(unet.get_submodule(layer).weight)
    with pytest.raises(ValueError, match="boom"), swapped_weight(unet, layer, zeros):
        assert torch.equal(unet.get_submodule(layer).weight, zeros)
        raise ValueError("boom")
    assert _unchanged(unet, before)


def test_the_sensitivity_survives_json(measured: dict[str, Any], tmp_path: Path) -> None:
    sens = measured["sensitivity"]
    save_sensitivity(sens, str(tmp_path / "s.json"))
    again = load_sensitivity(str(tmp_path / "s.json"))
    assert again.errors == sens.errors and again.shapes == sens.shapes and again.bits == sens.bits
    assert again.__dagfusion_fingerprint__() == sens.__dagfusion_fingerprint__()
    with pytest.raises(ValueError, match="not a quantization sensitivity"):
        QuantSensitivity.from_dict({"format": "something else"})


def test_bit_widths_are_checked() -> None:
    assert parse_bits("8, 1,2,2") == (1, 2, 8)
    for text in ("", "0", "9", "2,x", "1.5"):
        with pytest.raises(ValueError, match="node input 'bits': expected"):
            parse_bits(text, where="node input 'bits'")
    assert spec_for_bits(3, 32).group_size == 32 and not spec_for_bits(3, 32).symmetric
    assert spec_for_bits(8, 32) == spec_for_bits(8, 0)  # wider formats: one scale per output channel


# --- allocation -------------------------------------------------------------------------------


def test_the_knapsack_is_optimal_and_never_over_budget() -> None:
    rng = random.Random(0)
    for trial in range(60):
        layers = [f"l{i}" for i in range(rng.randint(1, 5))]
        errors = {n: {b: rng.uniform(0, 10) for b in (1, 2, 4)} for n in layers}
        costs = {n: {b: b * rng.randint(1, 40) * 8 + 16 for b in (1, 2, 4)} for n in layers}
        cheapest = sum(min(c.values()) for c in costs.values())
        dearest = sum(max(c.values()) for c in costs.values())
        budget = rng.randint(cheapest, dearest)
        best = min(
            (sum(errors[n][b] for n, b in zip(layers, combo)), combo)
            for combo in itertools.product((1, 2, 4), repeat=len(layers))
            if sum(costs[n][b] for n, b in zip(layers, combo)) <= budget
        )[0]
        for resolution in (1 << 18, 3):  # exact, and rounded to 3 cells
            chosen, exact = choose_bits(errors, costs, budget, resolution=resolution)
            assert sum(costs[n][b] for n, b in chosen.items()) <= budget
            total = sum(errors[n][b] for n, b in chosen.items())
            if resolution > 3:
                assert exact and total == pytest.approx(best), trial
            else:
                assert total >= best - 1e-9
    with pytest.raises(ValueError, match="below"):
        choose_bits({"a": {1: 1.0}}, {"a": {1: 64}}, 63)


def test_allocation_meets_the_budget_counted_like_average_bits(handles: dict[str, Any], measured: dict[str, Any]) -> None:
    unet = handles["model"].denoiser
    sens = measured["sensitivity"]
    previous = None
    for target in (2.2, 3.0, 4.0, 6.5):
        allocation = allocate(unet, sens, target)
        assert allocation.average_bits <= target
        assert target - allocation.average_bits < 0.01  # the budget is used up (to a layer's granularity)
        patch = quantize_allocation(unet, sens, allocation)
        assert average_bits(unet, patch) == allocation.average_bits
        assert {n: qt.spec.bits for n, qt in patch.layers.items()} == dict(allocation.bits)
        if previous is not None:
            assert allocation.predicted_error <= previous
        previous = allocation.predicted_error
    unlimited = allocate(unet, sens, 32.0)  # every layer at its least harmful width
    assert unlimited.predicted_error == pytest.approx(sum(min(row.values()) for row in sens.errors.values()))
    assert unlimited.average_bits <= unlimited.maximum_average_bits


def test_allocation_beats_uniform_bits_at_equal_average(
    handles: dict[str, Any], measured: dict[str, Any], eval_calls: list[Any]
) -> None:
    unet = handles["model"].denoiser
    sens = measured["sensitivity"]
    for bits in (2, 4):
        uniform = quantize_module(unet, spec_for_bits(bits, 64))
        budget = average_bits(unet, uniform)
        mixed = quantize_allocation(unet, sens, allocate(unet, sens, budget))
        assert average_bits(unet, mixed) <= budget
        uniform_error, mixed_error = output_mse(unet, eval_calls, uniform), output_mse(unet, eval_calls, mixed)
        assert mixed_error < 0.7 * uniform_error, (bits, mixed_error, uniform_error)


# --- the nodes --------------------------------------------------------------------------------


def test_mixed_precision_returns_a_new_handle_and_keeps_the_input(
    handles: dict[str, Any], measured: dict[str, Any], tmp_path: Path
) -> None:
    other = FunctionPatch(lambda call, forward: forward(call), key="test.identity")
    model = handles["model"].with_patch(other)
    before = _snapshot(model.denoiser)
    ctx = NodeCallContext(tmp_path)
    out = mixed_precision.fn(ctx, model=model, sensitivity=measured["sensitivity"], target_bits=3.0)
    assert model.patches == (other,) and _unchanged(model.denoiser, before)
    quantized = out["model"]
    assert quantized.denoiser is model.denoiser and quantized.patches[0] is other
    patch = quantized.patches[1]
    assert isinstance(patch, WeightQuantPatch) and patch.settings["format"] == "mixed"
    assert patch.settings["layer_bits"] == out["bits"] and set(out["bits"].values()) <= set(BITS)
    assert out["average_bits"] <= 3.0 and out["average_bits"] == average_bits(model.denoiser, patch)
    report = out["report"]
    assert report["format"] == "mixed" and report["average_bits"] == out["average_bits"]
    allocation = report["allocation"]
    assert allocation["target_bits"] == 3.0 and allocation["exact"] and allocation["measured_on_these_weights"]
    assert sum(v["layers"] for v in allocation["bits_histogram"].values()) == len(out["bits"])
    layer = "down_blocks.1.resnets.0.conv2"
    assert report["layers"][layer]["bits"] == out["bits"][layer] and "sensitivity" in report["layers"][layer]
    assert ctx.steps[-1] == (len(out["bits"]), len(out["bits"]))


def test_mixed_precision_saves_and_loads_bit_for_bit(
    handles: dict[str, Any], measured: dict[str, Any], tmp_path: Path
) -> None:
    ctx = NodeCallContext(tmp_path)
    result = mixed_precision.fn(ctx, model=handles["model"], sensitivity=measured["sensitivity"], target_bits=2.5)
    quantized = result["model"]
    saved = save_quantized.fn(ctx, model=quantized, filename="mixed.safetensors")
    # The nominal average meets the target; the file (header and index included) is what the node said.
    assert result["average_bits"] <= 2.5 and result["file_bits"] == saved["file_bits"] > result["average_bits"]
    assert result["report"]["file_bits"] == result["file_bits"] and result["report"]["nominal_bits"] == result["average_bits"]
    loaded = load_quantized.fn(ctx, model=handles["model"], path=saved["path"])
    original, restored = quantized.patches[0], loaded.patches[0]
    assert restored.key == original.key and restored.settings == original.settings
    for name, qt in original.layers.items():
        other = restored.layers[name]
        assert other.spec == qt.spec and torch.equal(other.codes, qt.codes) and torch.equal(other.scales, qt.scales)
    assert {qt.spec.bits for qt in restored.layers.values()} == set(restored.settings["layer_bits"].values())
    assert len({qt.spec.bits for qt in restored.layers.values()}) > 1
    meta = storage.read_metadata(saved["path"])
    assert meta["settings"]["format"] == "mixed"
    kwargs = {"steps": 2, "guidance_scale": 2.0, "seed": 5, "sampler": "euler"}
    a = sample(quantized, handles["conditioning"], handles["latent"], **kwargs).samples
    b = sample(loaded, handles["conditioning"], handles["latent"], **kwargs).samples
    assert torch.equal(a, b)


def test_an_infeasible_target_names_node_input_expected_and_received(
    handles: dict[str, Any], measured: dict[str, Any], tmp_path: Path
) -> None:
    sens = measured["sensitivity"]
    lowest = allocate(handles["model"].denoiser, sens, 32.0).minimum_average_bits
    assert 1.0 < lowest < 2.0
    with pytest.raises(NodeInputError) as info:
        mixed_precision.fn(NodeCallContext(tmp_path), model=handles["model"], sensitivity=sens, target_bits=1.0)
    assert info.value.input == "target_bits"
    message = str(info.value)
    assert message.startswith("input 'target_bits': expected at least ")
    assert f"{lowest:.3f}" in message and "layers at 1 bit with scales" in message and message.endswith("got 1.0")
    assert allocate(handles["model"].denoiser, sens, lowest + 1e-9).average_bits <= lowest + 1e-9


def test_a_sensitivity_of_another_model_is_refused(measured: dict[str, Any], tmp_path: Path) -> None:
    from dagfusion.model import ModelHandle

    pixart = ModelHandle.from_module(tiny._cached_pipeline("pixart", 0).transformer, vae_scale_factor=2)
    with pytest.raises(NodeInputError, match=r"input 'sensitivity': expected a sensitivity measured on this "
                                             r"model's architecture \(PixArtTransformer2DModel.*got one measured on a "
                                             r"UNet2DConditionModel") as info:
        mixed_precision.fn(NodeCallContext(tmp_path), model=pixart, sensitivity=measured["sensitivity"], target_bits=3.0)
    assert info.value.input == "sensitivity"


def test_quantize_module_takes_a_format_per_layer(handles: dict[str, Any]) -> None:
    unet = handles["model"].denoiser
    layer = "mid_block.resnets.0.conv1"
    patch = quantize_module(unet, "int4", layer_specs={layer: spec_for_bits(2, 32)})
    assert patch.layers[layer].spec == spec_for_bits(2, 32)
    assert patch.layers["mid_block.resnets.0.conv2"].spec == spec_for_bits(4, 64)
    assert patch.settings["format"] == "mixed" and patch.settings["layer_bits"][layer] == 2
    with pytest.raises(ValueError, match=r"layer_specs names 1 layer\(s\) that are not quantized.*conv_in"):
        quantize_module(unet, "int4", layer_specs={"conv_in": spec_for_bits(2, 64)})
