"""Handles: what flows between nodes instead of raw modules.

A handle is light: a *reference* to shared weights (in the process-wide model cache, or held
in memory) plus an immutable tuple of patches. Every handle — the denoiser's
:class:`ModelHandle`, the :class:`VAEHandle` and the :class:`TextEncoderBundle` — carries
patches the same way. Cloning a handle to add a patch copies no weights, and two handles built
from the same load share the same module object but never their patches::

    patched = model.with_patch(MyPatch())      # model itself is unchanged
    assert patched.denoiser is model.denoiser  # same weights
    assert model.patches == ()

Patches are applied only while the module is used: the denoiser's while a sampler runs (see
:mod:`dagfusion.model.hooks`), the VAE's and text encoders' inside :meth:`Handle.patched`
(decoding, encoding). Handles are safe to reuse across runs: they hold no per-run state.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

from dagfusion.model.cache import Loader, ModelCache, default_cache
from dagfusion.model.patch import apply_patches, check_patch, patch_key

H = TypeVar("H", bound="Handle")


class SchedulerSpecLike(Protocol):
    """What a handle's default scheduler must offer (the diffusion pack's ``SchedulerSpec`` does)."""

    def create(self) -> Any:
        """A fresh scheduler instance for one sampling run."""

    def __dagfusion_fingerprint__(self) -> str:
        """Its identity (class and configuration)."""


def _fingerprint(value: Any) -> str:
    from dagfusion.fingerprint import fingerprint

    fp = fingerprint(value)
    if fp is None:  # pragma: no cover - every value we store is fingerprintable
        fp = repr(value)
    return fp


def _plain(value: Any) -> Any:
    """``value`` with mapping proxies turned into dicts (for fingerprints)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class ComponentRef:
    """One component of a model-cache entry: ``cache[key][name]``, loaded by ``loader`` if absent.

    ``fingerprint`` identifies the weights' content (the model file or folder hash, dtype and
    placement), so equal loads fingerprint equally across processes.
    """

    __slots__ = ("key", "name", "loader", "fingerprint", "cache")

    def __init__(
        self, key: Any, name: str, loader: Loader, fingerprint: str, cache: ModelCache | None = None
    ) -> None:
        self.key = key
        self.name = name
        self.loader = loader
        self.fingerprint = fingerprint
        self.cache = cache

    def get(self) -> Any:
        """The component (loaded now if it was never loaded or was evicted)."""
        return (self.cache if self.cache is not None else default_cache()).get(self.key, self.name, self.loader)

    def __repr__(self) -> str:
        return f"ComponentRef({self.name!r}, key={self.key!r})"


class StaticRef:
    """A component held in memory (built in Python rather than loaded); never evicted."""

    __slots__ = ("value", "_fingerprint")

    def __init__(self, value: Any, fingerprint: str | None = None) -> None:
        self.value = value
        self._fingerprint = fingerprint

    def get(self) -> Any:
        return self.value

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is not None:
            return self._fingerprint
        return _fingerprint(self.value) if _is_fingerprintable(self.value) else f"object:{id(self.value)}"

    def __repr__(self) -> str:
        return f"StaticRef({type(self.value).__name__})"


def _is_fingerprintable(value: Any) -> bool:
    from dagfusion.fingerprint import fingerprint

    return fingerprint(value) is not None


Ref = ComponentRef | StaticRef


def as_ref(value: Any) -> Ref:
    """``value`` if it is already a reference, else a :class:`StaticRef` holding it."""
    return value if isinstance(value, (ComponentRef, StaticRef)) else StaticRef(value)


@contextlib.contextmanager
def placed(module: Any, device: Any, enabled: bool) -> Iterator[Any]:
    """Move ``module`` to ``device`` for the duration (CPU offload), then back; no-op unless ``enabled``."""
    if not enabled:
        yield module
        return
    import torch

    target = torch.device(device)
    try:
        current = next(module.parameters()).device
    except StopIteration:
        yield module
        return
    if current == target:
        yield module
        return
    module.to(target)
    try:
        yield module
    finally:
        module.to(current)
        if target.type == "cuda":
            torch.cuda.empty_cache()


