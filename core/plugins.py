"""Plugin discovery: a plugin-manager factory, entry-point loading, allow/block lists, isolation.

Nothing is loaded at import time. :func:`make_plugin_manager` builds a fresh
:class:`pluggy.PluginManager` each call, registers the built-in node packs, then loads the
``dagfusion`` entry points of the installed distributions, honouring:

- ``DAGFUSION_PLUGINS`` — comma-separated allow list of entry-point or distribution names;
  when set, only those third-party plugins load;
- ``DAGFUSION_DISABLE_PLUGINS`` — comma-separated block list (also blocks built-in packs by
  their short name, e.g. ``basic``).

Third-party plugins (entry points and ``extra_plugins``) are isolated: one that fails to import,
implements an unknown hook or has an invalid hook implementation is *disabled* — recorded as a
:class:`PluginLoadFailure` (name, distribution, version, one-line reason, traceback where there
is one) and warned about with a :class:`PluginWarning` — and everything else still loads. The
registry disables plugins the same way for what they register (see
:class:`~dagfusion.registry.Registry`). Built-in packs are part of dagfusion: their failures are
errors, never disabled.

Run-lifecycle hook implementations (:data:`~dagfusion.hookspecs.LIFECYCLE_HOOKS`) are guarded:
an exception one raises reaches the caller as a :class:`~dagfusion.PluginError` naming the plugin.
"""

from __future__ import annotations

import functools
import importlib
import os
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from dagfusion import hookspecs
from dagfusion.errors import PluginError, RunCancelled, did_you_mean
from dagfusion.hookspecs import LIFECYCLE_HOOKS, PROJECT, hookimpl
from dagfusion.types import CORE_TYPES

ENTRY_POINT_GROUP = "dagfusion"
BUILTIN_PREFIX = "dagfusion.builtin."


class PluginWarning(RuntimeWarning):
    """Warned once for each plugin that is disabled (its message is the failure's summary)."""


@dataclass(frozen=True)
class PluginInfo:
    """One plugin the manager knows: its name, distribution and version, and its state.

    ``error`` is the one-line reason a failed plugin was disabled, ``detail`` its traceback
    when the failure was an exception.
    """

    name: str
    distribution: str | None
    version: str | None
    status: str  # "loaded", "failed", "blocked"
    error: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class PluginLoadFailure:
    """A disabled plugin: its name, distribution and version (where known), why, and the traceback
    of the exception that disabled it (``None`` when the reason says it all)."""

    name: str
    distribution: str | None
    version: str | None
    reason: str
    traceback: str | None = None

    def summary(self) -> str:
        """``plugin 'x' (dist 1.2) disabled: reason`` on one line."""
        return f"{plugin_label(self.name, self.distribution, self.version)} disabled: {self.reason}"

    def __str__(self) -> str:
        return self.summary()


def plugin_label(name: str, distribution: str | None = None, version: str | None = None) -> str:
    """How messages name a plugin: ``plugin 'x' (dist 1.2)``, or ``plugin 'x'`` without a distribution."""
    if not distribution:
        return f"plugin {name!r}"
    return f"plugin {name!r} ({distribution} {version})" if version else f"plugin {name!r} ({distribution})"


class _CoreTypesPlugin:
    """Registers the core socket types (ANY, INT, FLOAT, …) through the ordinary hook."""

    @hookimpl
    def register_types(self, register: Any) -> None:
        for socket_type in CORE_TYPES:
            register(socket_type)


