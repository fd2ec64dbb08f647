"""Socket types of the structure pack.

Conventions (all tensors float32 on the CPU, one row per image):

- ``DEPTH``: ``(B, 1, H, W)`` in ``[0, 1]``, **1 = nearest**, 0 = farthest (the disparity-like
  convention of DPT-style estimators and of depth ControlNets). A renderer's metric depth is
  converted by :func:`dagfusion.nodes.structure.maps.depth_from_distance`.
- ``NORMAL``: ``(B, 3, H, W)`` unit vectors in ``[-1, 1]`` in camera space: ``x`` to the right,
  ``y`` up, ``z`` towards the viewer (a surface facing the camera is ``(0, 0, 1)``). As an image
  it is shown as ``(n + 1) / 2``.
- ``LAYOUT``: a :class:`~dagfusion.nodes.structure.data.Layout` (boxes, labels, keypoints per image).
- ``OBJECT_MASK``: ``(B, K, H, W)`` in ``[0, 1]``, channel ``k`` covers object ``k`` (1 = object;
  ``K = 1`` for a union of all objects). Not to be confused with ``MASK``, which marks pixels to
  regenerate.
- ``CONTROL_NET``: a :class:`~dagfusion.nodes.structure.controlnet.ControlNetHandle` (a
  ControlNet model and what it was built for).
- ``T2I_ADAPTER``: a :class:`~dagfusion.nodes.structure.adapter.AdapterHandle`.
- ``STRUCTURAL_MODEL``: a :class:`~dagfusion.nodes.structure.structural.StructuralHandle` (the
  joint RGB + depth + normal denoiser of latent structural diffusion).
"""

from __future__ import annotations

from typing import Any

from dagfusion import Serializer, SocketType

_PKG = "dagfusion.nodes.structure"


def _save_layout(value: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(value.to_json())


def _load_layout(path: str) -> Any:
    from dagfusion.nodes.structure.data import Layout

    with open(path, encoding="utf-8") as handle:
        return Layout.from_json(handle.read())


DEPTH = SocketType(
    "DEPTH",
    parents=("TENSOR",),
    python_types=("torch.Tensor",),
    description="Depth maps: float tensor (B, 1, H, W) in [0, 1], 1 = nearest.",
    color="#8d6e63",
)
NORMAL = SocketType(
    "NORMAL",
    parents=("TENSOR",),
    python_types=("torch.Tensor",),
    description="Surface normals: float tensor (B, 3, H, W) of unit vectors (x right, y up, z towards the viewer).",
    color="#7986cb",
)
LAYOUT = SocketType(
    "LAYOUT",
    python_types=(f"{_PKG}.data.Layout",),
    description="Where the objects of each image are: boxes, labels, attributes and keypoints.",
    color="#aed581",
    serializer=Serializer(_save_layout, _load_layout),
)
OBJECT_MASK = SocketType(
    "OBJECT_MASK",
    parents=("TENSOR",),
    python_types=("torch.Tensor",),
    description="Object masks: float tensor (B, K, H, W) in [0, 1], channel k = object k (1 = object).",
    color="#a1887f",
)
CONTROL_NET = SocketType(
    "CONTROL_NET",
    python_types=(f"{_PKG}.controlnet.ControlNetHandle",),
    description="A ControlNet: a copy of a UNet's encoder that turns a control map into residuals for that UNet.",
    color="#4dd0e1",
)
T2I_ADAPTER = SocketType(
    "T2I_ADAPTER",
    python_types=(f"{_PKG}.adapter.AdapterHandle",),
    description="A T2I-Adapter: a small network that turns a control map into features added to a UNet's encoder.",
    color="#4db6ac",
)
STRUCTURAL_MODEL = SocketType(
    "STRUCTURAL_MODEL",
    python_types=(f"{_PKG}.structural.StructuralHandle",),
    description="A joint RGB + depth + normal denoiser (latent structural diffusion): shared trunk, one branch per target.",
    color="#9575cd",
)

TYPES: tuple[SocketType, ...] = (DEPTH, NORMAL, LAYOUT, OBJECT_MASK, CONTROL_NET, T2I_ADAPTER, STRUCTURAL_MODEL)
"""Every socket type this pack registers, in registration order."""
