"""The registry: every socket type and node type the loaded plugins provide, and who provided it.

Built from a plugin manager by calling each plugin's ``register_types`` hook, then each
``register_nodes`` hook, one plugin at a time, so a duplicate can name both plugins. The
registry is an ordinary object: make one with :meth:`Registry.from_plugins` (or
:func:`dagfusion.default_registry` for the process-wide default, built lazily on first use).
"""

from __future__ import annotations

import copy
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from dagfusion.errors import NodeDefinitionError, PluginError
from dagfusion.node import NodeSpec
from dagfusion.plugins import DagfusionPluginManager, PluginLoadFailure, make_plugin_manager
from dagfusion.types import SocketType, TypeSystem, UnionType


class Registry:
    """Socket types and node specs, with the plugin each came from."""

    def __init__(self, plugin_manager: DagfusionPluginManager) -> None:
        self.plugin_manager = plugin_manager
        self.types = TypeSystem()
        self._type_origin: dict[str, str] = {}
        self._nodes: dict[str, NodeSpec] = {}
        self._node_origin: dict[str, str] = {}
        self._collect()

    @classmethod
    def from_plugins(
        cls,
        *,
        load_entrypoints: bool = True,
        extra_plugins: Iterable[tuple[str, object]] = (),
        include_builtins: bool = True,
        environ: dict[str, str] | None = None,
    ) -> Registry:
        """A registry over a fresh plugin manager (see :func:`~dagfusion.plugins.make_plugin_manager`)."""
        pm = make_plugin_manager(
            load_entrypoints=load_entrypoints,
            extra_plugins=extra_plugins,
            include_builtins=include_builtins,
            environ=environ,
        )
        return cls(pm)

    # --- building ---------------------------------------------------------------------

    def _call_each(self, hook_name: str, register_for: Callable[[str], Callable[[Any], None]]) -> None:
        hook = getattr(self.plugin_manager.hook, hook_name)
        for impl in hook.get_hookimpls():  # in registration order
            plugin_name = impl.plugin_name
            try:
                impl.function(**{name: register_for(plugin_name) for name in impl.argnames if name == "register"})
            except (PluginError, NodeDefinitionError):
                raise
            except Exception as exc:
                failure = PluginLoadFailure(plugin_name, self._distribution(plugin_name), traceback.format_exc())
                self.plugin_manager.load_failures.append(failure)
                warnings.warn(f"{hook_name} of {failure}: {exc}", RuntimeWarning, stacklevel=2)

    def _collect(self) -> None:
        pending: list[tuple[str, SocketType]] = []

        def type_register(plugin_name: str) -> Callable[[SocketType], None]:
            def register(socket_type: SocketType) -> None:
                if not isinstance(socket_type, SocketType):
                    raise PluginError(f"{self._describe(plugin_name)} registered {socket_type!r}, which is not a SocketType")
                pending.append((plugin_name, socket_type))

            return register

        def node_register(plugin_name: str) -> Callable[[NodeSpec], None]:
            def register(spec: NodeSpec) -> None:
                if not isinstance(spec, NodeSpec):
                    raise PluginError(
                        f"{self._describe(plugin_name)} registered {spec!r}, which is not a NodeSpec "
                        "(decorate the function with @dagfusion.node)"
                    )
                if spec.type_id in self._nodes:
                    other = self._node_origin[spec.type_id]
                    raise PluginError(
                        f"node type {spec.type_id} is registered by both {self._describe(other)} "
                        f"and {self._describe(plugin_name)}"
                    )
                unknown = sorted(
                    {n for s in (*spec.inputs, *spec.outputs) for n in self.types.unknown_names(s.type)}
                )
                if unknown:
                    raise PluginError(
                        f"node type {spec.type_id} from {self._describe(plugin_name)} uses unregistered "
                        f"socket types {unknown}"
                    )
                self._nodes[spec.type_id] = spec
                self._node_origin[spec.type_id] = plugin_name

            return register

        self._call_each("register_types", type_register)
        self._add_types(pending)
        self._call_each("register_nodes", node_register)

    def _add_types(self, pending: list[tuple[str, SocketType]]) -> None:
        """Add types parents-first, whatever order the plugins registered them in."""
        for plugin_name, socket_type in pending:
            if socket_type.name in self._type_origin:
                other = self._type_origin[socket_type.name]
                raise PluginError(
                    f"socket type {socket_type.name} is registered by both {self._describe(other)} "
                    f"and {self._describe(plugin_name)}"
                )
            self._type_origin[socket_type.name] = plugin_name
        remaining = list(pending)
        while remaining:
            ready = [(p, t) for p, t in remaining if all(parent in self.types for parent in t.parents)]
            if not ready:
                plugin_name, socket_type = remaining[0]
                missing = [parent for parent in socket_type.parents if parent not in self.types]
                raise PluginError(
                    f"{self._describe(plugin_name)}: socket type {socket_type.name} names unknown parent types {missing}"
                )
            for item in ready:
                self.types.add(item[1])
                remaining.remove(item)

    def _distribution(self, plugin_name: str) -> str | None:
        dist = self.plugin_manager.distributions.get(plugin_name)
        return dist[0] if dist else None

    def _describe(self, plugin_name: str) -> str:
        dist = self._distribution(plugin_name)
        return f"plugin {plugin_name!r} (distribution {dist})" if dist else f"plugin {plugin_name!r}"

    # --- queries ----------------------------------------------------------------------

    def __contains__(self, type_id: object) -> bool:
        return type_id in self._nodes

    def __iter__(self) -> Iterator[NodeSpec]:
        return iter(self._nodes.values())

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, type_id: str) -> NodeSpec | None:
        return self._nodes.get(type_id)

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
        return derived

    @property
    def hook(self) -> Any:
        """The plugin manager's hook relay (lifecycle hooks)."""
        return self.plugin_manager.hook


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
