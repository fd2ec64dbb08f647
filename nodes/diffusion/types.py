"""Socket types of the diffusion pack.

Python classes are named by dotted strings, so registering these types never imports torch,
diffusers or transformers. Tensor-valued types (``IMAGE``, ``MASK``, ``VIDEO``) are subtypes
of ``TENSOR``: any node taking a tensor accepts them.

Conventions:

- ``IMAGE``: float32 tensor ``(B, C, H, W)`` with values in ``[0, 1]`` on the CPU (C = 3, or 4 with alpha).
- ``MASK``: float32 tensor ``(B, 1, H, W)`` in ``[0, 1]``; 1 marks the pixels to regenerate.
- ``VIDEO``: float32 tensor ``(B, F, C, H, W)`` in ``[0, 1]``.
- ``LATENT``: a :class:`~dagfusion.nodes.diffusion.data.Latent` (samples in the denoiser's
  latent space, already scaled by the VAE's scaling factor).
- ``RUN_REPORT``: a :class:`~dagfusion.model.RunReport` (what a sampling run did; JSON on disk).
"""

from __future__ import annotations

from typing import Any

from dagfusion import Serializer, SocketType

_PKG = "dagfusion.nodes.diffusion"


def _save_report(value: Any, path: str) -> None:
    from dagfusion.model.report import save_report

    save_report(value, path)


def _load_report(path: str) -> Any:
    from dagfusion.model.report import load_report

    return load_report(path)


MODEL = SocketType(
    "MODEL",
    python_types=("dagfusion.model.handle.ModelHandle",),
    description="A denoiser (UNet or transformer) handle: shared weights plus the patches applied while sampling.",
    color="#b39ddb",
)
VAE = SocketType(
    "VAE",
    python_types=("dagfusion.model.handle.VAEHandle",),
    description="A variational autoencoder handle (pixels <-> latents).",
    color="#ef5350",
)
CLIP = SocketType(
    "CLIP",
    python_types=("dagfusion.model.handle.TextEncoderBundle",),
    description="Text encoder(s) with their tokenizer(s): CLIP (SD 1/2), dual CLIP (SDXL) or T5 (PixArt).",
    color="#ffd54f",
)
SCHEDULER = SocketType(
    "SCHEDULER",
    python_types=(f"{_PKG}.data.SchedulerSpec",),
    description="A noise scheduler: a diffusers scheduler class name and its configuration.",
    color="#80cbc4",
)
CONDITIONING = SocketType(
    "CONDITIONING",
    python_types=(f"{_PKG}.data.Conditioning",),
    description="What the denoiser is conditioned on (text embeddings, class labels), with its negative.",
    color="#ffb74d",
)
LATENT = SocketType(
    "LATENT",
    python_types=(f"{_PKG}.data.Latent",),
    description="A batch of latents in the denoiser's latent space.",
    color="#f48fb1",
)
IMAGE = SocketType(
    "IMAGE",
    parents=("TENSOR",),
    python_types=("torch.Tensor",),
    description="Images: float tensor (B, C, H, W) with values in [0, 1].",
    color="#64b5f6",
)
MASK = SocketType(
    "MASK",
    parents=("TENSOR",),
    python_types=("torch.Tensor",),
    description="Masks: float tensor (B, 1, H, W) in [0, 1]; 1 marks pixels to regenerate.",
    color="#90a4ae",
)
VIDEO = SocketType(
    "VIDEO",
    parents=("TENSOR",),
    python_types=("torch.Tensor",),
    description="Videos: float tensor (B, F, C, H, W) with values in [0, 1].",
    color="#4db6ac",
)

RUN_REPORT = SocketType(
    "RUN_REPORT",
    python_types=("dagfusion.model.report.RunReport",),
    description="What a sampling run did: per step whether the denoiser ran, its MACs and seconds; per patch its statistics.",
    color="#ce93d8",
    serializer=Serializer(_save_report, _load_report),
)

TYPES: tuple[SocketType, ...] = (MODEL, VAE, CLIP, SCHEDULER, CONDITIONING, LATENT, IMAGE, MASK, VIDEO, RUN_REPORT)
"""Every socket type this pack registers, in registration order."""
