"""Latent nodes: an empty latent of the right shape for a model."""

from __future__ import annotations

from typing import Any

from dagfusion import INT, Input, Output, RunContext, node
from dagfusion.model import ModelHandle
from dagfusion.nodes.diffusion.data import Latent
from dagfusion.nodes.diffusion.types import LATENT, MODEL


def empty_latent(model: ModelHandle, width: int, height: int, batch_size: int = 1, frames: int = 1) -> Latent:
    """Zeros shaped for ``model``: ``(B, C, H/f, W/f)``, or ``(B, F, C, H/f, W/f)`` for video models."""
    import torch

    from dagfusion.model import family_for

    module = model.denoiser
    family = family_for(module)
    if frames > 1 and not family.video:
        raise ValueError(f"frames={frames} needs a video model; this is a {family.name} image model (use frames=1)")
    shape = family.latent_shape(module, batch_size, height, width, model.vae_scale_factor, frames)
    return Latent(torch.zeros(shape), {"size": [width, height], "batch_size": batch_size, "frames": frames})


def _example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.sd_handles()["model"], "width": 32, "height": 32, "batch_size": 2}


@node(
    "dagfusion.latent.EmptyLatent",
    version="1.0.0",
    category="latent",
    inputs=[
        Input("model", MODEL, link_only=True, description="The model the latent is for (gives channels and scale)."),
        Input("width", INT, 512, min=8, max=16384, ui={"step": 8}, description="Image width in pixels."),
        Input("height", INT, 512, min=8, max=16384, ui={"step": 8}, description="Image height in pixels."),
        Input("batch_size", INT, 1, min=1, max=4096, description="Number of images."),
        Input("frames", INT, 1, min=1, max=1024, description="Frames per video (video models only)."),
    ],
    outputs=[Output("latent", LATENT, "Zeros of the model's latent shape (a sampler at strength 1 fills them with noise).")],
    examples=[_example],
)
def empty_latent_node(ctx: RunContext, model: ModelHandle, width: int, height: int, batch_size: int, frames: int) -> Latent:
    """An empty latent batch sized for a model and a picture size (width and height in pixels)."""
    return empty_latent(model, width, height, batch_size, frames)


NODES = (empty_latent_node,)
