"""VAE nodes: latents to images (optionally tiled, for large pictures) and images to latents.

Latents in dagfusion are in the denoiser's space: VAE latents multiplied by the VAE's
``scaling_factor`` (after subtracting ``shift_factor``, or normalised by ``latents_mean`` /
``latents_std`` when the VAE config has them), exactly as diffusers pipelines do.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

from dagfusion import BOOLEAN, INT, SEED, STRING, Input, Output, RunContext, node
from dagfusion.model import VAEHandle
from dagfusion.nodes.diffusion.data import Latent
from dagfusion.nodes.diffusion.types import IMAGE, LATENT, VAE

LINEAGE_ATTR = "dagfusion_lineage"
"""Attribute set on decoded image tensors: how they were made (read by SaveImage)."""


def _stats(module: Any, like: Any) -> tuple[Any, Any] | None:
    config = module.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return None
    channels = len(mean)
    shape = (1, channels, 1, 1)
    return (
        like.new_tensor(mean).view(shape),
        like.new_tensor(std).view(shape),
    )


def to_vae_space(module: Any, latents: Any) -> Any:
    """Denoiser-space latents -> what ``vae.decode`` takes."""
    config = module.config
    stats = _stats(module, latents)
    if stats is not None:
        mean, std = stats
        return latents * std / config.scaling_factor + mean
    latents = latents / config.scaling_factor
    shift = getattr(config, "shift_factor", None)
    return latents + shift if shift is not None else latents


def from_vae_space(module: Any, latents: Any) -> Any:
    """``vae.encode`` latents -> denoiser space (inverse of :func:`to_vae_space`)."""
    config = module.config
    stats = _stats(module, latents)
    if stats is not None:
        mean, std = stats
        return (latents - mean) * config.scaling_factor / std
    shift = getattr(config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return config.scaling_factor * latents


def needs_upcast(vae: VAEHandle, module: Any) -> bool:
    """Whether ``precision="auto"`` decodes in fp32: an fp16 VAE whose config asks for it
    (``force_upcast``) in an SDXL model — exactly when diffusers' pipelines upcast."""
    import torch

    dtype = next(module.parameters()).dtype
    return (
        dtype == torch.float16
        and bool(getattr(module.config, "force_upcast", False))
        and "XL" in str(vae.info.get("pipeline", ""))
    )


@contextlib.contextmanager
def _compute_dtype(module: Any, upcast: bool) -> Iterator[Any]:
    """Run the block with ``module`` in fp32 if ``upcast`` (restored afterwards)."""
    import torch

    dtype = next(module.parameters()).dtype
    if upcast and dtype != torch.float32:
        module.to(torch.float32)
        try:
            yield torch.float32
        finally:
            module.to(dtype)
    else:
        yield dtype


def _decode_raw(module: Any, z: Any, frames: int | None) -> Any:
    kwargs: dict[str, Any] = {}
    if frames is not None and "num_frames" in inspect.signature(module.decode).parameters:
        kwargs["num_frames"] = frames
    return module.decode(z, return_dict=False, **kwargs)[0]


