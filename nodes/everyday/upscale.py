"""Latent upscale by interpolation: ``dagfusion.latent.Upscale``.

It resizes ``(B, C, h, w)`` (or video ``(B, F, C, h, w)``) latents with ``nearest``, ``bilinear``
or ``bicubic`` interpolation, by ``scale_by`` or to a ``width × height`` in pixels (one side given:
the other keeps the aspect). The pixel size is rounded to a multiple of 8 (never below 8), so the
latent side is a multiple of ``8 / f`` for the model's VAE factor ``f`` (8 without a model). The
pixel size is checked against the settings' ``max_image_pixels`` before anything is allocated.
Sampling the result at ``strength < 1`` is the second pass of a "hires fix"
(``workflows/hires_fix_shapes.yaml``).
"""

from __future__ import annotations

from typing import Any

from dagfusion import FLOAT, INT, STRING, Input, Output, RunContext, node
from dagfusion.errors import NodeInputError
from dagfusion.model import ModelHandle
from dagfusion.nodes.diffusion.data import Latent
from dagfusion.nodes.diffusion.types import LATENT, MODEL

UPSCALE_METHODS = ("nearest", "bilinear", "bicubic")
"""Interpolation methods of ``dagfusion.latent.Upscale``."""


def _align(pixels: float) -> int:
    return max(8, round(pixels / 8.0) * 8)


def upscale_size(h: int, w: int, factor: int, scale_by: float, width: int = 0, height: int = 0) -> tuple[int, int]:
    """Latent ``(h, w)`` after upscaling: pixel sizes ×8-aligned, from ``width``/``height`` or ``scale_by``."""
    px_w = _align(width if width else (w * factor * height / (h * factor) if height else w * factor * scale_by))
    px_h = _align(height if height else (h * factor * width / (w * factor) if width else h * factor * scale_by))
    return max(1, px_h // factor), max(1, px_w // factor)


def upscale_latent(latent: Latent, h: int, w: int, method: str = "bilinear") -> Latent:
    """``latent`` interpolated to latent size ``(h, w)``; video frames are resized one by one."""
    import torch.nn.functional as F

    if method not in UPSCALE_METHODS:
        raise ValueError(f"expected a method in {UPSCALE_METHODS}, got {method!r}")
    samples = latent.samples
    flat = samples.reshape(-1, *samples.shape[-3:])
    mode = "nearest-exact" if method == "nearest" else method
    extra = {} if method == "nearest" else {"align_corners": False}
    out = F.interpolate(flat.float(), size=(h, w), mode=mode, **extra).to(samples.dtype)
    out = out.reshape(*samples.shape[:-2], h, w)
    lineage = {**dict(latent.lineage), "upscaled": {"method": method, "from": list(samples.shape[-2:]), "to": [h, w]}}
    return Latent(out, lineage)


def _upscale_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    handles = tiny.sd_handles()
    return {"latent": handles["latent"], "model": handles["model"], "method": "bicubic", "scale_by": 1.5,
            "width": 0, "height": 0}


@node(
    "dagfusion.latent.Upscale",
    version="1.0.0",
    category="latent",
    inputs=[
        Input("latent", LATENT, link_only=True, description="Latents (B, C, h, w) or videos (B, F, C, h, w)."),
        Input("model", MODEL, optional=True, link_only=True,
              description="The model the latent is for: gives the VAE factor of pixels per latent cell (else 8)."),
        Input("method", STRING, "bilinear", choices=UPSCALE_METHODS, description="Interpolation."),
        Input("scale_by", FLOAT, 1.5, min=0.05, max=16.0, description="Factor used when width and height are 0."),
        Input("width", INT, 0, min=0, max=16384, ui={"step": 8},
              description="Target width in pixels (0: from height and the aspect ratio, or scale_by)."),
        Input("height", INT, 0, min=0, max=16384, ui={"step": 8},
              description="Target height in pixels (0: from width and the aspect ratio, or scale_by)."),
    ],
    outputs=[Output("latent", LATENT, "The interpolated latent, for a second sampling pass at strength < 1.")],
    examples=[_upscale_example],
)
def upscale_node(
    ctx: RunContext, latent: Latent, method: str, scale_by: float, width: int, height: int, model: ModelHandle | None = None
) -> Latent:
    """Upscale a latent by interpolation, by a factor or to a pixel size (×8-aligned); the size is
    checked against max_image_pixels before anything is allocated."""
    from dagfusion.settings import DEFAULT_MAX_IMAGE_PIXELS

    if not isinstance(latent, Latent) or getattr(latent.samples, "ndim", 0) not in (4, 5):
        raise NodeInputError("latent", f"expected a LATENT (B, C, h, w) or (B, F, C, h, w), got {latent!r}")
    factor = int(model.vae_scale_factor) if model is not None else 8
    h, w = (int(v) for v in latent.samples.shape[-2:])
    new_h, new_w = upscale_size(h, w, factor, scale_by, width, height)
    limit = int(getattr(getattr(ctx, "settings", None), "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
    if new_h * factor * new_w * factor > limit:
        raise NodeInputError(
            "scale_by" if not (width or height) else "width",
            f"expected at most {limit} pixels (max_image_pixels), got {new_w * factor}×{new_h * factor}; "
            "raise max_image_pixels in the settings (or DAGFUSION_MAX_IMAGE_PIXELS)",
        )
    return upscale_latent(latent, new_h, new_w, method)


NODES = (upscale_node,)
