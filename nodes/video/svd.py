"""Image-to-video with Stable Video Diffusion's layout: load, condition, sample, decode.

A Stable Video Diffusion (SVD) pipeline is a ``UNetSpatioTemporalConditionModel`` that denoises
video latents ``(B, F, C, h, w)`` conditioned on one image, an ``AutoencoderKLTemporalDecoder``
and a ``CLIPVisionModelWithProjection`` with its image processor. The nodes here split
``StableVideoDiffusionPipeline`` into graph steps and follow it step for step, so that the same
noise, settings and weights give the same frames (a test checks it to 1e-5 on a tiny model):

1. :func:`image_embeddings` — the image at the encoder's input size (an anti-aliased bicubic
   resize when it is another size), normalised by the image processor, through the vision
   model: ``(B, 1, D)``;
2. :func:`svd_conditioning` — the image at the video's size in ``[-1, 1]`` plus
   ``noise_aug_strength`` times Gaussian noise (its own seeded generator), encoded by the VAE
   (the distribution's mode, unscaled, as SVD was trained); the micro-conditions
   ``(fps - 1, motion_bucket_id, noise_aug_strength)``; under guidance the negative embedding and
   image latents are zeros (the ``svd`` model family adds them);
3. the shared sampler (:func:`~dagfusion.nodes.diffusion.sampling.run_sampling`) with the guidance
   scale ramping linearly across the frames from ``min_guidance_scale`` to ``max_guidance_scale``;
4. :func:`decode_video` — latents divided by the VAE's scaling factor, decoded
   ``decode_chunk_size`` frames at a time (the temporal decoder is told how many frames each
   chunk holds), mapped to ``[0, 1]``.

Differences from the pipeline: the pipeline resizes a PIL image for the vision encoder even when
it already has the encoder's size, and draws the augmentation noise and the latent noise from one
generator; here the conditioning node has its own seed and the sampler its own.
"""

from __future__ import annotations

import functools
from typing import Any

from dagfusion import FLOAT, INT, PATH, SEED, STRING, Input, NodeInputError, Output, RunContext, SocketType, node
from dagfusion.nodes.diffusion.types import CONDITIONING, IMAGE, LATENT, MODEL, RUN_REPORT, SCHEDULER, VAE, VIDEO

CLIP_VISION = SocketType(
    "CLIP_VISION",
    python_types=("dagfusion.model.handle.ImageEncoderHandle",),
    description="An image encoder (CLIP vision with projection) and its image processor.",
    color="#fdd835",
)
TYPES: tuple[SocketType, ...] = (CLIP_VISION,)

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_MOTION_BUCKET = 1023
"""The largest motion bucket id accepted (SVD was trained on 0–255; larger values extrapolate)."""


# --- the computations --------------------------------------------------------------------------


def encoder_image_size(encoder: Any) -> int:
    """The side of the square images the vision encoder takes (its config's ``image_size``)."""
    config = getattr(encoder, "config", None)
    size = getattr(config, "image_size", None)
    if size is None:
        size = getattr(getattr(config, "vision_config", None), "image_size", 224)
    return int(size)


def image_embeddings(handle: Any, image: Any) -> Any:
    """``(B, 1, D)`` image embeddings of ``image`` ((B, 3, H, W) in ``[0, 1]``), as SVD computes them.

    An image of another size than the encoder's is resized in ``[-1, 1]`` with an anti-aliased
    bicubic filter; the processor's mean and standard deviation normalise it (CLIP's constants
    when the handle has no processor).
    """
    import torch
    import torch.nn.functional as F

    module = handle.module
    size = encoder_image_size(module)
    pixels = image.float()
    if tuple(pixels.shape[-2:]) != (size, size):
        pixels = F.interpolate(pixels * 2.0 - 1.0, size=(size, size), mode="bicubic", antialias=True, align_corners=True)
        pixels = (pixels + 1.0) / 2.0
    processor = handle.image_processor
    mean = getattr(processor, "image_mean", None) or _CLIP_MEAN
    std = getattr(processor, "image_std", None) or _CLIP_STD
    mean_t = torch.tensor(mean, dtype=pixels.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype).view(1, -1, 1, 1)
    pixels = (pixels - mean_t) / std_t
    param = next(module.parameters())
    with handle.patched(module), torch.no_grad():
        embeds = module(pixels.to(device=param.device, dtype=param.dtype)).image_embeds
    return embeds.unsqueeze(1)


