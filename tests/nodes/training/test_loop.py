"""The training loop: deterministic, learns, never touches its input, resumes bit-exactly after a cancel
or a time limit, trains only what it is told to (module globs, patch parameters), EMA output."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")

from dagfusion import RunCancelled  # noqa: E402
from dagfusion.model import ModelPatch  # noqa: E402
from dagfusion.nodes.training import checkpoint as ckpt  # noqa: E402
from dagfusion.nodes.training.loop import CheckpointPolicy, TrainConfig, TrainingPaused, lr_at, train  # noqa: E402
from dagfusion.nodes.training.objectives import EpsilonObjective, RectifiedFlowObjective, VPredictionObjective  # noqa: E402

SMALL = TrainConfig(steps=6, batch_size=2, learning_rate=1e-3, caption_dropout=0.3, ema_decay=0.8,
                    schedule="cosine", warmup_steps=2, seed=7)


def _train(parts, data, config=SMALL, objective=None, **options):
    objective = objective or VPredictionObjective(zero_terminal_snr=True)
    return train(parts["model"], data, parts["clip"], parts["vae"], objective, config, **options)


def test_seeded_training_is_deterministic_and_leaves_the_input_alone(parts, shapes, helpers):
    model = parts["model"]
    before = helpers.state(model.denoiser)
    a = _train(parts, shapes)
    b = _train(parts, shapes)
    helpers.assert_same(helpers.state(a.model.denoiser), helpers.state(b.model.denoiser))
    assert a.losses == b.losses and len(a.losses) == 6 and a.final_loss == b.final_loss
    c = _train(parts, shapes, dataclasses.replace(SMALL, seed=8))
    assert not torch.equal(a.model.denoiser.conv_out.weight, c.model.denoiser.conv_out.weight)

    # the input handle and its shared module are untouched; the output is a new handle over a copy
    helpers.assert_same(before, helpers.state(model.denoiser))
    assert all(p.grad is None for p in model.denoiser.parameters())
    assert a.model is not model and a.model.denoiser is not model.denoiser
    assert model.scheduler.class_name == "PNDMScheduler" and model.scheduler.config["prediction_type"] == "epsilon"
    assert a.model.scheduler.config["prediction_type"] == "v_prediction"
    out = a.model.denoiser
    assert not out.training and not any(p.requires_grad for p in out.parameters())
    assert next(out.parameters()).dtype == torch.float32
    assert a.model.info["training"]["objective"] == "v_prediction"


@pytest.mark.slow
def test_loss_decreases_on_a_tiny_model(parts, shapes):
    config = TrainConfig(steps=24, batch_size=4, learning_rate=1e-3, caption_dropout=0.0, seed=0)
    result = _train(parts, shapes, config, EpsilonObjective())
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.6 * first, result.losses
    assert result.final_loss == pytest.approx(sum(result.losses[-10:]) / 10)


def test_cancel_keeps_checkpoints_and_resuming_equals_an_uninterrupted_run(parts, shapes, helpers, tmp_path):
    full = _train(parts, shapes, checkpoints=CheckpointPolicy(folder=tmp_path / "full", every=2))
    assert [s for s, _ in ckpt.steps(tmp_path / "full")] == [4, 6]  # keep=2

    seen = []

    def cancel_at_3(step, total, values):
        seen.append(values)
        if step == 3:
            raise RunCancelled("stop")

    cut = tmp_path / "cut"
    with pytest.raises(RunCancelled):
        _train(parts, shapes, checkpoints=CheckpointPolicy(folder=cut, every=2, keep=0), progress=cancel_at_3)
    assert [s for s, _ in ckpt.steps(cut)] == [2, 3]  # the periodic one, and the step finished before the cancel
    assert set(seen[0]) >= {"loss", "lr", "grad_norm"}

    resumed = _train(parts, shapes, checkpoints=CheckpointPolicy(folder=cut, every=2, keep=0), resume=ckpt.latest(cut))
    assert resumed.start_step == 3 and resumed.losses == full.losses[3:]
    helpers.assert_same(helpers.state(full.model.denoiser), helpers.state(resumed.model.denoiser))
    assert resumed.final_loss == full.final_loss

    older = _train(parts, shapes, resume=cut / "step-00000002")
    helpers.assert_same(helpers.state(full.model.denoiser), helpers.state(older.model.denoiser))

    # the checkpoint holds plain data and safetensors only
    final = ckpt.latest(cut)
    assert final.name == "step-00000006"
    assert {f.suffix for f in final.iterdir()} == {".safetensors", ".json"}
    document = json.loads((final / "state.json").read_text())
    assert document["step"] == 6 and document["total"] == 6 and document["final_loss"] == full.final_loss
    assert set(document["rng"]) == {"generator", "cpu"} and document["config"]["seed"] == 7


def test_a_time_limit_pauses_with_a_checkpoint_and_running_again_continues(parts, shapes, helpers, tmp_path):
    config = dataclasses.replace(SMALL, steps=3, schedule="constant", warmup_steps=0, ema_decay=0.0)
    full = _train(parts, shapes, config)
    policy = CheckpointPolicy(folder=tmp_path, time_limit=1e-9)
    pauses = 0
    while True:
        try:
            result = _train(parts, shapes, config, checkpoints=policy, resume=ckpt.latest(tmp_path))
            break
        except TrainingPaused as paused:
            pauses += 1
            assert "run again to continue" in str(paused)
    assert pauses == 2
    helpers.assert_same(helpers.state(full.model.denoiser), helpers.state(result.model.denoiser))


def test_ema_weights_are_the_output_and_raw_weights_stay_in_the_checkpoint(parts, shapes, tmp_path):
    result = _train(parts, shapes, checkpoints=CheckpointPolicy(folder=tmp_path))
    saved = ckpt.load(ckpt.latest(tmp_path))
    weight = "conv_out.weight"
    assert torch.equal(result.model.denoiser.state_dict()[weight], saved.ema[weight])
    assert not torch.equal(saved.weights[weight], saved.ema[weight])


def test_trainable_match_changes_only_matching_parameters(parts, shapes):
    config = dataclasses.replace(SMALL, steps=2, trainable="match", match="*attn2*", ema_decay=0.0)
    result = _train(parts, shapes, config, RectifiedFlowObjective())
    before = dict(parts["model"].denoiser.named_parameters())
    changed = {n for n, p in result.model.denoiser.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("attn2" in n for n in changed)


def test_gradient_checkpointing_gives_the_same_weights(parts, shapes, helpers):
    config = dataclasses.replace(SMALL, steps=2)
    plain = _train(parts, shapes, config)
    saved = _train(parts, shapes, dataclasses.replace(config, gradient_checkpointing=True))
    helpers.assert_same(helpers.state(plain.model.denoiser), helpers.state(saved.model.denoiser))
    assert not saved.model.denoiser.is_gradient_checkpointing


class ScaleOutput(ModelPatch):
    """A patch owning a parameter: scales the UNet's output while applied."""

    def __init__(self):
        self.scale = torch.nn.Parameter(torch.ones(1))

    def key(self):
        return f"test.scale-output:{float(self.scale.detach()):.6f}"

    def trainable_parameters(self):
        return {"scale": self.scale}

    @contextlib.contextmanager
    def apply(self, module):
        handle = module.conv_out.register_forward_hook(lambda m, args, out: out * self.scale)
        try:
            yield module
        finally:
            handle.remove()


