"""The built-in ``shapes-sd`` and ``shapes-dit`` configs: the architectures of the shipped shapes
models (classes, sizes, x4 VAE, no attention at the highest UNet resolution), seeded builds, and a
text-to-latent pass through each denoiser with its own tokenizer and text encoder."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from dagfusion.nodes.training.build import build_builtin, handles  # noqa: E402

CAPTION = "a large red circle on the left on a black background"
EXPECTED = {
    "shapes-sd": {"denoiser": "UNet2DConditionModel", "text": "CLIPTextModel", "kind": "clip", "name": "unet",
                  "pipeline": "StableDiffusionPipeline"},
    "shapes-dit": {"denoiser": "PixArtTransformer2DModel", "text": "T5EncoderModel", "kind": "t5", "name": "transformer",
                   "pipeline": "PixArtAlphaPipeline"},
}
CONFIGS = list(EXPECTED)


@pytest.fixture(scope="module")
def built() -> dict[str, dict]:
    return {name: build_builtin(name, 0) for name in CONFIGS}


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", CONFIGS)
def test_the_architecture(name, built):
    parts, expected = built[name], EXPECTED[name]
    assert type(parts["denoiser"]).__name__ == expected["denoiser"]
    assert parts["denoiser_name"] == expected["name"] and parts["pipeline"] == expected["pipeline"]
    (encoder,) = parts["text_encoders"]
    assert type(encoder).__name__ == expected["text"]
    assert parts["text_kind"] == expected["kind"]
    assert type(parts["vae"]).__name__ == "AutoencoderKL"
    assert 2 ** (len(parts["vae"].config.block_out_channels) - 1) == 4  # 64 px images, 16 x 16 latents
    assert parts["vae"].config.latent_channels == 4
    assert 3_000_000 <= _params(parts["denoiser"]) <= 12_000_000, _params(parts["denoiser"])
    for module in (parts["denoiser"], parts["vae"], encoder):
        param = next(module.parameters())
        assert param.dtype == torch.float32 and param.device.type == "cpu"


def test_both_configs_share_the_vae_architecture(built):
    assert dict(built["shapes-sd"]["vae"].config) == dict(built["shapes-dit"]["vae"].config)


def test_the_unet_has_no_attention_at_the_highest_resolution(built):
    unet = built["shapes-sd"]["denoiser"]
    assert not hasattr(unet.down_blocks[0], "attentions")
    assert all(hasattr(block, "attentions") for block in unet.down_blocks[1:])  # cross-attention below it
    assert not hasattr(unet.up_blocks[-1], "attentions")


@pytest.mark.parametrize("name", CONFIGS)
def test_the_tokenizer_fits_the_text_encoder(name, built):
    parts = built[name]
    (encoder,), (tokenizer,) = parts["text_encoders"], parts["tokenizers"]
    assert len(tokenizer) <= encoder.config.vocab_size
    ids = tokenizer(CAPTION).input_ids
    assert max(ids) < encoder.config.vocab_size
    assert len(ids) == len(CAPTION.split()) + (2 if name == "shapes-sd" else 1)  # one token per word
    if name == "shapes-sd":
        assert tokenizer.model_max_length <= encoder.config.max_position_embeddings
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (encoder.config.bos_token_id, encoder.config.eos_token_id)
    else:
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (encoder.config.pad_token_id, encoder.config.eos_token_id)


@pytest.mark.parametrize("name", CONFIGS)
def test_seeded_builds_are_identical(name, built, helpers):
    first, again, other = built[name], build_builtin(name, 0), build_builtin(name, 1)
    for component in ("denoiser", "vae"):
        helpers.assert_same(helpers.state(first[component]), helpers.state(again[component]))
    helpers.assert_same(helpers.state(first["text_encoders"][0]), helpers.state(again["text_encoders"][0]))
    a, b = helpers.state(first["denoiser"]), helpers.state(other["denoiser"])
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", CONFIGS)
def test_a_caption_conditions_a_denoising_pass(name, built):
    from dagfusion.nodes.diffusion.latents import empty_latent
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.text import encode_prompt

    out = handles(built[name], "x", "cpu")
    assert out["model"].vae_scale_factor == 4
    assert not out["model"].denoiser.training and not out["vae"].module.training
    conditioning = encode_prompt(out["clip"], CAPTION)
    hidden = conditioning.positive["encoder_hidden_states"]
    assert hidden.shape[0] == 1 and hidden.shape[-1] == 64 and torch.isfinite(hidden).all()
    latent = empty_latent(out["model"], 64, 64, 1)
    assert tuple(latent.samples.shape) == (1, 4, 16, 16)
    result = sample(out["model"], conditioning, latent, steps=2, seed=0)
    assert tuple(result.samples.shape) == (1, 4, 16, 16)
    assert torch.isfinite(result.samples).all()
    assert math.isfinite(float(result.samples.std())) and float(result.samples.std()) > 0