def _positions(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    positions = list(range(0, size - tile, stride))
    positions.append(size - tile)
    return sorted(set(positions))


def _ramp(length: int, fade: int, at_start: bool, at_end: bool, like: Any) -> Any:
    import torch

    weights = torch.ones(length, dtype=torch.float32, device=like.device)
    if fade > 0:
        ramp = (torch.arange(fade, dtype=torch.float32, device=like.device) + 0.5) / fade
        if at_start:
            weights[:fade] = torch.minimum(weights[:fade], ramp)
        if at_end:
            weights[-fade:] = torch.minimum(weights[-fade:], ramp.flip(0))
    return weights


def tiled_decode(module: Any, z: Any, tile: int, overlap: int, frames: int | None = None) -> Any:
    """Decode ``z`` (VAE space) in overlapping ``tile`` x ``tile`` latent tiles, blended linearly.

    Memory grows with the tile size instead of the picture size; seams are feathered over the
    overlap. Tiles as large as the latent decode in one piece (identical to plain decoding).
    """
    import torch

    if overlap >= tile:
        raise ValueError(f"tile_overlap ({overlap}) must be smaller than tile_size ({tile})")
    height, width = z.shape[-2:]
    ys, xs = _positions(height, tile, tile - overlap), _positions(width, tile, tile - overlap)
    if len(ys) == 1 and len(xs) == 1:
        return _decode_raw(module, z, frames)
    out = weight = None
    factor = 1
    for y in ys:
        for x in xs:
            piece = _decode_raw(module, z[..., y : y + tile, x : x + tile], frames).float()
            if out is None:
                factor = piece.shape[-1] // min(tile, width)
                out = torch.zeros((*piece.shape[:-2], height * factor, width * factor), device=piece.device)
                weight = torch.zeros((height * factor, width * factor), device=piece.device)
            ph, pw = piece.shape[-2:]
            wy = _ramp(ph, overlap * factor, y > 0, y + tile < height, piece)
            wx = _ramp(pw, overlap * factor, x > 0, x + tile < width, piece)
            mask = wy[:, None] * wx[None, :]
            top, left = y * factor, x * factor
            out[..., top : top + ph, left : left + pw] += piece * mask
            weight[top : top + ph, left : left + pw] += mask
    assert out is not None and weight is not None
    return out / weight


def decode(
    vae: VAEHandle,
    latent: Latent,
    *,
    tiled: bool = False,
    tile_size: int = 64,
    tile_overlap: int = 16,
    precision: str = "auto",
    logger: Any = None,
) -> Any:
    """Images ``(B, 3, H, W)`` in [0, 1] (float32, CPU) from ``latent``; video latents give ``B*F`` frames.

    ``precision="auto"`` decodes in the VAE's dtype (fp32 where diffusers upcasts, see
    :func:`needs_upcast`) and decodes again in fp32 if half precision overflowed;
    ``"fp32"`` always decodes in fp32.
    """
    import torch

    if precision not in ("auto", "fp32"):
        raise ValueError(f"expected precision 'auto' or 'fp32', got {precision!r}")
    module = vae.module
    samples = latent.samples
    frames = None
    if samples.ndim == 5:
        frames = samples.shape[1]
        samples = samples.reshape(-1, *samples.shape[2:])

    def run(upcast: bool) -> Any:
        with _compute_dtype(module, upcast) as dtype:
            z = to_vae_space(module, samples.to(device=next(module.parameters()).device, dtype=dtype))
            if tiled:
                return tiled_decode(module, z, tile_size, tile_overlap, frames)
            return _decode_raw(module, z, frames)

    with vae.patched(module), torch.no_grad():
        upcast = precision == "fp32" or needs_upcast(vae, module)
        image = run(upcast)
        if not upcast and image.dtype != torch.float32 and not bool(torch.isfinite(image).all()):
            (logger or logging.getLogger("dagfusion.node")).warning(
                "the VAE overflowed in %s; decoding again in fp32", str(image.dtype).replace("torch.", "")
            )
            image = run(True)
    image = (image.float() / 2 + 0.5).clamp(0, 1).cpu()
    setattr(image, LINEAGE_ATTR, {**dict(latent.lineage), "vae": vae.info.get("source")})
    return image


def encode(vae: VAEHandle, image: Any, *, mode: str = "mode", seed: int = 0) -> Latent:
    """Latents (denoiser space) of images ``(B, C, H, W)`` in [0, 1]; ``mode="sample"`` draws from the posterior."""
    import torch

    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(image.shape)}")
    if image.shape[1] == 4:
        image = image[:, :3]
    elif image.shape[1] == 1:
        image = image.expand(-1, 3, -1, -1)
    elif image.shape[1] != 3:
        raise ValueError(f"expected 1, 3 or 4 image channels, got {image.shape[1]}")
    module = vae.module
    with vae.patched(module), torch.no_grad(), _compute_dtype(module, needs_upcast(vae, module)) as dtype:
        device = next(module.parameters()).device
        x = (image.to(device=device, dtype=dtype) * 2 - 1)
        dist = module.encode(x).latent_dist
        if mode == "sample":
            z = dist.sample(generator=torch.Generator(device="cpu").manual_seed(int(seed)))
        elif mode == "mode":
            z = dist.mode()
        else:
            raise ValueError(f"expected mode 'mode' or 'sample', got {mode!r}")
        latents = from_vae_space(module, z)
    return Latent(latents, {"vae": vae.info.get("source"), "encoded": {"mode": mode, "seed": int(seed)}})


