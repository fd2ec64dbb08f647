"""Plugin discovery: a plugin-manager factory, entry-point loading, allow/block lists.

Nothing is loaded at import time. :func:`make_plugin_manager` builds a fresh
:class:`pluggy.PluginManager` each call, registers the built-in node packs, then loads the
``dagfusion`` entry points of the installed distributions, honouring:

- ``DAGFUSION_PLUGINS`` — comma-separated allow list of entry-point or distribution names;
  when set, only those third-party plugins load;
- ``DAGFUSION_DISABLE_PLUGINS`` — comma-separated block list (also blocks built-in packs by
  their short name, e.g. ``basic``).

A plugin that fails to import is recorded as a :class:`PluginLoadFailure` (name, distribution,
traceback) and reported; the others still load.
"""

from __future__ import annotations

import importlib
import os
import traceback
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from dagfusion import hookspecs
from dagfusion.errors import PluginError
from dagfusion.hookspecs import PROJECT, hookimpl
from dagfusion.types import CORE_TYPES

ENTRY_POINT_GROUP = "dagfusion"
BUILTIN_PREFIX = "dagfusion.builtin."


@dataclass(frozen=True)
class PluginInfo:
    """One plugin the manager knows: its name, distribution and version, and its state."""

    name: str
    distribution: str | None
    version: str | None
    status: str  # "loaded", "failed", "blocked"
    error: str | None = None


@dataclass(frozen=True)
class PluginLoadFailure:
    """A plugin that could not be imported: the entry point, its distribution, the traceback."""

    name: str
    distribution: str | None
    traceback: str

    def __str__(self) -> str:
        dist = f" (distribution {self.distribution})" if self.distribution else ""
        return f"plugin {self.name!r}{dist} failed to load:\n{self.traceback}"


class _CoreTypesPlugin:
    """Registers the core socket types (ANY, INT, FLOAT, …) through the ordinary hook."""

    @hookimpl
    def register_types(self, register: Any) -> None:
        for socket_type in CORE_TYPES:
            register(socket_type)


class DagfusionPluginManager(pluggy.PluginManager):
    """A :class:`pluggy.PluginManager` that also remembers load failures and blocked plugins."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.add_hookspecs(hookspecs)
        self.load_failures: list[PluginLoadFailure] = []
        self.blocked: list[str] = []
        self.distributions: dict[str, tuple[str, str]] = {}

    def plugin_infos(self) -> list[PluginInfo]:
        """Every plugin, loaded, failed or blocked, in load order."""
        infos = []
        for name, plugin in self.list_name_plugin():
            if name is None or plugin is None:
                continue
            dist, version = self.distributions.get(name, (None, None))
            if name.startswith(BUILTIN_PREFIX):
                from dagfusion import __version__

                dist, version = "dagfusion", __version__
            infos.append(PluginInfo(name, dist, version, "loaded"))
        for failure in self.load_failures:
            infos.append(PluginInfo(failure.name, failure.distribution, None, "failed", failure.traceback))
        for name in self.blocked:
            infos.append(PluginInfo(name, None, None, "blocked"))
        return infos


def _names(raw: str | None) -> set[str]:
    return {part.strip() for part in (raw or "").split(",") if part.strip()}


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
    pm.register(_CoreTypesPlugin(), name=BUILTIN_PREFIX + "core")
    if include_builtins:
        for short, module_path in builtin_plugin_modules().items():
            if short in block:
                pm.blocked.append(BUILTIN_PREFIX + short)
                continue
            _register_checked(pm, importlib.import_module(module_path), BUILTIN_PREFIX + short)
    if load_entrypoints:
        _load_entry_points(pm, allow, block)
    for name, plugin in extra_plugins:
        _register_checked(pm, plugin, name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc
    return pm


def _register_checked(pm: DagfusionPluginManager, plugin: object, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name!r} has an invalid hook implementation: {exc}") from exc
    except ValueError as exc:  # already registered under that name or as another plugin
        raise PluginError(f"plugin {name!r} cannot be registered: {exc}") from exc


def _load_entry_points(pm: DagfusionPluginManager, allow: set[str], block: set[str]) -> None:
    seen: set[str] = set()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in seen:
            continue
        seen.add(ep.name)
        dist_name = ep.dist.name if ep.dist is not None else None
        dist_version = ep.dist.version if ep.dist is not None else None
        names = {ep.name, dist_name} - {None}
        if names & block or (allow and not names & allow):
            pm.blocked.append(ep.name)
            continue
        if pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception:  # a broken plugin must not take the others down
            failure = PluginLoadFailure(ep.name, dist_name, traceback.format_exc())
            pm.load_failures.append(failure)
            warnings.warn(str(failure), RuntimeWarning, stacklevel=2)
            continue
        try:
            _register_checked(pm, plugin, ep.name)
        except PluginError as exc:
            pm.load_failures.append(PluginLoadFailure(ep.name, dist_name, str(exc)))
            warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
            continue
        if dist_name is not None:
            pm.distributions[ep.name] = (dist_name, dist_version or "")