class Handle:
    """What every handle shares: device/dtype info, the offload flag and an immutable tuple of patches.

    Attributes:
        patches: Immutable tuple of :class:`~dagfusion.model.ModelPatch`, applied in order (the
            first is the outermost) while the module is used.
        info: Plain data (``source``, ``device``, ``dtype`` …), read only.
        offload: Weights live on the CPU and move to ``device`` only while used.
    """

    def __init__(self, info: Mapping[str, Any] | None, offload: bool, patches: Sequence[Any] = ()) -> None:
        self.info: Mapping[str, Any] = MappingProxyType(dict(info or {}))
        self.offload = bool(offload)
        for patch in patches:
            check_patch(patch)
        self.patches: tuple[Any, ...] = tuple(patches)

    @property
    def device(self) -> str:
        """Where this component computes (weights may live on the CPU when offloaded)."""
        return str(self.info.get("device", "cpu"))

    def use(self, module: Any) -> contextlib.AbstractContextManager[Any]:
        """Context in which ``module`` is on its compute device (moves it there if offloaded).

        Placement only: see :meth:`patched` for placement plus this handle's patches.
        """
        return placed(module, self.device, self.offload)

    @contextlib.contextmanager
    def patched(self, module: Any) -> Iterator[Any]:
        """Context in which ``module`` is on its compute device with every patch's ``apply(module)``
        entered (first patch outermost); all undone on exit, also after an error. Yields ``module``.

        The VAE and text-encoder code paths use this around each use of a module; the sampler
        applies a denoiser's patches itself (they also get a :class:`~dagfusion.model.SamplingRun`).
        """
        with self.use(module), apply_patches(self.patches, module):
            yield module

    def clone(self: H) -> H:
        """A new handle over the same weights with the same patches (no weight is copied)."""
        return copy.copy(self)

    def with_patch(self: H, patch: Any) -> H:
        """A clone with ``patch`` appended (innermost); this handle is unchanged.

        :raises TypeError: ``patch`` has neither ``apply`` nor ``begin``.
        :raises NodeDefinitionError: ``patch`` has no key (see :func:`~dagfusion.model.patch_key`).
        """
        check_patch(patch)
        clone = self.clone()
        clone.patches = (*self.patches, patch)
        return clone

    def without_patches(self: H) -> H:
        """A clone with no patches."""
        clone = self.clone()
        clone.patches = ()
        return clone

    def with_patches(self: H, patches: Sequence[Any]) -> H:
        """A clone with exactly ``patches``, in order (outermost first); this handle is unchanged.

        :raises TypeError: a patch has neither ``apply`` nor ``begin``.
        :raises NodeDefinitionError: a patch has no key (see :func:`~dagfusion.model.patch_key`).
        """
        for patch in patches:
            check_patch(patch)
        clone = self.clone()
        clone.patches = tuple(patches)
        return clone

    def _patch_fingerprint(self) -> dict[str, Any]:
        return {"patches": [patch_key(p) for p in self.patches]} if self.patches else {}

    def _patch_names(self) -> str:
        return ", ".join(type(p).__name__ for p in self.patches)


class ModelHandle(Handle):
    """A denoiser (UNet or transformer) with its default scheduler and its patches.

    Attributes:
        ref: Where the denoiser's weights live (shared between clones).
        scheduler: The model's own scheduler spec (from its folder), used when a Sample node
            is given none.
        patches: Immutable tuple of :class:`~dagfusion.model.ModelPatch`, applied in order (the
            first is the outermost) while sampling: ``apply(module)`` around the run, and
            ``begin(run)`` for its :class:`~dagfusion.model.StepHook`.
        info: Plain data: ``source``, ``fingerprint``, ``dtype``, ``device``, ``pipeline``,
            ``vae_scale_factor``.
        offload: Weights live on the CPU and move to ``device`` only while sampling.
    """

    def __init__(
        self,
        ref: Ref,
        *,
        scheduler: SchedulerSpecLike | None = None,
        patches: Sequence[Any] = (),
        info: Mapping[str, Any] | None = None,
        offload: bool = False,
    ) -> None:
        super().__init__(info, offload, patches)
        self.ref = ref
        self.scheduler = scheduler
        self.preview_vae: VAEHandle | None = None
        """The VAE that made this model's latents, when a loader knows it: live previews fit a
        cheap latent-to-RGB projection from it (not part of the fingerprint)."""

    def with_preview_vae(self, vae: VAEHandle | None) -> ModelHandle:
        """A clone whose live previews are fitted from ``vae`` (see :attr:`preview_vae`)."""
        clone = self.clone()
        clone.preview_vae = vae
        return clone

    @classmethod
    def from_module(
        cls,
        module: Any,
        *,
        scheduler: SchedulerSpecLike | None = None,
        vae_scale_factor: int = 8,
        info: Mapping[str, Any] | None = None,
        offload: bool = False,
    ) -> ModelHandle:
        """A handle over a module built in Python (tests, benchmarks, other packs)."""
        base = {"source": f"in-memory {type(module).__name__}", "vae_scale_factor": vae_scale_factor}
        try:
            param = next(module.parameters())
            base.update(device=str(param.device), dtype=str(param.dtype).replace("torch.", ""))
        except StopIteration:  # pragma: no cover - denoisers have parameters
            pass
        base.update(info or {})
        return cls(StaticRef(module), scheduler=scheduler, info=base, offload=offload)

    @property
    def denoiser(self) -> Any:
        """The shared denoiser module (unpatched: patches apply only while sampling)."""
        return self.ref.get()

    @property
    def vae_scale_factor(self) -> int:
        return int(self.info.get("vae_scale_factor", 8))

    def with_denoiser(self, module_or_ref: Any, **info: Any) -> ModelHandle:
        """A clone computing with another module (a quantized copy, say); patches are kept."""
        clone = self.clone()
        clone.ref = as_ref(module_or_ref)
        clone.info = MappingProxyType({**self.info, **info})
        return clone

    def with_scheduler(self, scheduler: SchedulerSpecLike) -> ModelHandle:
        """A clone whose default scheduler is ``scheduler``."""
        clone = self.clone()
        clone.scheduler = scheduler
        return clone

    def __dagfusion_fingerprint__(self) -> str:
        return _fingerprint(
            {
                "weights": self.ref.fingerprint,
                "scheduler": None if self.scheduler is None else self.scheduler.__dagfusion_fingerprint__(),
                "patches": [patch_key(p) for p in self.patches],
                "info": _plain(self.info),
                "offload": self.offload,
            }
        )

    def __repr__(self) -> str:
        return f"ModelHandle({self.info.get('source', '?')!r}, patches=[{self._patch_names()}])"


