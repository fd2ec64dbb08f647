"""The LoRA pack: load, apply, train, extract and save low-rank adapters.

Nodes:

- ``dagfusion.lora.Load`` — read a LoRA safetensors file in the diffusers/peft or kohya layout
  (UNet, DiT/PixArt transformers, text encoders).
- ``dagfusion.lora.Apply`` — put a LoRA on a model and its text encoders with strengths, as a
  patch: a low-rank side branch (default) or fused into private copies of the touched weights;
  chainable.
- ``dagfusion.lora.Trainable`` — a fresh adapter for ``dagfusion.train.Train`` (``trainable: patches``).
- ``dagfusion.lora.Extract`` — the LoRA patches of handles as one LoRA.
- ``dagfusion.lora.Save`` — write a LoRA in the diffusers/peft layout with metadata.

Types: ``LORA`` (:mod:`~dagfusion.nodes.lora.types`).

Modules: :mod:`~dagfusion.nodes.lora.weights` (the data), :mod:`~dagfusion.nodes.lora.layouts`
(file layouts), :mod:`~dagfusion.nodes.lora.matching` (names to modules),
:mod:`~dagfusion.nodes.lora.patch` (the patch), :mod:`~dagfusion.nodes.lora.attach` (handles).

Registering this pack imports neither torch nor diffusers: each node imports them when it runs.
"""

from __future__ import annotations

from typing import Any

from dagfusion import hookimpl
from dagfusion.nodes.lora import nodes
from dagfusion.nodes.lora.types import TYPES

NODES = nodes.NODES
"""Every node of the pack, in palette order."""


@hookimpl
def register_types(register: Any) -> None:
    for socket_type in TYPES:
        register(socket_type)


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)