def svd_conditioning(
    image_encoder: Any,
    vae: Any,
    image: Any,
    *,
    width: int,
    height: int,
    frames: int,
    fps: int,
    motion_bucket_id: int,
    noise_aug_strength: float,
    seed: int,
) -> tuple[Any, Any]:
    """The ``svd`` conditioning and an empty video latent ``(B, frames, C, h, w)`` for ``image``.

    See the module docstring for the steps. ``image`` is (B, 3, H, W) in ``[0, 1]``; it is resized
    to ``height`` x ``width`` (bilinear) for the VAE.
    """
    import torch
    import torch.nn.functional as F

    from dagfusion.nodes.diffusion.data import Conditioning, Latent

    embeds = image_embeddings(image_encoder, image)
    pixels = image.float()
    if tuple(pixels.shape[-2:]) != (height, width):
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False)
    pixels = pixels * 2.0 - 1.0
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(pixels.shape, generator=generator, dtype=pixels.dtype)
    pixels = pixels + noise_aug_strength * noise
    module = vae.module
    param = next(module.parameters())
    with vae.patched(module), torch.no_grad():
        latents = module.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist.mode()
    latents = latents.to(embeds.dtype)
    batch = int(image.shape[0])
    ids = torch.tensor([[float(fps - 1), float(motion_bucket_id), float(noise_aug_strength)]], dtype=embeds.dtype)
    cond = Conditioning(
        "svd",
        {"encoder_hidden_states": embeds.cpu(), "image_latents": latents.unsqueeze(1).cpu(), "added_time_ids": ids.repeat(batch, 1)},
        None,
        meta={"fps": int(fps), "motion_bucket_id": int(motion_bucket_id), "noise_aug_strength": float(noise_aug_strength),
              "conditioning_seed": int(seed), "frames": int(frames)},
    )
    empty = torch.zeros(batch, int(frames), int(latents.shape[1]), int(latents.shape[2]), int(latents.shape[3]))
    return cond, Latent(empty, {"frames": int(frames), "size": [int(height), int(width)]})


def decode_video(vae: Any, latents: Any, decode_chunk_size: int = 14) -> Any:
    """Frames ``(B, F, C, H, W)`` in ``[0, 1]`` from video latents ``(B, F, c, h, w)``, decoded
    ``decode_chunk_size`` frames at a time (temporal decoders get ``num_frames`` per chunk)."""
    import inspect

    import torch

    from dagfusion.model import unwrap_compiled

    if latents.ndim != 5:
        raise ValueError(f"expected video latents (B, F, C, h, w), got shape {tuple(latents.shape)}")
    module = vae.module
    batch, frames = int(latents.shape[0]), int(latents.shape[1])
    flat = latents.flatten(0, 1) / float(module.config.scaling_factor)
    accepts_frames = "num_frames" in inspect.signature(unwrap_compiled(module).forward).parameters
    param = next(module.parameters())
    pieces = []
    with vae.patched(module), torch.no_grad():
        for start in range(0, flat.shape[0], decode_chunk_size):
            chunk = flat[start:start + decode_chunk_size].to(device=param.device, dtype=param.dtype)
            kwargs = {"num_frames": int(chunk.shape[0])} if accepts_frames else {}
            pieces.append(module.decode(chunk, **kwargs).sample.float().cpu())
    decoded = torch.cat(pieces).reshape(batch, frames, *pieces[0].shape[1:])
    return (decoded / 2 + 0.5).clamp(0, 1)


