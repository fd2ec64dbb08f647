"""Untrained image-to-video models in Stable Video Diffusion's layout, built from a config.

The video counterpart of ``dagfusion.train.NewModel``: the starting point of training an SVD-layout
model from scratch (:mod:`~dagfusion.nodes.video.edm` trains it, :mod:`~dagfusion.nodes.video.sfv`
tunes it to one step). Built-in configs:

- ``tiny-svd``: the tiny test architecture (:func:`dagfusion.testing.models.build_svd`): a
  32/64-channel ``UNetSpatioTemporalConditionModel``, an ``AutoencoderKLTemporalDecoder`` with x2
  downsampling and a 2-layer 32-px CLIP vision encoder. For tests and examples.
- ``shapes-video``: the architecture of the shipped ``shapes-video`` model (32 px, 8 frames): a
  3.2 M-parameter ``UNetSpatioTemporalConditionModel`` (32/64/64 channels; spatial and temporal
  attention at the 4 x 4 and 2 x 2 resolutions; 8 input channels = 4 noisy + 4 first-frame latent
  channels), an ``AutoencoderKLTemporalDecoder`` with x4 downsampling (8 x 8 x 4 latents of 32 px
  frames; 64 channels at every level: diffusers fixes its group norms at 32 groups, and with one
  channel per group the decoder's last normalisation erases each channel's level, and the colours
  with it) and a 2-layer ``CLIPVisionModelWithProjection`` of width 64 on 32 px images (patch 4)
  with its ``CLIPImageProcessor``. The image encoder stays at its seeded initialisation (training
  keeps it frozen, as the shapes text encoders): the UNet learns to read its embedding.

Every component is seeded (the same config and seed give identical weights) and the scheduler is
SVD's Euler on Karras sigmas with v-prediction (:func:`~dagfusion.nodes.video.edm.svd_scheduler_config`).
"""

from __future__ import annotations

from typing import Any

from dagfusion import SEED, STRING, Input, Output, RunContext, node
from dagfusion.model import use_time_only_convs
from dagfusion.nodes.diffusion.types import MODEL, SCHEDULER, VAE
from dagfusion.nodes.video.svd import CLIP_VISION

_TINY_UNET = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "sample_size": 16, "in_channels": 8, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
    "cross_attention_dim": 32, "num_attention_heads": [8, 8], "projection_class_embeddings_input_dim": 96,
    "addition_time_embed_dim": 32,
}
_TINY_VAE = {"block_out_channels": [32, 64], "in_channels": 3, "out_channels": 3, "latent_channels": 4,
             "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], "layers_per_block": 1}
_TINY_VISION = {"hidden_size": 32, "projection_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "image_size": 32, "intermediate_size": 37, "patch_size": 4}

_SHAPES_UNET = {
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "sample_size": 8, "in_channels": 8, "out_channels": 4,
    "down_block_types": ["DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"],
    "up_block_types": ["CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"],
    "cross_attention_dim": 64, "num_attention_heads": [2, 4, 4], "projection_class_embeddings_input_dim": 96,
    "addition_time_embed_dim": 32, "num_frames": 8,
}
_SHAPES_VAE = {"block_out_channels": [64, 64, 64], "in_channels": 3, "out_channels": 3, "latent_channels": 4,
               "down_block_types": ["DownEncoderBlock2D"] * 3, "layers_per_block": 1, "sample_size": 32}
_SHAPES_VISION = {"hidden_size": 64, "projection_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "image_size": 32, "intermediate_size": 256, "patch_size": 4}

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-svd": {"unet": _TINY_UNET, "vae": _TINY_VAE, "image_encoder": _TINY_VISION, "resolution": 32, "frames": 3},
    "shapes-video": {"unet": _SHAPES_UNET, "vae": _SHAPES_VAE, "image_encoder": _SHAPES_VISION, "resolution": 32,
                     "frames": 8},
}
"""Built-in configs: the UNet, VAE and image-encoder configs, and the clips they are made for."""


def build_video_pipeline(name: str, seed: int = 0) -> Any:
    """An untrained ``StableVideoDiffusionPipeline`` of built-in config ``name`` (CPU, fp32, eval).

    :raises ValueError: ``name`` is not a built-in config.
    """
    from dagfusion.nodes.training.build import seeded
    from dagfusion.nodes.video.edm import svd_scheduler_config
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    if name not in CONFIGS:
        raise ValueError(f"expected a video config in {list(CONFIGS)}, got {name!r}")
    spec = CONFIGS[name]
    unet = seeded(seed, 0, lambda: UNetSpatioTemporalConditionModel(**spec["unet"]))
    vae = seeded(seed, 1, lambda: AutoencoderKLTemporalDecoder(**spec["vae"]))
    vision = spec["image_encoder"]
    encoder = seeded(seed, 2, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)))
    use_time_only_convs(unet)
    use_time_only_convs(vae)
    size = int(vision["image_size"])
    processor = CLIPImageProcessor(crop_size=size, size={"shortest_edge": size})
    return StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=unet, feature_extractor=processor,
                                        scheduler=EulerDiscreteScheduler(**svd_scheduler_config()))


