"""The patch that runs a diffusers cache hook during one sampling run, and leaves the module as it was."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dagfusion import RunContext
from dagfusion.model import DenoiserCall, Forward, ModelPatch, SamplingRun, StepHook, unwrap_compiled
from dagfusion.nodes.cache.diffusers_caches.config import CacheSettings, Clock, apply_function, build_config
from dagfusion.nodes.cache.diffusers_caches.support import METHODS, all_hook_names, check_supported, hook_names

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
    clock: Clock
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
        ours = all_hook_names()
        taken = [name for name in present if ours & set(vars(inner.get_submodule(name))["_diffusers_hook"].hooks)]
        if taken or (_is_cache_mixin(inner) and inner.is_cache_enabled):
            raise RuntimeError(
                f"a diffusers cache is already enabled on this {type(inner).__name__} (hooks on {taken[:3]}); "
                "a model takes one DiffusersCache patch at a time"
            )
        state = _ModuleState(inner)
        clock = Clock()
        config = build_config(self.settings, clock)
        session = _Session(inner, config, clock)
        key = (id(self), id(inner))
        mixin = _is_cache_mixin(inner)
        try:
            if mixin:
                inner.enable_cache(config)
            else:
                apply_function(method)(inner, config)
                HookRegistry.check_if_exists_or_initialize(inner).invalidate_child_registries_cache()
            if method == "mag_cache":
                session.mag_head = _find_hook(inner, hook_names("mag_cache")[0])
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
                for name in hook_names(method):
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

