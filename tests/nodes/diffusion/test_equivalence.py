"""The sampler node equals diffusers' own pipelines (same seed, scheduler, steps; fp32).

Each test loads a tiny model saved on disk through the real loader node, runs
encode -> sample -> decode through the engine, and compares with the diffusers pipeline
loaded from the same folder.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("sampler", ["default", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "unipc"])
def test_stable_diffusion_matches_pipeline(sampler, sd_folder, engine, tmp_path, helpers, reference):
    result = helpers.run_ok(engine, helpers.txt2img(sd_folder, sampler=sampler, steps=4, guidance=6.0), tmp_path / "run")
    pipe = reference(diffusers.StableDiffusionPipeline, sd_folder, sampler, safety_checker=None, requires_safety_checker=False)
    args = dict(prompt="a red fox", num_inference_steps=4, guidance_scale=6.0, height=32, width=32)
    latents = pipe(**args, generator=helpers.generator(0), output_type="latent").images
    images = pipe(**args, generator=helpers.generator(0), output_type="pt").images
    helpers.assert_close(result.output("sample.latent").samples, latents)
    helpers.assert_close(result.output("decode.image"), images)


def test_stable_diffusion_batch_negative_prompt_and_rescale(sd_folder, engine, tmp_path, helpers, reference):
    text = helpers.txt2img(sd_folder, negative="blurry, dark", batch=2, sampler="euler", steps=3, guidance=7.0,
                           seed=11, extra_sample=", guidance_rescale: 0.7")
    result = helpers.run_ok(engine, text, tmp_path / "run", use_cache=False)
    pipe = reference(diffusers.StableDiffusionPipeline, sd_folder, "euler", safety_checker=None, requires_safety_checker=False)
    latents = pipe(prompt="a red fox", negative_prompt="blurry, dark", num_images_per_prompt=2, num_inference_steps=3,
                   guidance_scale=7.0, guidance_rescale=0.7, height=32, width=32, generator=helpers.generator(11),
                   output_type="latent").images
    helpers.assert_close(result.output("sample.latent").samples, latents)


def test_img2img_matches_pipeline(sd_folder, engine, tmp_path, helpers, reference):
    """VAE-encode an image (posterior mode), then sample at strength 0.6 = StableDiffusionImg2ImgPipeline."""
    from PIL import Image

    picture = Image.new("RGB", (32, 32))
    picture.putdata([(8 * (i % 32), 8 * (i // 32), 128) for i in range(32 * 32)])
    picture.save(tmp_path / "input.png")
    text = f"""
    nodes:
      load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{sd_folder}", dtype: fp32}}}}
      text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: "a red fox"}}}}
      image: {{type: dagfusion.image.LoadImage, inputs: {{path: "{tmp_path / 'input.png'}"}}}}
      encode: {{type: dagfusion.vae.Encode, inputs: {{vae: {{from: load.vae}}, image: {{from: image.image}}}}}}
      sample:
        type: dagfusion.sampling.Sample
        inputs: {{model: {{from: load.model}}, conditioning: {{from: text.conditioning}}, latent: {{from: encode.latent}},
                 sampler: ddim, steps: 5, strength: 0.6, guidance_scale: 5.0, seed: 4}}
    """
    result = helpers.run_ok(engine, text, tmp_path / "run")
    init = result.output("encode.latent").samples
    pipe = reference(diffusers.StableDiffusionImg2ImgPipeline, sd_folder, "ddim", safety_checker=None,
                     requires_safety_checker=False)
    latents = pipe(prompt="a red fox", image=init, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
                   generator=helpers.generator(4), output_type="latent").images
    helpers.assert_close(result.output("sample.latent").samples, latents)


@pytest.mark.parametrize("sampler", ["default", "dpmpp_2m"])
def test_sdxl_matches_pipeline(sampler, sdxl_folder, engine, tmp_path, helpers, reference):
    result = helpers.run_ok(engine, helpers.txt2img(sdxl_folder, sampler=sampler, steps=3, guidance=5.0, seed=2),
                            tmp_path / "run")
    pipe = reference(diffusers.StableDiffusionXLPipeline, sdxl_folder, sampler)
    args = dict(prompt="a red fox", num_inference_steps=3, guidance_scale=5.0, height=32, width=32)
    latents = pipe(**args, generator=helpers.generator(2), output_type="latent").images
    images = pipe(**args, generator=helpers.generator(2), output_type="pt").images
    helpers.assert_close(result.output("sample.latent").samples, latents)
    helpers.assert_close(result.output("decode.image"), images)


def test_sdxl_with_negative_prompt_matches_pipeline(sdxl_folder, engine, tmp_path, helpers, reference):
    text = helpers.txt2img(sdxl_folder, negative="ugly", sampler="euler_ancestral", steps=3, guidance=4.0, seed=5,
                           decode=False)
    result = helpers.run_ok(engine, text, tmp_path / "run")
    pipe = reference(diffusers.StableDiffusionXLPipeline, sdxl_folder, "euler_ancestral")
    latents = pipe(prompt="a red fox", negative_prompt="ugly", num_inference_steps=3, guidance_scale=4.0, height=32,
                   width=32, generator=helpers.generator(5), output_type="latent").images
    helpers.assert_close(result.output("sample.latent").samples, latents)


@pytest.mark.parametrize("sampler", ["default", "ddim"])
def test_dit_matches_pipeline(sampler, dit_folder, engine, tmp_path, helpers, reference):
    text = f"""
    nodes:
      load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{dit_folder}", dtype: fp32}}}}
      labels: {{type: dagfusion.conditioning.ClassLabel, inputs: {{class_ids: "3, 907"}}}}
      latent: {{type: dagfusion.latent.EmptyLatent, inputs: {{model: {{from: load.model}}, width: 16, height: 16, batch_size: 2}}}}
      sample:
        type: dagfusion.sampling.Sample
        inputs: {{model: {{from: load.model}}, conditioning: {{from: labels.conditioning}}, latent: {{from: latent.latent}},
                 sampler: {sampler}, steps: 4, guidance_scale: 4.0, seed: 7}}
      decode: {{type: dagfusion.vae.Decode, inputs: {{vae: {{from: load.vae}}, latent: {{from: sample.latent}}}}}}
    """
    result = helpers.run_ok(engine, text, tmp_path / "run")
    pipe = reference(diffusers.DiTPipeline, dit_folder, sampler)
    images = pipe(class_labels=[3, 907], num_inference_steps=4, guidance_scale=4.0, generator=helpers.generator(7),
                  output_type="pt").images
    helpers.assert_close(result.output("decode.image"), images)


@pytest.mark.parametrize("sampler", ["default", "euler"])
def test_pixart_matches_pipeline(sampler, pixart_folder, engine, tmp_path, helpers, reference):
    text = helpers.txt2img(pixart_folder, prompt="A Tiny Red Fox", width=16, height=16, sampler=sampler, steps=3,
                           guidance=4.5, seed=9)
    result = helpers.run_ok(engine, text, tmp_path / "run")
    pipe = reference(diffusers.PixArtAlphaPipeline, pixart_folder, sampler)
    args = dict(prompt="A Tiny Red Fox", num_inference_steps=3, guidance_scale=4.5, height=16, width=16,
                use_resolution_binning=False, clean_caption=False)
    latents = pipe(**args, generator=helpers.generator(9), output_type="latent").images
    images = pipe(**args, generator=helpers.generator(9), output_type="pt").images
    helpers.assert_close(result.output("sample.latent").samples, latents)
    helpers.assert_close(result.output("decode.image"), images)


def test_equivalence_check_can_fail(sd_folder, engine, tmp_path, helpers, reference):
    """A different seed gives different latents: the comparisons above are not vacuous."""
    result = helpers.run_ok(engine, helpers.txt2img(sd_folder, steps=2, seed=1, decode=False), tmp_path / "run")
    pipe = reference(diffusers.StableDiffusionPipeline, sd_folder, safety_checker=None, requires_safety_checker=False)
    latents = pipe(prompt="a red fox", num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                   generator=helpers.generator(2), output_type="latent").images
    with pytest.raises(AssertionError):
        helpers.assert_close(result.output("sample.latent").samples, latents)
