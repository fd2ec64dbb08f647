"""The Train node in real runs: progress with loss, memory cache, checkpoints in the cache folder,
cancel then continue, resume from a path, a new process loading the finished weights, and a plug-in
objective defined here training through the unchanged loop."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from dagfusion import CancelToken, Engine, EventCollector, NodeProgress, Output, hookimpl, node  # noqa: E402
from dagfusion.nodes.training import checkpoint as ckpt  # noqa: E402
from dagfusion.nodes.training.objectives import Objective, TrainStep, mse  # noqa: E402

TRAIN = """
nodes:
  build: {type: dagfusion.train.NewModel, inputs: {config: tiny-sd, device: cpu, seed: 2}}
  data: {type: dagfusion.shapes.Dataset, inputs: {resolution: 32, seed: 1}}
  objective: {type: %(objective)s}
  train:
    type: dagfusion.train.Train
    inputs:
      model: {from: build.model}
      data: {from: data.dataset}
      clip: {from: build.clip}
      vae: {from: build.vae}
      objective: {from: objective.objective}
      steps: 4
      batch_size: 2
      learning_rate: 0.001
      checkpoint_every: 2
      keep_checkpoints: 0
      seed: 3%(extra)s
"""


def _text(objective="dagfusion.train.VPrediction", extra=""):
    return TRAIN % {"objective": objective, "extra": extra}


def _train_progress(events):
    return [e for e in events.of(NodeProgress) if e.node_id == "train"]


def test_progress_cache_checkpoints_and_a_new_process(registry, settings, helpers, tmp_path):
    engine = Engine(registry, settings)
    events = EventCollector()
    result = helpers.run_ok(engine, _text(), tmp_path / "run1", handler=events, check_mutation=True)
    progress = _train_progress(events)
    assert [e.step for e in progress] == [1, 2, 3, 4] and all(e.total == 4 for e in progress)
    assert all("loss" in e.values and "lr" in e.values for e in progress)
    folder = result.output("train.checkpoint_dir")
    assert folder.startswith(str(settings.cache_dir / "training"))
    assert [s for s, _ in ckpt.steps(Path(folder))] == [2, 4]
    assert not any(p.suffix == ".safetensors" for p in (tmp_path / "run1").rglob("*"))  # nothing in the output folder
    trained = helpers.state(result.output("train.model").denoiser)

    again = helpers.run_ok(engine, _text(), tmp_path / "run2")
    assert "train" in again.cached  # pure: served from the memory cache

    fresh = Engine(registry, settings)  # a new process: empty memory, same cache folder
    events = EventCollector()
    reloaded = helpers.run_ok(fresh, _text(), tmp_path / "run3", handler=events)
    assert "train" in reloaded.executed and _train_progress(events) == []  # the final checkpoint, not training
    helpers.assert_same(trained, helpers.state(reloaded.output("train.model").denoiser))
    assert reloaded.output("train.final_loss") == result.output("train.final_loss")

    # resuming explicitly from the middle checkpoint reaches the same weights
    middle = Path(folder) / "step-00000002"
    events = EventCollector()
    resumed = helpers.run_ok(fresh, _text(extra=f"\n      resume: '{middle}'"), tmp_path / "run4", handler=events)
    assert [e.step for e in _train_progress(events)] == [3, 4]
    helpers.assert_same(trained, helpers.state(resumed.output("train.model").denoiser))
    assert resumed.output("train.checkpoint_dir") != folder


def test_cancel_keeps_the_checkpoint_and_the_next_run_continues(registry, settings, helpers, tmp_path):
    reference = helpers.run_ok(Engine(registry, settings.with_overrides(cache_dir=tmp_path / "other")), _text(),
                               tmp_path / "reference")
    token = CancelToken()

    class CancelAtThree(EventCollector):
        def handle(self, event):
            super().handle(event)
            if isinstance(event, NodeProgress) and event.node_id == "train" and event.step == 3:
                token.cancel()

    engine = Engine(registry, settings)
    result = engine.run(helpers.workflow(_text()), out=tmp_path / "run1", handler=CancelAtThree(), cancel_token=token)
    assert result.status == "cancelled"
    (folder,) = (settings.cache_dir / "training").iterdir()
    assert [s for s, _ in ckpt.steps(folder)] == [2, 3]

    events = EventCollector()
    continued = helpers.run_ok(engine, _text(), tmp_path / "run2", handler=events)
    assert [e.step for e in _train_progress(events)] == [4]
    helpers.assert_same(helpers.state(reference.output("train.model").denoiser),
                        helpers.state(continued.output("train.model").denoiser))


class DenoiseHalf(Objective):
    """A plug-in objective: predict x0 from x0 + ε/2 at timestep 500 (defined here, not in the pack)."""

    name = "test.denoise_half"
    calls = 0

    def loss(self, model_call, batch, step: TrainStep, generator):
        DenoiseHalf.calls += 1
        noise = torch.randn(tuple(batch.x0.shape), generator=generator).to(batch.x0.device)
        timesteps = torch.full((batch.size,), 500, device=batch.x0.device)
        prediction = model_call(batch.x0 + 0.5 * noise, timesteps)
        return mse(prediction, batch.x0), {"fraction": step.fraction}


@node("testpack.DenoiseHalf", version="1.0.0", category="test", outputs=[Output("objective", "OBJECTIVE")])
def denoise_half(ctx):
    """A test objective."""
    return DenoiseHalf()


def test_a_plugin_objective_trains_without_touching_the_loop(settings, helpers, tmp_path):
    from dagfusion.testing import make_registry

    plugin = types.SimpleNamespace(register_nodes=hookimpl(lambda register: register(denoise_half)))
    registry = make_registry(("testpack", plugin))
    events = EventCollector()
    result = helpers.run_ok(Engine(registry, settings), _text("testpack.DenoiseHalf"), tmp_path / "run", handler=events)
    assert DenoiseHalf.calls == 4
    assert [round(e.values["fraction"], 2) for e in _train_progress(events)] == [0.0, 0.25, 0.5, 0.75]
    trained = result.output("train.model")
    assert trained.info["training"]["objective"] == "test.denoise_half"
    assert trained.scheduler.class_name == "DDIMScheduler"  # the default keeps the model's scheduler
    built = result.output("build.model").denoiser
    assert not torch.equal(trained.denoiser.conv_out.weight, built.conv_out.weight)


def test_any_training_data_source_connects(engine, helpers, tmp_path):
    text = """
    nodes:
      build: {type: dagfusion.train.NewModel, inputs: {config: tiny-sd-pixel, device: cpu}}
      shapes: {type: dagfusion.shapes.Dataset, inputs: {resolution: 32}}
      render: {type: dagfusion.shapes.Render, inputs: {dataset: {from: shapes.dataset}, count: 3}}
      data: {type: dagfusion.train.ImageData, inputs: {images: {from: render.images}, captions: {from: render.captions}}}
      objective: {type: dagfusion.train.RectifiedFlow}
      train:
        type: dagfusion.train.Train
        inputs: {model: {from: build.model}, data: {from: data.data}, clip: {from: build.clip}, vae: {from: build.vae},
                 objective: {from: objective.objective}, steps: 2, batch_size: 2, checkpoint_every: 0}
    """
    result = helpers.run_ok(engine, text, tmp_path / "run", check_mutation=True)
    assert result.output("train.checkpoint_dir") == ""
    assert result.output("train.model").scheduler.class_name == "FlowMatchEulerDiscreteScheduler"
