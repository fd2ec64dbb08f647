"""The registry: every socket type and node type the loaded plugins provide, and who provided it.

Built from a plugin manager by calling each plugin's ``register_types`` hook, then each
``register_nodes`` hook, one plugin at a time, and only then checking what each offered. A
plugin is all or nothing: one whose hook raises, that registers something that is not a
socket type or node spec, claims a type name or node type id an earlier plugin claimed (built-in
packs come first), or uses socket types nobody registered is *disabled* — unregistered from the
plugin manager and recorded in its ``load_failures`` — and nothing it registered is kept. All
other plugins still load. The registry is an ordinary object: make one with
:meth:`Registry.from_plugins` (or :func:`dagfusion.default_registry` for the process-wide
default, built lazily on first use).
"""

from __future__ import annotations

import copy
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dagfusion.errors import PluginError
from dagfusion.node import NodeSpec
from dagfusion.plugins import DagfusionPluginManager, PluginWarning, make_plugin_manager
from dagfusion.types import SocketType, TypeSystem, UnionType


@dataclass
class _Offer:
    """What one plugin's registration hooks handed over, before any of it is accepted."""

    plugin: str
    types: list[SocketType] = field(default_factory=list)
    nodes: list[NodeSpec] = field(default_factory=list)
    families: list[Any] = field(default_factory=list)
    adapters: list[Any] = field(default_factory=list)
    problem: str | None = None
    detail: str | None = None

    def fail(self, problem: str, detail: str | None = None) -> None:
        """Remember the first problem found while calling this plugin's hooks."""
        if self.problem is None:
            self.problem, self.detail = problem, detail


