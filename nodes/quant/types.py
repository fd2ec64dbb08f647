"""Socket types of the quantization pack.

Classes are named by dotted strings, so registering these types imports no torch.

- ``QUANT_SENSITIVITY``: how much a denoiser's output changes when one of its layers is
  quantized to each candidate bit width — a
  :class:`~dagfusion.nodes.quant.sensitivity.QuantSensitivity` (plain data: ``{layer: {bits: error}}``,
  layer shapes and sizes, the quantization settings and how it was calibrated). Made by
  ``dagfusion.quant.Sensitivity``, read by ``dagfusion.quant.MixedPrecision``; stored on disk as
  JSON (for persistent caching).
"""

from __future__ import annotations

from typing import Any

from dagfusion import Serializer, SocketType

_PKG = "dagfusion.nodes.quant"


def _save_sensitivity(value: Any, path: str) -> None:
    from dagfusion.nodes.quant.sensitivity import save_sensitivity

    save_sensitivity(value, path)


def _load_sensitivity(path: str) -> Any:
    from dagfusion.nodes.quant.sensitivity import load_sensitivity

    return load_sensitivity(path)


QUANT_SENSITIVITY = SocketType(
    "QUANT_SENSITIVITY",
    python_types=(f"{_PKG}.sensitivity.QuantSensitivity",),
    description="Per-layer quantization sensitivity of a denoiser: the output error of each layer at each bit width.",
    color="#9575cd",
    serializer=Serializer(_save_sensitivity, _load_sensitivity),
)

TYPES: tuple[SocketType, ...] = (QUANT_SENSITIVITY,)
"""Every socket type this pack registers, in registration order."""
