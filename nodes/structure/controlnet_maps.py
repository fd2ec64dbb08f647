"""Control maps: how pictures, depth, normals and object masks become the conditioning tensor of a
ControlNet or T2I-Adapter.

One function, :func:`stack_control`, turns the maps a node was given into one float tensor
``(B, C, H, W)`` in ``[0, 1]``, channels in a fixed order:

1. ``image`` (``IMAGE``, 3 channels, as is; a 4th alpha channel is dropped);
2. ``depth`` (``DEPTH``, 1 channel, 1 = nearest);
3. ``normal`` (``NORMAL``, 3 channels in ``[-1, 1]``, shown as ``(n + 1) / 2`` as normal
   ControlNets expect);
4. ``mask`` (``OBJECT_MASK``, ``K`` channels);
5. ``control`` (any ``TENSOR`` ``(B, C, H, W)``, used as is: a stack made elsewhere).

When exactly one 1-channel map (a depth map or a one-object mask) is given and the network wants
3 channels, it is repeated to 3 — the grey picture depth ControlNets were trained on. Every other
count must equal the network's ``conditioning_channels`` exactly, or the call fails naming what
was stacked.

:func:`fit_control` resizes a map to the pixel size of the latents being sampled with nearest
neighbour interpolation, exactly as diffusers' control image processor resizes a tensor, but
refuses a map whose aspect ratio is off by more than :data:`MAX_ASPECT_DISTORTION` or whose size
exceeds the settings' image pixel limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAP_INPUTS = ("image", "depth", "normal", "mask", "control")
"""The map inputs of the control nodes, in stacking order."""

MAX_ASPECT_DISTORTION = 4.0
"""The most a control map's aspect ratio may differ (as a factor) from the latents' before it is refused."""


class ControlMapError(ValueError):
    """A control map cannot be used: wrong shape, channel count, value range or size. ``input``
    names the node input it came from (``""`` when it is the stack as a whole)."""

    def __init__(self, input: str, message: str) -> None:
        self.input = input
        super().__init__(message)


def _as_batch(name: str, value: Any) -> Any:
    import torch

    if not isinstance(value, torch.Tensor):
        raise ControlMapError(name, f"expected a tensor (B, C, H, W), got {type(value).__name__}")
    if value.ndim == 3:
        value = value.unsqueeze(0)
    if value.ndim != 4:
        raise ControlMapError(name, f"expected a tensor (B, C, H, W), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ControlMapError(name, f"expected a floating-point map, got dtype {value.dtype}")
    if value.shape[0] < 1 or value.shape[-1] < 1 or value.shape[-2] < 1:
        raise ControlMapError(name, f"got an empty map of shape {tuple(value.shape)}")
    return value.detach().float().cpu()


def stack_control(maps: Mapping[str, Any], channels: int | None = None) -> Any:
    """The control tensor ``(B, C, H, W)`` from the given maps (see the module docstring).

    :param maps: ``{input name: tensor or None}`` for names in :data:`MAP_INPUTS`.
    :param channels: The channel count the network takes (``None``: no check, no expansion).
    :raises ControlMapError: no map, maps of different batch or pixel sizes, a map of the wrong
        channel count for its type, or a stack of the wrong channel count (expected vs got).
    """
    import torch

    given = [(name, maps[name]) for name in MAP_INPUTS if maps.get(name) is not None]
    if not given:
        raise ControlMapError("", f"give a control map: one or more of {', '.join(MAP_INPUTS)}")
    parts: list[tuple[str, Any]] = []
    for name, raw in given:
        value = _as_batch(name, raw)
        c = value.shape[1]
        if name == "image":
            if c == 4:
                value = value[:, :3]
            elif c == 1:
                value = value.expand(-1, 3, -1, -1)
            elif c != 3:
                raise ControlMapError(name, f"an IMAGE control map has 3 channels (RGB), got {c}")
        elif name == "depth" and c != 1:
            raise ControlMapError(name, f"a DEPTH map has 1 channel, got {c}")
        elif name == "normal":
            if c != 3:
                raise ControlMapError(name, f"a NORMAL map has 3 channels (x, y, z), got {c}")
            value = (value.clamp(-1.0, 1.0) + 1.0) / 2.0
        parts.append((name, value))
    first_name, first = parts[0]
    for name, value in parts[1:]:
        if value.shape[-2:] != first.shape[-2:]:
            raise ControlMapError(
                name, f"is {tuple(value.shape[-2:])} (H, W) but {first_name} is {tuple(first.shape[-2:])}; "
                      "stacked maps must have one size"
            )
        if value.shape[0] not in (1, first.shape[0]) and first.shape[0] != 1:
            raise ControlMapError(name, f"has {value.shape[0]} rows but {first_name} has {first.shape[0]}")
    rows = max(v.shape[0] for _, v in parts)
    tensors = [v.expand(rows, -1, -1, -1) if v.shape[0] == 1 else v for _, v in parts]
    stacked = torch.cat(tensors, dim=1) if len(tensors) > 1 else tensors[0]
    if channels is not None and stacked.shape[1] != channels:
        if stacked.shape[1] == 1 and channels == 3 and len(parts) == 1:
            return stacked.expand(-1, 3, -1, -1).contiguous()
        layout = " + ".join(f"{name} ({v.shape[1]})" for name, v in parts)
        raise ControlMapError(
            "" if len(parts) > 1 else parts[0][0],
            f"the network takes {channels} conditioning channels, got {stacked.shape[1]} ({layout})",
        )
    return stacked.contiguous()


def fit_control(control: Any, height: int, width: int, max_pixels: int) -> Any:
    """``control`` resized to ``height`` × ``width`` (nearest neighbour, as diffusers' control
    image processor resizes tensors); unchanged when it already has that size.

    :raises ControlMapError: the map or the target is larger than ``max_pixels``, or the map's
        aspect ratio differs from the target's by more than :data:`MAX_ASPECT_DISTORTION`.
    """
    import torch

    h, w = int(control.shape[-2]), int(control.shape[-1])
    if h * w > max_pixels:
        raise ControlMapError("", f"the control map is {w}×{h} = {h * w:,} pixels, more than the limit of "
                                  f"{max_pixels:,} (max_image_pixels in the settings)")
    if height * width > max_pixels:
        raise ControlMapError("", f"the latents need a {width}×{height} control map, more than the limit of "
                                  f"{max_pixels:,} pixels (max_image_pixels in the settings)")
    if (h, w) == (height, width):
        return control
    distortion = (w / h) / (width / height)
    if max(distortion, 1.0 / distortion) > MAX_ASPECT_DISTORTION:
        raise ControlMapError(
            "", f"the control map is {w}×{h} (W×H) but the latents are {width}×{height} pixels: stretching it "
                f"changes the aspect ratio by {max(distortion, 1 / distortion):.1f}×, more than "
                f"{MAX_ASPECT_DISTORTION:g}×; resize or crop the map to the picture's aspect first"
        )
    return torch.nn.functional.interpolate(control, size=(height, width))


def rows_for(control: Any, rows: int) -> Any:
    """``control`` with ``rows`` rows: a single map repeated, or a map per row kept.

    :raises ValueError: the map has another number of rows (naming both).
    """
    n = int(control.shape[0])
    if n == rows:
        return control
    if n == 1:
        return control.repeat_interleave(rows, dim=0)
    raise ValueError(f"the control map has {n} rows but the latents have {rows}; give one map, or one per latent")
