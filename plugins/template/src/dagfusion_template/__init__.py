"""dagfusion-plugin-template: a ready-to-copy dagfusion plugin with one node, ``template.Sharpen``.

dagfusion loads this module through the ``dagfusion`` entry point declared in pyproject.toml
and calls its hook implementations: :func:`register_nodes` here (a plugin may also implement
``register_types`` and the run-lifecycle hooks, see ``dagfusion.hookspecs``).

Keep this module cheap to import: dagfusion imports every installed plugin to list its nodes,
so heavy libraries (torch) are imported inside the run functions, not at the top.
"""

from __future__ import annotations

from typing import Any

from dagfusion import FLOAT, TENSOR, Input, Output, RunContext, hookimpl, node

__version__ = "0.1.0"


def _gaussian_blur(tensor: Any, sigma: float) -> Any:
    """Separable Gaussian blur of a (N, C, H, W) float tensor, reflected borders."""
    import math

    import torch
    import torch.nn.functional as F

    radius = min(max(1, math.ceil(3 * sigma)), tensor.shape[-1] - 1, tensor.shape[-2] - 1)
    if radius < 1:  # a 1-pixel-wide image cannot be blurred
        return tensor
    x = torch.arange(-radius, radius + 1, dtype=tensor.dtype, device=tensor.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = tensor.shape[1]
    out = F.pad(tensor, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def _example_image() -> dict[str, Any]:
    """Example inputs for the node contract: built lazily, so importing the plugin stays cheap."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return {"tensor": torch.rand(3, 16, 16, generator=generator), "amount": 1.5, "sigma": 1.0}


def _example_batch() -> dict[str, Any]:
    import torch

    step = torch.zeros(2, 1, 8, 8)
    step[..., 4:] = 1.0
    return {"tensor": step, "amount": 0.5, "sigma": 2.0, "threshold": 0.05}


@node(
    "template.Sharpen",
    version="1.0.0",
    category="image/filters",
    inputs=[
        Input("tensor", TENSOR, description="A floating-point (C, H, W) or (N, C, H, W) tensor: an image or a latent."),
        Input("amount", FLOAT, 1.0, min=0.0, max=10.0, description="Strength; 0 returns the input unchanged."),
        Input("sigma", FLOAT, 1.0, min=0.1, max=32.0, description="Blur radius in pixels: the size of the details boosted."),
        Input(
            "threshold",
            FLOAT,
            0.0,
            min=0.0,
            description="Only differences from the blurred tensor larger than this are sharpened (keeps flat areas and noise calm).",
        ),
    ],
    outputs=[Output("tensor", TENSOR, "The sharpened tensor, same shape, dtype and device.")],
    examples=[_example_image, _example_batch],
)
def sharpen(ctx: RunContext, tensor: Any, amount: float, sigma: float, threshold: float) -> Any:
    """Sharpen a tensor with an unsharp mask.

    ``out = x + amount * (x - blur(x, sigma))``, applied where ``|x - blur(x, sigma)| > threshold``.
    Values are not clamped, so it works on latents as well as on images in [0, 1].
    """
    if not tensor.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {tensor.dtype}")
    if tensor.dim() not in (3, 4):
        raise ValueError(f"expected a (C, H, W) or (N, C, H, W) tensor, got shape {tuple(tensor.shape)}")
    batched = tensor if tensor.dim() == 4 else tensor.unsqueeze(0)
    detail = batched - _gaussian_blur(batched, sigma)
    if threshold > 0:
        detail = detail * (detail.abs() > threshold)
    out = batched + amount * detail  # a new tensor: never modify an input in place
    return out if tensor.dim() == 4 else out.squeeze(0)


@hookimpl
def register_nodes(register: Any) -> None:
    """Register this plugin's nodes (called once per registry)."""
    register(sharpen)
