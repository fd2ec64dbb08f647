"""DGQ activation quantization: grouped ranges, the log attention quantizer, the patch and the node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dagfusion import NodeInputError
from dagfusion.nodes.diffusion.sampling import sample
from dagfusion.nodes.quant import backend as backends
from dagfusion.nodes.quant.activation import (
    ActivationQuantPatch,
    attention_modules,
    calibrate_activations,
    fit_groups,
    interval_bounds,
    interval_of,
    log_quantize,
    quantize_grouped,
    split_timesteps,
)
from dagfusion.nodes.quant.activation_nodes import (
    TORCH_RAN,
    activation_quant,
    check_activation,
)
from dagfusion.nodes.quant.calibration import record_calls
from dagfusion.nodes.quant.patch import DEFAULT_KEEP, DEFAULT_KEEP_TEXT, quantize_module
from dagfusion.testing import NodeCallContext
from dagfusion.testing import models as tiny

STEPS = 4


@pytest.fixture(scope="module")
def handles() -> dict[str, Any]:
    return tiny.sd_handles()


@pytest.fixture(scope="module")
def calls(handles: dict[str, Any]) -> list[Any]:
    return record_calls(handles["model"], handles["conditioning"], handles["latent"], steps=STEPS, count=STEPS,
                        guidance_scale=4.0, seed=0)


def _spec(handles: dict[str, Any], calls: list[Any], **options: Any) -> Any:
    model = handles["model"]
    with torch.no_grad(), model.use(model.denoiser):
        return calibrate_activations(model.denoiser, calls, min_params=0, **options)


def _sample(model: Any, handles: dict[str, Any]) -> Any:
    return sample(model, handles["conditioning"], handles["latent"], steps=STEPS, guidance_scale=4.0, seed=0).samples


def _relative(x: Any, y: Any) -> float:
    return float((x - y).norm() / y.norm())


# --- the maths --------------------------------------------------------------------------------


def _ranges(x: Any, groups: int) -> Any:
    flat = x.reshape(-1, x.shape[-1])
    tokens = x.amin(dim=(0, 2)), x.amax(dim=(0, 2))
    return fit_groups(flat.amin(dim=0), flat.amax(dim=0), groups, *tokens)


def test_outlier_channels_get_their_own_groups_and_a_smaller_error_than_per_tensor() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 64, generator=gen)
    x[..., 5] *= 60.0
    x[..., 40] += 80.0
    grouped, per_tensor = _ranges(x, 8), _ranges(x, 1)
    assert grouped.axis == "channel" and per_tensor.axis == "tensor"
    assert grouped.labels[5] != grouped.labels[0] and grouped.labels[40] != grouped.labels[0]
    error_grouped = _relative(quantize_grouped(x, grouped, 8, -1), x)
    error_tensor = _relative(quantize_grouped(x, per_tensor, 8, -1), x)
    assert error_grouped < error_tensor / 5


def test_an_outlier_token_groups_by_tokens() -> None:
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    x[:, 0] += 100.0  # a start token far above the others, in every channel
    ranges = _ranges(x, 4)
    assert ranges.axis == "token" and ranges.labels[0] != ranges.labels[1]
    assert _relative(quantize_grouped(x, ranges, 8, -1), x) < _relative(quantize_grouped(x, _ranges(x, 1), 8, -1), x)


def test_a_conv_input_is_grouped_by_channel_and_another_token_count_falls_back() -> None:
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(2))
    x[:, 3] *= 50.0
    ranges = fit_groups(x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3)), 4)
    out = quantize_grouped(x, ranges, 8, 1)
    assert out.shape == x.shape and _relative(out, x) < 0.01
    token_ranges = fit_groups(torch.zeros(3) - 1, torch.ones(3), 2, torch.tensor([-1.0, -50.0]), torch.tensor([1.0, 50.0]))
    assert token_ranges.axis == "token"
    y = torch.randn(1, 5, 3)  # 5 tokens, calibrated on 2: the union range, no error
    assert torch.allclose(quantize_grouped(y, token_ranges, 8, -1), y, atol=0.5)


def test_the_log_quantizer_keeps_the_start_token_exact_and_is_prompt_specific() -> None:
    logits = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(3))
    logits[..., 0] += 4.0  # the start-token peak
    probs = logits.softmax(dim=-1)
    out = log_quantize(probs, 8, keep_first=True)
    assert torch.equal(out[..., 0], probs[..., 0])
    rest, got = probs[..., 1:], out[..., 1:]
    ratio = got / rest
    assert float(ratio.min()) >= 2**-0.5 - 1e-6 and float(ratio.max()) <= 2**0.5 + 1e-6  # nearest power of two
    # each prompt's scale is its own maximum: another row's values do not change it
    scaled = probs.clone()
    scaled[1, ..., 1:] *= 0.01
    assert torch.equal(log_quantize(scaled, 8, keep_first=True)[0], out[0])
    # without the exception the peak is quantized too
    assert not torch.equal(log_quantize(probs, 3)[..., 0], probs[..., 0])


# --- the patch --------------------------------------------------------------------------------


def test_w8a8_stays_close_to_fp32_and_groups_beat_per_tensor(handles: dict[str, Any], calls: list[Any]) -> None:
    # calibrated on the run it is compared on (held-out prompts may exceed tight group ranges: see margin)
    model = handles["model"]
    reference = _sample(model, handles)
    grouped = _sample(model.with_patch(ActivationQuantPatch(_spec(handles, calls, attention="uniform"))), handles)
    per_tensor = _sample(model.with_patch(ActivationQuantPatch(_spec(handles, calls, method="per_tensor"))), handles)
    assert _relative(grouped, reference) < 0.05
    assert _relative(grouped, reference) < _relative(per_tensor, reference)


def test_the_patch_composes_with_weight_quantization_and_leaves_the_model_unchanged(
    handles: dict[str, Any], calls: list[Any]
) -> None:
    model = handles["model"]
    unet = model.denoiser
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    processors = {name: attn.processor for name, attn in attention_modules(unet).items()}
    assert processors  # the tiny UNet has attention the patch replaces
    weights = model.with_patch(quantize_module(unet, "int8", min_params=0))
    w8 = _sample(weights, handles)
    spec = _spec(handles, calls)
    w8a8 = _sample(weights.with_patch(ActivationQuantPatch(spec)), handles)
    assert not torch.equal(w8, w8a8) and _relative(w8a8, _sample(model, handles)) < 0.1
    for key, value in unet.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(not m._forward_pre_hooks for m in unet.modules())
    assert {name: attn.processor for name, attn in attention_modules(unet).items()} == processors
    assert spec.summary()["quantized_inputs"] == len(spec.layers) > 0


# --- time-step intervals ----------------------------------------------------------------------


def test_timesteps_split_in_sampling_order_into_near_equal_runs_and_each_finds_its_own() -> None:
    values = [float(t) for t in range(0, 1000, 100)] * 2  # ten distinct, each seen twice
    runs = split_timesteps(values, 3)
    assert runs == ((900.0, 800.0, 700.0, 600.0), (500.0, 400.0, 300.0), (200.0, 100.0, 0.0))
    bounds = interval_bounds(runs)
    assert bounds == (550.0, 250.0)
    for index, run in enumerate(runs):
        assert all(interval_of(t, bounds) == index for t in run)
    assert interval_of(999.0, bounds) == 0 and interval_of(-5.0, bounds) == 2 and interval_of(549.0, bounds) == 1
    assert split_timesteps([10.0, 20.0], 5) == ((20.0,), (10.0,))  # no more runs than distinct timesteps
    with pytest.raises(ValueError, match="input 'intervals'"):
        split_timesteps(values, 0)


def test_ranges_of_their_own_per_step_bring_low_bit_activations_closer_to_fp32(
    handles: dict[str, Any], calls: list[Any]
) -> None:
    model = handles["model"]
    reference = _sample(model, handles)
    distinct = len({c.timestep_value for c in calls})  # the tiny model's sampler repeats a timestep
    one_set = _spec(handles, calls, method="per_tensor", bits=5)
    per_step = _spec(handles, calls, method="per_tensor", bits=5, intervals=STEPS)
    assert len(per_step.intervals) == distinct > 1 and not one_set.intervals
    assert [len(i.timesteps) for i in per_step.intervals] == [1] * distinct
    assert per_step.summary()["timestep_intervals"][0][0] > per_step.summary()["timestep_intervals"][-1][0]
    assert ActivationQuantPatch(per_step).key != ActivationQuantPatch(one_set).key
    # the all-step ranges are the one-set spec's: only the per-step ranges differ
    assert all(torch.equal(per_step.layers[n].high, one_set.layers[n].high) for n in one_set.layers)
    error_one = _relative(_sample(model.with_patch(ActivationQuantPatch(one_set)), handles), reference)
    error_per_step = _relative(_sample(model.with_patch(ActivationQuantPatch(per_step)), handles), reference)
    assert error_per_step < 0.8 * error_one


def test_a_call_outside_a_sampling_run_uses_the_all_step_ranges(handles: dict[str, Any], calls: list[Any]) -> None:
    from dagfusion.model import family_for

    model = handles["model"]
    unet = model.denoiser
    per_step = _spec(handles, calls, method="per_tensor", bits=5, intervals=STEPS)
    one_set = _spec(handles, calls, method="per_tensor", bits=5)
    call = calls[-1]
    outputs = []
    for spec in (per_step, one_set):
        with torch.no_grad(), model.use(unet), ActivationQuantPatch(spec).apply(unet):
            outputs.append(family_for(unet).call(unet, call.sample, call.timestep, dict(call.kwargs)))
    assert torch.equal(outputs[0], outputs[1])


# --- the node ---------------------------------------------------------------------------------


def _run(ctx: Any, handles: dict[str, Any], **changes: Any) -> dict[str, Any]:
    inputs = {"model": handles["model"], "conditioning": handles["conditioning"], "latent": handles["latent"],
              "sampler": "default", "steps": 3, "calibration_steps": 2, "guidance_scale": 4.0, "seed": 1, "bits": 8,
              "method": "dgq", "groups": 8, "attention": "auto", "start_token": "auto", "margin": 0.0,
              "keep": DEFAULT_KEEP_TEXT, "min_params": 0, "backend": "torch", "intervals": 1}
    inputs.update(changes)
    return activation_quant.fn(ctx, **inputs)


def test_the_node_returns_a_patched_model_and_says_which_backend_ran(handles: dict[str, Any], tmp_path: Path) -> None:
    ctx = NodeCallContext(tmp_path)
    out = _run(ctx, handles)
    model = out["model"]
    assert out["report"]["backend"] == TORCH_RAN and out["report"]["attention"] == "log"
    assert [type(p) for p in model.patches] == [ActivationQuantPatch] and handles["model"].patches == ()
    again = _run(ctx, {**handles, "model": model}, method="per_tensor")
    assert len(again["model"].patches) == 1 and again["report"]["groups"] == 1
    kept = out["report"]["kept_inputs"]
    assert "conv_in" in kept and "conv_out" in kept and any(p in DEFAULT_KEEP for p in ("conv_in", "conv_out"))


def test_bad_inputs_give_errors_naming_the_input(handles: dict[str, Any], tmp_path: Path) -> None:
    problems = list(check_activation({"backend": "torchao", "bits": 6}))
    assert [p.input for p in problems] == ["backend"]
    problems = list(check_activation({"start_token": "on", "attention": "uniform", "method": "dgq"}))
    assert [p.input for p in problems] == ["start_token"]
    assert not list(check_activation({"start_token": "on", "attention": "auto", "method": "dgq", "backend": "auto", "bits": 8}))
    problems = list(check_activation({"intervals": 5, "calibration_steps": 4}))
    assert [p.input for p in problems] == ["intervals"] and "calibration_steps" in problems[0].message
    assert not list(check_activation({"intervals": 4, "calibration_steps": 4}))
    ctx = NodeCallContext(tmp_path)
    with pytest.raises(NodeInputError) as error:
        _run(ctx, handles, backend="torchao", bits=4)
    assert error.value.input == "backend"
    if not backends.torchao_available():
        with pytest.raises(NodeInputError) as error:
            _run(ctx, handles, backend="torchao")
        assert error.value.input == "backend" and "pip install" in str(error.value)
    with pytest.raises(ValueError, match="input 'method'"):
        calibrate_activations(handles["model"].denoiser, [object()], method="nope")


def test_the_torchao_backend_returns_a_copy_and_says_so(
    handles: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import copy

    from dagfusion.nodes.quant.activation_nodes import TORCHAO_RAN

    if not (backends.torchao_available() and torch.cuda.is_available()):  # the plumbing, with a stand-in for the kernels
        monkeypatch.setattr(backends, "torchao_available", lambda: True)
        monkeypatch.setattr(backends, "torchao_w8a8", lambda module, layers: copy.deepcopy(module))
    weights = handles["model"].with_patch(quantize_module(handles["model"].denoiser, "int8", min_params=0))
    out = _run(NodeCallContext(tmp_path), {**handles, "model": weights}, backend="torchao")
    assert out["report"]["backend"] == TORCHAO_RAN and out["report"]["quantized_linear_layers"] > 0
    model = out["model"]
    assert model.denoiser is not handles["model"].denoiser and model.patches == ()
    assert str(model.info.get("quantization")) == "torchao:w8a8"
