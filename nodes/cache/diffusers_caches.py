"""diffusers' own cache hooks as a dagfusion patch: First Block Cache, PAB, FasterCache, TaylorSeer, MagCache.

diffusers ships several training-free caches as *hooks* (``diffusers.hooks``): each
``apply_*(module, config)`` function wraps submodules of a denoiser so that they reuse or
extrapolate earlier results instead of computing. This module does not reimplement any of them;
:class:`DiffusersCachePatch` only runs them inside dagfusion's sampler:

- ``apply(module)`` calls the matching ``apply_*`` (``module.enable_cache(config)`` when the
  module is a ``CacheMixin``) and on exit removes every hook again (``disable_cache`` /
  ``HookRegistry.remove_hook``) and deletes what registering left on the modules (the
  ``_diffusers_hook`` registries and instance ``forward`` attributes), so the module is exactly
  as before the run;
- ``begin(run)`` resets the hooks' state (``HookRegistry.reset_stateful_hooks``) and returns a
  :class:`DiffusersCacheStep` that, around each denoiser call, records the current timestep
  (PAB and FasterCache read it through ``current_timestep_callback``) and sets the cache
  context the diffusers pipelines set: ``"cond_uncond"`` for a call carrying both
  classifier-free-guidance halves (dagfusion's sampler batches them in one call), ``"cond"``
  without guidance. ``CacheMixin`` models get ``module.cache_context(name)``; the others (the
  UNet, DiT and PixArt are not ``CacheMixin`` in diffusers 0.42) the same call it makes,
  ``diffusers.hooks.hooks._set_cache_context``.

Which method works on which denoiser (checked by :func:`unsupported_reasons`, found by running
each on the tiny UNet, DiT and PixArt models in diffusers 0.42.1):

============================  ======  ======  ======
method                        UNet    DiT     PixArt
============================  ======  ======  ======
first_block_cache             no      yes     yes
pyramid_attention_broadcast   yes     yes     yes
faster_cache                  no      no      yes (without 1024 px micro-conditions)
taylorseer                    yes     yes     yes
mag_cache                     no      yes     yes (needs magnitude ratios: MagCacheCalibrate)
============================  ======  ======  ======

First Block Cache and MagCache hook the top-level list of transformer blocks, which a UNet
does not have. FasterCache splits the guidance batch itself and assumes the unconditional
half first and every batched input among ``hidden_states``/``encoder_hidden_states``/
``timestep``/attention masks: the UNet gets a scalar timestep, DiT puts the conditional half
first and passes ``class_labels``, and PixArt at 1024 px passes resolution micro-conditions in
``added_cond_kwargs`` — FasterCache breaks on each. TaylorSeer's default module patterns match
no module of these models (they are written for Flux-style ``attn`` names), so the patch gives
it explicit ones: the attention and feed-forward modules of every transformer block
(:data:`TAYLORSEER_MODULES`), as in the TaylorSeer paper.

MagCache skips by model-specific magnitude ratios. diffusers has a ``calibrate=True`` mode that
measures them in one uncached run; the ``dagfusion.cache.MagCacheCalibrate`` node runs it and
outputs the ratios as text for the ``mag_ratios`` input.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dagfusion import FLOAT, INT, SEED, STRING, Input, Output, RunContext, node
from dagfusion.model import DenoiserCall, Forward, ModelPatch, SamplingRun, StepHook, unwrap_compiled
from dagfusion.nodes.diffusion.schedulers import SAMPLER_CHOICES
from dagfusion.nodes.diffusion.types import CONDITIONING, LATENT, MODEL

METHODS = ("first_block_cache", "pyramid_attention_broadcast", "faster_cache", "taylorseer", "mag_cache")
"""The diffusers caches the node offers (each works on at least one of UNet, DiT, PixArt)."""

TAYLORSEER_MODULES = r"(?:.*\.)?(?:single_|temporal_)?transformer_blocks\.\d+\.(?:attn\d*|ff)"
"""Modules TaylorSeer predicts (``re.fullmatch`` on module names): attention and feed-forward of each transformer block."""

_DEFAULT_TIMESTEP_RANGES = {"pyramid_attention_broadcast": (100.0, 800.0), "faster_cache": (-1.0, 681.0)}
_FASTER_UNCOND_RANGE = (-1.0, 641.0)  # diffusers' default unconditional_batch_timestep_skip_range


def _hook_names(method: str) -> tuple[str, ...]:
    """The names diffusers registers the method's hooks under (what ``disable_cache`` removes)."""
    if method == "first_block_cache":
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        return (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK)
    if method == "pyramid_attention_broadcast":
        from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

        return (_PYRAMID_ATTENTION_BROADCAST_HOOK,)
    if method == "faster_cache":
        from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK

        return (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK)
    if method == "taylorseer":
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        return (_TAYLORSEER_CACHE_HOOK,)
    if method == "mag_cache":
        from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK

        return (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK)
    raise ValueError(f"unknown diffusers cache method {method!r}; expected one of {list(METHODS)}")


