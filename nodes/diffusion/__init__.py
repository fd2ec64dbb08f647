"""The diffusion foundation pack: model loading, text encoding, sampling with a step hook, VAE, images.

Node ids (all version 1.0.0):

- models: ``dagfusion.models.LoadDiffusers``, ``dagfusion.models.LoadFromHFCache``,
  ``dagfusion.models.LoadSingleFile``
- conditioning: ``dagfusion.text.Encode``, ``dagfusion.conditioning.ClassLabel``
- latent: ``dagfusion.latent.EmptyLatent``, ``dagfusion.vae.Decode``, ``dagfusion.vae.Encode``
- sampling: ``dagfusion.sampling.Sample``, ``dagfusion.sampling.Scheduler``
- image: ``dagfusion.image.LoadImage``, ``dagfusion.image.SaveImage``, ``dagfusion.image.PreviewImage``

Types: ``MODEL``, ``VAE``, ``CLIP``, ``SCHEDULER``, ``CONDITIONING``, ``LATENT``, ``IMAGE``,
``MASK``, ``VIDEO`` (:mod:`~dagfusion.nodes.diffusion.types`).

The seams for other packs: :class:`~dagfusion.nodes.diffusion.handle.ModelHandle` (clone and
add patches), :mod:`~dagfusion.nodes.diffusion.hooks` (the documented step hook),
:func:`~dagfusion.nodes.diffusion.denoisers.register_family` (new denoiser kinds) and
:func:`~dagfusion.nodes.diffusion.sampling.sample` (the loop as a function).

Registering this pack imports neither torch nor diffusers nor transformers: each node imports
them when it runs.
"""

from __future__ import annotations

from typing import Any

from dagfusion import hookimpl
from dagfusion.nodes.diffusion import conditioning, images, latents, loaders, sampling, schedulers, text, vae
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
