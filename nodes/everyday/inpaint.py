"""Inpainting and masks: regenerate the masked part of a picture and keep the rest.

Two ways, depending on the model:

- ``dagfusion.inpaint.Blend`` (any model): latent-mask blending. After every sampler step the
  latents outside the mask are replaced by the picture's latents noised to the next step's
  noise level, and after the last step by the picture's latents themselves — outside the mask
  the result equals the encoded picture exactly; inside, the model paints freely while seeing
  the surroundings at every step.
- ``dagfusion.inpaint.Condition`` (9-channel inpainting UNets such as
  ``stable-diffusion-inpainting``): the model is given the mask and the latents of the picture
  with the masked pixels grey as 5 extra input channels at every step, as diffusers'
  ``StableDiffusionInpaintPipeline`` does (the same seed and steps give its latents).

MASK values are ``(B, 1, H, W)`` in [0, 1], 1 = regenerate. A mask of another size than the
picture is resized (bilinear) with a warning when its aspect ratio is the same (within 1%), and
refused otherwise. The mask nodes (``dagfusion.mask.*``) make, grow, shrink, feather and invert
masks.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from dagfusion import FLOAT, INT, SEED, STRING, Input, Output, RunContext, node
from dagfusion.errors import NodeInputError
from dagfusion.model import ModelHandle, VAEHandle
from dagfusion.nodes.diffusion.data import Latent
from dagfusion.nodes.diffusion.types import IMAGE, LATENT, MASK, MODEL, VAE

_logger = logging.getLogger("dagfusion.inpaint")

LATENT_RESIZE = ("nearest", "area")
"""How ``dagfusion.inpaint.Blend`` shrinks the mask to latent size (nearest: as diffusers)."""

CHANNELS = ("luminance", "red", "green", "blue", "alpha")
"""Which channel ``dagfusion.mask.FromImage`` reads."""


# --------------------------------------------------------------------------- mask helpers


def as_mask(mask: Any, input: str = "mask") -> Any:
    """``mask`` as a float32 ``(B, 1, H, W)`` tensor (``(H, W)`` and ``(B, H, W)`` are accepted).

    :raises NodeInputError: another shape.
    """
    import torch

    if not isinstance(mask, torch.Tensor):
        raise NodeInputError(input, f"expected a mask tensor (B, 1, H, W), got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise NodeInputError(input, f"expected a mask (B, 1, H, W), got shape {tuple(mask.shape)}")
    return mask.detach().float().cpu()


def fit_mask(mask: Any, height: int, width: int, logger: Any = None, input: str = "mask") -> Any:
    """``mask`` (B, 1, H, W) at ``height × width``: unchanged if it already is; resized
    (bilinear) with a warning if its aspect ratio is the same within 1%.

    :raises NodeInputError: the aspect ratios differ (naming both sizes).
    """
    import torch.nn.functional as F

    mask = as_mask(mask, input)
    h, w = int(mask.shape[-2]), int(mask.shape[-1])
    if (h, w) == (height, width):
        return mask
    if abs(h * width - w * height) > 0.01 * h * width:
        raise NodeInputError(
            input, f"the mask is {w}x{h} (width x height) but the picture is {width}x{height}: the aspect ratios "
                   "differ, so the mask cannot be resized to fit; crop or pad one of them"
        )
    (logger or _logger).warning(
        "the mask is %dx%d but the picture is %dx%d (width x height); resizing the mask to fit", w, h, width, height
    )
    return F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def to_latent_size(mask: Any, height: int, width: int, method: str = "nearest") -> Any:
    """A pixel mask shrunk to ``height × width`` latent cells: ``nearest`` (diffusers' choice) or
    ``area`` (the average over each cell: a soft edge)."""
    import torch.nn.functional as F

    if method not in LATENT_RESIZE:
        raise ValueError(f"expected a latent resize method in {list(LATENT_RESIZE)}, got {method!r}")
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    if method == "area":
        return F.adaptive_avg_pool2d(mask, (height, width))
    return F.interpolate(mask, size=(height, width))


def grow_mask(mask: Any, pixels: int) -> Any:
    """``mask`` dilated by ``pixels`` (a square neighbourhood); negative values shrink (erode) it."""
    import torch.nn.functional as F

    mask = as_mask(mask)
    if pixels == 0:
        return mask.clone()
    n = abs(int(pixels))
    size = 2 * n + 1
    if pixels > 0:
        return F.max_pool2d(mask, size, stride=1, padding=n)
    padded = F.pad(mask, (n, n, n, n), mode="replicate")
    return -F.max_pool2d(-padded, size, stride=1)


def gaussian_kernel(sigma: float) -> Any:
    """A normalised 1-D Gaussian of standard deviation ``sigma`` (radius ``ceil(3 sigma)``)."""
    import torch

    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def feather_mask(mask: Any, sigma: float) -> Any:
    """``mask`` blurred by a Gaussian of ``sigma`` pixels (edges replicated), for soft transitions."""
    import torch.nn.functional as F

    mask = as_mask(mask)
    if sigma <= 0:
        return mask.clone()
    k = gaussian_kernel(sigma)
    r = (k.numel() - 1) // 2
    x = F.pad(mask, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x.clamp(0, 1)


def mask_from_image(images: Any, channel: str = "luminance", threshold: float = 0.0) -> Any:
    """A mask from one channel of ``images`` (B, C, H, W); ``threshold > 0`` makes it binary (>= threshold)."""
    import torch

    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise NodeInputError("images", f"expected images (B, C, H, W), got {tuple(getattr(images, 'shape', ()))}")
    x = images.detach().float().cpu()
    c = x.shape[1]
    if channel == "luminance":
        m = x[:, :1] if c < 3 else 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    elif channel == "alpha":
        if c not in (2, 4):
            raise NodeInputError("channel", f"the images have {c} channels and no alpha")
        m = x[:, -1:]
    else:
        index = ("red", "green", "blue").index(channel)
        if index >= c:
            raise NodeInputError("channel", f"the images have {c} channel(s); there is no {channel} channel")
        m = x[:, index:index + 1]
    m = m.clamp(0, 1)
    return (m >= threshold).float() if threshold > 0 else m


def rectangle_mask(width: int, height: int, x: int, y: int, w: int, h: int, batch: int = 1) -> Any:
    """A ``width × height`` mask with 1 in the rectangle at ``(x, y)`` of ``w × h`` (clipped)."""
    import torch

    mask = torch.zeros(batch, 1, height, width)
    mask[:, :, max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)] = 1.0
    return mask


def masked_picture(image: Any, mask: Any) -> Any:
    """``image`` (B, 3, H, W) in [0, 1] with the pixels where ``mask >= 0.5`` set to grey (0.5),
    as diffusers prepares the masked image of 9-channel inpainting."""
    keep = (mask < 0.5).to(image.dtype)
    return image * keep + 0.5 * (1 - keep)


# --------------------------------------------------------------------------- inpainting


def blend_model(model: ModelHandle, latent: Latent, mask: Any, *, resize: str = "nearest",
                logger: Any = None) -> ModelHandle:
    """``model`` with a :class:`~dagfusion.nodes.everyday.inpaint_hook.BlendPatch` keeping
    ``latent`` where ``mask`` (pixel size: the latent's size × the VAE factor) is 0."""
    from dagfusion.nodes.everyday.inpaint_hook import BlendPatch

    samples = latent.samples
    if samples.ndim != 4:
        raise NodeInputError("latent", f"expected image latents (B, C, h, w), got shape {tuple(samples.shape)}")
    h, w = int(samples.shape[-2]), int(samples.shape[-1])
    scale = int(model.vae_scale_factor or 1)
    pixels = fit_mask(mask, h * scale, w * scale, logger)
    if pixels.shape[0] not in (1, samples.shape[0]):
        raise NodeInputError("mask", f"the mask has {pixels.shape[0]} rows and the latent {samples.shape[0]}; give 1 or {samples.shape[0]}")
    return model.with_patch(BlendPatch(samples.detach().float().cpu(), to_latent_size(pixels, h, w, resize)))


def condition_model(model: ModelHandle, vae: VAEHandle, image: Any, mask: Any, *, mode: str = "mode", seed: int = 0,
                    logger: Any = None) -> tuple[ModelHandle, Latent]:
    """``model`` (a 9-channel inpainting UNet) with a
    :class:`~dagfusion.nodes.everyday.inpaint_hook.ConditionPatch`, and the picture's latents.

    The mask is binarised at 0.5 (as diffusers does); the masked picture (grey where masked) is
    encoded with ``vae`` (``mode``: the posterior's mode, or a ``sample`` drawn with ``seed``).
    """
    import torch
    from dagfusion.nodes.diffusion.vae import encode
    from dagfusion.nodes.everyday.inpaint_hook import ConditionPatch

    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise NodeInputError("image", f"expected images (B, C, H, W), got {tuple(getattr(image, 'shape', ()))}")
    image = image.detach().float().cpu()[:, :3]
    height, width = int(image.shape[-2]), int(image.shape[-1])
    binary = (fit_mask(mask, height, width, logger) >= 0.5).float()
    scale = int(model.vae_scale_factor or 1)
    if height % scale or width % scale:
        raise NodeInputError("image", f"the picture is {width}x{height}; both sides must be multiples of the VAE factor {scale}")
    masked = encode(vae, masked_picture(image, binary), mode=mode, seed=seed).samples.detach().float().cpu()
    picture = encode(vae, image, mode=mode, seed=seed)
    small = torch.nn.functional.interpolate(binary, size=(height // scale, width // scale))
    return model.with_patch(ConditionPatch(small, masked)), picture


# --------------------------------------------------------------------------- nodes


def _sd() -> dict[str, Any]:
    from dagfusion.testing.models import sd_handles

    return sd_handles()


def _example_mask(size: int = 32) -> Any:
    return rectangle_mask(size, size, size // 4, size // 4, size // 2, size // 2)


@node(
    "dagfusion.inpaint.Blend",
    version="1.0.0",
    category="inpaint",
    inputs=[
        Input("model", MODEL, link_only=True, description="Any model (no inpainting training needed)."),
        Input("latent", LATENT, link_only=True, description="The picture's latents (dagfusion.vae.Encode)."),
        Input("mask", MASK, link_only=True,
              description="1 = regenerate, 0 = keep; the picture's pixel size (a same-aspect mask is resized with a warning)."),
        Input("latent_resize", STRING, "nearest", choices=LATENT_RESIZE,
              description="How the mask shrinks to latent size: nearest (as diffusers) or area (soft edges)."),
    ],
    outputs=[Output("model", MODEL, "The model keeping the picture outside the mask while sampling.")],
    examples=[lambda: {"model": _sd()["model"], "latent": _sd()["latent"], "mask": _example_mask(), "latent_resize": "nearest"}],
    ui={"color": "#7e57c2"},
)
def blend_node(ctx: RunContext, model: ModelHandle, latent: Latent, mask: Any, latent_resize: str) -> ModelHandle:
    """Inpaint with any model by latent-mask blending: after every step, the latents outside the
    mask are reset to the picture's latents at that step's noise level (exactly the picture's
    latents after the last step). Sample with the picture's latent (or an empty latent of its size)."""
    return blend_model(model, latent, mask, resize=latent_resize, logger=ctx.logger)


@node(
    "dagfusion.inpaint.Condition",
    version="1.0.0",
    category="inpaint",
    inputs=[
        Input("model", MODEL, link_only=True, description="A 9-channel inpainting UNet (e.g. stable-diffusion-inpainting)."),
        Input("vae", VAE, link_only=True, description="The model's VAE."),
        Input("image", IMAGE, link_only=True, description="The picture (B, 3, H, W) in [0, 1]; sides a multiple of the VAE factor."),
        Input("mask", MASK, link_only=True, description="1 = regenerate (binarised at 0.5); resized to the picture if needed."),
        Input("mode", STRING, "mode", choices=("mode", "sample"),
              description="Encode with the posterior's mode, or draw a sample (seeded)."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed for mode 'sample'."),
    ],
    outputs=[
        Output("model", MODEL, "The model given the mask and masked picture at every step."),
        Output("latent", LATENT, "The picture's latents (their size for sampling; img2img below strength 1)."),
    ],
    examples=[lambda: {"model": _sd()["model"], "vae": _sd()["vae"], "image": _sd()["image"], "mask": _example_mask(),
                       "mode": "mode", "seed": 0}],
    ui={"color": "#7e57c2"},
)
def condition_node(ctx: RunContext, model: ModelHandle, vae: VAEHandle, image: Any, mask: Any, mode: str,
                   seed: int) -> tuple[ModelHandle, Latent]:
    """Inpaint with a 9-channel inpainting UNet: every denoiser call gets the mask and the latents
    of the masked picture as extra input channels (as diffusers' StableDiffusionInpaintPipeline).
    The check that the model takes 9 channels happens when sampling starts."""
    return condition_model(model, vae, image, mask, mode=mode, seed=seed, logger=ctx.logger)


@node(
    "dagfusion.mask.Grow",
    version="1.0.0",
    category="mask",
    inputs=[
        Input("mask", MASK, link_only=True),
        Input("pixels", INT, 4, min=-1024, max=1024, description="Grow by this many pixels (square); negative shrinks."),
    ],
    outputs=[Output("mask", MASK, "The grown (or shrunk) mask.")],
    examples=[lambda: {"mask": _example_mask(), "pixels": 2}],
)
def grow_node(ctx: RunContext, mask: Any, pixels: int) -> Any:
    """Dilate a mask by N pixels (or erode it for negative N), e.g. to cover an object's fringe."""
    return grow_mask(mask, pixels)


@node(
    "dagfusion.mask.Feather",
    version="1.0.0",
    category="mask",
    inputs=[
        Input("mask", MASK, link_only=True),
        Input("sigma", FLOAT, 2.0, min=0.0, max=256.0, description="Standard deviation of the Gaussian blur in pixels (0: unchanged)."),
    ],
    outputs=[Output("mask", MASK, "The blurred mask in [0, 1].")],
    examples=[lambda: {"mask": _example_mask(), "sigma": 1.5}],
)
def feather_node(ctx: RunContext, mask: Any, sigma: float) -> Any:
    """Soften a mask's edges with a Gaussian blur (fractional values blend old and new)."""
    return feather_mask(mask, sigma)


@node(
    "dagfusion.mask.Invert",
    version="1.0.0",
    category="mask",
    inputs=[Input("mask", MASK, link_only=True)],
    outputs=[Output("mask", MASK, "1 - mask.")],
    examples=[lambda: {"mask": _example_mask()}],
)
def invert_node(ctx: RunContext, mask: Any) -> Any:
    """Swap the regenerated and kept regions of a mask."""
    return 1.0 - as_mask(mask)


@node(
    "dagfusion.mask.FromImage",
    version="1.0.0",
    category="mask",
    inputs=[
        Input("images", IMAGE, link_only=True),
        Input("channel", STRING, "luminance", choices=CHANNELS, description="Which channel becomes the mask."),
        Input("threshold", FLOAT, 0.0, min=0.0, max=1.0, description="Above 0: 1 where the channel is >= threshold, else 0."),
    ],
    outputs=[Output("mask", MASK, "The mask (B, 1, H, W).")],
    examples=[lambda: {"images": _sd()["image"], "channel": "red", "threshold": 0.5}],
)
def from_image_node(ctx: RunContext, images: Any, channel: str, threshold: float) -> Any:
    """A mask from one channel of an image (a painted mask, or an alpha channel)."""
    return mask_from_image(images, channel, threshold)


@node(
    "dagfusion.mask.Rectangle",
    version="1.0.0",
    category="mask",
    inputs=[
        Input("width", INT, 512, min=1, max=16384, description="Mask width in pixels."),
        Input("height", INT, 512, min=1, max=16384, description="Mask height in pixels."),
        Input("x", INT, 128, min=-16384, max=16384, description="Left edge of the rectangle."),
        Input("y", INT, 128, min=-16384, max=16384, description="Top edge of the rectangle."),
        Input("rect_width", INT, 256, min=0, max=16384, description="Rectangle width."),
        Input("rect_height", INT, 256, min=0, max=16384, description="Rectangle height."),
    ],
    outputs=[Output("mask", MASK, "1 inside the rectangle (clipped to the mask), 0 elsewhere.")],
    examples=[{"width": 32, "height": 32, "x": 8, "y": 4, "rect_width": 12, "rect_height": 20}],
)
def rectangle_node(ctx: RunContext, width: int, height: int, x: int, y: int, rect_width: int, rect_height: int) -> Any:
    """A rectangular mask (1 inside), e.g. the region to repaint."""
    from dagfusion.nodes.everyday.resize import check_size, pixel_limit

    check_size(width, height, pixel_limit(ctx))
    return rectangle_mask(width, height, x, y, rect_width, rect_height)


NODES = (blend_node, condition_node, grow_node, feather_node, invert_node, from_image_node, rectangle_node)