def _decode_example() -> dict[str, Any]:
    import torch

    from dagfusion.testing import models as tiny

    generator = torch.Generator().manual_seed(0)
    return {"vae": tiny.sd_handles()["vae"], "latent": Latent(torch.randn(1, 4, 16, 16, generator=generator)),
            "tiled": True, "tile_size": 8, "tile_overlap": 2}


def _encode_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    parts = tiny.sd_handles()
    return {"vae": parts["vae"], "image": parts["image"], "mode": "sample", "seed": 1}


@node(
    "dagfusion.vae.Decode",
    version="1.0.0",
    category="latent",
    inputs=[
        Input("vae", VAE, link_only=True, description="The VAE of the model that made the latents."),
        Input("latent", LATENT, link_only=True, description="Latents to decode."),
        Input("tiled", BOOLEAN, False, description="Decode in overlapping tiles (for pictures too large to decode at once)."),
        Input("tile_size", INT, 64, min=4, max=4096, description="Tile size in latent pixels (x8 for most VAEs)."),
        Input("tile_overlap", INT, 16, min=0, max=4095, description="Overlap of neighbouring tiles in latent pixels."),
        Input("precision", STRING, "auto", choices=("auto", "fp32"),
              description="'auto': the VAE's dtype (fp32 for SDXL fp16 VAEs, and again in fp32 on overflow); 'fp32': always."),
    ],
    outputs=[Output("image", IMAGE, "Decoded images (B, 3, H, W) in [0, 1].")],
    examples=[_decode_example],
)
def decode_node(
    ctx: RunContext, vae: VAEHandle, latent: Latent, tiled: bool, tile_size: int, tile_overlap: int, precision: str
) -> Any:
    """Decode latents into images with a VAE, optionally in feathered tiles to bound memory."""
    if tiled and tile_overlap >= tile_size:
        raise ValueError(f"tile_overlap ({tile_overlap}) must be smaller than tile_size ({tile_size})")
    return decode(vae, latent, tiled=tiled, tile_size=tile_size, tile_overlap=tile_overlap, precision=precision,
                  logger=ctx.logger)


@node(
    "dagfusion.vae.Encode",
    version="1.0.0",
    category="latent",
    inputs=[
        Input("vae", VAE, link_only=True, description="The VAE of the model the latents are for."),
        Input("image", IMAGE, link_only=True, description="Images (B, C, H, W) in [0, 1]; sides a multiple of the VAE factor."),
        Input("mode", STRING, "mode", choices=("mode", "sample"),
              description="'mode' takes the posterior's most likely latent; 'sample' draws one with the seed."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed for mode 'sample'."),
    ],
    outputs=[Output("latent", LATENT, "Latents in the denoiser's space (scaled), e.g. for img2img.")],
    examples=[_encode_example],
)
def encode_node(ctx: RunContext, vae: VAEHandle, image: Any, mode: str, seed: int) -> Latent:
    """Encode images into latents with a VAE (the start of img2img)."""
    return encode(vae, image, mode=mode, seed=seed)


NODES = (decode_node, encode_node)
