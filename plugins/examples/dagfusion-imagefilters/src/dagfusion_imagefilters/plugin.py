"""Image filters for dagfusion: ``imagefilters.Sobel``, ``imagefilters.Posterize``, ``imagefilters.EdgeMask``.

The plugin registers its own socket type, ``EDGE_MAP``: a subtype of ``TENSOR`` holding edge
strengths in [0, 1]. An ``EDGE_MAP`` output connects anywhere a ``TENSOR`` is expected, but
``EdgeMask`` only accepts an ``EDGE_MAP``, so wiring a plain picture into it is a validation
error instead of a silently meaningless result.

torch is imported inside the run functions, so loading the plugin costs nothing.
"""

from __future__ import annotations

from typing import Any

from dagfusion import BOOLEAN, FLOAT, INT, TENSOR, Input, Output, RunContext, SocketType, hookimpl, node

EDGE_MAP = SocketType(
    "EDGE_MAP",
    parents=("TENSOR",),
    python_types=("torch.Tensor",),
    description="Edge strengths in [0, 1], shape (1, H, W) or (N, 1, H, W) (from imagefilters.Sobel).",
    color="#ffab91",
    serializer=TENSOR.serializer,
)


def _as_batch(tensor: Any) -> Any:
    if not tensor.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {tensor.dtype}")
    if tensor.dim() == 3:
        return tensor.unsqueeze(0)
    if tensor.dim() == 4:
        return tensor
    raise ValueError(f"expected a (C, H, W) or (N, C, H, W) tensor, got shape {tuple(tensor.shape)}")


def _picture() -> dict[str, Any]:
    """A deterministic picture with edges: a bright square on a gradient (node contract example)."""
    import torch

    image = torch.linspace(0.0, 0.5, 12).repeat(3, 12, 1)
    image[:, 3:9, 3:9] = 1.0
    return {"tensor": image}


@node(
    "imagefilters.Sobel",
    version="1.0.0",
    category="image/filters",
    inputs=[
        Input("tensor", TENSOR, description="A floating-point (C, H, W) or (N, C, H, W) picture."),
        Input("normalize", BOOLEAN, True, description="Scale so the strongest edge is 1 (else raw gradient magnitude, clamped to 1)."),
    ],
    outputs=[Output("edges", EDGE_MAP, "Gradient magnitude averaged over channels, one channel.")],
    examples=[_picture, lambda: {**_picture(), "normalize": False}],
)
def sobel(ctx: RunContext, tensor: Any, normalize: bool) -> Any:
    """Edge strength of a picture with the 3×3 Sobel operator (replicated borders)."""
    import torch
    import torch.nn.functional as F

    batched = _as_batch(tensor)
    gray = batched.mean(dim=1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=gray.dtype, device=gray.device)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1) / 4.0
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, kernels).unbind(dim=1)
    magnitude = torch.sqrt(gx**2 + gy**2).unsqueeze(1)
    if normalize:
        peak = magnitude.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        magnitude = magnitude / peak
    edges = magnitude.clamp(0.0, 1.0)
    return edges if tensor.dim() == 4 else edges.squeeze(0)


@node(
    "imagefilters.Posterize",
    version="1.0.0",
    category="image/filters",
    inputs=[
        Input("tensor", TENSOR, description="A picture with values in [0, 1] (values outside are clamped)."),
        Input("levels", INT, 4, min=2, max=256, description="Number of distinct values kept per channel."),
    ],
    outputs=[Output("tensor", TENSOR, "The picture with every value rounded to one of `levels` steps.")],
    examples=[_picture, lambda: {**_picture(), "levels": 2}],
)
def posterize(ctx: RunContext, tensor: Any, levels: int) -> Any:
    """Reduce each channel to a few evenly spaced levels (a poster look)."""
    _as_batch(tensor)
    steps = levels - 1
    return (tensor.clamp(0.0, 1.0) * steps).round() / steps


@node(
    "imagefilters.EdgeMask",
    version="1.0.0",
    category="image/filters",
    inputs=[
        Input("edges", EDGE_MAP, description="Edge strengths from imagefilters.Sobel."),
        Input("threshold", FLOAT, 0.25, min=0.0, max=1.0, description="Edges at least this strong become 1, the rest 0."),
    ],
    outputs=[
        Output("mask", TENSOR, "A float mask of 0s and 1s, the shape of the edge map."),
        Output("coverage", FLOAT, "Fraction of the picture covered by the mask."),
    ],
    examples=[lambda: {"edges": sobel.fn(None, **_picture(), normalize=True), "threshold": 0.5}],
)
def edge_mask(ctx: RunContext, edges: Any, threshold: float) -> dict[str, Any]:
    """Threshold an edge map into a binary mask (for inpainting or ControlNet-style inputs)."""
    mask = (edges >= threshold).to(edges.dtype)
    return {"mask": mask, "coverage": float(mask.mean())}


NODES = (sobel, posterize, edge_mask)


@hookimpl
def register_types(register: Any) -> None:
    """Register EDGE_MAP (its parent TENSOR is a core type, registered first)."""
    register(EDGE_MAP)


@hookimpl
def register_nodes(register: Any) -> None:
    """Register the filter nodes."""
    for spec in NODES:
        register(spec)
