"""Denoiser families: how a sampler (or a training loop) calls each kind of denoiser.

A :class:`Family` knows, for one kind of denoiser module, the latent shape it works on, how to
turn a conditioning (:class:`ConditioningLike`: the diffusion pack's ``Conditioning``) into the
module's keyword inputs (batched for classifier-free guidance), how the timestep is passed and
how the output is combined. The sampler loop itself is family-agnostic.

Families are kept in a :class:`FamilyRegistry`; :func:`family_for` asks the process-wide one.
Packs contribute families through a ``register_denoiser_families(register)`` function
(``register(family)`` for each); the built-in packs' functions are collected on the first
lookup, and :func:`register_family` adds one directly. Families registered later are asked
first, so a plugin can take over a kind of module from a built-in family.

Built in (diffusion pack): ``unet`` (``UNet2DConditionModel``: SD 1/2, SDXL, LCM), ``dit``,
``pixart`` and ``svd`` (video).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from dagfusion.model.helpers import unwrap_compiled


class ConditioningLike(Protocol):
    """What a family reads from a conditioning (the diffusion pack's ``Conditioning`` is one).

    Attributes:
        kind: How the tensors were made (``"clip"``, ``"sdxl"``, ``"t5"``, ``"class"``, ``"svd"`` …).
        positive: Tensors keyed by the denoiser argument they feed; batch = number of prompts.
        negative: The same keys for classifier-free guidance, or ``None``.
        meta: Plain data about how it was made (SDXL size conditions live here).
    """

    kind: str
    positive: Mapping[str, Any]
    negative: Mapping[str, Any] | None
    meta: Mapping[str, Any]


def config_of(module: Any) -> Any:
    """The diffusers config of ``module`` (looking through ``torch.compile`` wrappers).

    :raises TypeError: the module has no ``config``.
    """
    inner = unwrap_compiled(module)
    config = getattr(inner, "config", None)
    if config is None:
        raise TypeError(f"expected a diffusers model with a config, got {type(module).__name__}")
    return config


def class_names(module: Any) -> set[str]:
    """Names of the module's class and its bases (looking through ``torch.compile`` wrappers)."""
    inner = unwrap_compiled(module)
    return {cls.__name__ for cls in type(inner).__mro__}


def expand(tensor: Any, batch: int, what: str) -> Any:
    """Repeat each of a conditioning's ``P`` rows ``batch // P`` times (``[p0, p0, p1, p1]``)."""
    rows = int(tensor.shape[0])
    if rows == batch:
        return tensor
    if rows == 0 or batch % rows:
        raise ValueError(
            f"the conditioning holds {rows} {what}(s) but the latent batch is {batch}; "
            f"the batch must be a multiple of {rows}"
        )
    return tensor.repeat_interleave(batch // rows, dim=0)


def rescale_guidance(guided: Any, cond: Any, factor: float) -> Any:
    """Rescale a CFG prediction towards the conditional one's standard deviation (Lin et al. 2023, 3.4)."""
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return factor * rescaled + (1 - factor) * guided


class Prepared:
    """What :meth:`Family.prepare` returns: keyword inputs plus optional channel-concatenated latents."""

    __slots__ = ("kwargs", "concat", "batches")

    def __init__(self, kwargs: dict[str, Any], batches: tuple[str, ...], concat: Any = None) -> None:
        self.kwargs = kwargs
        self.batches = batches
        self.concat = concat


class Family:
    """Base class: an image denoiser conditioned on ``encoder_hidden_states``.

    Subclasses set ``name`` and implement :meth:`matches` and :meth:`prepare`; the other methods
    have defaults for diffusers-style models (``module(sample, timestep=..., **kwargs,
    return_dict=False)[0]``, learned variance in the second half of the output channels).
    """

    name = "base"
    #: Batch order under classifier-free guidance.
    cfg_batches: tuple[str, ...] = ("uncond", "cond")
    #: Expand the timestep to one value per batch row (transformers) or pass it as a scalar (UNets).
    timestep_per_row = False
    #: Dimension of the channels in the latent tensor (2 for video ``(B, F, C, h, w)``).
    channel_dim = 1
    video = False

    def matches(self, module: Any) -> bool:
        """Whether this family handles ``module`` (it may be a ``torch.compile`` wrapper)."""
        raise NotImplementedError

    def latent_channels(self, module: Any) -> int:
        """Channels of the noisy latents the module denoises (without concatenated conditions)."""
        return int(config_of(module).in_channels)

    def latent_shape(self, module: Any, batch: int, height: int, width: int, scale: int, frames: int = 1) -> tuple[int, ...]:
        """Shape of the latents for images of ``height`` x ``width`` pixels."""
        if height % scale or width % scale:
            raise ValueError(f"width and height must be multiples of {scale} for this model, got {width}x{height}")
        shape = (batch, self.latent_channels(module), height // scale, width // scale)
        if self.video:
            return (batch, frames, *shape[1:])
        return shape

    def supports_cfg(self, module: Any) -> bool:
        """Whether classifier-free guidance applies (``False`` for guidance-embedded models)."""
        return True

    def prepare(
        self,
        module: Any,
        cond: ConditioningLike,
        *,
        batch: int,
        cfg: bool,
        device: Any,
        dtype: Any,
        latent_shape: tuple[int, ...],
        scale: int,
        guidance_scale: float,
    ) -> Prepared:
        """The module's keyword inputs for a latent batch of ``batch`` rows (twice that, negative
        and positive in ``cfg_batches`` order, when ``cfg``), on ``device`` in ``dtype``.

        :raises ValueError: the conditioning is of the wrong kind or size for this model.
        """
        raise NotImplementedError

    def timestep(self, t: Any, rows: int, device: Any) -> Any:
        """The timestep argument for a batch of ``rows``: ``t`` itself, or one value per row."""
        if not self.timestep_per_row:
            return t
        if t.ndim == 0:
            t = t[None].to(device)
        return t.expand(rows)

    def combine(self, out: Any, module: Any, cfg: bool, batches: tuple[str, ...], scale: Any, rescale: float) -> Any:
        """The guided prediction the scheduler steps with (learned variance dropped). ``scale`` is
        a float, or a tensor broadcast against the prediction (one scale per video frame)."""
        if cfg:
            first, second = out.chunk(2)
            cond, uncond = (second, first) if batches[0] == "uncond" else (first, second)
            out = uncond + scale * (cond - uncond)
            if rescale > 0:
                out = rescale_guidance(out, cond, rescale)
        return self.drop_variance(out, module)

    def drop_variance(self, out: Any, module: Any) -> Any:
        """``out`` without a learned-variance half of the channels, if the module predicts one."""
        channels = self.latent_channels(module)
        if out.shape[self.channel_dim] == 2 * channels:
            return out.narrow(self.channel_dim, 0, channels)
        return out

    def call(self, module: Any, sample: Any, timestep: Any, kwargs: Mapping[str, Any]) -> Any:
        """Run the module once and return its raw output tensor."""
        return module(sample, timestep=timestep, **kwargs, return_dict=False)[0]

    @staticmethod
    def paired(cond: ConditioningLike, key: str, batch: int, cfg: bool, what: str, negative_default: Any = None) -> Any:
        """``cond.positive[key]`` expanded to ``batch`` rows, preceded by the negative under ``cfg``
        (``negative_default(positive)`` when the conditioning has no negative for ``key``).

        :raises ValueError: ``key`` is missing, or ``cfg`` needs a negative that is missing.
        """
        import torch

        if key not in cond.positive:
            raise ValueError(f"{cond.kind} conditioning has no {key!r}; it has {sorted(cond.positive)}")
        positive = expand(cond.positive[key], batch, what)
        if not cfg:
            return positive
        if cond.negative is not None and key in cond.negative:
            negative = expand(cond.negative[key], batch, what)
        elif negative_default is not None:
            negative = negative_default(positive)
        else:
            raise ValueError(
                f"guidance_scale > 1 needs a negative {key!r} but the {cond.kind} conditioning has none; "
                "encode a negative prompt or set guidance_scale to 1"
            )
        return torch.cat([negative, positive])

    _pair = paired


def require_kind(cond: ConditioningLike, family: str, kinds: tuple[str, ...]) -> None:
    """:raises ValueError: ``cond.kind`` is none of ``kinds`` (the message names ``family``)."""
    if cond.kind not in kinds:
        raise ValueError(f"a {family} model needs {' or '.join(kinds)} conditioning, got {cond.kind!r} conditioning")


RegisterFamily = Callable[[Family], None]
"""The ``register`` callback a pack's ``register_denoiser_families(register)`` receives."""


class FamilyRegistry:
    """An ordered set of families; :meth:`family_for` asks the most recently registered first.

    Thread-safe. A family is identified by its ``name``: registering one whose name is taken
    replaces the old one in its place when it is of the same class (so registering a pack twice
    changes nothing) and is an error otherwise.
    """

    def __init__(self) -> None:
        self._families: list[Family] = []  # asking order
        self._lock = threading.RLock()

    def register(self, family: Family, *, first: bool = True) -> None:
        """Add ``family``: asked before every family registered so far (``first``), or after them.
        A family already registered (same name and class) is replaced where it stands.

        :raises TypeError: ``family`` lacks ``name``, ``matches`` or ``prepare``.
        :raises ValueError: another class of family already has this name.
        """
        with self._lock:
            if not self._replace(family):
                self._families.insert(0 if first else len(self._families), family)

    def registrar(self) -> RegisterFamily:
        """The ``register`` callback for one pack's ``register_denoiser_families(register)``: the
        pack's new families are asked before those registered earlier, and among themselves in
        the order the pack registers them; registering a pack again changes nothing."""
        position = 0

        def register(family: Family) -> None:
            nonlocal position
            with self._lock:
                if not self._replace(family):
                    self._families.insert(position, family)
                    position += 1

        return register

    def _replace(self, family: Family) -> bool:
        """Check ``family``; put it in the place of a registered family of the same name and class
        (``True``), or report there is none (``False``)."""
        for attribute in ("name", "matches", "prepare"):
            if not hasattr(family, attribute):
                raise TypeError(
                    f"expected a denoiser family (a dagfusion.model.Family), got {type(family).__name__} without {attribute!r}"
                )
        for i, known in enumerate(self._families):
            if known.name != family.name:
                continue
            if type(known) is not type(family):
                raise ValueError(
                    f"a denoiser family named {family.name!r} is already registered "
                    f"({type(known).__module__}.{type(known).__qualname__}); give yours another name"
                )
            self._families[i] = family
            return True
        return False

    def unregister(self, name: str) -> bool:
        """Forget the family called ``name``; ``False`` if there was none."""
        with self._lock:
            for i, known in enumerate(self._families):
                if known.name == name:
                    del self._families[i]
                    return True
        return False

    def family_for(self, module: Any) -> Family:
        """The first family (in asking order) whose ``matches(module)`` is true.

        :raises TypeError: no family knows this kind of module (the message lists the known ones).
        """
        for family in self:
            if family.matches(module):
                return family
        known = ", ".join(f.name for f in self) or "none"
        raise TypeError(
            f"no sampler family handles a {type(unwrap_compiled(module)).__name__} "
            f"(known families: {known}); register one with dagfusion.model.register_family"
        )

    def names(self) -> list[str]:
        """Family names in asking order."""
        return [f.name for f in self]

    def __iter__(self) -> Iterator[Family]:
        with self._lock:
            return iter(list(self._families))

    def __len__(self) -> int:
        return len(self._families)


_DEFAULT = FamilyRegistry()
_BUILTINS_LOADED = False
_BUILTINS_LOCK = threading.RLock()


def _ensure_builtins() -> None:
    """Collect the built-in packs' ``register_denoiser_families`` once (on first use)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    with _BUILTINS_LOCK:
        if _BUILTINS_LOADED:
            return
        from dagfusion.plugins import builtin_plugin_modules

        _BUILTINS_LOADED = True  # a pack registering from inside its hook must not recurse
        try:
            for module_name in builtin_plugin_modules().values():
                hook = getattr(importlib.import_module(module_name), "register_denoiser_families", None)
                if callable(hook):
                    hook(register=_DEFAULT.registrar())
        except BaseException:
            _BUILTINS_LOADED = False
            raise


def default_families() -> FamilyRegistry:
    """The process-wide family registry, with the built-in packs' families in it."""
    _ensure_builtins()
    return _DEFAULT


def register_family(family: Family, *, first: bool = True) -> None:
    """Teach the samplers a new kind of denoiser (``first``: asked before the families known so far).

    :raises ValueError: another class of family already has this name.
    """
    default_families().register(family, first=first)


def family_for(module: Any) -> Family:
    """The family that handles ``module`` (asking the process-wide registry).

    :raises TypeError: no family knows this kind of module.
    """
    return default_families().family_for(module)