class Registry:
    """Socket types and node specs, with the plugin each came from."""

    def __init__(self, plugin_manager: DagfusionPluginManager) -> None:
        self.plugin_manager = plugin_manager
        self.types = TypeSystem()
        self._type_origin: dict[str, str] = {}
        self._nodes: dict[str, NodeSpec] = {}
        self._node_origin: dict[str, str] = {}
        self._former: dict[str, str] = {}
        self._collect()

    @classmethod
    def from_plugins(
        cls,
        *,
        load_entrypoints: bool = True,
        extra_plugins: Iterable[tuple[str, object]] = (),
        include_builtins: bool = True,
        environ: dict[str, str] | None = None,
        strict: bool = False,
    ) -> Registry:
        """A registry over a fresh plugin manager (see :func:`~dagfusion.plugins.make_plugin_manager`).

        A plugin that fails is disabled, warned about (:class:`~dagfusion.plugins.PluginWarning`)
        and listed in ``plugin_manager.load_failures``; with ``strict``, any such failure raises
        :class:`PluginError` listing them all instead (and nothing is warned).
        """
        with warnings.catch_warnings():
            if strict:
                warnings.simplefilter("ignore", PluginWarning)
            pm = make_plugin_manager(
                load_entrypoints=load_entrypoints,
                extra_plugins=extra_plugins,
                include_builtins=include_builtins,
                environ=environ,
            )
            registry = cls(pm)
        if strict:
            pm.raise_for_failures()
        return registry

    # --- building ---------------------------------------------------------------------

    def _collect(self) -> None:
        """Call every plugin's registration hooks, then keep what the healthy plugins offered."""
        candidates = []
        for offer in self._gather_offers():
            if offer.problem is None:
                candidates.append(offer)
            else:
                self.plugin_manager.disable(offer.plugin, offer.problem, offer.detail)
        while True:
            accepted, clashes = _claim(candidates, self.plugin_manager.describe)
            broken = self._resolve(accepted)
            if broken is None:
                break
            offer, problem = broken
            self.plugin_manager.disable(offer.plugin, problem)
            candidates.remove(offer)
        for offer, problem in clashes:
            self.plugin_manager.disable(offer.plugin, problem)
        _install_families_and_adapters(accepted)

    def _gather_offers(self) -> list[_Offer]:
        """One offer per registered plugin, in registration order: types first, then nodes."""
        offers = {name: _Offer(name) for name, plugin in self.plugin_manager.list_name_plugin() if plugin is not None}
        self._call_each("register_types", offers, _type_register)
        self._call_each("register_nodes", offers, _node_register)
        self._call_each("register_denoiser_families", offers, _family_register)
        self._call_each("register_data_adapters", offers, _adapter_register)
        return list(offers.values())

    def _call_each(
        self, hook_name: str, offers: dict[str, _Offer], make_register: Callable[[_Offer, str], Callable[[Any], None]]
    ) -> None:
        """Call one registration hook of each plugin in turn, recording into that plugin's offer.

        A third-party plugin's exception is recorded as its problem; a built-in pack's propagates.
        """
        hook = getattr(self.plugin_manager.hook, hook_name)
        for impl in hook.get_hookimpls():
            offer = offers[impl.plugin_name]
            if offer.problem is not None:
                continue
            register = make_register(offer, self.plugin_manager.describe(offer.plugin))
            try:
                impl.function(**{name: register for name in impl.argnames if name == "register"})
            except Exception as exc:
                if self.plugin_manager.is_builtin(offer.plugin):
                    raise
                offer.fail(f"{hook_name} raised {type(exc).__name__}: {exc}", traceback.format_exc())

    def _resolve(self, offers: list[_Offer]) -> tuple[_Offer, str] | None:
        """Build the types and nodes from ``offers`` (their claims do not clash); the first plugin
        whose types or nodes cannot be resolved, and why, or ``None`` when all could."""
        self.types = TypeSystem()
        self._type_origin = {t.name: o.plugin for o in offers for t in o.types}
        self._nodes, self._node_origin, self._former = {}, {}, {}
        stuck = self._add_types(offers)
        if stuck is not None:
            return stuck
        for offer in offers:
            for spec in offer.nodes:
                unknown = sorted({n for s in (*spec.inputs, *spec.outputs) for n in self.types.unknown_names(s.type)})
                if unknown:
                    return offer, f"node type {spec.type_id} uses unregistered socket types {unknown}"
                self._nodes[spec.type_id] = spec
                self._node_origin[spec.type_id] = offer.plugin
        self._former = _former_ids(self._nodes)
        return None

    def _add_types(self, offers: list[_Offer]) -> tuple[_Offer, str] | None:
        """Add types parents-first, whatever order the plugins registered them in; the first plugin
        with a type whose parents never appear, and why, or ``None``."""
        remaining = [(o, t) for o in offers for t in o.types]
        while remaining:
            ready = [(o, t) for o, t in remaining if all(parent in self.types for parent in t.parents)]
            if not ready:
                offer, socket_type = remaining[0]
                missing = [parent for parent in socket_type.parents if parent not in self.types]
                return offer, f"socket type {socket_type.name} names unknown parent types {missing}"
            for item in ready:
                self.types.add(item[1])
                remaining.remove(item)
        return None

    def _describe(self, plugin_name: str) -> str:
        return self.plugin_manager.describe(plugin_name)

    # --- queries ----------------------------------------------------------------------

    def __contains__(self, type_id: object) -> bool:
        return type_id in self._nodes

    def __iter__(self) -> Iterator[NodeSpec]:
        return iter(self._nodes.values())

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, type_id: str) -> NodeSpec | None:
        """The node type ``type_id`` names: a current id, or the former id of a renamed node."""
        spec = self._nodes.get(type_id)
        if spec is None and type_id in self._former:
            spec = self._nodes[self._former[type_id]]
        return spec

    def node_types(self) -> list[str]:
        return sorted(self._nodes)

    def origin(self, type_id: str) -> str:
        """The plugin name that registered a node type (or socket type)."""
        return self._node_origin.get(type_id) or self._type_origin[type_id]

    def origin_description(self, type_id: str) -> str:
        return self._describe(self.origin(type_id))

    def nodes_of(self, plugin_name: str) -> list[NodeSpec]:
        return [s for t, s in self._nodes.items() if self._node_origin[t] == plugin_name]

    def types_of(self, plugin_name: str) -> list[SocketType]:
        return [t for t in self.types if self._type_origin[t.name] == plugin_name]

    def resolve_type(self, t: SocketType | UnionType | str) -> SocketType | UnionType:
        """The registered type object for a type reference."""
        if isinstance(t, UnionType):
            return t
        return self.types.get(t if isinstance(t, str) else t.name)

    def with_nodes(self, specs: Iterable[NodeSpec], plugin_name: str) -> Registry:
        """A copy that also knows ``specs``, attributed to ``plugin_name`` (types, plugins and
        hooks are shared with this registry); for tools and tests that add nodes on the fly."""
        derived = copy.copy(self)
        derived._nodes = dict(self._nodes)
        derived._node_origin = dict(self._node_origin)
        for spec in specs:
            derived._nodes[spec.type_id] = spec
            derived._node_origin[spec.type_id] = plugin_name
        derived._former = _former_ids(derived._nodes)
        return derived

    @property
    def hook(self) -> Any:
        """The plugin manager's hook relay (lifecycle hooks)."""
        return self.plugin_manager.hook


def _former_ids(nodes: dict[str, NodeSpec]) -> dict[str, str]:
    """Former type id → current id of every renamed node; a current id always wins over a former one."""
    return {former: spec.type_id for spec in nodes.values() for former in spec.former_ids if former not in nodes}


