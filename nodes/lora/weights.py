"""LoRA weights in memory: one low-rank pair per targeted layer, grouped by model component.

A :class:`LoraLayer` holds ``down`` (``A``, rank x inputs) and ``up`` (``B``, outputs x rank)
and ``alpha``; the layer's output changes by ``strength * alpha / rank * up(down(x))``.
:class:`LoraWeights` groups layers by component — ``"denoiser"`` (a UNet or a transformer),
``"text_encoder"`` and ``"text_encoder_2"`` — under module names: dotted (``down_blocks.1.…``)
once resolved against a model or read from a diffusers/peft file, flattened with underscores
when read from a kohya file (resolved when applied).

Importing this module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

COMPONENTS = ("denoiser", "text_encoder", "text_encoder_2")
"""The components a LoRA can target, in file order."""


@dataclass(frozen=True)
class LoraLayer:
    """One layer's low-rank pair.

    Attributes:
        down: ``A``: ``(rank, in)`` for a Linear layer, ``(rank, in, kh, kw)`` for a Conv2d.
        up: ``B``: ``(out, rank)`` for a Linear layer, ``(out, rank, 1, 1)`` for a Conv2d.
        alpha: The scale numerator: the update is ``alpha / rank * up @ down``.
    """

    down: Any
    up: Any
    alpha: float

    @property
    def rank(self) -> int:
        """The rank (rows of ``down``)."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return float(self.alpha) / self.rank

    def delta(self, shape: Iterable[int]) -> Any:
        """``scale * up @ down`` as a float32 tensor of the weight's ``shape`` (no strength)."""
        shape = tuple(shape)
        up = self.up.detach().float().reshape(self.up.shape[0], -1)
        down = self.down.detach().float().reshape(self.rank, -1)
        return (up @ down).reshape(shape) * self.scale


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA: layers per component, the file layout it came from, and its content digest.

    Attributes:
        components: ``{component: {module name: LoraLayer}}`` (see :data:`COMPONENTS`).
        layout: ``"peft"`` (dotted names: diffusers/peft files, or resolved) or ``"kohya"``
            (flattened names).
        digest: A content fingerprint (the file's SHA-256, or of the tensors for a LoRA made in
            memory); it keys patches and caches.
        denoiser_prefix: ``"unet"`` or ``"transformer"``: the denoiser's key prefix in files.
        info: Provenance and other plain metadata (JSON-serializable), saved with the file.
    """

    components: Mapping[str, Mapping[str, LoraLayer]]
    layout: str = "peft"
    digest: str = ""
    denoiser_prefix: str = "unet"
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown:
            raise ValueError(f"expected LoRA components among {list(COMPONENTS)}, got {unknown}")
        if self.layout not in ("peft", "kohya"):
            raise ValueError(f"expected LoRA layout 'peft' or 'kohya', got {self.layout!r}")
        if not self.digest:
            object.__setattr__(self, "digest", tensor_digest(self.components))

    def __dagfusion_fingerprint__(self) -> str:
        return f"lora:{self.digest}"

    @property
    def layer_count(self) -> int:
        """How many layers the LoRA changes, over all components."""
        return sum(len(layers) for layers in self.components.values())

    def summary(self) -> dict[str, Any]:
        """Plain facts: layout, layers per component, ranks and alphas seen, digest."""
        ranks = sorted({layer.rank for layers in self.components.values() for layer in layers.values()})
        alphas = sorted({float(layer.alpha) for layers in self.components.values() for layer in layers.values()})
        return {
            "layout": self.layout,
            "layers": {c: len(layers) for c, layers in self.components.items()},
            "ranks": ranks,
            "alphas": alphas,
            "digest": self.digest,
        }

    def __repr__(self) -> str:
        counts = ", ".join(f"{c}: {len(v)}" for c, v in self.components.items())
        return f"LoraWeights({self.layout}, {counts}, {self.digest[:12]})"


def tensor_digest(components: Mapping[str, Mapping[str, LoraLayer]]) -> str:
    """SHA-256 over component and module names, alphas, shapes, dtypes and tensor bytes."""
    import torch

    h = hashlib.sha256()
    for component in sorted(components):
        for name in sorted(components[component]):
            layer = components[component][name]
            h.update(json.dumps([component, name, float(layer.alpha)]).encode())
            for tensor in (layer.down, layer.up):
                t = tensor.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def combine(parts: Iterable[tuple[Mapping[str, LoraLayer], float]]) -> dict[str, LoraLayer]:
    """Several LoRAs with strengths as one, exactly: per module, a single layer reproduces it
    unchanged with ``alpha * strength``; several are concatenated along the rank with each
    ``up`` scaled by its ``strength * alpha / rank`` (and ``alpha`` = total rank)."""
    import torch

    per_module: dict[str, list[tuple[LoraLayer, float]]] = {}
    for layers, strength in parts:
        for name, layer in layers.items():
            per_module.setdefault(name, []).append((layer, float(strength)))
    out: dict[str, LoraLayer] = {}
    for name, entries in per_module.items():
        if len(entries) == 1:
            layer, strength = entries[0]
            out[name] = LoraLayer(layer.down.detach(), layer.up.detach(), float(layer.alpha) * strength)
            continue
        downs = [layer.down.detach() for layer, _ in entries]
        ups = [layer.up.detach() * (strength * layer.scale) for layer, strength in entries]
        down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)
        out[name] = LoraLayer(down, up, float(down.shape[0]))
    return out
