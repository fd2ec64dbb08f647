"""The structure pack: depth, normals, layouts and object masks; ControlNet and T2I-Adapter
(apply and train); latent structural diffusion (a joint RGB + depth + normal denoiser) and its
structure-guided refiner.

Modules, one job each:

- :mod:`~dagfusion.nodes.structure.types` — the socket types;
- :mod:`~dagfusion.nodes.structure.data` — :class:`~dagfusion.nodes.structure.data.Layout`;
- :mod:`~dagfusion.nodes.structure.maps` — depth/normal/mask maps: conversions, visualisation, resizing;
- :mod:`~dagfusion.nodes.structure.layout` — layouts from prompts and rasterised layouts;
- :mod:`~dagfusion.nodes.structure.estimators` — depth estimators loaded from local folders;
- :mod:`~dagfusion.nodes.structure.controlnet` — ControlNet load/apply (a model patch);
- :mod:`~dagfusion.nodes.structure.adapter` — T2I-Adapter load/apply;
- :mod:`~dagfusion.nodes.structure.train_control` — training ControlNets and adapters;
- :mod:`~dagfusion.nodes.structure.structural` — latent structural diffusion's nodes (the model in
  ``structural_model``, its sampler family in ``structural_family``, data and objective in
  ``structural_data``, the file format in ``structural_io``);
- :mod:`~dagfusion.nodes.structure.refiner` — the structure-guided refiner's conditions.

Registering this pack imports neither torch nor diffusers: each node imports them when it runs.
"""

from __future__ import annotations

from typing import Any

from dagfusion import hookimpl
from dagfusion.nodes.structure import (
    adapter,
    controlnet,
    estimators,
    layout,
    maps,
    metrics,
    refiner,
    structural,
    train_control,
)
from dagfusion.nodes.structure.types import TYPES

NODES = (
    *maps.NODES, *layout.NODES, *estimators.NODES, *metrics.NODES, *controlnet.NODES, *adapter.NODES,
    *train_control.NODES, *structural.NODES, *refiner.NODES,
)
"""Every node of the pack, in palette order."""


@hookimpl
def register_types(register: Any) -> None:
    for socket_type in TYPES:
        register(socket_type)


@hookimpl
def register_denoiser_families(register: Any) -> None:
    from dagfusion.nodes.structure.structural_family import register_denoiser_families as families

    families(register)


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)
