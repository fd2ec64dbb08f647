"""EDM training of SVD-layout video UNets: preconditioning equals diffusers' Euler, a perfect
v-prediction denoises exactly, the first-frame conditioning equals the sampler's, the loss falls."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from dagfusion.model import ImageEncoderHandle, VAEHandle
from dagfusion.nodes.training.objectives import TrainBatch, TrainStep
from dagfusion.nodes.video.edm import (
    EDMVideoObjective,
    VideoModelCall,
    denoise,
    edm_sigmas,
    encode_clips,
    first_frame_conditioning,
    loss_weight,
    precondition,
    svd_model_call,
    svd_scheduler_config,
)
from dagfusion.nodes.video.svd import svd_conditioning
from dagfusion.testing import models as tiny

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe() -> Any:
    return tiny._cached_pipeline("svd", 0)


def _encoders(pipe: Any) -> tuple[Any, Any]:
    return ImageEncoderHandle.from_modules(pipe.image_encoder, pipe.feature_extractor), VAEHandle.from_module(pipe.vae)


def test_a_perfect_v_prediction_denoises_to_x0() -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 8, 8, generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    sigma = torch.tensor([0.01, 1.3, 700.0])
    x = x0 + sigma.view(-1, 1, 1, 1, 1) * eps
    seen: dict[str, Any] = {}

    def perfect(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = torch.exp(4.0 * t).view(-1, 1, 1, 1, 1)  # the noise level the timestep encodes (c_noise = ln(σ)/4)
        seen["sample"] = sample
        alpha, sig = 1.0 / (s**2 + 1).sqrt(), s / (s**2 + 1).sqrt()
        return alpha * eps - sig * x0  # v = α·ε − σ_vp·x0

    out = denoise(perfect, x, sigma)
    assert torch.allclose(out, x0, atol=1e-3, rtol=1e-4), float((out - x0).abs().max())
    assert torch.allclose(seen["sample"], x / (sigma**2 + 1).sqrt().view(-1, 1, 1, 1, 1))
    # a v-prediction off by a sign is not x0: the check can fail
    wrong = denoise(lambda s, t: -perfect(s, t), x, sigma)
    assert not torch.allclose(wrong, x0, atol=1e-2)


def test_preconditioning_equals_diffusers_euler_v_prediction() -> None:
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(**svd_scheduler_config())
    sched.set_timesteps(4)
    gen = torch.Generator().manual_seed(1)
    for i in range(3):  # every noise level but the final 0
        sigma = sched.sigmas[i]
        t = sched.timesteps[i]
        x = torch.randn(1, 2, 4, 8, 8, generator=gen) * float(sigma)
        out = torch.randn(x.shape, generator=gen)
        pre = precondition(sigma.reshape(1))
        assert torch.allclose(pre.c_noise, t.reshape(1).float(), atol=1e-5)
        sched._step_index = None  # fresh step bookkeeping for each level
        sched.set_begin_index(i)
        scaled = sched.scale_model_input(x, t)
        assert torch.allclose(scaled, x * pre.c_in, rtol=1e-5)
        step = sched.step(out, t, x, return_dict=True)
        ours = denoise(lambda s, tt, out=out: out, x, sigma.reshape(1))
        assert torch.allclose(step.pred_original_sample, ours, atol=1e-4, rtol=1e-4)


def test_sigmas_and_weight() -> None:
    sig = edm_sigmas(20000, torch.Generator().manual_seed(0), 0.7, 1.6)
    logs = sig.log()
    assert abs(float(logs.mean()) - 0.7) < 0.05 and abs(float(logs.std()) - 1.6) < 0.05
    assert torch.allclose(loss_weight(torch.tensor([1.0, 2.0])), torch.tensor([2.0, 1.25]))


def test_first_frame_conditioning_equals_the_sampler_conditioning(pipe: Any) -> None:
    clip_vision, vae = _encoders(pipe)
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    theirs, _ = svd_conditioning(clip_vision, vae, image, width=32, height=32, frames=3, fps=7, motion_bucket_id=127,
                                 noise_aug_strength=0.02, seed=5)
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(5))
    ours = first_frame_conditioning(clip_vision, vae, image, noise=noise, noise_aug=torch.full((2,), 0.02), fps=7,
                                    motion_bucket_id=127)
    for name in ("encoder_hidden_states", "image_latents", "added_time_ids"):
        assert torch.allclose(ours.positive[name], theirs.positive[name], atol=1e-6), name
    dropped = first_frame_conditioning(clip_vision, vae, image, noise=noise, noise_aug=torch.full((2,), 0.02), fps=7,
                                       motion_bucket_id=127, drop=torch.tensor([True, False]))
    assert float(dropped.positive["image_latents"][0].abs().sum()) == 0.0
    assert torch.equal(dropped.positive["encoder_hidden_states"][1], ours.positive["encoder_hidden_states"][1])


def test_model_call_concatenates_the_image_latents(pipe: Any) -> None:
    clip_vision, vae = _encoders(pipe)
    clips = torch.rand(1, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs = EDMVideoObjective(condition_dropout=0.0).batch_inputs(
        clips, vae=vae, encoder=clip_vision, device="cpu", generator=torch.Generator().manual_seed(0))
    call = svd_model_call(pipe.unet, inputs.conditioning, tuple(inputs.x0.shape))
    assert isinstance(call, VideoModelCall) and call.concat.shape == (1, 3, 4, 16, 16)
    with torch.no_grad():
        ours = call(inputs.x0, torch.tensor([0.5]))
        direct = pipe.unet(torch.cat([inputs.x0, call.concat], dim=2), torch.tensor([0.5]),
                           encoder_hidden_states=call.inputs["encoder_hidden_states"],
                           added_time_ids=call.inputs["added_time_ids"]).sample
    assert torch.allclose(ours, direct)
    assert inputs.x0.shape == encode_clips(vae, clips).shape


def test_loss_is_finite_and_falls_on_a_fixed_batch(pipe: Any) -> None:
    clip_vision, vae = _encoders(pipe)
    objective = EDMVideoObjective(p_mean=0.0, p_std=0.5)
    clips = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    inputs = objective.batch_inputs(clips, vae=vae, encoder=clip_vision, device="cpu",
                                    generator=torch.Generator().manual_seed(7))
    unet = copy.deepcopy(pipe.unet).train()
    call = svd_model_call(unet, inputs.conditioning, tuple(inputs.x0.shape))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    losses = []
    for step in range(6):
        loss, logs = objective.loss(call, TrainBatch(inputs.x0, ("",) * 2), TrainStep(step, 6),
                                    torch.Generator().manual_seed(11))  # the same σ and noise every step
        assert torch.isfinite(loss) and set(logs) == {"sigma_mean", "denoise_mse"}
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0], losses
    assert any(p.grad is not None for p in unet.parameters())


def test_objective_settings_are_checked_and_keyed() -> None:
    with pytest.raises(ValueError, match="condition_dropout"):
        EDMVideoObjective(condition_dropout=1.5)
    assert EDMVideoObjective().key() != EDMVideoObjective(p_mean=1.0).key()
    assert EDMVideoObjective().sampling_scheduler(None).config["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError, match="video latents"):
        EDMVideoObjective().loss(None, TrainBatch(torch.zeros(1, 4, 8, 8), ("",)), TrainStep(0, 1),  # type: ignore[arg-type]
                                 torch.Generator())


def test_the_shared_training_loop_trains_a_video_unet_on_shapes_clips() -> None:
    """The loop's batch seam: clips in, first-frame conditioning bound, image latents concatenated;
    each clip's motion bucket comes from the shapes-video data."""
    import torch

    from dagfusion.model import ImageEncoderHandle, ModelHandle, VAEHandle
    from dagfusion.nodes.diffusion.data import SchedulerSpec
    from dagfusion.nodes.shapes.motion import ShapesVideoDataset
    from dagfusion.nodes.training.loop import TrainConfig, train
    from dagfusion.nodes.video.edm import EDMVideoObjective
    from dagfusion.testing import models as tiny

    pipe = tiny._cached_pipeline("svd", 0)
    model = ModelHandle.from_module(pipe.unet, scheduler=SchedulerSpec("EulerDiscreteScheduler", tiny.svd_scheduler_config()),
                                    vae_scale_factor=2)
    encoder = ImageEncoderHandle.from_modules(pipe.image_encoder, pipe.feature_extractor)
    vae = VAEHandle.from_module(pipe.vae)
    data = ShapesVideoDataset("train", resolution=32, frames=3, seed=0)
    seen: list[Any] = []
    objective = EDMVideoObjective()
    original = objective.batch_inputs

    def spy(examples: Any, **kwargs: Any) -> Any:
        out = original(examples, **kwargs)
        seen.append(out.conditioning.positive["added_time_ids"][:, 1].tolist())
        return out

    object.__setattr__(objective, "batch_inputs", spy)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = train(model, data, encoder, vae, objective, TrainConfig(steps=3, batch_size=2, learning_rate=1e-3, seed=0))
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    batch = data.batch(0, 2)
    assert seen[0] == [float(b) for b in batch.motion_bucket_ids]
    trained = result.model.denoiser.state_dict()
    assert any(not torch.equal(trained[k], before[k]) for k in before)
    assert all(torch.equal(pipe.unet.state_dict()[k], before[k]) for k in before)  # the input model is untouched
