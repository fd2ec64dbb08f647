"""Live previews of latents that look like pictures: a linear latent-to-RGB projection fitted
for the model's VAE.

Decoding every preview with the VAE would cost a large part of a sampling step, so previews
project each latent pixel to a colour with a ``(C + 1) x 3`` matrix instead (as node-graph
tools' cheap latent previews do). The matrix is **fitted for the VAE**, once per VAE and
process: synthetic pictures (plain colour fills, and random colour patches on plain
backgrounds) are encoded with the
VAE (the posterior's mode, times its scaling factor: the denoiser's latent space), the pictures
are average-pooled to the latents' size, and a least-squares fit maps latents (plus a constant)
to those colours. A model whose loader did not record its VAE falls back to stretching the
first three latent channels to 0..255 — a picture of the latent, not of the image.
"""

from __future__ import annotations

import threading
from typing import Any

_FITTED: dict[str, Any] = {}
_LOCK = threading.Lock()
FIT_IMAGES = 48
FIT_SIZE = 64


def synthetic_pictures(count: int = FIT_IMAGES, size: int = FIT_SIZE, seed: int = 0) -> Any:
    """``(count, 3, size, size)`` in [0, 1]: a third plain colour fills, the rest random colour
    patches (a 4 x 4 grid, nearest-upsampled) over a plain background — many colours at every
    place, few edges."""
    import torch

    g = torch.Generator().manual_seed(seed)
    background = torch.rand(count, 3, 1, 1, generator=g).expand(count, 3, size, size)
    patches = torch.nn.functional.interpolate(torch.rand(count, 3, 4, 4, generator=g), size=(size, size), mode="nearest")
    keep = (torch.rand(count, 1, 4, 4, generator=g) < 0.5).float()
    keep[: count // 3] = 0.0  # plain fills
    keep = torch.nn.functional.interpolate(keep, size=(size, size), mode="nearest")
    return background * (1 - keep) + patches * keep


def fit_projection(vae: Any) -> Any:
    """The ``(C + 1, 3)`` least-squares projection from ``vae``'s scaled latents (plus a constant)
    to RGB in [0, 1], fitted once per VAE fingerprint (see the module docstring)."""
    import torch

    key = str(vae.__dagfusion_fingerprint__())
    with _LOCK:
        if key in _FITTED:
            return _FITTED[key]
    module = vae.module
    param = next(module.parameters())
    pictures = synthetic_pictures()
    with vae.patched(module), torch.no_grad():
        posterior = module.encode((pictures * 2 - 1).to(device=param.device, dtype=param.dtype)).latent_dist
        latents = posterior.mode().float().cpu() * float(getattr(module.config, "scaling_factor", 1.0))
    scale = pictures.shape[-1] // latents.shape[-1]
    targets = torch.nn.functional.avg_pool2d(pictures, scale)
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    projection = torch.linalg.lstsq(x.double(), y.double()).solution.float()
    with _LOCK:
        _FITTED[key] = projection
    return projection


def project(latents: Any, projection: Any) -> Any:
    """RGB ``(3, h, w)`` in [0, 1] of one latent ``(C, h, w)`` through a fitted projection."""
    import torch

    x = latents.detach().float().cpu()
    flat = torch.cat([x.reshape(x.shape[0], -1).T, torch.ones(x.shape[1] * x.shape[2], 1)], dim=1)
    return (flat @ projection).T.reshape(3, x.shape[1], x.shape[2]).clamp(0, 1)


def stretched(latents: Any) -> Any:
    """RGB ``(3, h, w)``: the first three channels of one latent, each stretched to [0, 1]."""
    x = latents.detach().float().cpu()
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


#: At most this many frames of a video latent are shown side by side in its preview.
PREVIEW_FRAMES = 8


def preview_frames(count: int, limit: int = PREVIEW_FRAMES) -> list[int]:
    """Indices of the frames a preview shows: all of them up to ``limit``, else ``limit`` spread
    evenly from the first to the last."""
    if count <= limit:
        return list(range(count))
    return [round(i * (count - 1) / (limit - 1)) for i in range(limit)]


def preview_picture(latents: Any, vae: Any = None) -> Any:
    """A PIL picture of the first latent of a batch: projected with the VAE's fitted projection
    when ``vae`` is given and fits, else :func:`stretched`. For a video latent ``(B, F, C, h, w)``
    the picture is a strip of the first clip's frames side by side (up to :data:`PREVIEW_FRAMES`,
    spread evenly, separated by a 1-pixel gap), so the motion can be followed while sampling."""
    import numpy as np
    import torch
    from PIL import Image

    x = latents[0]
    frames = [x[i] for i in preview_frames(x.shape[0])] if x.ndim == 4 else [x]
    projection = None
    if vae is not None:
        try:
            projection = fit_projection(vae)
            if projection.shape[0] != frames[0].shape[0] + 1:
                projection = None
        except Exception:  # noqa: BLE001 - a preview must never fail a run; fall back to the stretched latent
            projection = None
    pictures = [project(f, projection) if projection is not None else stretched(f) for f in frames]
    if len(pictures) > 1:
        gap = torch.ones(3, pictures[0].shape[1], 1)
        pictures = [p for picture in pictures for p in (picture, gap)][:-1]
    rgb = torch.cat(pictures, dim=2)
    array = (rgb.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(array)