def _all_hook_names() -> frozenset[str]:
    return frozenset(name for method in METHODS for name in _hook_names(method))


# --- which method works on which denoiser -----------------------------------------------------


def _top_level_blocks(inner: Any) -> list[Any]:
    """The blocks First Block Cache and MagCache hook: top-level ``ModuleList``s named like block lists."""
    import torch
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    return [
        block
        for name, child in inner.named_children()
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList)
        for block in child
    ]


def _block_problem(inner: Any, minimum: int) -> str | None:
    from diffusers.hooks._helpers import TransformerBlockRegistry

    blocks = _top_level_blocks(inner)
    if len(blocks) < minimum:
        return (
            "it hooks a top-level list of transformer blocks (transformer_blocks, blocks, …), "
            f"of which this model has {len(blocks)} (needs at least {minimum})"
        )
    unknown = set()
    for block in blocks:
        try:
            TransformerBlockRegistry.get(type(block))
        except ValueError:
            unknown.add(type(block).__name__)
    if unknown:
        return f"diffusers does not know the block class(es) {sorted(unknown)} (TransformerBlockRegistry)"
    return None


def _attention_names(inner: Any, patterns: tuple[str, ...], *, cross: bool | None = None) -> list[str]:
    import re

    from diffusers.hooks._common import _ATTENTION_CLASSES

    names = []
    for name, sub in inner.named_modules():
        if not isinstance(sub, _ATTENTION_CLASSES):
            continue
        if cross is not None and bool(getattr(sub, "is_cross_attention", False)) != cross:
            continue
        if any(re.search(p, name) for p in patterns):
            names.append(name)
    return names


def _pixart_micro_conditions(inner: Any) -> bool:
    micro = getattr(inner, "use_additional_conditions", None)
    if micro is None:
        micro = getattr(getattr(inner, "config", None), "sample_size", None) == 128
    return bool(micro)


def unsupported_reasons(module: Any) -> dict[str, str]:
    """``{method: why it cannot work on module}`` for each method of :data:`METHODS` that cannot."""
    import re

    from diffusers.hooks._common import _CROSS_TRANSFORMER_BLOCK_IDENTIFIERS, _SPATIAL_TRANSFORMER_BLOCK_IDENTIFIERS

    from dagfusion.model import family_for

    inner = unwrap_compiled(module)
    reasons: dict[str, str] = {}
    problem = _block_problem(inner, 2)
    if problem:
        reasons["first_block_cache"] = problem
    problem = _block_problem(inner, 1)
    if problem:
        reasons["mag_cache"] = problem
    if not _attention_names(inner, (*_SPATIAL_TRANSFORMER_BLOCK_IDENTIFIERS, *_CROSS_TRANSFORMER_BLOCK_IDENTIFIERS)):
        reasons["pyramid_attention_broadcast"] = "it has no diffusers Attention module inside transformer blocks"
    if not any(re.fullmatch(TAYLORSEER_MODULES, name) for name, _ in inner.named_modules()):
        reasons["taylorseer"] = "it has no attention or feed-forward module inside transformer blocks"
    try:
        family = family_for(inner).name
    except TypeError:
        family = None
    if family != "pixart":
        why = {
            "unet": "the UNet takes a scalar timestep, which FasterCache cannot split into the guidance halves",
            "dit": "DiT puts the conditional half first and passes class_labels, which FasterCache does not split",
        }.get(family or "", "FasterCache's guidance-batch split only fits PixArt-style transformers among "
                              "dagfusion's model families")
        reasons["faster_cache"] = why
    elif _pixart_micro_conditions(inner):
        reasons["faster_cache"] = (
            "this PixArt model takes resolution micro-conditions (added_cond_kwargs), which FasterCache does "
            "not split into the guidance halves"
        )
    elif not _attention_names(inner, ("^transformer_blocks.*attn",), cross=False):
        reasons["faster_cache"] = "it has no self-attention under transformer_blocks"
    return reasons


