"""TextCraftor training: the reward rises, only the encoder changes, resume is exact, NaN stops."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from dagfusion.nodes.textcraftor import denoise
from dagfusion.nodes.textcraftor.loop import CraftConfig, train_encoder
from dagfusion.nodes.training.loop import CheckpointPolicy

from .conftest import PROMPTS, Brightness, same, snapshot

FAST = dict(sample_steps=3, grad_steps=2, resolution=16, batch_size=2, guidance=2.0, alignment_weight=0.0)


def evaluate(parts: dict[str, Any], clip: Any, reward: Any) -> float:
    """Mean reward of a fixed generation (3 DDIM steps, fixed noise) with ``clip``'s embeddings."""
    from dagfusion.model import family_for
    from dagfusion.nodes.diffusion.text import encode_prompt

    model, vae = parts["model"], parts["vae"]
    encoded = encode_prompt(clip, PROMPTS, "")
    den = denoise.Denoiser(model.denoiser, family_for(model.denoiser), denoise.make_scheduler(model), torch.float32,
                           2.0, __import__("contextlib").nullcontext, kind=clip.kind, scale=model.vae_scale_factor)
    noise = torch.randn((len(PROMPTS), 4, 8, 8), generator=torch.Generator().manual_seed(5))
    with model.use(model.denoiser), torch.no_grad():
        from dagfusion.model import apply_patches

        with apply_patches([p for p in model.patches if hasattr(p, "apply")], model.denoiser):
            latents = denoise.ddim_chain(den, noise, 3, 0, dict(encoded.positive), dict(encoded.negative))
        return float(reward.score(denoise.decode(vae, latents), PROMPTS).mean())


def amplify_cross_attention(denoiser: torch.nn.Module, factor: float = 30.0) -> None:
    """The random tiny denoisers barely listen to their prompt: amplify their cross-attention."""
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "attn2.to_out.0.weight" in name:
                p.mul_(factor)


@pytest.mark.parametrize("variant", ["direct", "prompt"])
def test_reward_goes_up_and_only_the_encoder_changes(parts: dict[str, Any], brightness: Brightness, variant: str) -> None:
    unet, vae, encoder = parts["model"].denoiser, parts["vae"].module, parts["clip"].encoders[0].get()
    amplify_cross_attention(unet)
    before = {"unet": snapshot(unet), "vae": snapshot(vae), "encoder": snapshot(encoder)}
    start = evaluate(parts, parts["clip"], brightness)
    config = CraftConfig(variant=variant, steps=4, learning_rate=1e-2, **FAST)
    result = train_encoder(parts["model"], parts["clip"], parts["vae"], brightness, PROMPTS, config)
    assert evaluate(parts, result.clip, brightness) > start
    assert len(result.rewards) == len(result.losses) == 4
    assert same(snapshot(unet), before["unet"]) and same(snapshot(vae), before["vae"])
    assert same(snapshot(encoder), before["encoder"]), "the input encoder must not change"
    assert all(p.grad is None for m in (unet, vae, encoder) for p in m.parameters())
    trained = result.clip.encoders[0].get()
    assert trained is not encoder and not same(snapshot(trained), before["encoder"])
    assert all(not p.requires_grad for p in trained.parameters())


def test_lora_trains_only_the_adapter(parts: dict[str, Any], brightness: Brightness) -> None:
    encoder = parts["clip"].encoders[0].get()
    before = snapshot(encoder)
    config = CraftConfig(variant="prompt", steps=2, learning_rate=1e-2, trainable="lora", lora_rank=2, **FAST)
    result = train_encoder(parts["model"], parts["clip"], parts["vae"], brightness, PROMPTS, config)
    assert result.clip.encoders[0].get() is encoder and same(snapshot(encoder), before)
    (patch,) = result.clip.patches
    assert any(float(layer.up.abs().sum()) > 0 for layer in patch.layers.values())
    assert parts["clip"].patches == ()


def test_match_selects_layers_by_name(parts: dict[str, Any], brightness: Brightness) -> None:
    config = CraftConfig(variant="direct", steps=1, learning_rate=1e-2, trainable="match", match="*layers.1.*", **FAST)
    result = train_encoder(parts["model"], parts["clip"], parts["vae"], brightness, PROMPTS, config)
    old, new = snapshot(parts["clip"].encoders[0].get()), snapshot(result.clip.encoders[0].get())
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(".layers.1." in k for k in changed)


