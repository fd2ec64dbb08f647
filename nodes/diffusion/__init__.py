"""The diffusion foundation pack: model loading, text encoding, sampling with a step hook, VAE, images.

Node ids:

- models: ``dagfusion.models.LoadDiffusers``, ``dagfusion.models.LoadFromHFCache``,
  ``dagfusion.models.LoadSingleFile``
- conditioning: ``dagfusion.text.Encode``, ``dagfusion.conditioning.ClassLabel``
- latent: ``dagfusion.latent.EmptyLatent``, ``dagfusion.vae.Decode``, ``dagfusion.vae.Encode``
- sampling: ``dagfusion.sampling.Sample``, ``dagfusion.sampling.Scheduler``
- image: ``dagfusion.image.LoadImage``, ``dagfusion.image.SaveImage``, ``dagfusion.image.PreviewImage``

Types: ``MODEL``, ``VAE``, ``CLIP``, ``SCHEDULER``, ``CONDITIONING``, ``LATENT``, ``IMAGE``,
``MASK``, ``VIDEO`` (:mod:`~dagfusion.nodes.diffusion.types`).

The seams for other packs live in :mod:`dagfusion.model` (handles, patches, the step hook,
denoiser families, the model cache); this pack adds :func:`~dagfusion.nodes.diffusion.sampling.sample`
(the loop as a function) and its built-in denoiser families
(:mod:`~dagfusion.nodes.diffusion.families`, registered by :func:`register_denoiser_families`).

Registering this pack imports neither torch nor diffusers nor transformers: each node imports
them when it runs.
"""

from __future__ import annotations

from typing import Any

from dagfusion import hookimpl
from dagfusion.nodes.diffusion import conditioning, families, images, latents, loaders, sampling, schedulers, text, vae
from dagfusion.nodes.diffusion.types import TYPES

NODES = (
    *loaders.NODES,
    *text.NODES,
    *conditioning.NODES,
    *latents.NODES,
    *schedulers.NODES,
    *sampling.NODES,
    *vae.NODES,
    *images.NODES,
)
"""Every node of the pack, in palette order."""


@hookimpl
def register_types(register: Any) -> None:
    for socket_type in TYPES:
        register(socket_type)


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)


@hookimpl
def register_denoiser_families(register: Any) -> None:
    """Register the pack's denoiser families (UNet, DiT, PixArt, SVD): ``register(family)`` each."""
    families.register_denoiser_families(register)