def supported_methods(module: Any) -> tuple[str, ...]:
    """The methods of :data:`METHODS` that work on ``module``, in that order."""
    reasons = unsupported_reasons(module)
    return tuple(m for m in METHODS if m not in reasons)


def check_supported(module: Any, method: str) -> None:
    """:raises ValueError: naming the method, the model class and the methods it supports."""
    if method not in METHODS:
        raise ValueError(f"unknown diffusers cache method {method!r}; expected one of {list(METHODS)}")
    reasons = unsupported_reasons(module)
    if method in reasons:
        cls = type(unwrap_compiled(module)).__name__
        supported = [m for m in METHODS if m not in reasons]
        raise ValueError(
            f"diffusers' {method} does not work on a {cls}: {reasons[method]}. "
            f"Methods that work on {cls}: {', '.join(supported) if supported else 'none'}"
        )


# --- settings and configs ---------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSettings:
    """Everything that shapes one method's diffusers config (plain, immutable values).

    ``timestep_range`` ``None`` means the method's diffusers default; ``mag_ratios`` empty with
    ``calibrate`` true is MagCache's calibration mode (no skipping, ratios measured).
    """

    method: str
    threshold: float = 0.05
    spatial_attention_block_skip_range: int = 2
    cross_attention_block_skip_range: int = 6
    timestep_range: tuple[float, float] | None = None
    unconditional_batch_skip_range: int = 5
    cache_interval: int = 5
    max_order: int = 1
    disable_cache_before_step: int = 3
    mag_threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    mag_ratios: tuple[float, ...] = ()
    calibrate: bool = False

    def relevant(self) -> dict[str, Any]:
        """The settings the method uses (the patch key holds only these)."""
        m = self.method
        if m == "first_block_cache":
            return {"threshold": self.threshold}
        if m == "pyramid_attention_broadcast":
            return {"spatial": self.spatial_attention_block_skip_range, "cross": self.cross_attention_block_skip_range,
                    "timesteps": list(self.timesteps())}
        if m == "faster_cache":
            return {"spatial": self.spatial_attention_block_skip_range, "uncond": self.unconditional_batch_skip_range,
                    "timesteps": list(self.timesteps())}
        if m == "taylorseer":
            return {"interval": self.cache_interval, "order": self.max_order, "before": self.disable_cache_before_step}
        return {"threshold": self.mag_threshold, "max_skip": self.max_skip_steps, "retention": self.retention_ratio,
                "ratios": [round(r, 6) for r in self.mag_ratios], "calibrate": self.calibrate}

    def timesteps(self) -> tuple[float, float]:
        return self.timestep_range or _DEFAULT_TIMESTEP_RANGES.get(self.method, (100.0, 800.0))


class _Clock:
    """The current sampling timestep, written by the step hook and read by diffusers' callbacks."""

    def __init__(self) -> None:
        self.timestep: float | None = None

    def __call__(self) -> float:
        if self.timestep is None:
            raise RuntimeError(
                "the diffusers cache asked for the current timestep outside a denoiser call; the patch's step "
                "hook (begin) sets it — run the model through dagfusion's sampler"
            )
        return self.timestep