class DagfusionPluginManager(pluggy.PluginManager):
    """A :class:`pluggy.PluginManager` that also remembers disabled and blocked plugins and the
    distribution of each entry-point plugin, and guards run-lifecycle hooks."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.add_hookspecs(hookspecs)
        self.load_failures: list[PluginLoadFailure] = []
        self.blocked: list[str] = []
        self.distributions: dict[str, tuple[str, str]] = {}

    # --- registering --------------------------------------------------------------------

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register ``plugin`` as pluggy does; its run-lifecycle hook implementations are wrapped
        so that an exception they raise becomes a :class:`PluginError` naming the plugin."""
        plugin_name = super().register(plugin, name)
        if plugin_name is not None:
            self._guard_lifecycle_hooks(plugin)
        return plugin_name

    def _guard_lifecycle_hooks(self, plugin: object) -> None:
        for hook_name in LIFECYCLE_HOOKS:
            for impl in getattr(self.hook, hook_name).get_hookimpls():
                if impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper):
                    impl.function = self._guarded(hook_name, impl.plugin_name, impl.function)

    def _guarded(self, hook_name: str, plugin_name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def call(*args: Any) -> Any:
            try:
                return function(*args)
            except RunCancelled:
                raise
            except Exception as exc:
                raise PluginError(
                    f"{self.describe(plugin_name)} failed in {hook_name}: {type(exc).__name__}: {exc}"
                ) from exc

        return call

    def hook_names(self) -> list[str]:
        """The names of the hooks dagfusion specifies."""
        return sorted(name for name, caller in vars(self.hook).items() if caller.has_spec())

    def unknown_hooks(self, plugin: object) -> list[str]:
        """Hooks ``plugin`` implements that dagfusion does not specify (optional hooks aside)."""
        return sorted(
            caller.name
            for caller in self.get_hookcallers(plugin) or []
            if not caller.has_spec()
            and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
        )

    # --- failures -----------------------------------------------------------------------

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` is one of dagfusion's own packs (whose failures are errors, never disabled)."""
        return name.startswith(BUILTIN_PREFIX)

    def distribution_of(self, name: str) -> tuple[str | None, str | None]:
        """``(distribution, version)`` of a registered plugin, ``(None, None)`` when unknown."""
        if self.is_builtin(name):
            from dagfusion import __version__

            return "dagfusion", __version__
        return self.distributions.get(name, (None, None))

    def describe(self, name: str) -> str:
        """The plugin as messages name it: ``plugin 'x' (dist 1.2)``."""
        return plugin_label(name, *self.distribution_of(name))

    def record_failure(self, failure: PluginLoadFailure) -> None:
        """Remember a disabled plugin and warn about it (:class:`PluginWarning`)."""
        self.load_failures.append(failure)
        warnings.warn(failure.summary(), PluginWarning, stacklevel=3)

    def disable(self, name: str, reason: str, detail: str | None = None) -> PluginLoadFailure:
        """Unregister plugin ``name`` (its hooks stop being called) and record why.

        A built-in pack is never disabled: its failure is a bug in dagfusion, raised as
        :class:`PluginError`.
        """
        if self.is_builtin(name):
            raise PluginError(f"{self.describe(name)}: {reason}")
        failure = PluginLoadFailure(name, *self.distribution_of(name), reason, detail)
        if self.has_plugin(name):
            self.unregister(name=name)
        self.record_failure(failure)
        return failure

    def failure_report(self) -> str:
        """Every disabled plugin's summary, one per line (empty when none failed)."""
        if not self.load_failures:
            return ""
        count = len(self.load_failures)
        lines = [f"{count} plugin{'s' if count != 1 else ''} failed:"]
        lines += [f"  - {failure.summary()}" for failure in self.load_failures]
        return "\n".join(lines)

    def raise_for_failures(self) -> None:
        """Raise :class:`PluginError` listing every disabled plugin, if any was."""
        if self.load_failures:
            raise PluginError(self.failure_report())

    def plugin_infos(self) -> list[PluginInfo]:
        """Every plugin, loaded, failed or blocked, in load order."""
        infos = []
        for name, plugin in self.list_name_plugin():
            if name is None or plugin is None:
                continue
            infos.append(PluginInfo(name, *self.distribution_of(name), "loaded"))
        for failure in self.load_failures:
            infos.append(
                PluginInfo(failure.name, failure.distribution, failure.version, "failed", failure.reason, failure.traceback)
            )
        for name in self.blocked:
            infos.append(PluginInfo(name, None, None, "blocked"))
        return infos


def _names(raw: str | None) -> set[str]:
    return {part.strip() for part in (raw or "").split(",") if part.strip()}


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def builtin_plugin_modules() -> Mapping[str, str]:
    """Short name → module path of the built-in node packs."""
    from dagfusion.nodes import BUILTIN_PLUGINS

    return BUILTIN_PLUGINS


def make_plugin_manager(
    *,
    load_entrypoints: bool = True,
    extra_plugins: Iterable[tuple[str, object]] = (),
    environ: Mapping[str, str] | None = None,
    include_builtins: bool = True,
) -> DagfusionPluginManager:
    """A new plugin manager with built-in packs, entry-point plugins and ``extra_plugins``.

    Third-party plugins are isolated: one that cannot be imported or registered is disabled
    (see :attr:`DagfusionPluginManager.load_failures`) and the others load. A built-in pack that
    cannot be registered raises :class:`PluginError`.

    :param load_entrypoints: Load third-party plugins from installed distributions.
    :param extra_plugins: ``(name, plugin)`` pairs registered after everything else (tests,
        notebooks); ``plugin`` is a module or object with hook implementations.
    :param environ: Environment to read the allow/block lists from (default ``os.environ``).
    :param include_builtins: Register dagfusion's own node packs.
    """
    env = os.environ if environ is None else environ
    allow = _names(env.get("DAGFUSION_PLUGINS"))
    block = _names(env.get("DAGFUSION_DISABLE_PLUGINS"))
    pm = DagfusionPluginManager()
    _register_builtin(pm, _CoreTypesPlugin(), BUILTIN_PREFIX + "core")
    if include_builtins:
        for short, module_path in builtin_plugin_modules().items():
            if short in block:
                pm.blocked.append(BUILTIN_PREFIX + short)
                continue
            _register_builtin(pm, importlib.import_module(module_path), BUILTIN_PREFIX + short)
    if load_entrypoints:
        _load_entry_points(pm, allow, block)
    for name, plugin in extra_plugins:
        _register_third_party(pm, plugin, name, None)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:  # only reachable through a bug: each plugin was checked
        raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc
    return pm


def _register_builtin(pm: DagfusionPluginManager, plugin: object, name: str) -> None:
    """Register one of dagfusion's own packs; any problem is a :class:`PluginError`."""
    reason = _try_register(pm, plugin, name)
    if reason is not None:
        raise PluginError(f"{pm.describe(name)}: {reason}")


def _register_third_party(
    pm: DagfusionPluginManager, plugin: object, name: str, dist: tuple[str, str] | None
) -> None:
    """Register a plugin, or disable it with the reason; never raises for the plugin's faults."""
    reason = _try_register(pm, plugin, name)
    if reason is not None:
        pm.record_failure(PluginLoadFailure(name, *(dist or (None, None)), reason))
    elif dist is not None:
        pm.distributions[name] = dist


def _try_register(pm: DagfusionPluginManager, plugin: object, name: str) -> str | None:
    """Register ``plugin`` as ``name``; on failure leave the manager as it was and return why."""
    if pm.has_plugin(name):
        return f"another plugin is already registered under the name {name!r}"
    other = pm.get_name(plugin)
    if other is not None:
        return f"the same object is already registered as plugin {other!r}"
    try:
        pm.register(plugin, name=name)
    except Exception as exc:
        if pm.has_plugin(name):  # older pluggy releases register before validating
            pm.unregister(name=name)
        if isinstance(exc, pluggy.PluginValidationError):
            return f"invalid hook implementation: {_one_line(str(exc))}"
        return f"cannot be registered: {type(exc).__name__}: {_one_line(str(exc))}"
    unknown = pm.unknown_hooks(plugin)
    if unknown:
        pm.unregister(plugin=plugin, name=name)
        return "; ".join(f"implements unknown hook {h!r}{did_you_mean(h, pm.hook_names())}" for h in unknown)
    return None


def _entry_point_distribution(ep: EntryPoint) -> tuple[str, str] | None:
    """``(name, version)`` of the distribution that declares ``ep``, where known."""
    dist = getattr(ep, "dist", None)
    if dist is None or not dist.name:
        return None
    return dist.name, dist.version


def _load_entry_points(pm: DagfusionPluginManager, allow: set[str], block: set[str]) -> None:
    seen: set[str] = set()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in seen:
            continue
        seen.add(ep.name)
        dist = _entry_point_distribution(ep)
        names = {ep.name, dist[0] if dist else None} - {None}
        if names & block or (allow and not names & allow):
            pm.blocked.append(ep.name)
            continue
        _load_entry_point(pm, ep, dist)


def _load_entry_point(pm: DagfusionPluginManager, ep: EntryPoint, dist: tuple[str, str] | None) -> None:
    """Import one entry point and register it; an import failure disables it."""
    try:
        plugin = ep.load()
    except Exception as exc:  # a broken plugin must not take the others down
        reason = f"import failed: {type(exc).__name__}: {exc}"
        pm.record_failure(PluginLoadFailure(ep.name, *(dist or (None, None)), reason, traceback.format_exc()))
        return
    _register_third_party(pm, plugin, ep.name, dist)
