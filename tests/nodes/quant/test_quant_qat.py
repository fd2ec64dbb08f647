"""Quantization-aware distillation: the fake-quantized student, the teacher switch, the objectives,
training through the Train node, freezing into a packed model and the error profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dagfusion.model import apply_patches
from dagfusion.nodes.quant.distill import QuantDistillObjective, parse_weights
from dagfusion.nodes.quant.patch import quantize_module
from dagfusion.nodes.quant.qat import QATPatch, active, freeze
from dagfusion.nodes.quant.qat_nodes import error_profile
from dagfusion.nodes.training.objectives import ModelCall, TrainBatch, TrainStep
from dagfusion.testing import make_settings, models as tiny, run_workflow


@pytest.fixture(scope="module")
def sd() -> dict[str, Any]:
    return tiny.sd_handles()


def unet_inputs(sd: dict[str, Any]) -> tuple[Any, Any, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([100, 700])
    context = sd["conditioning"].positive["encoder_hidden_states"].repeat(2, 1, 1)
    return x, t, context


def test_the_student_starts_as_the_quantized_model_and_the_teacher_is_full_precision(sd: Any) -> None:
    module = sd["model"].denoiser
    before = {k: v.clone() for k, v in module.state_dict().items()}
    quantized = quantize_module(module, "int3", min_params=64)
    patch = QATPatch(quantized, module)
    x, t, context = unet_inputs(sd)
    with torch.no_grad():
        full = module(x, t, encoder_hidden_states=context).sample
        with apply_patches([quantized], module):
            packed = module(x, t, encoder_hidden_states=context).sample
        with apply_patches([patch], module):
            student = module(x, t, encoder_hidden_states=context).sample
            assert active(module) is patch
            with patch.teacher():
                teacher = module(x, t, encoder_hidden_states=context).sample
            # Between calls the module holds its own weights (checkpoints see the full-precision model).
            assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert torch.equal(teacher, full)
    # Equal up to the 16-bit rounding of the kept parameters in the packed model.
    assert float((student - packed).abs().max()) < 1e-2 * float(packed.abs().max())
    assert float((student - full).abs().mean()) > 10 * float((student - packed).abs().mean())
    with pytest.raises(ValueError, match="no quantization-aware patch"):
        active(module)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in module.modules())


def test_freezing_an_untrained_patch_gives_back_the_same_codes(sd: Any) -> None:
    module = sd["model"].denoiser
    quantized = quantize_module(module, "int4", min_params=64)
    frozen = freeze(QATPatch(quantized, module))
    assert frozen.layers.keys() == quantized.layers.keys()
    for name, qt in quantized.layers.items():
        assert torch.equal(frozen.layers[name].codes, qt.codes), name
        assert torch.equal(frozen.layers[name].scales, qt.scales), name
    assert frozen.nbytes == quantized.nbytes and frozen.key != quantized.key


def test_gradients_reach_the_latent_weights_and_scales_only(sd: Any) -> None:
    module = sd["model"].denoiser
    quantized = quantize_module(module, "int2", min_params=64)
    for train_weights in (True, False):
        patch = QATPatch(quantized, module, train_weights=train_weights)
        offered = patch.trainable_parameters()
        assert all(name.endswith(".scale") for name in offered) != train_weights
        assert len(offered) == len(patch.layers) * (2 if train_weights else 1)
        x, t, context = unet_inputs(sd)
        module.requires_grad_(False)
        with apply_patches([patch], module):
            module(x, t, encoder_hidden_states=context).sample.square().mean().backward()
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in offered.values())
        assert all(p.grad is None for p in module.parameters())
    module.requires_grad_(True)


def _call(module: Any, sd: Any) -> ModelCall:
    from dagfusion.model import family_for

    context = sd["conditioning"].positive["encoder_hidden_states"].repeat(2, 1, 1)
    empty = torch.zeros_like(context)
    return ModelCall(module, family_for(module), {"encoder_hidden_states": context}, _null,
                     lambda: {"encoder_hidden_states": empty})


def _null() -> Any:
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("stage", ["output", "noise"])
def test_the_distillation_loss_grows_with_fewer_bits(sd: Any, stage: str) -> None:
    module = sd["model"].denoiser
    objective = QuantDistillObjective(stage=stage, guidance_min=2.0, guidance_max=6.0)
    batch = TrainBatch(torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)), ("a", "b"))
    losses = {}
    for bits in ("int8", "int2"):
        patch = QATPatch(quantize_module(module, bits, min_params=64), module)
        with apply_patches([patch], module), torch.no_grad():
            loss, values = objective.loss(_call(module, sd), batch, TrainStep(0, 1), torch.Generator().manual_seed(1))
        losses[bits] = float(loss)
    if stage == "output":
        assert 0 < losses["int8"] < losses["int2"] / 10
    else:  # the noise loss is dominated by the task itself; the quantization shows as the distance to the teacher
        assert values["to_teacher"] > 0 and losses["int2"] > 0


def test_weighted_timesteps_come_only_from_weighted_bins() -> None:
    objective = QuantDistillObjective(stage="noise", timestep_weights=(0.0, 1.0, 0.0, 3.0))
    _, t = objective.draw(torch.zeros(4000, 1), torch.Generator().manual_seed(0))
    assert bool(((t >= 250) & (t < 500) | (t >= 750)).all())
    share = float((t >= 750).float().mean())
    assert 0.7 < share < 0.8
    assert parse_weights("[1, 2.5 ,0]") == (1.0, 2.5, 0.0) and parse_weights("") == ()
    with pytest.raises(ValueError, match="not all 0"):
        parse_weights("0, 0")
    with pytest.raises(ValueError, match="stage"):
        QuantDistillObjective(stage="features")


def test_the_error_profile_bins_and_fills_gaps() -> None:
    weights = error_profile([(950.0, 0.4), (650.0, 0.2), (50.0, 0.1), (60.0, 0.3)], bins=4, train_timesteps=1000)
    # bins [0,250) mean 0.2, [250,500) empty -> nearest [0,250) (tie goes low), [500,750) 0.2, [750,1000) 0.4
    raw = [0.2, 0.2, 0.2, 0.4]
    assert weights == pytest.approx([v / (sum(raw) / 4) for v in raw])


@pytest.mark.slow
def test_distillation_through_the_train_node_then_freeze_save_and_load(tmp_path: Path) -> None:
    folder = tiny.write_model("sd", tmp_path / "tiny-sd")
    settings = make_settings(tmp_path)
    result = run_workflow(f"""