def build_config(settings: CacheSettings, clock: Any) -> Any:
    """The diffusers config object for ``settings`` (``clock()`` gives the current timestep)."""
    import torch

    m = settings.method
    if m == "first_block_cache":
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=settings.threshold)
    if m == "pyramid_attention_broadcast":
        from diffusers.hooks import PyramidAttentionBroadcastConfig

        timesteps = settings.timesteps()
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=settings.spatial_attention_block_skip_range or None,
            cross_attention_block_skip_range=settings.cross_attention_block_skip_range or None,
            spatial_attention_timestep_skip_range=timesteps,
            cross_attention_timestep_skip_range=timesteps,
            current_timestep_callback=clock,
        )
    if m == "faster_cache":
        from diffusers.hooks import FasterCacheConfig

        given = settings.timestep_range
        return FasterCacheConfig(
            spatial_attention_block_skip_range=settings.spatial_attention_block_skip_range or None,
            spatial_attention_timestep_skip_range=settings.timesteps(),
            unconditional_batch_skip_range=settings.unconditional_batch_skip_range,
            unconditional_batch_timestep_skip_range=given or _FASTER_UNCOND_RANGE,
            attention_weight_callback=lambda _module: 0.5,  # diffusers' default, given to silence its warning
            tensor_format="BCHW",
            current_timestep_callback=clock,
        )
    if m == "taylorseer":
        from diffusers.hooks import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(
            cache_interval=settings.cache_interval,
            disable_cache_before_step=settings.disable_cache_before_step,
            max_order=settings.max_order,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=[TAYLORSEER_MODULES],
        )
    if m == "mag_cache":
        from diffusers.hooks import MagCacheConfig

        if settings.calibrate:
            return MagCacheConfig(calibrate=True)
        if not settings.mag_ratios:
            raise ValueError(_NO_RATIOS)
        ratios = torch.tensor(settings.mag_ratios, dtype=torch.float32)
        return MagCacheConfig(
            threshold=settings.mag_threshold, max_skip_steps=settings.max_skip_steps,
            retention_ratio=settings.retention_ratio, num_inference_steps=len(ratios), mag_ratios=ratios,
        )
    raise ValueError(f"unknown diffusers cache method {m!r}; expected one of {list(METHODS)}")


_NO_RATIOS = (
    "mag_cache needs the model's magnitude ratios (they depend on the checkpoint and the scheduler): measure "
    "them with the dagfusion.cache.MagCacheCalibrate node and link its mag_ratios output to the mag_ratios input"
)


def _apply_function(method: str) -> Any:
    import diffusers.hooks as hooks

    return {
        "first_block_cache": hooks.apply_first_block_cache,
        "pyramid_attention_broadcast": hooks.apply_pyramid_attention_broadcast,
        "faster_cache": hooks.apply_faster_cache,
        "taylorseer": hooks.apply_taylorseer_cache,
        "mag_cache": hooks.apply_mag_cache,
    }[method]


# --- leaving the module as it was -------------------------------------------------------------

_MISSING = object()


class _ModuleState:
    """What registering diffusers hooks changes on a module tree, recorded so it can be undone exactly."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.registries = {id(m) for m in inner.modules() if "_diffusers_hook" in vars(m)}
        self.forwards = {id(m) for m in inner.modules() if "forward" in vars(m)}
        self.cache_config = vars(inner).get("_cache_config", _MISSING)

    def restore(self) -> None:
        for module in self.inner.modules():
            attrs = vars(module)
            registry = attrs.get("_diffusers_hook")
            if registry is not None and not registry.hooks and id(module) not in self.registries:
                del attrs["_diffusers_hook"]
                registry = None
            if registry is None and "forward" in attrs and id(module) not in self.forwards:
                del attrs["forward"]  # a bound copy of the class's forward left by HookRegistry.remove_hook
            if registry is not None:
                registry._child_registries_cache = None
        attrs = vars(self.inner)
        if self.cache_config is _MISSING:
            attrs.pop("_cache_config", None)
        else:
            attrs["_cache_config"] = self.cache_config


def hooked_modules(module: Any) -> list[str]:
    """Names of the submodules of ``module`` (``""``: itself) that carry diffusers hooks."""
    return [name for name, m in unwrap_compiled(module).named_modules()
            if getattr(vars(m).get("_diffusers_hook"), "hooks", None)]


def _is_cache_mixin(inner: Any) -> bool:
    try:
        from diffusers.models.cache_utils import CacheMixin
    except ImportError:  # pragma: no cover - very old diffusers
        return False
    return isinstance(inner, CacheMixin)


@contextlib.contextmanager
def cache_context(inner: Any, name: str, **fields: Any) -> Iterator[None]:
    """The cache context diffusers' pipelines set around a denoiser call (``module.cache_context(name)``)."""
    try:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context
    except ImportError:  # pragma: no cover - diffusers before CacheContext: names only
        CacheContext = _set_cache_context = None  # noqa: N806
    if _is_cache_mixin(inner):
        with inner.cache_context(name, **fields) if CacheContext is not None else inner.cache_context(name):
            yield
        return
    if CacheContext is None:  # pragma: no cover
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(inner)
        registry._set_context(name)
        try:
            yield
        finally:
            registry._set_context(None)
        return
    _set_cache_context(inner, CacheContext(name, **fields))
    try:
        yield
    finally:
        _set_cache_context(inner, None)


