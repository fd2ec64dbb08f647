"""Plain values that flow between diffusion nodes: scheduler specs, conditioning, latents.

All three are immutable and fingerprintable (``__dagfusion_fingerprint__``), so the engine
can detect in-place modification and use them in cache keys. This module never imports
torch at import time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


def _freeze(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


def _fingerprint(value: Any) -> str:
    from dagfusion.fingerprint import fingerprint

    fp = fingerprint(value)
    if fp is None:  # pragma: no cover - every value we store is fingerprintable
        fp = repr(value)
    return fp


def _tensor_bytes(values: Any) -> int:
    total = 0
    for value in values:
        if hasattr(value, "element_size") and hasattr(value, "numel"):
            total += int(value.numel()) * int(value.element_size())
    return total


def _plain(value: Any) -> Any:
    """``value`` with mapping proxies turned into dicts (for fingerprints and JSON)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_MAX_PROTOTYPES = 32
_PROTOTYPES: dict[tuple[str, str], Any] = {}  # (class name, config as JSON) -> a scheduler never handed out


@dataclass(frozen=True, eq=False)
class SchedulerSpec:
    """A scheduler to build fresh for every sampling run (schedulers are stateful).

    Attributes:
        class_name: A diffusers scheduler class (``"EulerDiscreteScheduler"``).
        config: Its configuration (the ``scheduler_config.json`` of a model folder, with overrides);
            diffusers' private keys (``_class_name``, ``_diffusers_version``, ``_use_default_values``)
            are left out: they are not settings, and ``_use_default_values`` lists a set in hash order,
            which would make the fingerprint differ from process to process.
        name: The dagfusion sampler name it was made for (``"euler"``), or ``"default"``.
    """

    class_name: str
    config: Mapping[str, Any]
    name: str = "default"

    def __post_init__(self) -> None:
        public = {k: v for k, v in dict(self.config or {}).items() if not str(k).startswith("_")}
        object.__setattr__(self, "config", _freeze(public))

    def create(self) -> Any:
        """A new diffusers scheduler instance (only diffusers' scheduler classes are allowed), its
        state its own.

        Constructing some schedulers costs milliseconds (SVD's continuous-time Euler takes the log
        of 1,000 sigmas one by one), as much as a small denoiser's call; so the first instance of a
        configuration is kept and each call returns a deep copy of it.
        """
        import copy

        key = (self.class_name, json.dumps(_plain(self.config), sort_keys=True, default=repr))
        prototype = _PROTOTYPES.get(key)
        if prototype is None:
            from dagfusion.nodes.diffusion.schedulers import scheduler_class

            prototype = scheduler_class(self.class_name).from_config(dict(self.config))
            if len(_PROTOTYPES) >= _MAX_PROTOTYPES:
                _PROTOTYPES.pop(next(iter(_PROTOTYPES)))
            _PROTOTYPES[key] = prototype
        return copy.deepcopy(prototype)

    def __dagfusion_fingerprint__(self) -> str:
        return _fingerprint({"class": self.class_name, "name": self.name, "config": _plain(self.config)})

    def __repr__(self) -> str:
        return f"SchedulerSpec({self.class_name!r}, name={self.name!r})"


@dataclass(frozen=True, eq=False)
class Conditioning:
    """What a denoiser is conditioned on.

    Attributes:
        kind: How the tensors were made: ``"clip"`` (SD 1/2), ``"sdxl"``, ``"t5"`` (PixArt),
            ``"class"`` (DiT class labels), or a kind a later pack defines (``"svd"``).
        positive: Tensors keyed by the denoiser argument they feed (``encoder_hidden_states``,
            ``text_embeds``, ``encoder_attention_mask``, ``class_labels`` …); batch = number of prompts.
        negative: The same keys for classifier-free guidance, or ``None`` when the model family
            builds its own (the DiT null class, SVD zeros).
        meta: Plain data about how it was made (prompts, truncation, encoder names).
    """

    kind: str
    positive: Mapping[str, Any]
    negative: Mapping[str, Any] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "positive", _freeze(self.positive))
        if self.negative is not None:
            object.__setattr__(self, "negative", _freeze(self.negative))
        object.__setattr__(self, "meta", _freeze(self.meta))

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (the engine's output cache budgets with this)."""
        return _tensor_bytes(self.positive.values()) + _tensor_bytes((self.negative or {}).values())

    @property
    def batch_size(self) -> int:
        """Number of prompts (or labels) in this conditioning."""
        for value in self.positive.values():
            shape = getattr(value, "shape", None)
            if shape is not None and len(shape) > 0:
                return int(shape[0])
        return 1

    def __dagfusion_fingerprint__(self) -> str:
        return _fingerprint(
            {
                "kind": self.kind,
                "positive": dict(self.positive),
                "negative": None if self.negative is None else dict(self.negative),
                "meta": json.dumps(_plain(self.meta), sort_keys=True, default=str),
            }
        )

    def __repr__(self) -> str:
        keys = ", ".join(sorted(self.positive))
        return f"Conditioning(kind={self.kind!r}, batch={self.batch_size}, keys=[{keys}])"


@dataclass(frozen=True, eq=False)
class Latent:
    """A batch of latents.

    Attributes:
        samples: Tensor ``(B, C, h, w)`` (images) or ``(B, F, C, h, w)`` (videos) in the denoiser's
            latent space (VAE latents multiplied by its scaling factor).
        lineage: Plain data on how it was made (models, seeds, sampler), carried into saved files.
    """

    samples: Any
    lineage: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lineage", _freeze(self.lineage))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.samples.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the samples (the engine's output cache budgets with this)."""
        return _tensor_bytes([self.samples])

    def __dagfusion_fingerprint__(self) -> str:
        return _fingerprint(
            {"samples": self.samples, "lineage": json.dumps(_plain(self.lineage), sort_keys=True, default=str)}
        )

    def __repr__(self) -> str:
        return f"Latent(shape={self.shape}, dtype={getattr(self.samples, 'dtype', None)})"
