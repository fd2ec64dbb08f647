"""TrainVAE: training an AutoencoderKL improves reconstructions, never touches its input, is
bit-reproducible, resumes bit-exactly after a cancel or a time limit, and runs as a node whose
checkpoints a new process reloads instead of training again."""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dagfusion import Engine, EventCollector, NodeProgress, RunCancelled  # noqa: E402
from dagfusion.nodes.training import autoencoder  # noqa: E402
from dagfusion.nodes.training import checkpoint as ckpt  # noqa: E402
from dagfusion.nodes.training.autoencoder import (  # noqa: E402
    VAETrainConfig,
    measure_scale,
    train_vae,
    vae_loss,
)
from dagfusion.nodes.training.loop import CheckpointPolicy, TrainingPaused  # noqa: E402

SHORT = VAETrainConfig(steps=6, batch_size=2, learning_rate=1e-3, warmup_steps=2, seed=3)


@pytest.fixture(scope="module", autouse=True)
def small_scale_batch():
    """The scaling factor and PSNR are measured on 32 images instead of 256: a speed knob only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autoencoder, "SCALE_SAMPLES", 32)
        yield


@pytest.fixture(scope="module")
def reference(parts, shapes, helpers):
    """``(input state before, input scaling factor before, result)`` of SHORT trained straight through."""
    vae = parts["vae"]
    before = helpers.state(vae.module)
    scaling = vae.module.config.scaling_factor
    return before, scaling, train_vae(vae, shapes, SHORT)


@pytest.fixture(scope="module")
def probe():
    """Images the VAE never trains on (another seed: other jitter and order), in [0, 1]."""
    from dagfusion.nodes.shapes.dataset import ShapesDataset

    return ShapesDataset(split="train", resolution=32, seed=1).batch(0, 32).images[:, :3]


def _probe_loss(module, probe) -> float:
    with torch.no_grad():
        loss, _ = vae_loss(module, probe * 2 - 1, torch.Generator().manual_seed(0), 1e-4)
    return float(loss)


@pytest.mark.slow
def test_training_improves_reconstructions(parts, shapes, probe):
    vae = parts["vae"]
    untrained_loss = _probe_loss(vae.module, probe)
    _, untrained_psnr = measure_scale(vae.module, probe, torch.Generator().manual_seed(0))
    reported = []
    config = VAETrainConfig(steps=20, batch_size=4, learning_rate=5e-3, warmup_steps=0, seed=0)
    result = train_vae(vae, shapes, config, progress=lambda step, total, values: reported.append((step, total, values)))

    assert [(s, t) for s, t, _ in reported] == [(i, 20) for i in range(1, 21)]
    losses = [v["loss"] for _, _, v in reported]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert all({"l1", "mse", "kl", "lr"} <= v.keys() for _, _, v in reported)
    assert result.final_loss == pytest.approx(sum(losses[-10:]) / 10)  # the mean of the last ten
    assert result.start_step == 0

    # on images it never saw, the loss is lower and the reconstructions are sharper
    trained_loss = _probe_loss(result.module, probe)
    _, trained_psnr = measure_scale(result.module, probe, torch.Generator().manual_seed(0))
    assert trained_loss < 0.95 * untrained_loss, (untrained_loss, trained_loss)
    assert trained_psnr > untrained_psnr + 0.3, (untrained_psnr, trained_psnr)
    assert math.isfinite(result.psnr) and result.psnr > untrained_psnr


def test_the_input_vae_is_untouched_and_the_result_carries_its_scaling_factor(parts, reference, helpers):
    before, scaling, result = reference
    vae = parts["vae"]
    helpers.assert_same(before, helpers.state(vae.module))
    assert vae.module.config.scaling_factor == scaling
    assert result.module is not vae.module

    assert result.scaling_factor > 0 and math.isfinite(result.scaling_factor)
    assert result.module.config.scaling_factor == result.scaling_factor
    assert result.scaling_factor != scaling  # measured, not copied
    assert not result.module.training and not any(p.requires_grad for p in result.module.parameters())
    assert next(result.module.parameters()).dtype == next(vae.module.parameters()).dtype
    trained = helpers.state(result.module)
    assert trained.keys() == before.keys() and any(not torch.equal(trained[k], before[k]) for k in before)


def test_the_same_seed_gives_bit_identical_weights(parts, shapes, reference, helpers):
    _, _, first = reference
    again = train_vae(parts["vae"], shapes, SHORT)
    helpers.assert_same(helpers.state(first.module), helpers.state(again.module))
    assert (again.final_loss, again.psnr, again.scaling_factor) == (first.final_loss, first.psnr, first.scaling_factor)

    # the seed matters (it draws the posterior samples)
    a = train_vae(parts["vae"], shapes, VAETrainConfig(steps=2, batch_size=2, seed=3))
    b = train_vae(parts["vae"], shapes, VAETrainConfig(steps=2, batch_size=2, seed=4))
    assert any(not torch.equal(x, y) for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values()))


@pytest.mark.parametrize("stop", ["cancel", "time limit"])
def test_a_stopped_run_resumes_to_bit_identical_weights(stop, parts, shapes, reference, helpers, tmp_path: Path):
    _, _, straight = reference
    vae = parts["vae"]
    if stop == "cancel":
        def cancel_at_three(step, total, values):
            if step == 3:
                raise RunCancelled("stop")

        with pytest.raises(RunCancelled):
            train_vae(vae, shapes, SHORT, checkpoints=CheckpointPolicy(tmp_path), progress=cancel_at_three)
        stopped_at = 3
    else:
        with pytest.raises(TrainingPaused, match="time limit"):
            train_vae(vae, shapes, SHORT, checkpoints=CheckpointPolicy(tmp_path, time_limit=1e-9))
        stopped_at = 1
    assert [s for s, _ in ckpt.steps(tmp_path)] == [stopped_at]
    helpers.assert_same(reference[0], helpers.state(vae.module))  # stopping leaves the input alone too

    steps = []
    resumed = train_vae(vae, shapes, SHORT, checkpoints=CheckpointPolicy(tmp_path), resume=ckpt.latest(tmp_path),
                        progress=lambda step, total, values: steps.append(step))
    assert steps == list(range(stopped_at + 1, SHORT.steps + 1))
    assert resumed.start_step == stopped_at
    helpers.assert_same(helpers.state(straight.module), helpers.state(resumed.module))
    assert resumed.final_loss == straight.final_loss  # the recent losses travel in the checkpoint
    assert (resumed.psnr, resumed.scaling_factor) == (straight.psnr, straight.scaling_factor)
    assert [s for s, _ in ckpt.steps(tmp_path)][-1] == SHORT.steps  # the finished weights are saved


def test_periodic_checkpoints_keep_the_newest(parts, shapes, tmp_path: Path):
    train_vae(parts["vae"], shapes, VAETrainConfig(steps=4, batch_size=1, seed=1),
              checkpoints=CheckpointPolicy(tmp_path, every=1, keep=2))
    assert [s for s, _ in ckpt.steps(tmp_path)] == [3, 4]
    state = ckpt.load(ckpt.latest(tmp_path)).state
    assert state["config"]["steps"] == 4 and len(state["recent_losses"]) == 4


TRAIN_VAE = """
nodes:
  build: {type: dagfusion.train.NewModel, inputs: {config: tiny-sd, device: cpu}}
  data: {type: dagfusion.shapes.Dataset, inputs: {resolution: 32}}
  train:
    type: dagfusion.train.TrainVAE
    inputs: {vae: {from: build.vae}, data: {from: data.dataset}, steps: 3, batch_size: 2, checkpoint_every: 2}
