"""Text encoding (CLIP, SDXL, T5), class labels, VAE encode/decode (tiled), image load/save with provenance."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dagfusion.nodes.diffusion.data import Latent  # noqa: E402
from dagfusion.nodes.diffusion.loading import load_diffusers_folder  # noqa: E402
from dagfusion.nodes.diffusion.text import encode_prompt  # noqa: E402

LONG = " ".join(["a tiny red fox jumping over the lazy dog"] * 12)


def test_clip_embeddings_equal_the_pipeline_and_long_prompts_warn(sd_folder, reference, caplog):
    clip = load_diffusers_folder(sd_folder).clip
    pipe = reference(diffusers.StableDiffusionPipeline, sd_folder, safety_checker=None, requires_safety_checker=False)
    with caplog.at_level(logging.WARNING, logger="dagfusion.node"):
        cond = encode_prompt(clip, LONG, "blurry")
    assert cond.meta["truncated"] and "longer than" in caplog.text and "was cut" in caplog.text
    positive, negative = pipe.encode_prompt(LONG, "cpu", 1, True, "blurry")
    assert torch.equal(cond.positive["encoder_hidden_states"], positive)
    assert torch.equal(cond.negative["encoder_hidden_states"], negative)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dagfusion.node"):
        short = encode_prompt(clip, "a red fox")
    assert not short.meta["truncated"] and caplog.text == ""


def test_clip_skip_uses_an_earlier_layer(sd_folder):
    clip = load_diffusers_folder(sd_folder).clip
    encoder, tokenizer = clip.encoders[0].get(), clip.tokenizers[0].get()
    skipped = encode_prompt(clip, "a red fox", clip_skip=1).positive["encoder_hidden_states"]
    ids = tokenizer("a red fox", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
        assert torch.equal(skipped, final_norm(hidden))
    assert not torch.equal(skipped, encode_prompt(clip, "a red fox").positive["encoder_hidden_states"])


def test_sdxl_empty_negative_is_zeros_and_pooled_is_kept(sdxl_folder):
    clip = load_diffusers_folder(sdxl_folder).clip
    cond = encode_prompt(clip, "a red fox")
    assert cond.positive["encoder_hidden_states"].shape == (1, 77, 64)
    assert cond.positive["text_embeds"].shape == (1, 32)
    assert not cond.negative["encoder_hidden_states"].any() and not cond.negative["text_embeds"].any()
    assert encode_prompt(clip, "a red fox", "ugly").negative["text_embeds"].abs().sum() > 0


def test_t5_path_lowercases_masks_and_truncates(pixart_folder, caplog):
    clip = load_diffusers_folder(pixart_folder).clip
    upper = encode_prompt(clip, "  A RED FOX ")
    lower = encode_prompt(clip, "a red fox")
    assert torch.equal(upper.positive["encoder_hidden_states"], lower.positive["encoder_hidden_states"])
    mask = lower.positive["encoder_attention_mask"]
    assert mask.shape == (1, 120) and 0 < int(mask.sum()) < 120
    with caplog.at_level(logging.WARNING, logger="dagfusion.node"):
        short = encode_prompt(clip, "red fox " * 100, max_length=16)
    assert short.positive["encoder_hidden_states"].shape[1] == 16 and "T5" in caplog.text


def test_encoding_for_a_class_conditional_model_is_refused(dit_folder, engine, tmp_path, helpers):
    text = f"""
    nodes:
      load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{dit_folder}", dtype: fp32}}}}
      text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: "a fox"}}}}
    """
    result = engine.run(helpers.workflow(text), out=tmp_path / "run")
    assert "ClassLabel" in str(result.errors["text"].original)


def test_class_label_parsing(engine, tmp_path, helpers):
    from dagfusion.nodes.diffusion.conditioning import parse_labels

    assert parse_labels("207, 360 88") == [207, 360, 88]
    for bad, message in (("", "at least one"), ("cat", "integers"), ("-1", "negative")):
        with pytest.raises(ValueError, match=message):
            parse_labels(bad)
    result = helpers.run_ok(engine, 'nodes: {c: {type: dagfusion.conditioning.ClassLabel, inputs: {class_ids: "1,2"}}}',
                            tmp_path / "run")
    assert result.output("c.conditioning").positive["class_labels"].tolist() == [1, 2]


def test_dit_labels_out_of_range_are_explained(dit_folder):
    from dagfusion.nodes.diffusion.conditioning import class_conditioning
    from dagfusion.nodes.diffusion.sampling import sample

    loaded = load_diffusers_folder(dit_folder)
    with pytest.raises(ValueError, match=r"0\.\.999"):
        sample(loaded.model, class_conditioning([1000]), Latent(torch.zeros(1, 4, 8, 8)), steps=1)


# --- VAE ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae(sd_folder: Any) -> Any:
    return load_diffusers_folder(sd_folder).vae


def test_tiled_decode_matches_plain_decode(vae):
    from dagfusion.nodes.diffusion.vae import decode

    generator = torch.Generator().manual_seed(0)
    latent = Latent(torch.randn(1, 4, 24, 24, generator=generator))
    plain = decode(vae, latent)
    unrelated = decode(vae, Latent(torch.randn(1, 4, 24, 24, generator=generator)))
    assert plain.shape == (1, 3, 48, 48) and 0 <= plain.min() and plain.max() <= 1
    assert torch.equal(decode(vae, latent, tiled=True, tile_size=32, tile_overlap=8), plain)  # one tile
    tiled = decode(vae, latent, tiled=True, tile_size=16, tile_overlap=8)
    assert tiled.shape == plain.shape and not torch.equal(tiled, plain)
    # a random VAE has a wide receptive field, so tiles differ a little, but far less than other pictures
    assert (tiled - plain).abs().mean() < 0.15 * (unrelated - plain).abs().mean()
    with pytest.raises(ValueError, match="smaller than tile_size"):
        decode(vae, latent, tiled=True, tile_size=8, tile_overlap=8)


def test_encode_decode_round_trip_and_sampling_mode(vae):
    from dagfusion.nodes.diffusion.vae import decode, encode

    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mode = encode(vae, image)
    assert mode.shape == (2, 4, 16, 16)
    assert torch.equal(encode(vae, image).samples, mode.samples)
    drawn = encode(vae, image, mode="sample", seed=3)
    assert torch.equal(drawn.samples, encode(vae, image, mode="sample", seed=3).samples)
    assert not torch.equal(drawn.samples, mode.samples)
    assert decode(vae, mode).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="channels"):
        encode(vae, torch.rand(1, 2, 32, 32))


def test_scaling_matches_the_vae_config(vae):
    from dagfusion.nodes.diffusion.vae import from_vae_space, to_vae_space

    z = torch.randn(1, 4, 4, 4)
    module = vae.module
    assert torch.allclose(from_vae_space(module, z), z * module.config.scaling_factor)
    assert torch.allclose(to_vae_space(module, from_vae_space(module, z)), z, atol=1e-6)


# --- images and provenance ---------------------------------------------------------------------------


def test_saved_png_carries_workflow_and_manifest(sd_folder, engine, tmp_path, helpers):
    from PIL import Image

    from dagfusion.pngmeta import MANIFEST_KEY, WORKFLOW_KEY, read_png_text

    text = helpers.txt2img(sd_folder, prompt="a red fox", batch=2, sampler="euler", steps=2, seed=42) + """
      save: {type: dagfusion.image.SaveImage, inputs: {images: {from: decode.image}, filename_prefix: "fox/pic"}}
    """
    result = helpers.run_ok(engine, text, tmp_path / "run")
    paths = result.output("save.paths")
    assert [p.split("/")[-1] for p in paths] == ["pic_00000.png", "pic_00001.png"]
    chunks = read_png_text(paths[1])
    assert "dagfusion.models.LoadDiffusers" in chunks[WORKFLOW_KEY] and "seed: 42" in chunks[WORKFLOW_KEY]
    manifest = json.loads(chunks[MANIFEST_KEY])
    assert manifest["image"]["index"] == 1 and manifest["image"]["batch_size"] == 2
    assert manifest["seeds"]["sample.seed"] == 42
    assert manifest["torch"] and manifest["diffusers"]
    assert manifest["lineage"]["model"]["fingerprint"] == result.output("load.model").info["fingerprint"]
    assert manifest["lineage"]["sampler"]["seed"] == 42 and manifest["lineage"]["conditioning"]["prompt"] == "a red fox"
    with Image.open(paths[0]) as picture:
        assert picture.size == (32, 32)
    again = helpers.run_ok(engine, text, tmp_path / "run")  # same folder: never overwrites
    assert again.output("save.paths")[0].endswith("pic_00002.png")


def test_load_image_gives_image_and_alpha_mask(engine, tmp_path, helpers):
    from PIL import Image

    picture = Image.new("RGBA", (6, 4), (255, 0, 0, 255))
    picture.putpixel((0, 0), (0, 0, 255, 0))
    picture.save(tmp_path / "in.png")
    result = helpers.run_ok(engine, f'nodes: {{l: {{type: dagfusion.image.LoadImage, inputs: {{path: "{tmp_path / "in.png"}"}}}}}}',
                            tmp_path / "run")
    image, mask = result.output("l.image"), result.output("l.mask")
    assert image.shape == (1, 3, 4, 6) and mask.shape == (1, 1, 4, 6)
    assert image[0, :, 1, 1].tolist() == [1.0, 0.0, 0.0]
    assert mask[0, 0, 0, 0] == 1.0 and mask.sum() == 1.0
    (tmp_path / "bad.png").write_text("not a picture")
    bad = engine.run(helpers.workflow(f'nodes: {{l: {{type: dagfusion.image.LoadImage, inputs: {{path: "{tmp_path / "bad.png"}"}}}}}}'),
                     out=tmp_path / "run2")
    assert "PNG, JPEG or WebP" in str(bad.errors["l"].original)


def test_preview_image_emits_events(engine, tmp_path, helpers):
    from dagfusion import EventCollector, NodePreview

    events = EventCollector()
    text = helpers.txt2img  # noqa: F841 - documentation: previews also come from SaveImage
    workflow = f'''
    nodes:
      l: {{type: dagfusion.image.LoadImage, inputs: {{path: "{_png(tmp_path)}"}}}}
      p: {{type: dagfusion.image.PreviewImage, inputs: {{images: {{from: l.image}}}}}}
    '''
    helpers.run_ok(engine, workflow, tmp_path / "run", handler=events)
    previews = [e for e in events.events if isinstance(e, NodePreview) and e.node_id == "p"]
    assert len(previews) == 1 and previews[0].preview.size == (5, 5)


def _png(folder: Any) -> Any:
    from PIL import Image

    path = folder / "p.png"
    Image.new("RGB", (5, 5), (10, 20, 30)).save(path)
    return path


def test_decode_precision_follows_diffusers_and_recovers_from_overflow(caplog):
    import copy

    from dagfusion.model import VAEHandle
    from dagfusion.nodes.diffusion.vae import decode, needs_upcast
    from dagfusion.testing import models as tiny

    module = tiny.tiny_vae().to(torch.float16)
    sd = VAEHandle.from_module(module, info={"pipeline": "StableDiffusionPipeline"})
    xl = VAEHandle.from_module(module, info={"pipeline": "StableDiffusionXLPipeline"})
    assert module.config.force_upcast and not needs_upcast(sd, module) and needs_upcast(xl, module)
    latent = Latent(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    exact = decode(VAEHandle.from_module(copy.deepcopy(module).float()), latent)  # same (rounded) weights in fp32
    upcast = decode(xl, latent)
    assert module.dtype == torch.float16  # restored after decoding in fp32
    assert torch.equal(upcast, exact)
    assert torch.equal(decode(sd, latent, precision="fp32"), upcast)
    assert (decode(sd, latent) - exact).abs().max() < 0.02  # half precision, as StableDiffusionPipeline does
    with caplog.at_level(logging.WARNING, logger="dagfusion.node"):
        huge = decode(sd, Latent(latent.samples * 3e4))
    assert "overflowed" in caplog.text and torch.isfinite(huge).all()