# --- the patch --------------------------------------------------------------------------------

_SESSIONS = threading.local()


def _sessions() -> dict[tuple[int, int], _Session]:
    table = getattr(_SESSIONS, "table", None)
    if table is None:
        table = _SESSIONS.table = {}
    return table


@dataclass
class _Session:
    """One application of the patch to one module (from ``apply`` entry to exit)."""

    inner: Any
    config: Any
    clock: _Clock
    mag_head: Any = None
    base_ratios: Any = None


class DiffusersCachePatch(ModelPatch):
    """Run one of diffusers' cache hooks while sampling (see the module docstring).

    The patch holds only settings; hooks and their state exist only between ``apply`` entry and
    exit (one sampling run), so cached handles and clones never share cache state.
    """

    def __init__(self, settings: CacheSettings) -> None:
        if settings.method not in METHODS:
            raise ValueError(f"unknown diffusers cache method {settings.method!r}; expected one of {list(METHODS)}")
        self.settings = settings
        self.key = "dagfusion.cache.diffusers:" + json.dumps(
            {"method": settings.method, **settings.relevant()}, sort_keys=True, separators=(",", ":")
        )

    @contextlib.contextmanager
    def apply(self, module: Any) -> Iterator[Any]:
        from diffusers.hooks import HookRegistry

        inner = unwrap_compiled(module)
        method = self.settings.method
        check_supported(inner, method)
        present = hooked_modules(inner)
        ours = _all_hook_names()
        taken = [name for name in present if ours & set(vars(inner.get_submodule(name))["_diffusers_hook"].hooks)]
        if taken or (_is_cache_mixin(inner) and inner.is_cache_enabled):
            raise RuntimeError(
                f"a diffusers cache is already enabled on this {type(inner).__name__} (hooks on {taken[:3]}); "
                "a model takes one DiffusersCache patch at a time"
            )
        state = _ModuleState(inner)
        clock = _Clock()
        config = build_config(self.settings, clock)
        session = _Session(inner, config, clock)
        key = (id(self), id(inner))
        mixin = _is_cache_mixin(inner)
        try:
            if mixin:
                inner.enable_cache(config)
            else:
                _apply_function(method)(inner, config)
                HookRegistry.check_if_exists_or_initialize(inner).invalidate_child_registries_cache()
            if method == "mag_cache":
                session.mag_head = _find_hook(inner, _hook_names("mag_cache")[0])
                session.base_ratios = None if self.settings.calibrate else config.mag_ratios
            _sessions()[key] = session
            yield module
        finally:
            _sessions().pop(key, None)
            try:
                if mixin and inner.is_cache_enabled:
                    inner.disable_cache()
            finally:
                registry = vars(inner).get("_diffusers_hook") or HookRegistry.check_if_exists_or_initialize(inner)
                for name in _hook_names(method):
                    registry.remove_hook(name, recurse=True)
                state.restore()

    def begin(self, run: SamplingRun) -> StepHook:
        from diffusers.hooks import HookRegistry

        inner = unwrap_compiled(run.module)
        session = _sessions().get((id(self), id(inner)))
        if session is None:
            raise RuntimeError(
                "DiffusersCachePatch.begin() ran without apply() on the same module; sample the model with "
                "dagfusion's sampler, which applies the patch first"
            )
        # Fresh state for every run, even if the same hooks served a run before.
        HookRegistry.check_if_exists_or_initialize(inner).reset_stateful_hooks(recurse=True)
        session.clock.timestep = None
        config = session.config
        if self.settings.method == "mag_cache":
            if self.settings.calibrate:
                # One more than the run's steps: diffusers would clear (and print) the ratios after the last one.
                config.num_inference_steps = run.steps + 1
            else:
                from diffusers.hooks.mag_cache import nearest_interp

                config.num_inference_steps = run.steps
                base = session.base_ratios
                config.mag_ratios = base if len(base) == run.steps else nearest_interp(base, run.steps)
        return DiffusersCacheStep(self.settings, session, run)

    def __repr__(self) -> str:
        return f"DiffusersCachePatch({self.settings.method!r})"