def test_training_patch_parameters_leaves_the_denoiser_and_the_input_patch_alone(parts, shapes, helpers):
    patch = ScaleOutput()
    model = parts["model"].with_patch(patch)
    config = dataclasses.replace(SMALL, steps=3, trainable="patches", learning_rate=0.05, ema_decay=0.0)
    result = train(model, shapes, parts["clip"], parts["vae"], EpsilonObjective(), config)
    (trained,) = result.model.patches
    assert trained is not patch and isinstance(trained, ScaleOutput)
    assert float(trained.scale) != 1.0 and not trained.scale.requires_grad
    assert float(patch.scale.detach()) == 1.0 and patch.scale.grad is None
    helpers.assert_same(helpers.state(parts["model"].denoiser), helpers.state(result.model.denoiser))
    assert model.patches == (patch,)


def test_learning_rate_schedules():
    config = TrainConfig(steps=10, learning_rate=1.0, warmup_steps=2, schedule="cosine")
    assert [lr_at(s, config) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, config) == 1.0 and lr_at(6, config) == pytest.approx(0.5) and lr_at(10, config) == pytest.approx(0.0)
    assert lr_at(9, dataclasses.replace(config, schedule="constant")) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


def test_caption_embeddings_are_cached_with_a_bound(parts):
    from dagfusion.nodes.training.loop import _TextCache

    cache = _TextCache(parts["clip"], torch.device("cpu"), limit=2)
    first = cache.conditioning(("a red circle", "a blue square", "", "a red circle"))
    hidden = first.positive["encoder_hidden_states"]
    assert hidden.shape[0] == 4 and torch.equal(hidden[0], hidden[3]) and len(cache._cache) == 2
    again = cache.conditioning(("a blue square",))  # evicted or not, the same embedding
    assert torch.equal(again.positive["encoder_hidden_states"][0], hidden[1])
