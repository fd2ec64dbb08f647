"""Paths that only exist on a CUDA machine: device placement and CPU offload (skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from dagfusion.testing import models as tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _workflow(folder, offload: bool, dtype: str) -> str:
    return f"""
    nodes:
      load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", device: cuda, dtype: {dtype}, offload: {str(offload).lower()}}}}}
      text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: "a red circle"}}}}
      latent: {{type: dagfusion.latent.EmptyLatent, inputs: {{model: {{from: load.model}}, width: 32, height: 32}}}}
      sample: {{type: dagfusion.sampling.Sample, inputs: {{model: {{from: load.model}}, conditioning: {{from: text.conditioning}}, latent: {{from: latent.latent}}, steps: 4, seed: 3}}}}
      decode: {{type: dagfusion.vae.Decode, inputs: {{vae: {{from: load.vae}}, latent: {{from: sample.latent}}}}}}
    """


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cpu_offload_matches_resident_weights_and_returns_them_to_the_cpu(models_dir, engine, tmp_path, helpers, dtype):
    folder = tiny.write_model("sd", models_dir / f"cuda-sd-{dtype}", seed=3)
    resident = helpers.run_ok(engine, _workflow(folder, False, dtype), tmp_path / "resident", use_cache=False)
    offloaded = helpers.run_ok(engine, _workflow(folder, True, dtype), tmp_path / "offload", use_cache=False)
    assert next(resident.output("load.model").denoiser.parameters()).device.type == "cuda"
    assert next(offloaded.output("load.model").denoiser.parameters()).device.type == "cpu"
    assert next(offloaded.output("load.vae").module.parameters()).device.type == "cpu"
    a = resident.output("sample.latent").samples.float().cpu()
    b = offloaded.output("sample.latent").samples.float().cpu()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-3 if dtype == "fp16" else 1e-5)
    image = offloaded.output("decode.image")
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