def _find_hook(inner: Any, name: str) -> Any:
    for module in inner.modules():
        registry = vars(module).get("_diffusers_hook")
        if registry is not None and name in registry.hooks:
            return registry.hooks[name]
    return None


class DiffusersCacheStep(StepHook):
    """Per-run part: the timestep for diffusers' callbacks and the cache context around each call.

    Attributes:
        calls: Denoiser calls seen in this run.
        calibration: MagCache calibration mode only: the magnitude ratios measured so far.
    """

    def __init__(self, settings: CacheSettings, session: _Session, run: SamplingRun) -> None:
        self.settings = settings
        self.session = session
        self.calls = 0
        self.calibration: list[float] = []

    def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
        batches = tuple(call.batches)
        if self.settings.method == "faster_cache" and batches != ("uncond", "cond"):
            raise ValueError(
                "faster_cache approximates the unconditional half of classifier-free guidance, so it needs "
                f"guidance (guidance_scale > 1) with the unconditional half first; this call's batch is {batches}"
            )
        self.session.clock.timestep = float(call.step.timestep_value)
        name = "cond_uncond" if len(batches) > 1 else (batches[0] if batches else "cond")
        fields = {"step_index": call.step.index, "num_inference_steps": call.step.total,
                  "timestep": float(call.step.timestep_value), "sigma": call.step.sigma}
        with cache_context(self.session.inner, name, **fields):
            out = forward(call)
            head = self.session.mag_head
            if self.settings.calibrate and head is not None:
                self.calibration = [float(r) for r in head.state_manager.get_state().calibration_ratios]
        self.calls += 1
        return out

    def end(self) -> dict[str, Any]:
        """``{"method", "calls"}``, and ``calibration`` (MagCache's measured ratios) in calibration mode."""
        self.session.clock.timestep = None
        report: dict[str, Any] = {"method": self.settings.method, "calls": self.calls}
        if self.settings.calibrate:
            report["calibration"] = list(self.calibration)
        return report


# --- calibration (MagCache) -------------------------------------------------------------------


def calibrate_mag_ratios(model: Any, conditioning: Any, latent: Any, *, ctx: RunContext | None = None,
                         **sample_options: Any) -> list[float]:
    """MagCache's magnitude ratios for ``model``, measured with diffusers' ``calibrate=True`` mode.

    Runs one uncached sampling run (``sample_options`` as for
    :func:`~dagfusion.nodes.diffusion.sampling.sample`) and returns one ratio per step (the
    first is 1.0).
    """
    from dagfusion.nodes.diffusion.sampling import run_sampling

    check_supported(model.denoiser, "mag_cache")
    patch = DiffusersCachePatch(CacheSettings("mag_cache", calibrate=True))
    _, report = run_sampling(model.with_patch(patch), conditioning, latent, ctx=ctx, count_macs=False, **sample_options)
    ratios = report.patches.get(patch.key, {}).get("calibration")
    if not ratios:
        raise RuntimeError("MagCache calibration measured nothing: the denoiser's blocks never ran")
    return [float(r) for r in ratios]


# --- parsing ----------------------------------------------------------------------------------


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    """``"1.0, 0.98 1.02"`` -> ``(1.0, 0.98, 1.02)``; brackets are ignored (a pasted Python list works)."""
    values = []
    for part in text.replace("[", " ").replace("]", " ").replace(",", " ").split():
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(f"{what}: expected numbers separated by commas, got {part!r} in {text!r}") from None
    return tuple(values)


def parse_timestep_range(text: str) -> tuple[float, float] | None:
    """``""`` -> ``None`` (the method's default); ``"100, 800"`` -> ``(100.0, 800.0)``."""
    if not text.strip():
        return None
    values = parse_floats(text, "timestep_skip_range")
    if len(values) != 2 or not values[0] < values[1]:
        raise ValueError(
            f"timestep_skip_range: expected two timesteps 'low, high' with low < high (like '100, 800'), got {text!r}"
        )
    return (values[0], values[1])