def test_resume_equals_an_uninterrupted_run(parts: dict[str, Any], brightness: Brightness, tmp_path: Path) -> None:
    config = CraftConfig(variant="prompt", steps=4, learning_rate=1e-3, ema_decay=0.5, **{**FAST, "alignment_weight": 0.5})
    whole = train_encoder(parts["model"], parts["clip"], parts["vae"], brightness, PROMPTS, config,
                          checkpoints=CheckpointPolicy(folder=tmp_path / "a", every=2, keep=0))
    resumed = train_encoder(parts["model"], parts["clip"], parts["vae"], brightness, PROMPTS, config,
                            resume=tmp_path / "a" / "step-00000002")
    assert resumed.start_step == 2
    assert resumed.rewards == whole.rewards and resumed.losses == whole.losses
    assert same(snapshot(resumed.clip.encoders[0].get()), snapshot(whole.clip.encoders[0].get()))


def test_a_nan_reward_stops_naming_the_step(parts: dict[str, Any], tmp_path: Path) -> None:
    class Poison(Brightness):
        calls = 0

        def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            Poison.calls += 1
            scores = super()._score(images, prompts)
            return scores * float("nan") if Poison.calls == 2 else scores

    config = CraftConfig(variant="direct", steps=3, learning_rate=1e-3, **FAST)
    with pytest.raises(FloatingPointError, match="reward became nan at step 2.*step-00000001"):
        train_encoder(parts["model"], parts["clip"], parts["vae"], Poison(), PROMPTS, config,
                      checkpoints=CheckpointPolicy(folder=tmp_path, every=1, keep=0))
    assert (tmp_path / "step-00000001").is_dir() and not (tmp_path / "step-00000002").exists()


def test_v_prediction_x0_inverts_the_target() -> None:
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    abar = torch.tensor([0.3, 0.0])  # the second row at zero terminal SNR
    a = abar.reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(denoise.x0_from(v, x_t, abar, "v_prediction"), x0, atol=1e-6)
    assert torch.allclose(denoise.x0_from(eps[:1], x_t[:1], abar[:1], "epsilon"), x0[:1], atol=1e-5)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="grad_steps"):
        CraftConfig(sample_steps=2, grad_steps=3)
    with pytest.raises(ValueError, match="variant"):
        CraftConfig(variant="both")
    with pytest.raises(ValueError, match="unet_lora_rank"):
        CraftConfig(trainable="none")


def test_the_training_generation_equals_the_sampler(parts: dict[str, Any]) -> None:
    """With gradients off, the chain TextCraftor back-propagates through is the DDIM sampler's run."""
    from dagfusion.nodes.diffusion.data import Latent
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.text import encode_prompt

    model, clip = parts["model"], parts["clip"]
    encoded = encode_prompt(clip, PROMPTS[:2], "")
    seed = 3
    expected = sample(model, encoded, Latent(torch.zeros(2, 4, 8, 8)), sampler="ddim", steps=4, guidance_scale=3.0,
                      seed=seed).samples
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    from dagfusion.model import family_for

    den = denoise.Denoiser(model.denoiser, family_for(model.denoiser), denoise.make_scheduler(model), torch.float32,
                           3.0, __import__("contextlib").nullcontext, kind="clip", scale=2)
    with torch.no_grad():
        got = denoise.ddim_chain(den, noise, 4, 0, dict(encoded.positive), dict(encoded.negative))
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())


def test_the_training_generation_equals_the_sampler_on_pixart(pixart_parts: dict[str, Any]) -> None:
    """The transformer gets its inputs (T5 mask, micro-conditions) the way the sampler gives them."""
    from dagfusion.model import family_for
    from dagfusion.nodes.diffusion.data import Latent
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.text import encode_prompt

    model = pixart_parts["model"]
    encoded = encode_prompt(pixart_parts["clip"], "a red circle", "")
    expected = sample(model, encoded, Latent(torch.zeros(1, 4, 8, 8)), sampler="ddim", steps=3, guidance_scale=3.0,
                      seed=4).samples
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    den = denoise.Denoiser(model.denoiser, family_for(model.denoiser), denoise.make_scheduler(model), torch.float32,
                           3.0, __import__("contextlib").nullcontext, kind="t5", scale=2)
    with torch.no_grad():
        got = denoise.ddim_chain(den, noise, 3, 0, dict(encoded.positive), dict(encoded.negative))
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())


