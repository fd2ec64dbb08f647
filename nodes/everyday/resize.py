"""Pixel geometry: resize, crop, pad and composite image batches.

IMAGE values are tensors ``(B, C, H, W)`` in [0, 1]; every node returns a new tensor and never
changes its inputs. Output sizes are checked against the settings' ``max_image_pixels``
(``DAGFUSION_MAX_IMAGE_PIXELS``) **before** anything is allocated; a bigger output is a
:class:`~dagfusion.errors.NodeInputError` naming the size asked for and the limit.

Resize methods: ``lanczos`` (PIL, per channel in 32-bit float, so no 8-bit rounding),
``bicubic`` and ``bilinear`` (torch, antialiased when shrinking), ``nearest`` (torch). Bicubic and
Lanczos may overshoot: results are clamped to [0, 1].
"""

from __future__ import annotations

from typing import Any

from dagfusion import FLOAT, INT, STRING, Input, Output, RunContext, node
from dagfusion.errors import NodeInputError
from dagfusion.nodes.diffusion.types import IMAGE, MASK
from dagfusion.nodes.everyday.batches import as_batch

METHODS = ("lanczos", "bicubic", "bilinear", "nearest")
"""Resampling methods of ``dagfusion.image.Resize``."""

PAD_MODES = ("constant", "edge", "reflect")
"""How ``dagfusion.image.Pad`` fills the new border."""


def pixel_limit(ctx: RunContext | None) -> int:
    """The largest output (width × height) allowed: the settings' ``max_image_pixels``."""
    from dagfusion.settings import DEFAULT_MAX_IMAGE_PIXELS

    settings = getattr(ctx, "settings", None)
    return int(getattr(settings, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))


def check_size(width: int, height: int, limit: int, input: str = "width") -> None:
    """:raises NodeInputError: ``width × height`` is not positive or is over ``limit``."""
    if width < 1 or height < 1:
        raise NodeInputError(input, f"expected an output of at least 1×1 pixels, got {width}×{height}")
    if width * height > limit:
        raise NodeInputError(
            input, f"expected an output of at most {limit} pixels (max_image_pixels), got {width}×{height} = "
                   f"{width * height}; raise max_image_pixels in the settings (or DAGFUSION_MAX_IMAGE_PIXELS)"
        )


