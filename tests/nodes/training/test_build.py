"""NewModel: seeded untrained models from the built-in configs or a folder of configs; pixel-space training."""

from __future__ import annotations

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")

from dagfusion.nodes.training.build import build_builtin, handles  # noqa: E402


def test_builtin_configs_are_seeded(helpers):
    a, b, c = build_builtin("tiny-sd", 0), build_builtin("tiny-sd", 0), build_builtin("tiny-sd", 1)
    helpers.assert_same(helpers.state(a["denoiser"]), helpers.state(b["denoiser"]))
    helpers.assert_same(helpers.state(a["text_encoders"][0]), helpers.state(b["text_encoders"][0]))
    assert not torch.equal(a["denoiser"].conv_in.weight, c["denoiser"].conv_in.weight)
    out = handles(a, "tiny-sd", "cpu")
    assert out["model"].vae_scale_factor == 2 and out["vae"] is not None and out["clip"].kind == "clip"
    assert out["scheduler"].class_name == "DDIMScheduler"
    assert out["model"].info["pipeline"] == "StableDiffusionPipeline"


def test_pixel_space_config_trains_without_a_vae(shapes):
    from dagfusion.nodes.training.loop import TrainConfig, train
    from dagfusion.nodes.training.objectives import RectifiedFlowObjective

    out = handles(build_builtin("tiny-sd-pixel", 0), "tiny-sd-pixel", "cpu")
    assert out["vae"] is None and out["model"].vae_scale_factor == 1
    seen = []

    class Spy(RectifiedFlowObjective):
        def loss(self, model_call, batch, step, generator):
            seen.append(batch.x0)
            return super().loss(model_call, batch, step, generator)

    config = TrainConfig(steps=1, batch_size=2, learning_rate=1e-3)
    result = train(out["model"], shapes, out["clip"], None, Spy(), config)
    (x0,) = seen
    assert x0.shape == (2, 3, 32, 32) and float(x0.min()) >= -1 and float(x0.max()) <= 1
    torch.testing.assert_close(x0, shapes.batch(0, 2).images * 2 - 1)
    assert result.model.scheduler.class_name == "FlowMatchEulerDiscreteScheduler"
    assert dataclasses.replace(config, steps=2).steps == 2


def test_a_folder_of_configs_builds_fresh_weights(engine, helpers, tmp_path):
    from dagfusion.testing import models as tiny

    folder = tiny.write_model("sd", tmp_path / "tiny-sd")
    text = f"""
    nodes:
      new: {{type: dagfusion.train.NewModel, inputs: {{config_folder: "{folder}", seed: 4, device: cpu}}}}
    """
    result = helpers.run_ok(engine, text, tmp_path / "run")
    model = result.output("new.model")
    original = tiny._cached_pipeline("sd", 0).unet
    def plain(config):
        return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))

    assert plain(model.denoiser.config) == plain(original.config)
    assert not torch.equal(model.denoiser.conv_in.weight, original.conv_in.weight)
    clip = result.output("new.clip")
    assert clip.kind == "clip" and clip.tokenizers[0].get().get_vocab() == tiny.clip_tokenizer().get_vocab()
    assert result.output("new.scheduler").class_name == "PNDMScheduler"
    assert model.info["pipeline"] == "StableDiffusionPipeline" and model.vae_scale_factor == 2
