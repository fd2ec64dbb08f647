"""Image-to-video with SVD's layout: equal to StableVideoDiffusionPipeline, loaded offline, bad input refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dagfusion import NodeInputError
from dagfusion.model import ImageEncoderHandle, ModelHandle, VAEHandle
from dagfusion.nodes.diffusion.data import Latent, SchedulerSpec
from dagfusion.nodes.diffusion.sampling import run_sampling
from dagfusion.nodes.video.svd import check_video_model, decode_video, svd_conditioning
from dagfusion.testing import models as tiny

FRAMES, SIZE, STEPS = 3, 32, 2


@pytest.fixture(scope="module")
def pipe() -> Any:
    return tiny._cached_pipeline("svd", 0)


def _handles(pipe: Any) -> dict[str, Any]:
    spec = SchedulerSpec(type(pipe.scheduler).__name__, dict(pipe.scheduler.config))
    return {
        "model": ModelHandle.from_module(pipe.unet, scheduler=spec, vae_scale_factor=pipe.vae_scale_factor),
        "clip_vision": ImageEncoderHandle.from_modules(pipe.image_encoder, pipe.feature_extractor),
        "vae": VAEHandle.from_module(pipe.vae),
    }


def _ours(parts: dict[str, Any], image: torch.Tensor, *, cond_seed: int, seed: int, min_g: float, max_g: float,
          chunk: int) -> torch.Tensor:
    cond, latent = svd_conditioning(
        parts["clip_vision"], parts["vae"], image, width=SIZE, height=SIZE, frames=FRAMES, fps=7,
        motion_bucket_id=127, noise_aug_strength=0.02, seed=cond_seed,
    )
    out, _ = run_sampling(parts["model"], cond, latent, steps=STEPS, guidance_scale=max_g, min_guidance_scale=min_g,
                          seed=seed, count_macs=False)
    return decode_video(parts["vae"], out.samples, chunk)


@pytest.mark.parametrize("min_g, max_g, chunk", [(1.0, 2.5, 2), (1.0, 1.0, 14)])
def test_frames_equal_the_diffusers_pipeline(pipe: Any, min_g: float, max_g: float, chunk: int) -> None:
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    parts = _handles(pipe)
    ours = _ours(parts, image, cond_seed=11, seed=3, min_g=min_g, max_g=max_g, chunk=chunk)
    h = SIZE // pipe.vae_scale_factor
    noise = torch.randn((1, FRAMES, 4, h, h), generator=torch.Generator().manual_seed(3))
    theirs = pipe(
        image, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=STEPS, min_guidance_scale=min_g,
        max_guidance_scale=max_g, fps=7, motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=chunk,
        generator=torch.Generator().manual_seed(11), latents=noise, output_type="pt",
    ).frames
    assert ours.shape == theirs.shape == (1, FRAMES, 3, SIZE, SIZE)
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())


def test_guidance_ramp_changes_frames_unequally(pipe: Any) -> None:
    """With min = max the ramp is one scale; a ramp from 1 leaves the first frame unguided."""
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    parts = _handles(pipe)
    cond, latent = svd_conditioning(parts["clip_vision"], parts["vae"], image, width=SIZE, height=SIZE, frames=FRAMES,
                                    fps=7, motion_bucket_id=127, noise_aug_strength=0.02, seed=0)
    runs = {}
    for name, (lo, hi) in {"flat": (3.0, 3.0), "ramp": (1.0, 3.0), "none": (1.0, 1.0)}.items():
        runs[name] = run_sampling(parts["model"], cond, latent, steps=1, guidance_scale=hi,
                                  min_guidance_scale=lo, seed=0, count_macs=False)[0].samples
    # first frame: the ramp's scale is 1 (no guidance) — only that frame's prediction is the conditional one;
    # last frame: the ramp's scale is 3, as the flat run's
    assert torch.allclose(runs["ramp"][:, -1], runs["flat"][:, -1], atol=1e-5)
    assert not torch.allclose(runs["ramp"][:, 0], runs["flat"][:, 0], atol=1e-4)


def test_min_guidance_is_refused_for_image_models() -> None:
    parts = tiny.sd_handles()
    with pytest.raises(ValueError, match="video frames"):
        run_sampling(parts["model"], parts["conditioning"], parts["latent"], steps=1, guidance_scale=2.0,
                     min_guidance_scale=1.0, count_macs=False)


def test_too_many_frames_and_wrong_latents_are_named(pipe: Any) -> None:
    parts = _handles(pipe)
    image = torch.rand(1, 3, SIZE, SIZE)
    cond, _ = svd_conditioning(parts["clip_vision"], parts["vae"], image, width=SIZE, height=SIZE, frames=2, fps=7,
                               motion_bucket_id=127, noise_aug_strength=0.02, seed=0)
    too_long = Latent(torch.zeros(1, pipe.unet.config.num_frames + 1, 4, 16, 16))
    problems = dict(check_video_model(parts["model"], cond, too_long))
    assert "at most 25 frames" in problems["latent"]
    wrong_size = Latent(torch.zeros(1, 2, 4, 8, 8))
    assert "same width and height" in dict(check_video_model(parts["model"], cond, wrong_size))["latent"]
    image_model = tiny.sd_handles()["model"]
    assert "video UNet" in dict(check_video_model(image_model, cond, wrong_size))["model"]


def test_a_saved_svd_folder_loads_offline_with_its_image_encoder(pipe: Any, tmp_path: Path) -> None:
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder

    folder = tiny.write_model("svd", tmp_path / "svd")
    loaded = load_diffusers_folder(folder, read_roots=[tmp_path])
    assert loaded.image_encoder is not None
    assert type(loaded.image_encoder.module).__name__ == "CLIPVisionModelWithProjection"
    assert type(loaded.image_encoder.image_processor).__name__.startswith("CLIPImageProcessor")
    assert type(loaded.vae.module).__name__ == "AutoencoderKLTemporalDecoder"
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    parts = {"model": loaded.model, "clip_vision": loaded.image_encoder, "vae": loaded.vae}
    from_disk = _ours(parts, image, cond_seed=1, seed=2, min_g=1.0, max_g=2.0, chunk=14)
    in_memory = _ours(_handles(pipe), image, cond_seed=1, seed=2, min_g=1.0, max_g=2.0, chunk=14)
    # the same weights; a model loaded by from_pretrained may pick another attention kernel (≈1e-5 apart)
    assert torch.allclose(from_disk, in_memory, atol=1e-4), float((from_disk - in_memory).abs().max())


def test_conditioning_node_refuses_a_stretched_image(pipe: Any) -> None:
    from dagfusion.nodes.video.svd import image_to_video_conditioning

    parts = _handles(pipe)

    class _Ctx:
        class settings:  # noqa: N801 - a stand-in for the run's settings
            max_video_pixels = 10**9

    with pytest.raises(NodeInputError, match="aspect ratio") as info:
        image_to_video_conditioning.fn(_Ctx(), parts["clip_vision"], parts["vae"], torch.rand(1, 3, 32, 64), 32, 32,
                                       3, 7, 127, 0.02, 0)
    assert info.value.input == "image"


# --- caches on the video UNet ------------------------------------------------------------------


@pytest.mark.parametrize("branch", [0, 1])
def test_deepcache_partial_forward_of_the_video_unet_equals_the_full_call(pipe: Any, branch: int) -> None:
    from dagfusion.nodes.cache.unet_branch import capture_deep_feature, unet_partial_forward

    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, FRAMES, 8, 16, 16, generator=g)
    kwargs = {"encoder_hidden_states": torch.randn(2, 1, 32, generator=g),
              "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * 2)}
    t = torch.tensor(0.5)
    with torch.no_grad():
        full, deep = capture_deep_feature(unet, branch, lambda: unet(sample, t, **kwargs, return_dict=False)[0])
        partial = unet_partial_forward(unet, sample, t, kwargs, branch, deep)
    assert partial.shape == full.shape == (2, FRAMES, 4, 16, 16)
    assert torch.allclose(partial, full, atol=1e-5), float((partial - full).abs().max())


def test_deepcache_samples_a_video_with_partial_steps_close_to_the_full_run(pipe: Any) -> None:
    from dagfusion.nodes.cache.deepcache import DeepCacheConfig, DeepCachePatch

    parts = _handles(pipe)
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    cond, latent = svd_conditioning(parts["clip_vision"], parts["vae"], image, width=SIZE, height=SIZE, frames=FRAMES,
                                    fps=7, motion_bucket_id=127, noise_aug_strength=0.02, seed=0)
    full, _ = run_sampling(parts["model"], cond, latent, steps=4, guidance_scale=2.0, min_guidance_scale=1.0, seed=1,
                           count_macs=False)
    cached_model = parts["model"].with_patch(DeepCachePatch(DeepCacheConfig(interval=2, branch=0)))
    cached, report = run_sampling(cached_model, cond, latent, steps=4, guidance_scale=2.0, min_guidance_scale=1.0,
                                  seed=1)
    stats = next(iter(report.patches.values()))
    assert stats["partial_calls"] == 2 and stats["full_calls"] == 2, stats
    assert [s.denoiser_calls for s in report.steps] == [1, 0, 1, 0]
    difference = float((cached.samples - full.samples).abs().mean() / full.samples.abs().mean())
    assert 0 < difference < 0.01, difference  # measured 0.0039 (random tiny weights, 4 steps, interval 2)


def test_sample_video_previews_show_the_clips_frames(pipe: Any) -> None:
    from dagfusion.nodes.video.svd import sample_video

    class Context:
        handler = object()

        def __init__(self) -> None:
            self.previews: list[tuple[Any, str]] = []

        def progress(self, *args: Any, **kwargs: Any) -> None:
            pass

        def check_cancelled(self) -> None:
            pass

        def preview(self, picture: Any, label: str = "") -> None:
            self.previews.append((picture, label))

    args = sample_video.examples[0]()
    latent = args["latent"].samples
    ctx = Context()
    sample_video.fn(ctx, **{**args, "steps": 2, "preview_every": 1})
    assert [label for _, label in ctx.previews] == ["step 1/2", "step 2/2"]
    frames, width = latent.shape[1], latent.shape[-1]
    assert ctx.previews[-1][0].size == (frames * width + frames - 1, latent.shape[-2])