def target_size(height: int, width: int, new_width: int, new_height: int, scale: float) -> tuple[int, int]:
    """``(width, height)`` asked for: both given, one given (the other keeps the aspect), or ``scale``."""
    if new_width and new_height:
        return new_width, new_height
    if new_width:
        return new_width, max(1, round(height * new_width / width))
    if new_height:
        return max(1, round(width * new_height / height)), new_height
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_images(images: Any, width: int, height: int, method: str = "lanczos") -> Any:
    """``images`` resized to ``width × height`` with ``method`` (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    batch = as_batch(images)
    if method not in METHODS:
        raise ValueError(f"expected a method in {METHODS}, got {method!r}")
    if tuple(batch.shape[-2:]) == (height, width):
        return batch.clone()
    source = batch.float()
    if method == "lanczos":
        import numpy as np
        from PIL import Image

        planes = source.detach().cpu().numpy()
        out = np.empty((*planes.shape[:2], height, width), dtype=np.float32)
        for b in range(planes.shape[0]):
            for c in range(planes.shape[1]):
                plane = Image.fromarray(planes[b, c], mode="F")
                out[b, c] = np.asarray(plane.resize((width, height), Image.Resampling.LANCZOS))
        result = torch.from_numpy(out).to(batch.device)
    elif method == "nearest":
        result = F.interpolate(source, size=(height, width), mode="nearest-exact")
    else:
        result = F.interpolate(source, size=(height, width), mode=method, align_corners=False, antialias=True)
    return result.clamp(0, 1).to(batch.dtype)


def crop_images(images: Any, x: int, y: int, width: int, height: int) -> Any:
    """The ``width × height`` region at ``(x, y)``; it must lie inside the images."""
    batch = as_batch(images)
    h, w = int(batch.shape[-2]), int(batch.shape[-1])
    if x + width > w or y + height > h:
        raise NodeInputError(
            "width" if x + width > w else "height",
            f"expected a region inside the {w}×{h} image, got {width}×{height} at ({x}, {y}), "
            f"which reaches ({x + width}, {y + height})",
        )
    return batch[..., y : y + height, x : x + width].clone()


def pad_images(images: Any, left: int, top: int, right: int, bottom: int, mode: str, value: float) -> tuple[Any, Any]:
    """``(padded images, mask)``; the mask (B, 1, H, W) is 1 on the new border, 0 on the original."""
    import torch
    import torch.nn.functional as F

    batch = as_batch(images)
    h, w = int(batch.shape[-2]), int(batch.shape[-1])
    if mode == "reflect" and (max(left, right) >= w or max(top, bottom) >= h):
        raise NodeInputError("mode", f"reflect padding must be smaller than the image ({w}×{h}); "
                                     f"got left {left}, top {top}, right {right}, bottom {bottom}")
    pads = (left, right, top, bottom)
    if mode == "constant":
        padded = F.pad(batch, pads, mode="constant", value=float(value))
    else:
        padded = F.pad(batch.float(), pads, mode="replicate" if mode == "edge" else "reflect").to(batch.dtype)
    mask = torch.ones(batch.shape[0], 1, h + top + bottom, w + left + right, dtype=torch.float32, device=batch.device)
    mask[..., top : top + h, left : left + w] = 0.0
    return padded, mask


def composite(destination: Any, source: Any, x: int, y: int, mask: Any = None) -> Any:
    """``source`` pasted onto ``destination`` with its top-left corner at ``(x, y)``.

    Parts outside ``destination`` are dropped (``x``, ``y`` may be negative). ``mask`` (1 = take the
    source; ``(H, W)``, ``(1|B, 1, H, W)``, the source's size) blends the two. Batches must match or
    one be 1; channels must match.
    """
    import torch

    dest, src = as_batch(destination, "destination"), as_batch(source, "source")
    if dest.shape[1] != src.shape[1]:
        raise NodeInputError("source", f"expected {dest.shape[1]} channels like the destination {tuple(dest.shape)}, "
                                       f"got {tuple(src.shape)}")
    if dest.shape[0] != src.shape[0] and 1 not in (dest.shape[0], src.shape[0]):
        raise NodeInputError("source", f"expected a batch of {dest.shape[0]} or 1 like the destination "
                                       f"{tuple(dest.shape)}, got {tuple(src.shape)}")
    sh, sw = int(src.shape[-2]), int(src.shape[-1])
    if mask is not None:
        mask = mask.reshape(1, 1, *mask.shape) if mask.ndim == 2 else mask
        if mask.ndim != 4 or tuple(mask.shape[-2:]) != (sh, sw) or mask.shape[0] not in (1, src.shape[0], dest.shape[0]):
            raise NodeInputError("mask", f"expected a mask (1 or B, 1, {sh}, {sw}) matching the source "
                                         f"{tuple(src.shape)}, got {tuple(mask.shape)}")
    batch = max(dest.shape[0], src.shape[0])
    out = dest.expand(batch, *dest.shape[1:]).clone()
    dh, dw = int(dest.shape[-2]), int(dest.shape[-1])
    top, left, bottom, right = max(y, 0), max(x, 0), min(y + sh, dh), min(x + sw, dw)
    if top >= bottom or left >= right:
        return out
    patch = src[..., top - y : bottom - y, left - x : right - x].to(out.dtype)
    if mask is None:
        out[..., top:bottom, left:right] = patch
    else:
        m = mask[..., top - y : bottom - y, left - x : right - x].to(device=out.device, dtype=out.dtype).clamp(0, 1)
        region = out[..., top:bottom, left:right]
        out[..., top:bottom, left:right] = torch.lerp(region, patch.expand_as(region), m.expand_as(region))
    return out


def _images(size: int = 16, batch: int = 1) -> Any:
    import torch

    return torch.linspace(0, 1, batch * 3 * size * size).reshape(batch, 3, size, size)


@node(
    "dagfusion.image.Resize",
    version="1.0.0",
    category="image",
    inputs=[
        Input("images", IMAGE, link_only=True, description="Images (B, C, H, W) in [0, 1]."),
        Input("width", INT, 0, min=0, max=16384, description="New width (0: from height and the aspect ratio, or scale)."),
        Input("height", INT, 0, min=0, max=16384, description="New height (0: from width and the aspect ratio, or scale)."),
        Input("scale", FLOAT, 1.0, min=0.01, max=64.0, description="Factor used when width and height are both 0."),
        Input("method", STRING, "lanczos", choices=METHODS, description="Resampling filter."),
    ],
    outputs=[Output("images", IMAGE, "The resized images, clamped to [0, 1].")],
    examples=[lambda: {"images": _images(), "width": 24, "height": 0, "scale": 1.0, "method": "lanczos"},
              lambda: {"images": _images(), "width": 0, "height": 0, "scale": 0.5, "method": "bicubic"}],
)
def resize_node(ctx: RunContext, images: Any, width: int, height: int, scale: float, method: str) -> Any:
    """Resize images to a size, or by a factor (aspect kept when only one side is given); the output
    size is checked against max_image_pixels before anything is allocated."""
    batch = as_batch(images)
    new_w, new_h = target_size(int(batch.shape[-2]), int(batch.shape[-1]), width, height, scale)
    check_size(new_w, new_h, pixel_limit(ctx), "scale" if not (width or height) else "width")
    return resize_images(batch, new_w, new_h, method)


@node(
    "dagfusion.image.Crop",
    version="1.0.0",
    category="image",
    inputs=[
        Input("images", IMAGE, link_only=True, description="Images (B, C, H, W)."),
        Input("x", INT, 0, min=0, max=16384, description="Left edge of the region."),
        Input("y", INT, 0, min=0, max=16384, description="Top edge of the region."),
        Input("width", INT, 512, min=1, max=16384, description="Region width; the region must lie inside the image."),
        Input("height", INT, 512, min=1, max=16384, description="Region height."),
    ],
    outputs=[Output("images", IMAGE, "The region of every image.")],
    examples=[lambda: {"images": _images(), "x": 2, "y": 4, "width": 8, "height": 6}],
)
def crop_node(ctx: RunContext, images: Any, x: int, y: int, width: int, height: int) -> Any:
    """Cut a rectangle out of every image; a region reaching past the image is an error naming both."""
    return crop_images(images, x, y, width, height)


@node(
    "dagfusion.image.Pad",
    version="1.0.0",
    category="image",
    inputs=[
        Input("images", IMAGE, link_only=True, description="Images (B, C, H, W)."),
        Input("left", INT, 0, min=0, max=16384, description="Pixels added on the left."),
        Input("top", INT, 0, min=0, max=16384, description="Pixels added on top."),
        Input("right", INT, 0, min=0, max=16384, description="Pixels added on the right."),
        Input("bottom", INT, 0, min=0, max=16384, description="Pixels added at the bottom."),
        Input("mode", STRING, "constant", choices=PAD_MODES,
              description="constant: fill with value; edge: repeat the edge pixels; reflect: mirror the image."),
        Input("value", FLOAT, 0.0, min=0.0, max=1.0, description="Fill value of constant padding (0 black, 1 white)."),
    ],
    outputs=[
        Output("images", IMAGE, "The padded images."),
        Output("mask", MASK, "1 on the added border, 0 over the original picture (for outpainting)."),
    ],
    examples=[lambda: {"images": _images(), "left": 4, "top": 0, "right": 2, "bottom": 8, "mode": "reflect", "value": 0.0}],
)
def pad_node(ctx: RunContext, images: Any, left: int, top: int, right: int, bottom: int, mode: str, value: float) -> tuple[Any, Any]:
    """Add a border around every image, with a mask of the border; the output size is checked
    against max_image_pixels first."""
    batch = as_batch(images)
    check_size(int(batch.shape[-1]) + left + right, int(batch.shape[-2]) + top + bottom, pixel_limit(ctx), "left")
    return pad_images(batch, left, top, right, bottom, mode, value)


@node(
    "dagfusion.image.Composite",
    version="1.0.0",
    category="image",
    inputs=[
        Input("destination", IMAGE, link_only=True, description="Background images A (B, C, H, W)."),
        Input("source", IMAGE, link_only=True, description="Images B pasted onto A (same channels; batch B or 1)."),
        Input("x", INT, 0, min=-16384, max=16384, description="Where B's left edge goes on A (may be negative)."),
        Input("y", INT, 0, min=-16384, max=16384, description="Where B's top edge goes on A (may be negative)."),
        Input("mask", MASK, optional=True, link_only=True,
              description="Blend mask the size of B: 1 takes B, 0 keeps A (none: B replaces A)."),
    ],
    outputs=[Output("images", IMAGE, "A with B pasted at (x, y); parts of B outside A are dropped.")],
    examples=[lambda: {"destination": _images(), "source": _images(8).flip(-1), "x": 4, "y": -2}],
)
def composite_node(ctx: RunContext, destination: Any, source: Any, x: int, y: int, mask: Any = None) -> Any:
    """Paste image B onto image A at (x, y), optionally through a mask (1 = B)."""
    return composite(destination, source, x, y, mask)


NODES = (resize_node, crop_node, pad_node, composite_node)