class VAEHandle(Handle):
    """A VAE (``AutoencoderKL`` and relatives) by reference, with its patches.

    A VAE patch's ``apply(module)`` is entered around each decode and encode (``begin`` is never
    called: there is no sampling run).
    """

    def __init__(
        self, ref: Ref, *, info: Mapping[str, Any] | None = None, offload: bool = False, patches: Sequence[Any] = ()
    ) -> None:
        super().__init__(info, offload, patches)
        self.ref = ref

    @classmethod
    def from_module(cls, module: Any, *, info: Mapping[str, Any] | None = None, offload: bool = False) -> VAEHandle:
        base: dict[str, Any] = {"source": f"in-memory {type(module).__name__}"}
        try:
            param = next(module.parameters())
            base.update(device=str(param.device), dtype=str(param.dtype).replace("torch.", ""))
        except StopIteration:  # pragma: no cover
            pass
        base.update(info or {})
        return cls(StaticRef(module), info=base, offload=offload)

    @property
    def module(self) -> Any:
        """The shared VAE module (unpatched: patches apply only inside :meth:`patched`)."""
        return self.ref.get()

    def __dagfusion_fingerprint__(self) -> str:
        return _fingerprint(
            {"weights": self.ref.fingerprint, "info": _plain(self.info), "offload": self.offload, **self._patch_fingerprint()}
        )

    def __repr__(self) -> str:
        patches = f", patches=[{self._patch_names()}]" if self.patches else ""
        return f"VAEHandle({self.info.get('source', '?')!r}{patches})"


