"""ControlNet apply equals diffusers' StableDiffusionControlNetPipeline (same seed, fp32, CPU):
single, multi, guess mode, start/end; DeepCache + ControlNet stays close to the uncached run."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT = "a tiny red fox"  # the prompt of tiny.sd_handles()["conditioning"]


@pytest.fixture(scope="module")
def parts():
    from dagfusion.nodes.structure.controlnet import tiny_controlnet
    from dagfusion.nodes.structure.controlnet_model import ControlNetHandle, from_unet
    from dagfusion.testing import models as tiny

    handles = tiny.sd_handles()
    second = from_unet(handles["model"].denoiser, conditioning_channels=3, seed=5, source="second", fingerprint="second",
                       embedding_channels=(16, 32))
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, param in second.module.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return {**handles, "cn": tiny_controlnet(), "cn2": ControlNetHandle.from_module(second.module, source="second"),
            "pipe": tiny._cached_pipeline("sd", 0)}


def _image(seed: int, size: int = 32, channels: int = 3):
    return torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _pipeline(parts, controlnets):
    from diffusers import MultiControlNetModel, StableDiffusionControlNetPipeline

    base = parts["pipe"]
    controlnet = controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(controlnets)
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=controlnet, scheduler=type(base.scheduler).from_config(base.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(parts, patches, *, steps=4, guidance=5.0, seed=3, batch=1):
    from dagfusion.nodes.diffusion.data import Latent
    from dagfusion.nodes.diffusion.sampling import run_sampling

    model = parts["model"]
    for patch in patches:
        model = model.with_patch(patch)
    latents, report = run_sampling(model, parts["conditioning"], Latent(torch.zeros(batch, 4, 16, 16)), steps=steps,
                                   guidance_scale=guidance, seed=seed)
    return latents.samples, report


def _reference(parts, controlnets, images, *, steps=4, guidance=5.0, seed=3, **options):
    pipe = _pipeline(parts, [c.module for c in controlnets])
    image = images[0] if len(images) == 1 else images
    return pipe(PROMPT, image=image, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **options).images


def _close(ours, reference, atol=1e-5):
    assert ours.shape == reference.shape
    diff = (ours - reference).abs().max().item()
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol}"


def test_single_controlnet_matches_pipeline(parts):
    from dagfusion.nodes.structure.controlnet import ControlNetPatch

    image = _image(1)
    ours, report = _ours(parts, [ControlNetPatch(parts["cn"], image, strength=0.8)])
    _close(ours, _reference(parts, [parts["cn"]], [image], controlnet_conditioning_scale=0.8))
    plain, _ = _ours(parts, [])
    assert (ours - plain).abs().max() > 1e-3  # the ControlNet changes the result: the comparison is not vacuous
    assert list(report.patches.values()) == [{"computed": len(report.steps), "skipped": 0}]


def test_resized_control_map_matches_pipeline(parts):
    """A 48 px map for 32 px latents is resized as the pipeline resizes a tensor (nearest)."""
    from dagfusion.nodes.structure.controlnet import ControlNetPatch

    image = _image(4, size=48)
    ours, _ = _ours(parts, [ControlNetPatch(parts["cn"], image)], steps=3)
    _close(ours, _reference(parts, [parts["cn"]], [image], steps=3))


def test_start_end_and_strength_match_pipeline(parts):
    from dagfusion.nodes.structure.controlnet import ControlNetPatch

    image = _image(2)
    ours, report = _ours(parts, [ControlNetPatch(parts["cn"], image, strength=1.3, start=0.25, end=0.75)], steps=4)
    _close(ours, _reference(parts, [parts["cn"]], [image], steps=4, controlnet_conditioning_scale=1.3,
                            control_guidance_start=0.25, control_guidance_end=0.75))
    counts = next(iter(report.patches.values()))
    assert counts["computed"] + counts["skipped"] == len(report.steps) and counts["skipped"] >= 2


def test_guess_mode_matches_pipeline(parts):
    from dagfusion.nodes.structure.controlnet import ControlNetPatch

    image = _image(3)
    ours, _ = _ours(parts, [ControlNetPatch(parts["cn"], image, guess_mode=True)], guidance=4.0)
    _close(ours, _reference(parts, [parts["cn"]], [image], guidance=4.0, guess_mode=True))
    normal, _ = _ours(parts, [ControlNetPatch(parts["cn"], image)], guidance=4.0)
    assert (ours - normal).abs().max() > 1e-4


def test_multi_controlnet_matches_pipeline(parts):
    from dagfusion.nodes.structure.controlnet import ControlNetPatch

    a, b = _image(5), _image(6)
    patches = [ControlNetPatch(parts["cn"], a, strength=0.6, start=0.0, end=0.5),
               ControlNetPatch(parts["cn2"], b, strength=1.2, start=0.25, end=1.0)]
    ours, _ = _ours(parts, patches)
    _close(ours, _reference(parts, [parts["cn"], parts["cn2"]], [a, b], controlnet_conditioning_scale=[0.6, 1.2],
                            control_guidance_start=[0.0, 0.25], control_guidance_end=[0.5, 1.0]))


def test_without_guidance_and_a_batch_matches_pipeline(parts):
    from dagfusion.nodes.structure.controlnet import ControlNetPatch

    image = _image(7)
    ours, _ = _ours(parts, [ControlNetPatch(parts["cn"], image, guess_mode=True)], guidance=1.0, batch=2)
    pipe = _pipeline(parts, [parts["cn"].module])
    reference = pipe(PROMPT, image=image, num_inference_steps=4, guidance_scale=1.0, height=32, width=32,
                     num_images_per_prompt=2, guess_mode=True, generator=torch.Generator("cpu").manual_seed(3),
                     output_type="latent").images
    _close(ours, reference)


def test_comparison_can_fail(parts):
    from dagfusion.nodes.structure.controlnet import ControlNetPatch

    ours, _ = _ours(parts, [ControlNetPatch(parts["cn"], _image(1))])
    with pytest.raises(AssertionError):
        _close(ours, _reference(parts, [parts["cn"]], [_image(2)]))


def test_deepcache_with_controlnet_stays_close(parts):
    from dagfusion.nodes.cache.deepcache import DeepCacheConfig, DeepCachePatch
    from dagfusion.nodes.structure.controlnet import ControlNetPatch

    image = _image(8)
    patch = ControlNetPatch(parts["cn"], image)
    full, _ = _ours(parts, [patch], steps=6)
    cached, report = _ours(parts, [patch, DeepCachePatch(DeepCacheConfig(interval=2, branch=0))], steps=6)
    plain_cached, _ = _ours(parts, [DeepCachePatch(DeepCacheConfig(interval=2, branch=0))], steps=6)
    assert any(not step.computed for step in report.steps)  # DeepCache skipped the deep path on some steps
    assert report.patch(patch.key)["computed"] == len(report.steps)  # the ControlNet ran on every one
    err = (cached - full).abs().mean() / full.abs().mean()
    assert err < 0.1, f"relative L1 {err:.3g}"
    # the ControlNet still acts on the cached run
    assert (cached - plain_cached).abs().max() > 1e-3


@pytest.mark.parametrize("guess", [False, True])
def test_sdxl_controlnet_matches_pipeline(guess):
    """SDXL: the ControlNet also gets the added text/time embeddings (the conditional half's in guess mode)."""
    from dagfusion.model import ModelHandle, TextEncoderBundle
    from dagfusion.nodes.diffusion.data import Latent, SchedulerSpec
    from dagfusion.nodes.diffusion.sampling import run_sampling
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.structure.controlnet import ControlNetPatch, _randomise_zero_convs
    from dagfusion.nodes.structure.controlnet_model import ControlNetHandle
    from dagfusion.testing import models as tiny
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    pipe = tiny._cached_pipeline("sdxl", 0)
    torch.manual_seed(0)
    module = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32)).eval()
    _randomise_zero_convs(module, seed=4)
    handle = ControlNetHandle.from_module(module, source="sdxl")
    model = ModelHandle.from_module(pipe.unet, scheduler=SchedulerSpec(type(pipe.scheduler).__name__,
                                                                       dict(pipe.scheduler.config)), vae_scale_factor=2)
    clip = TextEncoderBundle.from_modules("sdxl", [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])
    image = _image(11)
    patched = model.with_patch(ControlNetPatch(handle, image, strength=0.9, guess_mode=guess))
    ours, _ = run_sampling(patched, encode_prompt(clip, "a red fox", ""), Latent(torch.zeros(1, 4, 16, 16)), steps=3,
                           guidance_scale=5.0, seed=2)
    reference_pipe = StableDiffusionXLControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2, unet=pipe.unet, controlnet=module,
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
    )
    reference_pipe.set_progress_bar_config(disable=True)
    reference = reference_pipe("a red fox", image=image, num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                               controlnet_conditioning_scale=0.9, guess_mode=guess,
                               generator=torch.Generator("cpu").manual_seed(2), output_type="latent").images
    _close(ours.samples, reference)