def check_video_model(model: Any, cond: Any, latent: Any) -> list[tuple[str, str]]:
    """Problems ``(input, message)`` of sampling ``model`` on an SVD conditioning and video latent."""
    problems: list[tuple[str, str]] = []
    module = model.denoiser
    config = getattr(module, "config", None)
    if "UNetSpatioTemporalConditionModel" not in {c.__name__ for c in type(module).__mro__}:
        problems.append(("model", f"expected a video UNet (UNetSpatioTemporalConditionModel), got {type(module).__name__}"))
        return problems
    if getattr(cond, "kind", None) != "svd":
        problems.append(("conditioning", f"expected image-to-video conditioning (kind 'svd', from "
                                         f"dagfusion.video.ImageToVideoConditioning), got kind {getattr(cond, 'kind', None)!r}"))
        return problems
    samples = latent.samples
    if samples.ndim != 5:
        problems.append(("latent", f"expected a video latent (B, F, C, h, w), got shape {tuple(samples.shape)}"))
        return problems
    supported = int(getattr(config, "num_frames", 25))
    if samples.shape[1] > supported:
        problems.append(("latent", f"this video UNet supports at most {supported} frames (its config's num_frames), "
                                   f"got {int(samples.shape[1])}"))
    image_latents = cond.positive["image_latents"]
    if tuple(image_latents.shape[-3:]) != tuple(samples.shape[-3:]):
        problems.append(("latent", f"the conditioning image was encoded at latent size {tuple(image_latents.shape[-3:])}, "
                                   f"the latent is {tuple(samples.shape[-3:])}; make both with the same width and height"))
    ids = cond.positive["added_time_ids"]
    expected = int(module.add_embedding.linear_1.in_features)
    passed = int(config.addition_time_embed_dim) * int(ids.shape[-1])
    if expected != passed:
        problems.append(("conditioning", f"the UNet expects {expected // int(config.addition_time_embed_dim)} "
                                         f"micro-conditions, the conditioning has {int(ids.shape[-1])}"))
    channels = int(config.in_channels)
    if samples.shape[2] + image_latents.shape[-3] != channels:
        problems.append(("latent", f"the UNet takes {channels} input channels (noisy + image latents), got "
                                   f"{int(samples.shape[2])} + {int(image_latents.shape[-3])}"))
    return problems


# --- nodes -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _tiny_cached() -> dict[str, Any]:
    """Handles over the tiny SVD pipeline (node examples)."""
    from dagfusion.model import ImageEncoderHandle, ModelHandle, VAEHandle
    from dagfusion.nodes.diffusion.data import SchedulerSpec
    from dagfusion.testing import models as tiny

    pipe = tiny._cached_pipeline("svd", 0)
    spec = SchedulerSpec(type(pipe.scheduler).__name__, dict(pipe.scheduler.config))
    return {
        "model": ModelHandle.from_module(pipe.unet, scheduler=spec, vae_scale_factor=2),
        "clip_vision": ImageEncoderHandle.from_modules(pipe.image_encoder, pipe.feature_extractor),
        "vae": VAEHandle.from_module(pipe.vae),
    }


def _load_example(folder: Any) -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"path": str(tiny.write_model("svd", folder / "tiny-svd")), "device": "cpu", "dtype": "fp32"}


#: What the SVD loaders give (a diffusers folder or a single file): the same four handles.
SVD_OUTPUTS = (
    Output("model", MODEL, "The video UNet with the pipeline's scheduler."),
    Output("clip_vision", CLIP_VISION, "The image encoder and its image processor."),
    Output("vae", VAE, "The VAE (temporal decoder)."),
    Output("scheduler", SCHEDULER, "The pipeline's scheduler configuration."),
)


