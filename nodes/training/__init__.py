"""The training pack: a generic training loop, pluggable objectives, and diffusers export.

Node ids (all version 1.0.0):

- training: ``dagfusion.train.Train`` (the loop), ``dagfusion.train.TrainVAE`` (an autoencoder),
  ``dagfusion.train.NewModel`` (an untrained
  model from a shipped or given config), ``dagfusion.train.ImageData`` (images + captions as a
  data source), ``dagfusion.train.SaveDiffusers`` (export a diffusers pipeline folder)
- objectives: ``dagfusion.train.Epsilon``, ``dagfusion.train.VPrediction``,
  ``dagfusion.train.RectifiedFlow``

Types: ``OBJECTIVE`` and ``TRAINING_DATA`` (:mod:`~dagfusion.nodes.training.types`).

The seams for other packs: :class:`~dagfusion.nodes.training.objectives.Objective` (new losses:
gate losses, distillation, rewards — without touching the loop),
:class:`~dagfusion.nodes.training.data.TrainingData` (new datasets, or adapters registered by
:func:`register_data_adapters`), patches offering
``trainable_parameters()`` (:mod:`~dagfusion.nodes.training.params`) and
:func:`~dagfusion.nodes.training.loop.train` (the loop as a function).

Registering this pack imports neither torch nor diffusers: each node imports them when it runs.
"""

from __future__ import annotations

from typing import Any

from dagfusion import hookimpl
from dagfusion.nodes.training import autoencoder, build, data, export, objectives, train
from dagfusion.nodes.training.types import TYPES

NODES = (
    *train.NODES,
    *autoencoder.NODES,
    *build.NODES,
    *data.NODES,
    *export.NODES,
    *objectives.NODES,
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
def register_data_adapters(register: Any) -> None:
    """Register the pack's training-data adapters (the ``batch()`` rule): ``register(adapter)`` each."""
    data.register_data_adapters(register)
