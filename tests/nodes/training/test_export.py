"""SaveDiffusers: a trained tiny SD model exported as a diffusers folder loads back through
``DiffusionPipeline.from_pretrained`` and through dagfusion's loader, and samples the same as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dagfusion import UnsafeOperationError  # noqa: E402
from dagfusion.nodes.training.export import export  # noqa: E402

PROMPT = "a large red circle on the left on a black background"

TRAIN_AND_EXPORT = f"""
nodes:
  build: {{type: dagfusion.train.NewModel, inputs: {{config: tiny-sd, device: cpu}}}}
  data: {{type: dagfusion.shapes.Dataset, inputs: {{resolution: 32}}}}
  objective: {{type: dagfusion.train.VPrediction, inputs: {{zero_terminal_snr: true}}}}
  train:
    type: dagfusion.train.Train
    inputs: {{model: {{from: build.model}}, data: {{from: data.dataset}}, clip: {{from: build.clip}}, vae: {{from: build.vae}},
             objective: {{from: objective.objective}}, steps: 2, batch_size: 2, learning_rate: 0.01, checkpoint_every: 0}}
  export:
    type: dagfusion.train.SaveDiffusers
    inputs: {{model: {{from: train.model}}, clip: {{from: build.clip}}, vae: {{from: build.vae}}, folder: exported/shapes-tiny}}
  text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: build.clip}}, prompt: "{PROMPT}"}}}}
  latent: {{type: dagfusion.latent.EmptyLatent, inputs: {{model: {{from: train.model}}, width: 32, height: 32}}}}
  sample:
    type: dagfusion.sampling.Sample
    inputs: {{model: {{from: train.model}}, conditioning: {{from: text.conditioning}}, latent: {{from: latent.latent}},
             steps: 3, guidance_scale: 3.0, seed: 5}}
"""

LOAD_AND_SAMPLE = """
nodes:
  load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", dtype: fp32, device: cpu}}}}
  text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: "{prompt}"}}}}
  latent: {{type: dagfusion.latent.EmptyLatent, inputs: {{model: {{from: load.model}}, width: 32, height: 32}}}}
  sample:
    type: dagfusion.sampling.Sample
    inputs: {{model: {{from: load.model}}, conditioning: {{from: text.conditioning}}, latent: {{from: latent.latent}},
             steps: 3, guidance_scale: 3.0, seed: 5}}
  decode: {{type: dagfusion.vae.Decode, inputs: {{vae: {{from: load.vae}}, latent: {{from: sample.latent}}}}}}
"""


def test_export_round_trips_through_diffusers_and_the_loader(engine, helpers, tmp_path):
    first = helpers.run_ok(engine, TRAIN_AND_EXPORT, tmp_path / "run")
    folder = Path(first.output("export.path"))
    assert folder == (tmp_path / "run" / "exported" / "shapes-tiny").resolve()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert {p.suffix for p in folder.rglob("*") if p.is_file()} <= {".safetensors", ".json", ".txt"}
    assert list(folder.rglob("*.safetensors"))

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, diffusers.StableDiffusionPipeline)
    config = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and config.prediction_type == "v_prediction"
    assert config.rescale_betas_zero_snr and config.timestep_spacing == "trailing"
    trained = first.output("train.model").denoiser.state_dict()
    helpers.assert_same(trained, {k: v for k, v in pipe.unet.state_dict().items()})

    second = helpers.run_ok(engine, LOAD_AND_SAMPLE.format(folder=folder, prompt=PROMPT), tmp_path / "load")
    ours = second.output("sample.latent").samples
    torch.testing.assert_close(ours, first.output("sample.latent").samples, rtol=0, atol=1e-6)  # same as before export
    reference = pipe(prompt=PROMPT, num_inference_steps=3, guidance_scale=3.0, height=32, width=32,
                     generator=torch.Generator().manual_seed(5), output_type="latent").images
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    images = pipe(prompt=PROMPT, num_inference_steps=3, guidance_scale=3.0, height=32, width=32,
                  generator=torch.Generator().manual_seed(5), output_type="pt").images
    torch.testing.assert_close(second.output("decode.image"), images, rtol=0, atol=1e-5)


def test_half_precision_export_keeps_the_shared_modules(parts, tmp_path):
    unet = parts["model"].denoiser
    folder = export(parts["model"], parts["clip"], parts["vae"], None, tmp_path / "half", dtype="fp16")
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and unet.dtype == torch.float32
    assert torch.equal(pipe.unet.conv_out.weight, unet.conv_out.weight.half())
    assert type(pipe.scheduler).__name__ == parts["model"].scheduler.class_name


def test_export_refuses_patches_existing_folders_and_escapes(parts, settings, tmp_path):
    from dagfusion.model import FunctionPatch

    patched = parts["model"].with_patch(FunctionPatch(lambda call, forward: forward(call), key="test.noop"))
    with pytest.raises(ValueError, match="patches"):
        export(patched, parts["clip"], parts["vae"], None, tmp_path / "p")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        export(parts["model"], parts["clip"], parts["vae"], None, tmp_path / "taken")
    with pytest.raises(ValueError, match="needs"):
        export(parts["model"], parts["clip"], None, None, tmp_path / "novae")

    from dagfusion import RunContext
    from dagfusion.context import CancelToken
    from dagfusion.nodes.training.export import save_diffusers

    ctx = RunContext("export", "run", settings, tmp_path / "out", CancelToken())
    with pytest.raises(UnsafeOperationError):
        save_diffusers.fn(ctx, parts["model"], parts["clip"], parts["vae"], None, "../outside", "keep", "auto")
    assert not (tmp_path / "outside").exists()
