"""Inpainting (latent-mask blending and 9-channel UNets) and the mask nodes."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dagfusion.errors import NodeInputError
from dagfusion.nodes.everyday import inpaint

PROMPT = "a tiny red fox"


@pytest.fixture(scope="module")
def sd():
    from dagfusion.testing.models import _cached_pipeline, sd_handles

    return {**sd_handles(), "pipe": _cached_pipeline("sd", 0)}


def _picture(size: int = 32):
    g = torch.Generator().manual_seed(3)
    return torch.rand(1, 3, size, size, generator=g)


# --------------------------------------------------------------------------- latent-mask blending


@pytest.mark.parametrize("sampler", ["default", "ddim", "euler", "dpmpp_2m", "flow_euler"])
def test_blend_keeps_the_picture_outside_the_mask_exactly(sd, sampler):
    from dagfusion.nodes.diffusion.sampling import run_sampling
    from dagfusion.nodes.diffusion.vae import encode

    original = encode(sd["vae"], _picture())
    mask = inpaint.rectangle_mask(32, 32, 8, 8, 16, 12)
    model = inpaint.blend_model(sd["model"], original, mask)
    result, report = run_sampling(model, sd["conditioning"], original, sampler=sampler, steps=4, guidance_scale=5.0,
                                  seed=7, count_macs=False)
    small = inpaint.to_latent_size(mask, 16, 16)
    keep = (small == 0).expand_as(result.samples)
    assert torch.equal(result.samples[keep], original.samples[keep])
    inside = ~keep
    assert (result.samples[inside] - original.samples[inside]).abs().mean() > 0.05
    stats = next(iter(report.patches.values()))
    assert stats["blended_steps"] == report.info["steps"]


def test_blend_partial_strength_and_batch(sd):
    from dagfusion.nodes.diffusion.data import Latent
    from dagfusion.nodes.diffusion.sampling import run_sampling
    from dagfusion.nodes.diffusion.vae import encode

    original = encode(sd["vae"], torch.cat([_picture(), _picture().flip(-1)]))
    mask = inpaint.rectangle_mask(32, 32, 0, 0, 16, 32)
    model = inpaint.blend_model(sd["model"], original, mask)
    result, _ = run_sampling(model, sd["conditioning"], Latent(original.samples), sampler="euler", steps=5,
                             strength=0.6, guidance_scale=4.0, seed=1, count_macs=False)
    assert torch.equal(result.samples[..., 8:], original.samples[..., 8:])
    assert not torch.allclose(result.samples[..., :8], original.samples[..., :8])


def test_blend_equals_diffusers_inpaint_pipeline_for_a_4_channel_unet(sd):
    """Same blending as StableDiffusionInpaintPipeline with an ordinary UNet (its picture latents
    given as ours: the pipeline would otherwise draw a posterior sample first)."""
    from dagfusion.nodes.diffusion.sampling import run_sampling
    from dagfusion.nodes.diffusion.vae import encode

    picture = _picture()
    original = encode(sd["vae"], picture)
    mask = inpaint.rectangle_mask(32, 32, 4, 10, 20, 14)
    model = inpaint.blend_model(sd["model"], original, mask)
    ours, _ = run_sampling(model, sd["conditioning"], original, sampler="ddim", steps=4, guidance_scale=6.0, seed=5,
                           count_macs=False)
    base = sd["pipe"]
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=diffusers.DDIMScheduler.from_config(base.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe._encode_vae_image = lambda image, generator: original.samples.clone()
    reference = pipe(prompt=PROMPT, image=picture, mask_image=mask, height=32, width=32, num_inference_steps=4,
                     guidance_scale=6.0, generator=torch.Generator().manual_seed(5), output_type="latent").images
    diff = (ours.samples - reference).abs().max().item()
    print(f"max |ours - diffusers| = {diff:.3g} (mean |x| {reference.abs().mean().item():.3g})")
    assert diff <= 1e-5, diff


def test_a_mask_of_another_size_is_resized_with_a_warning(sd, caplog):
    from dagfusion.nodes.diffusion.vae import encode

    original = encode(sd["vae"], _picture())
    with caplog.at_level(logging.WARNING):
        model = inpaint.blend_model(sd["model"], original, inpaint.rectangle_mask(64, 64, 16, 16, 32, 32))
    assert "64x64" in caplog.text and "32x32" in caplog.text
    assert model.patches[-1].mask.shape == (1, 1, 16, 16)


def test_a_mask_with_another_aspect_ratio_is_refused_naming_both_sizes(sd):
    from dagfusion.nodes.diffusion.vae import encode

    original = encode(sd["vae"], _picture())
    with pytest.raises(NodeInputError) as info:
        inpaint.blend_model(sd["model"], original, torch.zeros(1, 1, 32, 48))
    assert "48x32" in str(info.value) and "32x32" in str(info.value)


def test_blend_refuses_latents_of_another_size_when_sampling(sd):
    from dagfusion.nodes.diffusion.data import Latent
    from dagfusion.nodes.diffusion.sampling import run_sampling
    from dagfusion.nodes.diffusion.vae import encode

    original = encode(sd["vae"], _picture())
    model = inpaint.blend_model(sd["model"], original, inpaint.rectangle_mask(32, 32, 0, 0, 8, 8))
    with pytest.raises(ValueError, match="16x16.*8x8"):
        run_sampling(model, sd["conditioning"], Latent(torch.zeros(1, 4, 8, 8)), steps=2, count_macs=False)


def test_blend_patch_key_depends_on_the_mask(sd):
    from dagfusion.nodes.diffusion.vae import encode

    original = encode(sd["vae"], _picture())
    a = inpaint.blend_model(sd["model"], original, inpaint.rectangle_mask(32, 32, 0, 0, 8, 8))
    b = inpaint.blend_model(sd["model"], original, inpaint.rectangle_mask(32, 32, 0, 0, 8, 8))
    c = inpaint.blend_model(sd["model"], original, inpaint.rectangle_mask(32, 32, 0, 0, 8, 10))
    from dagfusion.fingerprint import fingerprint

    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


# --------------------------------------------------------------------------- 9-channel inpainting UNets


@pytest.fixture(scope="module")
def inpainting_pipe(sd):
    base = sd["pipe"]
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel.from_config({**dict(base.unet.config), "in_channels": 9}).eval()
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
        scheduler=diffusers.DDIMScheduler.from_config(base.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("sampler", "guidance", "seed"), [("ddim", 6.0, 3), ("default", 1.0, 9), ("euler", 4.0, 2)])
def test_nine_channel_unet_equals_diffusers_inpaint_pipeline(sd, inpainting_pipe, sampler, guidance, seed):
    from dagfusion.model import ModelHandle
    from dagfusion.nodes.diffusion.data import Latent, SchedulerSpec
    from dagfusion.nodes.diffusion.sampling import run_sampling

    pipe = inpainting_pipe
    if sampler == "euler":
        pipe = diffusers.StableDiffusionInpaintPipeline(**{**pipe.components, "scheduler": diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)})
        pipe.set_progress_bar_config(disable=True)
    spec = SchedulerSpec(type(pipe.scheduler).__name__, dict(pipe.scheduler.config))
    handle = ModelHandle.from_module(pipe.unet, scheduler=spec, vae_scale_factor=2)
    picture = _picture()
    mask = inpaint.feather_mask(inpaint.rectangle_mask(32, 32, 6, 4, 14, 20), 1.0)  # binarised at 0.5 by both
    model, latent = inpaint.condition_model(handle, sd["vae"], picture, mask)
    ours, _ = run_sampling(model, sd["conditioning"], Latent(torch.zeros_like(latent.samples)), steps=4,
                           guidance_scale=guidance, seed=seed, count_macs=False)
    masked = model.patches[-1].masked
    reference = pipe(prompt=PROMPT, image=picture, mask_image=mask, masked_image_latents=masked, height=32, width=32,
                     num_inference_steps=4, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
                     output_type="latent").images
    diff = (ours.samples - reference).abs().max().item()
    print(f"max |ours - diffusers| = {diff:.3g} (mean |x| {reference.abs().mean().item():.3g})")
    assert diff <= 1e-5, diff


def test_nine_channel_masked_picture_is_grey_where_masked(sd, inpainting_pipe):
    """The masked picture we encode equals diffusers' ``init_image * (mask < 0.5)`` (in [-1, 1])."""
    picture = _picture()
    mask = inpaint.rectangle_mask(32, 32, 6, 4, 14, 20)
    ours = inpaint.masked_picture(picture, mask) * 2 - 1
    theirs = (picture * 2 - 1) * (mask < 0.5)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_condition_refuses_an_ordinary_model(sd):
    from dagfusion.nodes.diffusion.sampling import run_sampling

    model, latent = inpaint.condition_model(sd["model"], sd["vae"], _picture(), inpaint.rectangle_mask(32, 32, 0, 0, 8, 8))
    with pytest.raises(ValueError, match="9 input channels.*takes 4.*Blend"):
        run_sampling(model, sd["conditioning"], latent, steps=2, count_macs=False)