@node(
    "dagfusion.video.LoadSVD",
    version="1.0.0",
    category="video",
    inputs=[
        Input("path", PATH, description="A Stable Video Diffusion diffusers folder (model_index.json with unet, vae, "
                                        "image_encoder, feature_extractor) under the allowed read folders."),
        Input("device", STRING, "auto", choices=("auto", "cpu", "cuda", "mps"),
              description="Where to compute; 'auto' takes the settings' device, else cuda > mps > cpu."),
        Input("dtype", STRING, "auto", choices=("auto", "fp32", "fp16", "bf16"),
              description="Weight precision; 'auto' is fp16 on a GPU and fp32 on the CPU."),
    ],
    outputs=list(SVD_OUTPUTS),
    examples=[_load_example],
)
def load_svd(ctx: RunContext, path: str, device: str, dtype: str) -> dict[str, Any]:
    """Load a Stable Video Diffusion folder offline, through the shared model cache.

    A folder saved from a one-step generator (``dagfusion.video.SaveSVD``; its ``dagfusion.json``)
    loads marked as one, with the scheduler it samples with."""
    from dagfusion.nodes.video.export import load_svd_folder

    folder = ctx.input_path(path)
    return load_svd_folder(ctx, folder, device, dtype, input="path", read_roots=ctx.settings.readable_roots)


def _conditioning_example() -> dict[str, Any]:
    import torch

    parts = _tiny_cached()
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {"clip_vision": parts["clip_vision"], "vae": parts["vae"], "image": image, "width": 32, "height": 32,
            "frames": 3, "fps": 7, "motion_bucket_id": 127, "noise_aug_strength": 0.02, "seed": 0}


