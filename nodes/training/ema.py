"""Exponential moving average of the trained parameters.

After every optimizer step, each shadow tensor ``s`` of a trained parameter ``p`` becomes::

    s ← decay · s + (1 − decay) · p

starting from the parameters' values before the first step. Shadows are float32 whatever the
parameters' dtype, live on the parameters' device, and are saved in checkpoints by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class EMA:
    """Shadow copies of named parameters, updated with a constant ``decay`` in [0, 1)."""

    def __init__(self, named_parameters: Iterable[tuple[str, Any]], decay: float) -> None:
        import torch

        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.parameters: dict[str, Any] = dict(named_parameters)
        with torch.no_grad():
            self.shadow: dict[str, Any] = {
                name: p.detach().to(torch.float32).clone() for name, p in self.parameters.items()
            }

    def update(self) -> None:
        """Move every shadow towards its parameter by ``1 − decay``."""
        import torch

        with torch.no_grad():
            for name, p in self.parameters.items():
                self.shadow[name].lerp_(p.detach().to(torch.float32), 1.0 - self.decay)

    def state(self) -> dict[str, Any]:
        """``{name: shadow}`` (the tensors themselves; copy before changing them)."""
        return dict(self.shadow)

    def load(self, tensors: Mapping[str, Any]) -> None:
        """Restore shadows saved by :meth:`state`.

        :raises ValueError: names or shapes do not match the parameters.
        """
        missing = sorted(set(self.shadow) - set(tensors))
        extra = sorted(set(tensors) - set(self.shadow))
        if missing or extra:
            raise ValueError(f"the EMA state does not match the trained parameters (missing {missing[:5]}, extra {extra[:5]})")
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(self.shadow[name].shape):
                raise ValueError(f"EMA tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)

    def copy_to(self, named_parameters: Mapping[str, Any]) -> None:
        """Write the shadows into ``named_parameters`` (in their dtype)."""
        import torch

        with torch.no_grad():
            for name, p in named_parameters.items():
                p.copy_(self.shadow[name].to(p.dtype))