# --------------------------------------------------------------------------- masks


def test_grow_and_shrink():
    mask = inpaint.rectangle_mask(16, 16, 6, 6, 4, 4)
    grown = inpaint.grow_mask(mask, 2)
    assert grown.sum() == 8 * 8 and grown[0, 0, 4, 4] == 1 and grown[0, 0, 3, 3] == 0
    assert torch.equal(inpaint.grow_mask(grown, -2), mask)
    assert torch.equal(inpaint.grow_mask(mask, 0), mask)


def test_feather_is_a_normalised_gaussian_blur():
    mask = inpaint.rectangle_mask(32, 32, 8, 8, 16, 16)
    soft = inpaint.feather_mask(mask, 2.0)
    assert soft.shape == mask.shape and 0 <= soft.min().item() and soft.max().item() <= 1
    assert soft[0, 0, 16, 16].item() == pytest.approx(1.0, abs=1e-6) and soft[0, 0, 0, 0].item() == 0
    assert 0.3 < soft[0, 0, 16, 8].item() < 0.7  # on the edge: about half
    assert soft.sum().item() == pytest.approx(mask.sum().item(), rel=1e-4)  # mass kept away from the borders


def test_invert_from_image_and_shapes():
    images = torch.zeros(2, 4, 8, 8)
    images[:, 0, :4] = 1.0
    images[:, 3, :, :2] = 1.0
    red = inpaint.mask_from_image(images, "red", 0.5)
    assert red.shape == (2, 1, 8, 8) and red[:, :, :4].min() == 1 and red[:, :, 4:].max() == 0
    assert inpaint.mask_from_image(images, "alpha")[:, :, :, :2].min() == 1
    assert torch.equal(inpaint.as_mask(torch.ones(8, 8)), torch.ones(1, 1, 8, 8))
    with pytest.raises(NodeInputError, match="alpha"):
        inpaint.mask_from_image(images[:, :3], "alpha")
    with pytest.raises(NodeInputError, match="shape"):
        inpaint.as_mask(torch.zeros(1, 3, 8, 8))


def test_nodes_through_the_engine(engine, tmp_path):
    from dagfusion.workflow import load_workflow

    text = """
    format_version: 1
    nodes:
      rect: {type: dagfusion.mask.Rectangle, inputs: {width: 16, height: 16, x: 4, y: 4, rect_width: 8, rect_height: 8}}
      grow: {type: dagfusion.mask.Grow, inputs: {mask: {from: rect.mask}, pixels: 1}}
      feather: {type: dagfusion.mask.Feather, inputs: {mask: {from: grow.mask}, sigma: 1.0}}
      invert: {type: dagfusion.mask.Invert, inputs: {mask: {from: feather.mask}}}
    """
    import textwrap

    result = engine.run(load_workflow(textwrap.dedent(text), text=True), out=tmp_path)
    out = result.output("invert.mask")
    assert out.shape == (1, 1, 16, 16) and out[0, 0, 8, 8].item() == pytest.approx(0.0, abs=1e-6)
    assert out[0, 0, 0, 0].item() == pytest.approx(1.0, abs=1e-3)