class TextEncoderBundle(Handle):
    """Text encoder(s) with their tokenizer(s), and their patches.

    A text-encoder patch's ``apply(module)`` is entered around the use of **each** encoder module
    of the bundle (both CLIPs of SDXL, say): a patch meant for one of them tells them apart by the
    module it is given (its class or config) and leaves the others unchanged. ``begin`` is never
    called (there is no sampling run).

    Attributes:
        kind: ``"clip"`` (one CLIP, SD 1/2), ``"sdxl"`` (CLIP + CLIP with projection), ``"t5"``
            (PixArt) or ``"none"`` (class-conditional models such as DiT: nothing to encode).
        encoders, tokenizers: References, index-aligned.
        options: ``force_zeros_for_empty_prompt`` (SDXL), ``max_length`` and ``lowercase`` (T5).
    """

    KINDS = ("clip", "sdxl", "t5", "none")

    def __init__(
        self,
        kind: str,
        encoders: Sequence[Ref] = (),
        tokenizers: Sequence[Ref] = (),
        *,
        options: Mapping[str, Any] | None = None,
        info: Mapping[str, Any] | None = None,
        offload: bool = False,
        patches: Sequence[Any] = (),
    ) -> None:
        super().__init__(info, offload, patches)
        if kind not in self.KINDS:
            raise ValueError(f"expected a text encoder kind in {list(self.KINDS)}, got {kind!r}")
        if len(encoders) != len(tokenizers):
            raise ValueError(f"{len(encoders)} text encoders but {len(tokenizers)} tokenizers; give one of each")
        self.kind = kind
        self.encoders: tuple[Ref, ...] = tuple(as_ref(e) for e in encoders)
        self.tokenizers: tuple[Ref, ...] = tuple(as_ref(t) for t in tokenizers)
        self.options: Mapping[str, Any] = MappingProxyType(dict(options or {}))

    @classmethod
    def from_modules(
        cls,
        kind: str,
        encoders: Sequence[Any],
        tokenizers: Sequence[Any],
        *,
        options: Mapping[str, Any] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> TextEncoderBundle:
        base: dict[str, Any] = {"source": "in-memory"}
        if encoders:
            try:
                base["device"] = str(next(encoders[0].parameters()).device)
            except StopIteration:  # pragma: no cover
                pass
        base.update(info or {})
        return cls(
            kind,
            [StaticRef(e) for e in encoders],
            [StaticRef(t, tokenizer_fingerprint(t)) for t in tokenizers],
            options=options,
            info=base,
        )

    def __dagfusion_fingerprint__(self) -> str:
        return _fingerprint(
            {
                "kind": self.kind,
                "encoders": [r.fingerprint for r in self.encoders],
                "tokenizers": [r.fingerprint for r in self.tokenizers],
                "options": _plain(self.options),
                "info": _plain(self.info),
                "offload": self.offload,
                **self._patch_fingerprint(),
            }
        )

    def __repr__(self) -> str:
        patches = f", patches=[{self._patch_names()}]" if self.patches else ""
        return f"TextEncoderBundle({self.kind!r}, {self.info.get('source', '?')!r}{patches})"


class ImageEncoderHandle(Handle):
    """An image encoder (``CLIPVisionModelWithProjection``) with its image processor, by reference.

    Image-to-video models (Stable Video Diffusion) condition on the embedding of their first
    frame. An image-encoder patch's ``apply(module)`` is entered around each encode.

    Attributes:
        encoder: Reference to the vision model.
        processor: Reference to its image processor (normalisation constants, input size), or
            ``None`` for an encoder whose inputs need no processor.
    """

    def __init__(
        self,
        encoder: Ref,
        processor: Ref | None = None,
        *,
        info: Mapping[str, Any] | None = None,
        offload: bool = False,
        patches: Sequence[Any] = (),
    ) -> None:
        super().__init__(info, offload, patches)
        self.encoder = as_ref(encoder)
        self.processor = as_ref(processor) if processor is not None else None

    @classmethod
    def from_modules(cls, encoder: Any, processor: Any = None, *, info: Mapping[str, Any] | None = None) -> ImageEncoderHandle:
        base: dict[str, Any] = {"source": f"in-memory {type(encoder).__name__}"}
        try:
            param = next(encoder.parameters())
            base.update(device=str(param.device), dtype=str(param.dtype).replace("torch.", ""))
        except StopIteration:  # pragma: no cover
            pass
        base.update(info or {})
        fingerprint = _fingerprint({"class": type(processor).__name__, "config": _plain(processor.to_dict())}) if processor is not None and hasattr(processor, "to_dict") else None
        return cls(StaticRef(encoder), StaticRef(processor, fingerprint) if processor is not None else None, info=base)

    @property
    def module(self) -> Any:
        """The shared vision model (unpatched: patches apply only inside :meth:`patched`)."""
        return self.encoder.get()

    @property
    def image_processor(self) -> Any:
        """The image processor, or ``None``."""
        return self.processor.get() if self.processor is not None else None

    def __dagfusion_fingerprint__(self) -> str:
        return _fingerprint(
            {
                "encoder": self.encoder.fingerprint,
                "processor": self.processor.fingerprint if self.processor is not None else None,
                "info": _plain(self.info),
                "offload": self.offload,
                **self._patch_fingerprint(),
            }
        )

    def __repr__(self) -> str:
        patches = f", patches=[{self._patch_names()}]" if self.patches else ""
        return f"ImageEncoderHandle({self.info.get('source', '?')!r}{patches})"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A content fingerprint of a tokenizer (class, vocabulary, maximum length)."""
    try:
        vocab = dict(tokenizer.get_vocab())
    except Exception:  # noqa: BLE001 - any tokenizer without a vocabulary API
        return f"object:{id(tokenizer)}"
    return _fingerprint(
        {"class": type(tokenizer).__name__, "vocab": vocab, "max": int(getattr(tokenizer, "model_max_length", 0) or 0)}
    )


def loaded(refs: Sequence[Ref]) -> list[Any]:
    """The objects behind ``refs`` (loading any that were evicted)."""
    return [r.get() for r in refs]


Factory = Callable[[], Any]
"""Builds an object on demand."""