format_version: 1
nodes:
  load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", device: cpu, dtype: fp32}}}}
  data: {{type: dagfusion.shapes.Dataset, inputs: {{resolution: 32}}}}
  quant: {{type: dagfusion.quant.WeightOnly, inputs: {{model: {{from: load.model}}, format: int4, group_size: 0, min_params: 64}}}}
  text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: a red circle}}}}
  latent: {{type: dagfusion.latent.EmptyLatent, inputs: {{model: {{from: load.model}}, width: 32, height: 32, batch_size: 2}}}}
  profile:
    type: dagfusion.quant.ErrorProfile
    inputs: {{model: {{from: quant.model}}, conditioning: {{from: text.conditioning}}, latent: {{from: latent.latent}},
              steps: 4, bins: 4, guidance_scale: 4.0}}
  student: {{type: dagfusion.quant.Trainable, inputs: {{model: {{from: quant.model}}}}}}
  stage1: {{type: dagfusion.quant.DistillLoss, inputs: {{stage: output, guidance_min: 2.0, guidance_max: 6.0}}}}
  stage2: {{type: dagfusion.quant.DistillLoss, inputs: {{stage: noise, timestep_weights: {{from: profile.timestep_weights}}}}}}
  train1:
    type: dagfusion.train.Train
    inputs: {{model: {{from: student.model}}, data: {{from: data.dataset}}, clip: {{from: load.clip}}, vae: {{from: load.vae}},
              objective: {{from: stage1.objective}}, trainable: patches, steps: 40, batch_size: 2, learning_rate: 0.00002,
              weight_decay: 0.0, caption_dropout: 0.0, checkpoint_every: 0, seed: 0}}
  train2:
    type: dagfusion.train.Train
    inputs: {{model: {{from: train1.model}}, data: {{from: data.dataset}}, clip: {{from: load.clip}}, vae: {{from: load.vae}},
              objective: {{from: stage2.objective}}, trainable: patches, steps: 3, batch_size: 2, learning_rate: 0.000001,
              weight_decay: 0.0, caption_dropout: 0.0, checkpoint_every: 0, seed: 1}}
  freeze: {{type: dagfusion.quant.Freeze, inputs: {{model: {{from: train2.model}}}}}}
  save: {{type: dagfusion.quant.Save, inputs: {{model: {{from: freeze.model}}, filename: distilled.safetensors}}}}
""", settings=settings, out=tmp_path / "out")
    reload = run_workflow(f"""
format_version: 1
nodes:
  load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", device: cpu, dtype: fp32}}}}
  reload: {{type: dagfusion.quant.Load, inputs: {{model: {{from: load.model}}, path: "{result.output('save.path')}"}}}}
""", settings=settings, out=tmp_path / "out2")
    loaded, quantized, trained = (result.output(f"{n}.model") for n in ("load", "quant", "train2"))
    weights = [float(w) for w in result.output("profile.timestep_weights").split(",")]
    assert len(weights) == 4 and sum(weights) == pytest.approx(4.0, rel=1e-3)
    # The denoiser's own weights did not train; only the patch did.
    original, after = loaded.denoiser.state_dict(), trained.denoiser.state_dict()
    assert all(torch.equal(original[k], after[k]) for k in original)
    start = next(p for p in result.output("student.model").patches if isinstance(p, QATPatch))
    learnt = next(p for p in trained.patches if isinstance(p, QATPatch))
    assert start.digest() != learnt.digest() and start.key != learnt.key

    # Stage I's loss on held-out batches is lower after distillation than before it.
    module = loaded.denoiser
    sd = {"conditioning": result.output("text.conditioning")}
    objective = result.output("stage1.objective")
    assert heldout_loss(module, learnt, objective, sd) < heldout_loss(module, start, objective, sd)
    # Freezing keeps what was learnt (up to float16 scales and 16-bit kept tensors); reloading is bit-exact.
    x, t, context = unet_inputs(sd)
    outputs = {}
    with torch.no_grad():
        for label, patches in (("learnt", [learnt]), ("frozen", list(result.output("freeze.model").patches)),
                               ("reloaded", list(reload.output("reload.model").patches))):
            with apply_patches(patches, module):
                outputs[label] = module(x, t, encoder_hidden_states=context).sample
    assert float((outputs["frozen"] - outputs["learnt"]).abs().max()) < 1e-2 * float(outputs["learnt"].abs().max())
    assert torch.equal(outputs["reloaded"], outputs["frozen"])
    assert result.output("freeze.average_bits") == pytest.approx(result.output("quant.average_bits"))


def heldout_loss(module: Any, patch: Any, objective: Any, sd: Any) -> float:
    total = 0.0
    with apply_patches([patch], module), torch.no_grad():
        for k in range(4):
            batch = TrainBatch(torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(100 + k)), ("a", "b"))
            loss, _ = objective.loss(_call(module, sd), batch, TrainStep(0, 1), torch.Generator().manual_seed(200 + k))
            total += float(loss)
    return total / 4