def _type_register(offer: _Offer, who: str) -> Callable[[SocketType], None]:
    """The ``register`` a plugin's ``register_types`` receives."""

    def register(socket_type: SocketType) -> None:
        if not isinstance(socket_type, SocketType):
            offer.fail(f"registered {socket_type!r}, which is not a SocketType")
            raise PluginError(f"{who} registered {socket_type!r}, which is not a SocketType")
        offer.types.append(socket_type)

    return register


def _node_register(offer: _Offer, who: str) -> Callable[[NodeSpec], None]:
    """The ``register`` a plugin's ``register_nodes`` receives."""

    def register(spec: NodeSpec) -> None:
        if not isinstance(spec, NodeSpec):
            offer.fail(f"registered {spec!r}, which is not a NodeSpec (decorate the function with @dagfusion.node)")
            raise PluginError(f"{who} registered {spec!r}, which is not a NodeSpec")
        offer.nodes.append(spec)

    return register


def _family_register(offer: _Offer, who: str) -> Callable[[Any], None]:
    """The ``register`` a plugin's ``register_denoiser_families`` receives."""
    from dagfusion.model import default_families

    def register(family: Any) -> None:
        missing = [a for a in ("name", "matches", "prepare") if not hasattr(family, a)]
        if missing:
            offer.fail(f"registered {family!r}, which is not a denoiser family (no {', '.join(missing)})")
            raise PluginError(f"{who} registered {family!r}, which is not a denoiser family")
        for known in default_families():
            if known.name == family.name and type(known) is not type(family):
                problem = (
                    f"registered a denoiser family named {family.name!r}, a name "
                    f"{type(known).__module__}.{type(known).__qualname__} already has"
                )
                offer.fail(problem)
                raise PluginError(f"{who} {problem}")
        offer.families.append(family)

    return register


def _adapter_register(offer: _Offer, who: str) -> Callable[[Any], None]:
    """The ``register`` a plugin's ``register_data_adapters`` receives."""

    def register(adapter: Any) -> None:
        if not callable(adapter):
            offer.fail(f"registered {adapter!r} as a data adapter, which is not callable")
            raise PluginError(f"{who} registered {adapter!r} as a data adapter, which is not callable")
        offer.adapters.append(adapter)

    return register


def _install_families_and_adapters(offers: list[_Offer]) -> None:
    """Make the accepted plugins' denoiser families and data adapters known process-wide, in
    registration order (registering one already known changes nothing)."""
    if any(o.families for o in offers):
        from dagfusion.model import default_families

        for offer in offers:
            if offer.families:
                register = default_families().registrar()
                for family in offer.families:
                    register(family)
    if any(o.adapters for o in offers):
        from dagfusion.nodes.training.data import adapter_registrar

        for offer in offers:
            if offer.adapters:
                register = adapter_registrar()
                for adapter in offer.adapters:
                    register(adapter)


def _claim(offers: list[_Offer], describe: Callable[[str], str]) -> tuple[list[_Offer], list[tuple[_Offer, str]]]:
    """First come, first served: the offers whose type names and node type ids clash with no
    earlier accepted offer (nor with themselves), and the others with the reason."""
    type_owner: dict[str, str] = {}
    node_owner: dict[str, str] = {}
    accepted: list[_Offer] = []
    clashes: list[tuple[_Offer, str]] = []
    for offer in offers:
        problem = _clash("socket type", [t.name for t in offer.types], type_owner, describe) or _clash(
            "node type", [s.type_id for s in offer.nodes], node_owner, describe
        )
        if problem is not None:
            clashes.append((offer, problem))
            continue
        accepted.append(offer)
        type_owner.update({t.name: offer.plugin for t in offer.types})
        node_owner.update({s.type_id: offer.plugin for s in offer.nodes})
    return accepted, clashes


def _clash(kind: str, names: list[str], owner: dict[str, str], describe: Callable[[str], str]) -> str | None:
    """Why ``names`` cannot all be claimed (one is owned already, or listed twice), or ``None``."""
    seen: set[str] = set()
    for name in names:
        if name in owner:
            return f"{kind} {name} is already registered by {describe(owner[name])}"
        if name in seen:
            return f"registers {kind} {name} twice"
        seen.add(name)
    return None


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry over all installed plugins, built on first call."""
    global _default
    if _default is None:
        _default = Registry.from_plugins()
    return _default


def set_default_registry(registry: Registry | None) -> Registry | None:
    """Make ``registry`` the process-wide one (``None``: rebuild on next use); return the previous."""
    global _default
    previous, _default = _default, registry
    return previous
