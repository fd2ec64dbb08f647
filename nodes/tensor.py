"""Tensor nodes: seeded noise, Gaussian blur, normalisation and statistics.

torch is imported inside each run function, so registering this pack stays cheap.
"""

from __future__ import annotations

from typing import Any

from dagfusion import FLOAT, INT, SEED, STRING, TENSOR, Input, Output, RunContext, hookimpl, node


def _ramp(*shape: int) -> Any:
    """A deterministic example tensor (values 0…1) for the node contract; imports torch lazily."""
    import torch

    return torch.linspace(0.0, 1.0, steps=int(torch.Size(shape).numel())).reshape(shape)


@node(
    "dagfusion.tensor.Noise",
    version="1.0.0",
    category="tensor",
    inputs=[
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed of the generator; same seed, same tensor."),
        Input("channels", INT, 3, min=1, max=64),
        Input("height", INT, 64, min=1, max=8192),
        Input("width", INT, 64, min=1, max=8192),
        Input("distribution", STRING, "normal", choices=("normal", "uniform")),
    ],
    outputs=[Output("tensor", TENSOR, "A float32 tensor of shape (channels, height, width).")],
    examples=[{"seed": 1, "channels": 1, "height": 4, "width": 4}],
)
def noise(ctx: RunContext, seed: int, channels: int, height: int, width: int, distribution: str) -> Any:
    """Seeded random noise on the CPU (identical on every machine for the same seed)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (channels, height, width)
    if distribution == "normal":
        return torch.randn(shape, generator=generator)
    return torch.rand(shape, generator=generator)


@node(
    "dagfusion.tensor.Blur",
    version="1.0.0",
    category="tensor",
    inputs=[
        Input("tensor", TENSOR, description="A (C, H, W) or (N, C, H, W) tensor."),
        Input("sigma", FLOAT, 1.0, min=0.0, max=64.0, description="Standard deviation in pixels; 0 returns the input."),
    ],
    outputs=[Output("tensor", TENSOR)],
    examples=[
        lambda: {"tensor": _ramp(3, 8, 8), "sigma": 1.5},
        lambda: {"tensor": _ramp(2, 1, 6, 6), "sigma": 0.0},
    ],
)
def blur(ctx: RunContext, tensor: Any, sigma: float) -> Any:
    """Separable Gaussian blur with reflected borders (kernel radius ``ceil(3·sigma)``)."""
    import math

    import torch
    import torch.nn.functional as F

    if tensor.dim() not in (3, 4):
        raise ValueError(f"expected a (C, H, W) or (N, C, H, W) tensor, got shape {tuple(tensor.shape)}")
    if sigma == 0:
        return tensor.clone()
    batched = tensor if tensor.dim() == 4 else tensor.unsqueeze(0)
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, batched.shape[-1] - 1, batched.shape[-2] - 1)
    if radius < 1:
        return tensor.clone()
    x = torch.arange(-radius, radius + 1, dtype=batched.dtype, device=batched.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = batched.shape[1]
    out = F.pad(batched, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    return out if tensor.dim() == 4 else out.squeeze(0)


@node(
    "dagfusion.tensor.Normalize",
    version="1.0.0",
    category="tensor",
    inputs=[
        Input("tensor", TENSOR),
        Input("low", FLOAT, 0.0),
        Input("high", FLOAT, 1.0),
    ],
    outputs=[Output("tensor", TENSOR)],
    examples=[lambda: {"tensor": _ramp(1, 4, 4), "low": -1.0, "high": 1.0}],
)
def normalize(ctx: RunContext, tensor: Any, low: float, high: float) -> Any:
    """Rescale values linearly so the minimum becomes ``low`` and the maximum ``high``."""
    lo, hi = tensor.min(), tensor.max()
    span = (hi - lo).clamp_min(1e-12)
    return (tensor - lo) / span * (high - low) + low


@node(
    "dagfusion.tensor.Stats",
    version="1.0.0",
    category="tensor",
    inputs=[Input("tensor", TENSOR)],
    outputs=[
        Output("mean", FLOAT),
        Output("std", FLOAT),
        Output("min", FLOAT),
        Output("max", FLOAT),
    ],
    examples=[lambda: {"tensor": _ramp(2, 3, 3)}],
)
def stats(ctx: RunContext, tensor: Any) -> dict[str, float]:
    """Mean, standard deviation, minimum and maximum of a tensor's values."""
    t = tensor.detach().float()
    return {
        "mean": float(t.mean()),
        "std": float(t.std()) if t.numel() > 1 else 0.0,
        "min": float(t.min()),
        "max": float(t.max()),
    }


NODES = (noise, blur, normalize, stats)


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)
