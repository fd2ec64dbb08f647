"""Socket types of the LoRA pack.

- ``LORA``: a LoRA's weights — a :class:`~dagfusion.nodes.lora.weights.LoraWeights` (low-rank
  pairs per model component and module, alphas, the source layout and a content digest). Made by
  ``dagfusion.lora.Load`` and ``dagfusion.lora.Extract``, read by ``dagfusion.lora.Apply`` and
  ``dagfusion.lora.Save``; stored on disk as safetensors (for persistent caching).
"""

from __future__ import annotations

from typing import Any

from dagfusion import Serializer, SocketType


def _save(value: Any, path: str) -> None:
    from dagfusion.nodes.lora.layouts import save_value

    save_value(value, path)


def _load(path: str) -> Any:
    from dagfusion.nodes.lora.layouts import load_value

    return load_value(path)


LORA = SocketType(
    "LORA",
    python_types=("dagfusion.nodes.lora.weights.LoraWeights",),
    description="A LoRA: low-rank weight updates for a denoiser and/or text encoders, with their alphas.",
    color="#f06292",
    serializer=Serializer(_save, _load),
)

TYPES: tuple[SocketType, ...] = (LORA,)
"""Every socket type this pack registers, in registration order."""