def parse_mag_ratios(text: str) -> tuple[float, ...]:
    values = parse_floats(text, "mag_ratios")
    bad = [v for v in values if not v > 0]
    if bad:
        raise ValueError(f"mag_ratios must be positive magnitude ratios, got {bad[:3]}")
    return values


# --- the nodes --------------------------------------------------------------------------------


def _example_pab_unet() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.sd_handles()["model"], "method": "pyramid_attention_broadcast"}


def _example_fbc_pixart() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.pixart_handles()["model"], "method": "first_block_cache", "threshold": 0.1}


def _example_mag_pixart() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.pixart_handles()["model"], "method": "mag_cache", "mag_ratios": "1.0, 0.94, 1.01, 1.0, 0.99, 1.01"}


@node(
    "dagfusion.cache.DiffusersCache",
    version="1.0.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="The denoiser to speed up (UNet, DiT or PixArt)."),
        Input("method", STRING, "first_block_cache", choices=METHODS,
              description="Which diffusers cache: first_block_cache (DiT, PixArt), pyramid_attention_broadcast "
                          "(all), faster_cache (PixArt, needs guidance), taylorseer (all), mag_cache (DiT, PixArt; "
                          "needs mag_ratios)."),
        Input("threshold", FLOAT, 0.05, min=0.0, max=10.0,
              description="first_block_cache: skip the remaining blocks while the first block's output changed by "
                          "less than this (relative mean difference) since it last ran in full; 0.05-0.2 typical, "
                          "higher is faster."),
        Input("spatial_attention_block_skip_range", INT, 2, min=0, max=100,
              description="pyramid_attention_broadcast, faster_cache: compute self-attention every N-th call and "
                          "reuse it in between (0 = never skip)."),
        Input("cross_attention_block_skip_range", INT, 6, min=0, max=100,
              description="pyramid_attention_broadcast: compute cross-attention every N-th call (0 = never skip)."),
        Input("timestep_skip_range", STRING, "",
              description="pyramid_attention_broadcast, faster_cache: 'low, high' - attention (and FasterCache's "
                          "unconditional half) is reused only at timesteps strictly between them; empty = diffusers' "
                          "defaults (PAB 100, 800; FasterCache -1, 681 for attention and -1, 641 for the "
                          "unconditional half)."),
        Input("unconditional_batch_skip_range", INT, 5, min=1, max=100,
              description="faster_cache: compute the unconditional half of guidance every N-th step and "
                          "approximate it from the conditional half in between (1 = never skip)."),
        Input("cache_interval", INT, 5, min=1, max=100,
              description="taylorseer: after each full computation, predict the cached modules for this many "
                          "steps minus one before computing again."),
        Input("max_order", INT, 1, min=0, max=4,
              description="taylorseer: order of the Taylor expansion (0 reuses features, 1 extrapolates linearly)."),
        Input("disable_cache_before_step", INT, 3, min=1, max=1000,
              description="taylorseer: the first steps that always compute (they give the expansion its "
                          "differences)."),
        Input("mag_threshold", FLOAT, 0.06, min=0.0, max=10.0,
              description="mag_cache: skip the blocks while the accumulated magnitude error stays below this; "
                          "higher is faster."),
        Input("max_skip_steps", INT, 3, min=1, max=100,
              description="mag_cache: at most this many consecutive steps skip the blocks."),
        Input("retention_ratio", FLOAT, 0.2, min=0.0, max=1.0,
              description="mag_cache: the first fraction of the steps never skips."),
        Input("mag_ratios", STRING, "",
              description="mag_cache: the model's magnitude ratios, comma-separated, one per step (resampled to the "
                          "run's step count); link dagfusion.cache.MagCacheCalibrate's output here."),
    ],
    outputs=[Output("model", MODEL, "The model with the diffusers cache applied while sampling.")],
    examples=[_example_pab_unet, _example_fbc_pixart, _example_mag_pixart],
    ui={"color": "#26a69a"},
)
def diffusers_cache(
    ctx: RunContext,
    model: Any,
    method: str,
    threshold: float,
    spatial_attention_block_skip_range: int,
    cross_attention_block_skip_range: int,
    timestep_skip_range: str,
    unconditional_batch_skip_range: int,
    cache_interval: int,
    max_order: int,
    disable_cache_before_step: int,
    mag_threshold: float,
    max_skip_steps: int,
    retention_ratio: float,
    mag_ratios: str,
) -> Any:
    """Speed up sampling with one of diffusers' own cache hooks (First Block Cache, PAB, FasterCache, TaylorSeer, MagCache).

    The hooks are diffusers' (diffusers.hooks); they are registered on the denoiser only while a
    sampler runs and removed afterwards, with fresh cache state every run. Only the inputs of the
    chosen method matter. Not every method fits every model: the error names the ones that do.
    Compare against the plain model with the same seed (dagfusion.metrics.Fidelity).
    """
    check_supported(model.denoiser, method)
    ratios: tuple[float, ...] = ()
    if method == "mag_cache":
        ratios = parse_mag_ratios(mag_ratios)
        if not ratios:
            raise ValueError(_NO_RATIOS)
    if method == "pyramid_attention_broadcast" and not (spatial_attention_block_skip_range or cross_attention_block_skip_range):
        raise ValueError(
            "pyramid_attention_broadcast with spatial_attention_block_skip_range and cross_attention_block_skip_range "
            "both 0 would skip nothing; set one of them to 2 or more"
        )
    settings = CacheSettings(
        method=method, threshold=threshold,
        spatial_attention_block_skip_range=spatial_attention_block_skip_range,
        cross_attention_block_skip_range=cross_attention_block_skip_range,
        timestep_range=parse_timestep_range(timestep_skip_range),
        unconditional_batch_skip_range=unconditional_batch_skip_range,
        cache_interval=cache_interval, max_order=max_order, disable_cache_before_step=disable_cache_before_step,
        mag_threshold=mag_threshold, max_skip_steps=max_skip_steps, retention_ratio=retention_ratio,
        mag_ratios=ratios,
    )
    return model.with_patch(DiffusersCachePatch(settings))