def handles(pipe: Any, ident: str, device: str) -> dict[str, Any]:
    """MODEL, CLIP_VISION, VAE and SCHEDULER handles over a pipeline's modules (fingerprinted by ``ident``)."""
    from dagfusion.model import ImageEncoderHandle, ModelHandle, StaticRef, VAEHandle
    from dagfusion.nodes.diffusion.data import SchedulerSpec

    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    info = {"source": f"new {ident}", "pipeline": "StableVideoDiffusionPipeline", "dtype": "float32", "device": device,
            "vae_scale_factor": scale}
    spec = SchedulerSpec(type(pipe.scheduler).__name__, dict(pipe.scheduler.config))
    model = ModelHandle(StaticRef(pipe.unet.to(device).eval(), f"new:{ident}:unet"), scheduler=spec,
                        info={**info, "component": "unet"})
    vae = VAEHandle(StaticRef(pipe.vae.to(device).eval(), f"new:{ident}:vae"), info={**info, "component": "vae"})
    processor = StaticRef(pipe.feature_extractor, f"new:{ident}:feature_extractor")
    encoder = ImageEncoderHandle(StaticRef(pipe.image_encoder.to(device).eval(), f"new:{ident}:image_encoder"),
                                 processor, info={**info, "component": "image_encoder"})
    return {"model": model, "clip_vision": encoder, "vae": vae, "scheduler": spec}


@node(
    "dagfusion.video.NewModel",
    version="1.0.0",
    category="training",
    inputs=[
        Input("config", STRING, "tiny-svd", choices=tuple(CONFIGS),
              description="A built-in image-to-video architecture: 'tiny-svd' (tests) or 'shapes-video' (the shipped "
                          "shapes-video model's, 64 px, 8 frames)."),
        Input("seed", SEED, 0, min=0, max=2**32 - 1, description="Seeds the initial weights."),
        Input("device", STRING, "auto", choices=("auto", "cpu", "cuda", "mps"),
              description="Where the model computes; 'auto' takes the settings' device."),
    ],
    outputs=[
        Output("model", MODEL, "The untrained video UNet with SVD's Euler scheduler."),
        Output("clip_vision", CLIP_VISION, "The image encoder (randomly initialised; trainings keep it frozen) and its processor."),
        Output("vae", VAE, "The temporal-decoder VAE (randomly initialised: train it with dagfusion.train.TrainVAE)."),
        Output("scheduler", SCHEDULER, "SVD's scheduler configuration."),
    ],
    examples=[{"config": "tiny-svd", "seed": 1, "device": "cpu"}],
)
def new_video_model(ctx: RunContext, config: str, seed: int, device: str) -> dict[str, Any]:
    """Build an untrained SVD-layout model (video UNet, image encoder, temporal-decoder VAE) with seeded weights."""
    from dagfusion.fingerprint import fingerprint
    from dagfusion.nodes.diffusion.loading import resolve_device

    resolved = resolve_device(device, ctx.device)
    ident = f"{config}@{fingerprint(CONFIGS[config])[:16]} (seed {seed})"
    return handles(build_video_pipeline(config, seed), ident, resolved)


NODES = (new_video_model,)
