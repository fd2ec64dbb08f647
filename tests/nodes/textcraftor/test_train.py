"""TextCraftor training: the reward rises, only the encoder changes, resume is exact, NaN stops."""

from __future__ import annotations

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
    cond = encoded.positive["encoder_hidden_states"]
    uncond = encoded.negative["encoder_hidden_states"]
    den = denoise.Denoiser(model.denoiser, family_for(model.denoiser), denoise.make_scheduler(model), torch.float32,
                           2.0, __import__("contextlib").nullcontext)
    noise = torch.randn((len(PROMPTS), 4, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        latents = denoise.ddim_chain(den, noise, 3, 0, cond, uncond)
        return float(reward.score(denoise.decode(vae, latents), PROMPTS).mean())


@pytest.mark.parametrize("variant", ["direct", "prompt"])
def test_reward_goes_up_and_only_the_encoder_changes(parts: dict[str, Any], brightness: Brightness, variant: str) -> None:
    unet, vae, encoder = parts["model"].denoiser, parts["vae"].module, parts["clip"].encoders[0].get()
    with torch.no_grad():  # the random tiny UNet barely listens to its prompt: amplify its cross-attention
        for name, p in unet.named_parameters():
            if "attn2.to_out.0.weight" in name:
                p.mul_(30)
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