def _example_calibrate() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {**tiny.pixart_handles(), "steps": 3,
            "guidance_scale": 4.0, "sampler": "euler", "seed": 1}


@node(
    "dagfusion.cache.MagCacheCalibrate",
    version="1.0.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="The DiT or PixArt model to measure (unpatched)."),
        Input("conditioning", CONDITIONING, link_only=True, description="A typical prompt or class conditioning."),
        Input("latent", LATENT, link_only=True, description="A latent of the size you will sample (only its shape counts)."),
        Input("sampler", STRING, "default", choices=SAMPLER_CHOICES,
              description="The sampler you will use with the cache (the ratios depend on it)."),
        Input("steps", INT, 20, min=2, max=1000, description="The step count you will use (other counts are resampled)."),
        Input("guidance_scale", FLOAT, 7.5, min=0.0, max=100.0, description="Guidance scale, as you will sample."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed of the calibration run's noise."),
    ],
    outputs=[Output("mag_ratios", STRING, "One magnitude ratio per step, comma-separated, for DiffusersCache's mag_ratios.")],
    examples=[_example_calibrate],
    ui={"color": "#26a69a"},
)
def mag_cache_calibrate(
    ctx: RunContext, model: Any, conditioning: Any, latent: Any, sampler: str, steps: int,
    guidance_scale: float, seed: int,
) -> str:
    """Measure MagCache's magnitude ratios for a model with diffusers' calibration mode (one full sampling run).

    MagCache decides which steps may skip the transformer blocks from how the blocks' residual
    shrinks or grows from step to step — a property of the checkpoint and the scheduler. This
    node samples once without skipping, records the ratios and outputs them for the
    ``mag_ratios`` input of dagfusion.cache.DiffusersCache (method mag_cache).
    """
    ratios = calibrate_mag_ratios(model, conditioning, latent, ctx=ctx, sampler=sampler, steps=steps,
                                  guidance_scale=guidance_scale, seed=seed)
    return ", ".join(f"{r:.5f}" for r in ratios)


NODES = (diffusers_cache, mag_cache_calibrate)
"""The nodes of this module."""
