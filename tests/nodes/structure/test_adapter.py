"""T2I-Adapter apply equals diffusers' StableDiffusionAdapterPipeline (same seed, fp32, CPU);
conditioning factor, fit checks, load/save round trips."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def parts():
    from dagfusion.nodes.structure.adapter import tiny_adapter, tiny_adapter_handles

    return {**tiny_adapter_handles(), "adapter": tiny_adapter()}


def _image(seed: int):
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _ours(parts, patches, *, steps=4, guidance=5.0, seed=3, batch=1):
    from dagfusion.nodes.diffusion.data import Latent
    from dagfusion.nodes.diffusion.sampling import run_sampling

    model = parts["model"]
    for patch in patches:
        model = model.with_patch(patch)
    latents, report = run_sampling(model, parts["conditioning"], Latent(torch.zeros(batch, 4, 16, 16)), steps=steps,
                                   guidance_scale=guidance, seed=seed)
    return latents.samples, report


def _reference(parts, image, *, steps=4, guidance=5.0, seed=3, **options):
    from diffusers import StableDiffusionAdapterPipeline

    base = parts["pipe"]
    pipe = StableDiffusionAdapterPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=parts["unet"],
        adapter=parts["adapter"].module, scheduler=type(base.scheduler).from_config(base.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe("a tiny red fox", image=image, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **options).images


def _close(ours, reference, atol=1e-5):
    assert ours.shape == reference.shape
    diff = (ours - reference).abs().max().item()
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol}"


def test_adapter_matches_pipeline(parts):
    from dagfusion.nodes.structure.adapter import AdapterPatch

    image = _image(1)
    ours, report = _ours(parts, [AdapterPatch(parts["adapter"], image, strength=0.7)])
    _close(ours, _reference(parts, image, adapter_conditioning_scale=0.7))
    plain, _ = _ours(parts, [])
    assert (ours - plain).abs().max() > 1e-3
    assert list(report.patches.values()) == [{"steps": len(report.steps)}]


def test_adapter_batch_without_guidance_matches_pipeline(parts):
    from dagfusion.nodes.structure.adapter import AdapterPatch

    image = _image(2)
    ours, _ = _ours(parts, [AdapterPatch(parts["adapter"], image)], guidance=1.0, batch=2)
    _close(ours, _reference(parts, image, guidance=1.0, num_images_per_prompt=2))


def test_adapter_comparison_can_fail(parts):
    from dagfusion.nodes.structure.adapter import AdapterPatch

    ours, _ = _ours(parts, [AdapterPatch(parts["adapter"], _image(1))])
    with pytest.raises(AssertionError):
        _close(ours, _reference(parts, _image(2)))


def test_conditioning_factor_limits_the_steps(parts):
    from dagfusion.nodes.structure.adapter import AdapterPatch

    _, report = _ours(parts, [AdapterPatch(parts["adapter"], _image(1), conditioning_factor=0.5)])
    assert list(report.patches.values()) == [{"steps": int(len(report.steps) * 0.5)}]


def test_adapter_for_another_unet_is_refused(parts):
    from types import SimpleNamespace

    from dagfusion import NodeInputError
    from dagfusion.nodes.structure.adapter import apply_t2i_adapter
    from dagfusion.testing import models as tiny

    ctx = SimpleNamespace(settings=SimpleNamespace(max_image_pixels=10**8))
    values = {"image": _image(1), "depth": None, "normal": None, "mask": None, "control": None, "strength": 1.0,
              "conditioning_factor": 1.0}
    # the tiny SD UNet has a plain block first: it takes the first feature after its downsampler
    with pytest.raises(NodeInputError, match=r"gives features \(channels, downscale\) \[\(32, 1\), \(64, 2\)\], the UNet takes \[\(32, 2\), \(64, 2\)\]"):
        apply_t2i_adapter.fn(ctx, model=tiny.sd_handles()["model"], adapter=parts["adapter"], **values)
    with pytest.raises(NodeInputError, match="takes 3 conditioning channels, got 2"):
        apply_t2i_adapter.fn(ctx, model=parts["model"], adapter=parts["adapter"],
                             **{**values, "image": None, "control": torch.rand(1, 2, 32, 32)})


def test_save_load_round_trip(parts, tmp_path):
    from dagfusion.nodes.structure.adapter import load_module, save_single_file

    handle = parts["adapter"]
    handle.module.save_pretrained(str(tmp_path / "folder"), safe_serialization=True)
    for path in (tmp_path / "folder", save_single_file(handle, tmp_path / "a.safetensors")):
        loaded = load_module(path, dtype="fp32", device="cpu")
        reference = handle.module.state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