"""


def test_the_node_trains_checkpoints_and_a_new_process_reloads(registry, settings, helpers, tmp_path: Path):
    from dagfusion.model import VAEHandle

    events = EventCollector()
    result = helpers.run_ok(Engine(registry, settings), TRAIN_VAE, tmp_path / "run1", handler=events, check_mutation=True)
    assert [e.step for e in events.of(NodeProgress) if e.node_id == "train"] == [1, 2, 3]
    built, trained = result.output("build.vae"), result.output("train.vae")
    assert isinstance(trained, VAEHandle) and trained.module is not built.module
    assert any(not torch.equal(a, b) for a, b in zip(trained.module.state_dict().values(), built.module.state_dict().values()))
    scale = trained.module.config.scaling_factor
    assert scale > 0 and built.module.config.scaling_factor != scale
    final_loss, psnr = result.output("train.final_loss"), result.output("train.psnr")
    assert math.isfinite(final_loss) and math.isfinite(psnr)

    (folder,) = (settings.cache_dir / "training").iterdir()
    assert [s for s, _ in ckpt.steps(folder)] == [2, 3]
    assert not any(p.suffix == ".safetensors" for p in (tmp_path / "run1").rglob("*"))

    events = EventCollector()  # a new process: empty memory, the same cache folder
    reloaded = helpers.run_ok(Engine(registry, settings), TRAIN_VAE, tmp_path / "run2", handler=events)
    assert "train" in reloaded.executed
    assert [e for e in events.of(NodeProgress) if e.node_id == "train"] == []  # loaded, not trained
    helpers.assert_same(helpers.state(trained.module), helpers.state(reloaded.output("train.vae").module))
    assert (reloaded.output("train.final_loss"), reloaded.output("train.psnr")) == (final_loss, psnr)
    assert reloaded.output("train.vae").module.config.scaling_factor == scale
    assert [s for s, _ in ckpt.steps(folder)] == [2, 3]
    # downstream trainings key their checkpoints on this handle: the reload must fingerprint the same
    from dagfusion.fingerprint import fingerprint

    assert fingerprint(reloaded.output("train.vae")) == fingerprint(trained)


def test_the_trained_handle_is_fingerprinted_by_its_training_not_the_measured_scale(parts, shapes, monkeypatch):
    """The scaling factor is measured again when a finished training is reloaded; a float that moved in its
    last bits must not change the keys of trainings downstream."""
    from dagfusion.fingerprint import fingerprint

    real = autoencoder.measure_scale
    prints = []
    for nudge in (1.0, 1.0 + 1e-12):
        monkeypatch.setattr(autoencoder, "measure_scale", lambda *a, n=nudge: (real(*a)[0] * n, real(*a)[1]))
        ctx = SimpleNamespace(progress=lambda *a, **k: None, logger=logging.getLogger("test"))
        out = autoencoder.train_vae_node.fn(ctx, parts["vae"], shapes, 1, 2, 1e-3, 0, 1e-4, 0, 0, False, 0.0)
        prints.append(fingerprint(out["vae"]))
    assert prints[0] == prints[1]


@pytest.mark.parametrize("bad", [{"steps": 0}, {"batch_size": 0}, {"kl_weight": -1.0}])
def test_an_invalid_config_is_refused(bad):
    with pytest.raises(ValueError):
        VAETrainConfig(**bad)


def test_the_learning_rate_warms_up_then_decays_to_zero():
    config = VAETrainConfig(steps=100, learning_rate=1e-3, warmup_steps=10)
    rates = [config.lr_at(step) for step in range(101)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3) and rates[10] == pytest.approx(1e-3)
    assert all(a <= b for a, b in itertools.pairwise(rates[:11]))
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert rates[100] == pytest.approx(0.0, abs=1e-12)
    assert VAETrainConfig(steps=5, learning_rate=1e-3, warmup_steps=0).lr_at(0) == pytest.approx(1e-3)


def test_a_temporal_decoder_trains_on_clips_decoding_each_clip_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clips (B, F, C, H, W): their frames are the batch, and SVD's temporal decoder sees F frames a clip."""
    from dagfusion.model import VAEHandle
    from dagfusion.nodes.shapes.motion import ShapesVideoDataset
    from dagfusion.nodes.video.build import build_video_pipeline

    vae = build_video_pipeline("tiny-svd").vae
    frames_seen: list[int] = []
    original = autoencoder._decode

    def spy(module, z, frames):
        frames_seen.append(frames)
        return original(module, z, frames)

    monkeypatch.setattr(autoencoder, "_decode", spy)
    data = ShapesVideoDataset("train", resolution=32, frames=3, seed=0)
    result = train_vae(VAEHandle.from_module(vae), data, VAETrainConfig(steps=2, batch_size=2, warmup_steps=0))
    assert frames_seen == [3, 3, 3]  # two steps and the measurement
    assert math.isfinite(result.psnr) and result.scaling_factor > 0