def _check_conditioning(values: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for name in ("width", "height"):
        value = values.get(name)
        if isinstance(value, int) and value % 8:
            problems.append((name, f"expected a multiple of 8 pixels, got {value}"))
    return problems


@node(
    "dagfusion.video.ImageToVideoConditioning",
    version="1.0.0",
    category="video",
    inputs=[
        Input("clip_vision", CLIP_VISION, link_only=True),
        Input("vae", VAE, link_only=True),
        Input("image", IMAGE, link_only=True, description="The first frame: (B, 3, H, W) in [0, 1], the video's aspect ratio."),
        Input("width", INT, 1024, min=8, max=4096, description="Video width in pixels (a multiple of 8)."),
        Input("height", INT, 576, min=8, max=4096, description="Video height in pixels (a multiple of 8)."),
        Input("frames", INT, 14, min=1, max=128, description="Frames to generate (at most the UNet's num_frames)."),
        Input("fps", INT, 7, min=1, max=120, description="Frames per second the clip should have (the UNet sees fps - 1)."),
        Input("motion_bucket_id", INT, 127, min=0, max=MAX_MOTION_BUCKET,
              description="How much motion: higher moves more (SVD was trained on 0-255)."),
        Input("noise_aug_strength", FLOAT, 0.02, min=0.0, max=10.0,
              description="Noise added to the conditioning image; more noise follows the image less closely."),
        Input("seed", SEED, 0, min=0, description="Seeds the augmentation noise."),
    ],
    outputs=[
        Output("conditioning", CONDITIONING, "Image-to-video conditioning (kind 'svd')."),
        Output("latent", LATENT, "An empty video latent (B, frames, C, h, w) to sample."),
    ],
    examples=[_conditioning_example],
    check=_check_conditioning,
)
def image_to_video_conditioning(
    ctx: RunContext, clip_vision: Any, vae: Any, image: Any, width: int, height: int, frames: int, fps: int,
    motion_bucket_id: int, noise_aug_strength: float, seed: int,
) -> dict[str, Any]:
    """Condition a video model on a first frame, as Stable Video Diffusion does (see the module docs)."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise NodeInputError("image", f"expected an RGB image batch (B, 3, H, W), got shape {tuple(image.shape)}")
    ratio, target = float(image.shape[-1]) / float(image.shape[-2]), width / height
    if abs(ratio / target - 1.0) > 0.02:
        raise NodeInputError(
            "image", f"expected the video's aspect ratio {width}x{height} ({target:.3f}), got an image of "
                     f"{int(image.shape[-1])}x{int(image.shape[-2])} ({ratio:.3f}); crop or pad it first "
                     "(dagfusion.everyday.Crop / Pad) so it is not stretched")
    limit = int(ctx.settings.max_video_pixels)
    if width * height * frames * int(image.shape[0]) > limit:
        raise NodeInputError(
            "frames", f"expected at most {limit} video pixels (batch x frames x width x height, the max_video_pixels "
                      f"setting), got {int(image.shape[0])} x {frames} x {width} x {height}")
    cond, latent = svd_conditioning(
        clip_vision, vae, image, width=width, height=height, frames=frames, fps=fps,
        motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength, seed=seed,
    )
    return {"conditioning": cond, "latent": latent}


def _sample_example() -> dict[str, Any]:
    parts = _tiny_cached()
    args = _conditioning_example()
    cond, latent = svd_conditioning(
        args["clip_vision"], args["vae"], args["image"], width=32, height=32, frames=3, fps=7, motion_bucket_id=127,
        noise_aug_strength=0.02, seed=0,
    )
    made = {"conditioning": cond, "latent": latent}
    return {"model": parts["model"], "conditioning": made["conditioning"], "latent": made["latent"], "steps": 1,
            "seed": 0, "min_guidance_scale": 1.0, "max_guidance_scale": 2.0, "sampler": "default"}


@node(
    "dagfusion.video.SampleVideo",
    version="1.1.0",
    category="video",
    inputs=[
        Input("model", MODEL, link_only=True),
        Input("conditioning", CONDITIONING, link_only=True),
        Input("latent", LATENT, link_only=True),
        Input("steps", INT, 25, min=1, max=1000),
        Input("seed", SEED, 0, min=0),
        Input("min_guidance_scale", FLOAT, 1.0, min=0.0, max=100.0, description="Guidance on the first frame."),
        Input("max_guidance_scale", FLOAT, 3.0, min=0.0, max=100.0,
              description="Guidance on the last frame (linear in between); 1 or less disables guidance."),
        Input("sampler", STRING, "default", description="The scheduler class to use ('default': the model's own)."),
        Input("preview_every", INT, 0, min=0, max=1000,
              description="Emit a preview every N steps (0 = none): the first clip's frames side by side."),
    ],
    outputs=[Output("latent", LATENT), Output("report", RUN_REPORT)],
    examples=[_sample_example],
)
def sample_video(
    ctx: RunContext, model: Any, conditioning: Any, latent: Any, steps: int, seed: int, min_guidance_scale: float,
    max_guidance_scale: float, sampler: str, preview_every: int,
) -> dict[str, Any]:
    """Sample a video latent with guidance ramping across frames (Stable Video Diffusion's sampler);
    previews show up to eight frames of the first clip side by side."""
    from dagfusion.nodes.diffusion.sampling import run_sampling

    problems = check_video_model(model, conditioning, latent)
    if problems:
        raise NodeInputError(problems[0][0], "; ".join(message for _, message in problems))
    out, report = run_sampling(
        model, conditioning, latent, sampler=sampler, steps=steps, guidance_scale=max_guidance_scale,
        min_guidance_scale=min_guidance_scale, seed=seed, ctx=ctx, preview_every=preview_every,
    )
    return {"latent": out, "report": report}


def _decode_example() -> dict[str, Any]:
    import torch

    from dagfusion.nodes.diffusion.data import Latent

    return {"vae": _tiny_cached()["vae"], "latent": Latent(torch.zeros(1, 2, 4, 16, 16)), "decode_chunk_size": 1}


@node(
    "dagfusion.video.DecodeVideo",
    version="1.0.0",
    category="video",
    inputs=[
        Input("vae", VAE, link_only=True),
        Input("latent", LATENT, link_only=True),
        Input("decode_chunk_size", INT, 14, min=1, max=1024,
              description="Frames decoded at once (fewer use less memory; the temporal decoder sees each chunk)."),
    ],
    outputs=[Output("video", VIDEO, "(B, F, 3, H, W) in [0, 1].")],
    examples=[_decode_example],
)
def decode_video_node(ctx: RunContext, vae: Any, latent: Any, decode_chunk_size: int) -> Any:
    """Decode video latents to frames, a chunk of frames at a time."""
    samples = latent.samples
    if samples.ndim != 5:
        raise NodeInputError("latent", f"expected a video latent (B, F, C, h, w), got shape {tuple(samples.shape)}")
    return decode_video(vae, samples, decode_chunk_size)


NODES = (load_svd, image_to_video_conditioning, sample_video, decode_video_node)
"""The image-to-video nodes, in palette order."""
