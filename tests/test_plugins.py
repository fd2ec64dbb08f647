from __future__ import annotations

import pytest

from dagfusion import FLOAT, Input, Output, PluginError, SocketType, hookimpl, node
from dagfusion.plugins import make_plugin_manager
from dagfusion.registry import Registry


@node("dup.Same", version="1.0.0", category="t", outputs=[Output("x", FLOAT)])
def same(ctx):
    """A node two plugins both register."""
    return 1.0


class First:
    @hookimpl
    def register_nodes(self, register):
        register(same)


class Second:
    @hookimpl
    def register_nodes(self, register):
        register(same)


def test_duplicate_node_types_name_both_plugins() -> None:
    with pytest.raises(PluginError) as info:
        Registry.from_plugins(load_entrypoints=False, extra_plugins=[("first-pack", First()), ("second-pack", Second())])
    assert "dup.Same" in str(info.value)
    assert "first-pack" in str(info.value) and "second-pack" in str(info.value)


def test_duplicate_socket_types_name_both_plugins() -> None:
    class Image:
        @hookimpl
        def register_types(self, register):
            register(SocketType("TENSOR"))

    with pytest.raises(PluginError, match="TENSOR is registered by both plugin 'dagfusion.builtin.core' and plugin 'mine'"):
        Registry.from_plugins(load_entrypoints=False, extra_plugins=[("mine", Image())])


def test_plugin_types_are_usable_by_other_plugins_nodes() -> None:
    class Types:
        @hookimpl
        def register_types(self, register):
            register(SocketType("EDGES", parents=("TENSOR",)))

    @node("edges.Count", version="1.0.0", category="t", inputs=[Input("edges", "EDGES")], outputs=[Output("n", "INT")])
    def count_edges(ctx, edges):
        """Count edges."""
        return int(edges.sum())

    class Nodes:
        @hookimpl
        def register_nodes(self, register):
            register(count_edges)

    # the nodes plugin is registered first, the types plugin second: types are collected first anyway
    registry = Registry.from_plugins(load_entrypoints=False, extra_plugins=[("nodes", Nodes()), ("types", Types())])
    assert "edges.Count" in registry
    assert registry.types.accepts("TENSOR", "EDGES")
    assert registry.origin("EDGES") == "types"


def test_unregistered_types_and_non_specs_are_plugin_errors() -> None:
    @node("bad.Node", version="1.0.0", category="t", inputs=[Input("x", "NOPE")])
    def bad(ctx, x):
        """Uses an unknown type."""

    class UsesUnknown:
        @hookimpl
        def register_nodes(self, register):
            register(bad)

    with pytest.raises(PluginError, match=r"unregistered socket types \['NOPE'\]"):
        Registry.from_plugins(load_entrypoints=False, extra_plugins=[("u", UsesUnknown())])

    class NotASpec:
        @hookimpl
        def register_nodes(self, register):
            register(lambda ctx: None)

    with pytest.raises(PluginError, match="not a NodeSpec"):
        Registry.from_plugins(load_entrypoints=False, extra_plugins=[("n", NotASpec())])


def test_misspelt_hook_fails_loudly() -> None:
    class Typo:
        @hookimpl
        def register_node(self, register):  # missing "s"
            pass

    with pytest.raises(PluginError, match="register_node"):
        make_plugin_manager(load_entrypoints=False, extra_plugins=[("typo", Typo())])


def test_a_plugin_whose_hook_raises_is_reported_and_others_load() -> None:
    class Broken:
        @hookimpl
        def register_nodes(self, register):
            raise RuntimeError("boom")

    with pytest.warns(RuntimeWarning, match="boom"):
        registry = Registry.from_plugins(load_entrypoints=False, extra_plugins=[("broken", Broken())])
    assert "dagfusion.math.Add" in registry
    (failure,) = registry.plugin_manager.load_failures
    assert failure.name == "broken" and "RuntimeError: boom" in failure.traceback
    assert any(i.status == "failed" and i.name == "broken" for i in registry.plugin_manager.plugin_infos())


def test_builtin_packs_register_through_hooks_and_can_be_blocked() -> None:
    registry = Registry.from_plugins(load_entrypoints=False, environ={"DAGFUSION_DISABLE_PLUGINS": "tensor"})
    assert "dagfusion.tensor.Noise" not in registry
    assert "dagfusion.math.Add" in registry
    assert registry.origin("dagfusion.math.Add") == "dagfusion.builtin.basic"
    infos = {i.name: i.status for i in registry.plugin_manager.plugin_infos()}
    assert infos["dagfusion.builtin.tensor"] == "blocked"


def test_managers_are_independent() -> None:
    a = make_plugin_manager(load_entrypoints=False)
    b = make_plugin_manager(load_entrypoints=False, extra_plugins=[("first", First())])
    assert not a.has_plugin("first") and b.has_plugin("first")