def test_unet_lora_alone_trains_only_its_adapter(parts: dict[str, Any], brightness: Brightness) -> None:
    unet, encoder = parts["model"].denoiser, parts["clip"].encoders[0].get()
    before = {"unet": snapshot(unet), "encoder": snapshot(encoder)}
    start = evaluate(parts, parts["clip"], brightness)
    config = CraftConfig(variant="prompt", steps=4, learning_rate=5e-2, trainable="none", unet_lora_rank=2, **FAST)
    result = train_encoder(parts["model"], parts["clip"], parts["vae"], brightness, PROMPTS, config)
    assert result.clip is parts["clip"], "trainable 'none' leaves the encoder bundle as it is"
    assert same(snapshot(unet), before["unet"]) and same(snapshot(encoder), before["encoder"])
    (patch,) = result.model.patches
    assert any(float(layer.up.abs().sum()) > 0 for layer in patch.layers.values())
    assert parts["model"].patches == ()
    assert evaluate({**parts, "model": result.model}, parts["clip"], brightness) > start


def test_encoder_and_unet_lora_train_together_and_resume(parts: dict[str, Any], brightness: Brightness,
                                                          tmp_path: Path) -> None:
    config = CraftConfig(variant="prompt", steps=3, learning_rate=1e-3, trainable="lora", lora_rank=2,
                         unet_lora_rank=2, **FAST)
    whole = train_encoder(parts["model"], parts["clip"], parts["vae"], brightness, PROMPTS, config,
                          checkpoints=CheckpointPolicy(folder=tmp_path, every=1, keep=0))
    resumed = train_encoder(parts["model"], parts["clip"], parts["vae"], brightness, PROMPTS, config,
                            resume=tmp_path / "step-00000002")
    assert resumed.rewards == whole.rewards
    (a,), (b,) = whole.model.patches, resumed.model.patches
    assert all(torch.equal(a.layers[n].up, b.layers[n].up) for n in a.layers)
    assert len(whole.clip.patches) == 1


@pytest.fixture
def pixart_parts() -> dict[str, Any]:
    """Private copies of the tiny PixArt (T5 encoder, transformer denoiser) and its VAE."""
    from dagfusion.model import ModelHandle, TextEncoderBundle, VAEHandle
    from dagfusion.testing.models import _cached_pipeline

    pipe = _cached_pipeline("pixart", 0)
    model = ModelHandle.from_module(copy.deepcopy(pipe.transformer), scheduler=tiny_ddim_spec(pipe.scheduler),
                                    vae_scale_factor=2)
    clip = TextEncoderBundle.from_modules("t5", [copy.deepcopy(pipe.text_encoder)], [pipe.tokenizer],
                                          options={"max_length": 16, "lowercase": True})
    return {"model": model, "vae": VAEHandle.from_module(copy.deepcopy(pipe.vae)), "clip": clip}


def tiny_ddim_spec(scheduler: Any) -> Any:
    from dagfusion.nodes.diffusion.data import SchedulerSpec

    return SchedulerSpec("DDIMScheduler", dict(scheduler.config))


def test_t5_encoder_of_a_pixart_model_trains(pixart_parts: dict[str, Any], brightness: Brightness) -> None:
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.textcraftor.encoder import encode

    clip = pixart_parts["clip"]
    encoder, tokenizer = clip.encoders[0].get(), clip.tokenizers[0].get()
    reference = encode_prompt(clip, "A Red Circle", "")
    ours = encode(clip, encoder, tokenizer, ["A Red Circle"], "cpu")
    assert torch.equal(ours["encoder_attention_mask"], reference.positive["encoder_attention_mask"])
    assert torch.allclose(ours["encoder_hidden_states"], reference.positive["encoder_hidden_states"], atol=1e-6)
    denoiser = pixart_parts["model"].denoiser
    amplify_cross_attention(denoiser)
    with torch.no_grad():  # and its caption projection, so the text reaches the image at all
        for name, p in denoiser.named_parameters():
            if name.startswith("caption_projection") and name.endswith("weight"):
                p.mul_(10)
    before = snapshot(encoder)
    start = evaluate(pixart_parts, clip, brightness)
    config = CraftConfig(variant="prompt", steps=4, learning_rate=3e-2, **FAST)
    result = train_encoder(pixart_parts["model"], clip, pixart_parts["vae"], brightness, PROMPTS, config)
    assert evaluate(pixart_parts, result.clip, brightness) > start
    assert same(snapshot(encoder), before)
    assert result.clip.kind == "t5" and result.clip.options["max_length"] == 16


def test_two_encoder_bundles_are_refused(parts: dict[str, Any], brightness: Brightness) -> None:
    from dagfusion.model import TextEncoderBundle

    encoder = parts["clip"].encoders[0].get()
    tokenizer = parts["clip"].tokenizers[0].get()
    sdxl = TextEncoderBundle.from_modules("sdxl", [encoder, encoder], [tokenizer, tokenizer])
    with pytest.raises(ValueError, match="one text encoder, CLIP .* or T5"):
        train_encoder(parts["model"], sdxl, parts["vae"], brightness, PROMPTS, CraftConfig(steps=1, **FAST))
