"""Plugins: registration through hooks, and isolation of plugins that fail.

A plugin that fails to import, implements an unknown hook, raises in a registration hook or
claims a type another plugin registered first is disabled — all or nothing — with its reason and
distribution; the built-ins and every other plugin still load. Fake plugins are plain objects
passed as ``extra_plugins``, or real installed distributions (a module and its ``dist-info``
on ``sys.path``) found through the ``dagfusion`` entry-point group.
"""

from __future__ import annotations

import sys
import textwrap
import types
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dagfusion import FLOAT, Input, Output, PluginError, SocketType, hookimpl, node
from dagfusion.cli import EXIT_INVALID, EXIT_OK, main
from dagfusion.engine import Engine
from dagfusion.plugins import PluginWarning, make_plugin_manager
from dagfusion.registry import Registry, set_default_registry
from dagfusion.workflow import load_workflow

Install = Callable[..., str]


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """``install(dist, entry, source, version="0.3.0")``: a distribution installed on ``sys.path``
    whose ``dagfusion`` entry point ``entry`` names a fresh module with ``source``."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def install(dist: str, entry: str, source: str, version: str = "0.3.0") -> str:
        module = f"dagfusion_test_{entry}_{uuid.uuid4().hex[:8]}"
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[dagfusion]\n{entry} = {module}\n")
        modules.append(module)
        return module

    yield install
    for module in modules:
        sys.modules.pop(module, None)


def failures_of(registry: Registry) -> dict[str, object]:
    return {f.name: f for f in registry.plugin_manager.load_failures}


def build(*extra: tuple[str, object], load_entrypoints: bool = False) -> Registry:
    """A registry over the built-ins, the installed plugins if asked, and ``extra``, expecting a
    warning for a disabled plugin."""
    with pytest.warns(PluginWarning):
        return Registry.from_plugins(load_entrypoints=load_entrypoints, extra_plugins=list(extra), environ={})


@node("dup.Same", version="1.0.0", category="t", outputs=[Output("x", FLOAT)])
def same(ctx):
    """A node two plugins both register."""
    return 1.0


@node("mine.First", version="1.0.0", category="t", outputs=[Output("x", FLOAT)])
def mine_first(ctx):
    """The first of a plugin's nodes."""
    return 1.0


@node("mine.Second", version="1.0.0", category="t", outputs=[Output("x", FLOAT)])
def mine_second(ctx):
    """The second of a plugin's nodes."""
    return 2.0


@node("dagfusion.math.Add", version="9.0.0", category="t", outputs=[Output("x", FLOAT)])
def add_clone(ctx):
    """Claims the type id of a built-in node."""
    return 0.0


class First:
    @hookimpl
    def register_nodes(self, register):
        register(same)


class Second:
    @hookimpl
    def register_nodes(self, register):
        register(same)


class Healthy:
    @hookimpl
    def register_types(self, register):
        register(SocketType("HEALTHY"))

    @hookimpl
    def register_nodes(self, register):
        register(mine_first)


# --- registration ---------------------------------------------------------------------------


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
    assert registry.plugin_manager.load_failures == []


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


# --- isolation: what disables a plugin ------------------------------------------------------


def test_a_misspelt_hook_disables_the_plugin_and_suggests_the_name() -> None:
    class Typo:
        @hookimpl
        def register_node(self, register):  # missing "s"
            register(mine_first)

    with pytest.warns(PluginWarning, match="plugin 'typo' disabled: implements unknown hook 'register_node'"):
        registry = Registry.from_plugins(load_entrypoints=False, extra_plugins=[("typo", Typo()), ("healthy", Healthy())])
    failure = failures_of(registry)["typo"]
    assert failure.reason == "implements unknown hook 'register_node' (did you mean 'register_nodes'?)"
    assert not registry.plugin_manager.has_plugin("typo")
    assert "mine.First" in registry and registry.origin("mine.First") == "healthy"
    assert "dagfusion.math.Add" in registry


def test_an_installed_plugin_with_a_misspelt_hook_names_its_distribution(install: Install) -> None:
    install(
        "dagfusion-typo",
        "typo",
        """
        from dagfusion import hookimpl

        @hookimpl
        def register_node(register):
            pass
        """,
        version="1.2.0",
    )
    registry = build(load_entrypoints=True)
    failure = failures_of(registry)["typo"]
    assert (failure.distribution, failure.version) == ("dagfusion-typo", "1.2.0")
    assert failure.summary() == (
        "plugin 'typo' (dagfusion-typo 1.2.0) disabled: "
        "implements unknown hook 'register_node' (did you mean 'register_nodes'?)"
    )


def test_a_plugin_that_fails_to_import_is_disabled_with_its_distribution_and_version(install: Install) -> None:
    module = install(
        "dagfusion-broken",
        "broken",
        """
        import dagfusion
        import a_dependency_nobody_installed  # noqa: F401
        """,
    )
    install(
        "dagfusion-fine",
        "fine",
        """
        from dagfusion import FLOAT, Output, hookimpl, node

        @node("fine.One", version="1.0.0", category="t", outputs=[Output("x", FLOAT)])
        def one(ctx):
            '''Always one.'''
            return 1.0

        @hookimpl
        def register_nodes(register):
            register(one)
        """,
    )
    with pytest.warns(PluginWarning, match=r"plugin 'broken' \(dagfusion-broken 0.3.0\) disabled: import failed"):
        registry = Registry.from_plugins(environ={})
    failure = failures_of(registry)["broken"]
    assert failure.reason == "import failed: ModuleNotFoundError: No module named 'a_dependency_nobody_installed'"
    assert f"{module}.py" in failure.traceback and "Traceback (most recent call last)" in failure.traceback
    infos = {i.name: i for i in registry.plugin_manager.plugin_infos()}
    assert (infos["broken"].status, infos["broken"].distribution, infos["broken"].version) == (
        "failed",
        "dagfusion-broken",
        "0.3.0",
    )
    assert infos["fine"].status == "loaded" and infos["fine"].version == "0.3.0"
    assert registry.origin_description("fine.One") == "plugin 'fine' (dagfusion-fine 0.3.0)"


def test_a_raising_register_hook_disables_the_plugin_and_rolls_back_what_it_registered() -> None:
    class Partial:
        @hookimpl
        def register_types(self, register):
            register(SocketType("PARTIAL"))

        @hookimpl
        def register_nodes(self, register):
            register(mine_first)
            register(mine_second)
            raise RuntimeError("boom")

    registry = build(("partial", Partial()), ("first", First()))
    failure = failures_of(registry)["partial"]
    assert failure.reason == "register_nodes raised RuntimeError: boom"
    assert "RuntimeError: boom" in failure.traceback
    assert "mine.First" not in registry and "mine.Second" not in registry
    assert "PARTIAL" not in registry.types
    assert registry.nodes_of("partial") == [] and registry.types_of("partial") == []
    assert "dup.Same" in registry  # the other plugin loaded
    assert any(i.status == "failed" and i.name == "partial" for i in registry.plugin_manager.plugin_infos())


def test_a_node_type_clashing_with_a_builtin_disables_the_whole_plugin() -> None:
    class Clashes:
        @hookimpl
        def register_nodes(self, register):
            register(mine_first)
            register(mine_second)
            register(add_clone)  # the third one clashes

    registry = build(("clashes", Clashes()), ("healthy", Healthy()))
    failure = failures_of(registry)["clashes"]
    assert failure.reason == (
        "node type dagfusion.math.Add is already registered by plugin 'dagfusion.builtin.basic' (dagfusion "
        f"{registry.plugin_manager.distribution_of('dagfusion.builtin.basic')[1]})"
    )
    assert "mine.Second" not in registry and registry.origin("mine.First") == "healthy"
    assert registry.get("dagfusion.math.Add").version != "9.0.0"
    assert registry.origin("dagfusion.math.Add") == "dagfusion.builtin.basic"


def test_a_node_type_two_plugins_register_stays_with_the_first() -> None:
    registry = build(("first-pack", First()), ("second-pack", Second()))
    assert registry.origin("dup.Same") == "first-pack"
    assert failures_of(registry)["second-pack"].reason == "node type dup.Same is already registered by plugin 'first-pack'"
    infos = {i.name: i.status for i in registry.plugin_manager.plugin_infos()}
    assert infos["first-pack"] == "loaded" and infos["second-pack"] == "failed"


def test_a_socket_type_clashing_with_a_builtin_disables_the_plugin() -> None:
    class Image:
        @hookimpl
        def register_types(self, register):
            register(SocketType("TENSOR"))

    registry = build(("mine", Image()))
    assert failures_of(registry)["mine"].reason.startswith(
        "socket type TENSOR is already registered by plugin 'dagfusion.builtin.core'"
    )
    assert registry.origin("TENSOR") == "dagfusion.builtin.core"


def test_unregistered_types_and_non_specs_disable_the_plugin() -> None:
    @node("bad.Node", version="1.0.0", category="t", inputs=[Input("x", "NOPE")])
    def bad(ctx, x):
        """Uses an unknown type."""

    class UsesUnknown:
        @hookimpl
        def register_nodes(self, register):
            register(mine_first)
            register(bad)

    class NotASpec:
        @hookimpl
        def register_nodes(self, register):
            register(lambda ctx: None)

    registry = build(("u", UsesUnknown()), ("n", NotASpec()))
    failures = failures_of(registry)
    assert failures["u"].reason == "node type bad.Node uses unregistered socket types ['NOPE']"
    assert failures["n"].reason.endswith("which is not a NodeSpec (decorate the function with @dagfusion.node)")
    assert "mine.First" not in registry


def test_a_plugin_that_needs_a_disabled_plugins_types_is_disabled_too() -> None:
    class Types:
        @hookimpl
        def register_types(self, register):
            register(SocketType("EDGES", parents=("TENSOR",)))

        @hookimpl
        def register_nodes(self, register):
            register(add_clone)  # disables this plugin, and EDGES with it

    @node("edges.Count", version="1.0.0", category="t", inputs=[Input("edges", "EDGES")], outputs=[Output("n", "INT")])
    def count_edges(ctx, edges):
        """Count edges."""
        return 0

    class Uses:
        @hookimpl
        def register_nodes(self, register):
            register(count_edges)

    registry = build(("types", Types()), ("uses", Uses()))
    failures = failures_of(registry)
    assert failures["types"].reason.startswith("node type dagfusion.math.Add is already registered")
    assert failures["uses"].reason == "node type edges.Count uses unregistered socket types ['EDGES']"
    assert "EDGES" not in registry.types


def test_plugins_as_plain_namespaces_are_isolated_the_same_way() -> None:
    @hookimpl
    def register_nodes(register):
        raise ValueError("no luck")

    plugin = types.SimpleNamespace(register_nodes=register_nodes)
    registry = build(("ns", plugin), ("healthy", Healthy()))
    assert failures_of(registry)["ns"].reason == "register_nodes raised ValueError: no luck"
    assert "mine.First" in registry


def test_strict_registries_raise_every_failure() -> None:
    class Typo:
        @hookimpl
        def register_node(self, register):
            pass

    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)  # strict registries raise instead of warning
        with pytest.raises(PluginError) as info:
            Registry.from_plugins(
                load_entrypoints=False,
                extra_plugins=[("typo", Typo()), ("second-pack", Second()), ("first", First())],
                strict=True,
            )
    message = str(info.value)
    assert message.startswith("2 plugins failed:")
    assert "plugin 'typo' disabled: implements unknown hook 'register_node'" in message
    assert "plugin 'first' disabled: node type dup.Same is already registered by plugin 'second-pack'" in message


def test_builtin_packs_are_never_disabled() -> None:
    class Broken:
        @hookimpl
        def register_nodes(self, register):
            raise RuntimeError("a bug in dagfusion")

    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(Broken(), name="dagfusion.builtin.broken")
    with pytest.raises(RuntimeError, match="a bug in dagfusion"):
        Registry(pm)


# --- run-lifecycle hooks --------------------------------------------------------------------


def _lifecycle_run(settings, test_nodes_plugin, tmp_path: Path, tracer: object):
    registry = Registry.from_plugins(load_entrypoints=False, extra_plugins=[("t", test_nodes_plugin), ("tracer", tracer)])
    workflow = load_workflow("format_version: 1\nnodes:\n  a: {type: test.Count}\n  f: {type: test.Fail}\n", text=True)
    return Engine(registry, settings).run(workflow, out=tmp_path / "run")


def test_a_raising_before_node_run_fails_the_node_with_a_plugin_error(settings, test_nodes_plugin, tmp_path) -> None:
    class Tracer:
        @hookimpl
        def before_node_run(self, node_id):
            raise KeyError(node_id)

    result = _lifecycle_run(settings, test_nodes_plugin, tmp_path, Tracer())
    error = result.errors["a"]
    assert isinstance(error.original, PluginError)
    assert str(error.original) == "plugin 'tracer' failed in before_node_run: KeyError: 'a'"
    assert isinstance(error.original.__cause__, KeyError)


def test_a_raising_after_node_run_is_a_warning_naming_the_plugin_and_the_run_goes_on(settings, test_nodes_plugin, tmp_path) -> None:
    class Tracer:
        @hookimpl
        def after_node_run(self, node_id, seconds):
            raise RuntimeError("tracer is full")

    result = _lifecycle_run(settings, test_nodes_plugin, tmp_path, Tracer())
    assert result.outputs["a"] == {"y": 0.0}  # the node's result stands
    assert "node 'a': plugin 'tracer' failed in after_node_run: RuntimeError: tracer is full" in result.warnings
    events = (tmp_path / "run" / "events.jsonl").read_text()
    assert '"RunWarning"' in events and "tracer is full" in events


def test_a_raising_on_node_error_is_a_warning_naming_the_plugin(settings, test_nodes_plugin, tmp_path) -> None:
    class Tracer:
        @hookimpl
        def on_node_error(self, node_id, error):
            raise ValueError(f"cannot report {node_id}")

    result = _lifecycle_run(settings, test_nodes_plugin, tmp_path, Tracer())
    assert isinstance(result.errors["f"].original, ZeroDivisionError)  # the node's own failure is kept
    assert "node 'f': plugin 'tracer' failed in on_node_error: ValueError: cannot report f" in result.warnings


# --- the command line -----------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A clean process-wide registry and settings confined to ``tmp_path``; returns a workflow."""
    for key in ("DAGFUSION_PLUGINS", "DAGFUSION_DISABLE_PLUGINS", "DAGFUSION_PLUGINS_STRICT", "DAGFUSION_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DAGFUSION_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("DAGFUSION_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    workflow = tmp_path / "add.yaml"
    workflow.write_text("format_version: 1\nnodes:\n  add: {type: dagfusion.math.Add, inputs: {a: 1, b: 2}}\n")
    previous = set_default_registry(None)
    yield workflow
    set_default_registry(previous)


def _install_typo_and_clone(install: Install) -> None:
    install(
        "dagfusion-typo",
        "typo",
        """
        from dagfusion import hookimpl

        @hookimpl
        def register_node(register):
            pass
        """,
        version="1.2.0",
    )
    install(
        "dagfusion-adder",
        "adder",
        """
        from dagfusion import FLOAT, Output, hookimpl, node

        @node("dagfusion.math.Add", version="9.0.0", category="t", outputs=[Output("x", FLOAT)])
        def add(ctx):
            '''Claims a built-in node's type id.'''
            return 0.0

        @hookimpl
        def register_nodes(register):
            register(add)
        """,
    )


def test_dagfusion_plugins_lists_failures_and_exits_0(install: Install, cli_env: Path, capsys) -> None:
    _install_typo_and_clone(install)
    assert main(["plugins"]) == EXIT_OK
    out, err = capsys.readouterr()
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert lines["typo"].split()[1:4] == ["failed", "dagfusion-typo", "1.2.0"]
    assert lines["adder"].split()[1:4] == ["failed", "dagfusion-adder", "0.3.0"]
    assert "loaded" in lines["dagfusion.builtin.basic"]
    assert "    implements unknown hook 'register_node' (did you mean 'register_nodes'?)" in out.splitlines()
    assert "node type dagfusion.math.Add is already registered by plugin 'dagfusion.builtin.basic'" in out
    assert "disabled" not in err and "Warning" not in err


def test_other_commands_warn_once_per_disabled_plugin_and_carry_on(install: Install, cli_env: Path, capsys) -> None:
    _install_typo_and_clone(install)
    assert main(["validate", str(cli_env)]) == EXIT_OK
    out, err = capsys.readouterr()
    assert "valid (1 nodes)" in out
    warnings = [line for line in err.splitlines() if "disabled" in line]
    assert warnings == [
        "warning: plugin 'typo' (dagfusion-typo 1.2.0) disabled: implements unknown hook 'register_node' "
        "(did you mean 'register_nodes'?); see `dagfusion plugins`",
        "warning: plugin 'adder' (dagfusion-adder 0.3.0) disabled: node type dagfusion.math.Add is already "
        f"registered by plugin 'dagfusion.builtin.basic' (dagfusion {_dagfusion_version()}); see `dagfusion plugins`",
    ]
    assert "PluginWarning" not in err
    assert main(["nodes"]) == EXIT_OK
    assert "dagfusion.math.Add" in capsys.readouterr().out


def test_strict_mode_makes_any_plugin_failure_exit_2(
    install: Install, cli_env: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_typo_and_clone(install)
    monkeypatch.setenv("DAGFUSION_PLUGINS_STRICT", "1")
    assert main(["validate", str(cli_env)]) == EXIT_INVALID
    out, err = capsys.readouterr()
    assert "valid" not in out
    assert "2 plugins failed:" in err and "plugins_strict is on" in err
    assert "plugin 'typo' (dagfusion-typo 1.2.0) disabled" in err
    assert main(["plugins"]) == EXIT_INVALID
    out, err = capsys.readouterr()
    assert "failed" in out and "plugin 'adder' (dagfusion-adder 0.3.0) disabled" in err


def test_strict_mode_is_quiet_when_every_plugin_loads(cli_env: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGFUSION_PLUGINS_STRICT", "1")
    assert main(["validate", str(cli_env)]) == EXIT_OK
    assert capsys.readouterr().err == ""


def _dagfusion_version() -> str:
    from dagfusion import __version__

    return __version__


# --- denoiser families and data adapters through hooks ----------------------------------------


class _ToyFamily:
    """A denoiser family a plugin adds (it never matches a real module)."""

    name = "toy-family-from-plugin"

    def matches(self, module: object) -> bool:
        return False

    def prepare(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError


def test_a_plugins_denoiser_families_and_data_adapters_are_registered_through_hooks() -> None:
    from dagfusion.model import default_families
    from dagfusion.nodes.training.data import as_training_data

    marker = object()

    class Toy:
        @hookimpl
        def register_denoiser_families(self, register):
            register(_ToyFamily())

        @hookimpl
        def register_data_adapters(self, register):
            register(lambda value: marker if value == "toy-dataset" else None)

    registry = Registry.from_plugins(load_entrypoints=False, extra_plugins=[("toy", Toy())])
    assert not registry.plugin_manager.load_failures
    try:
        assert [f.name for f in default_families()][0] == "toy-family-from-plugin"  # later plugins asked first
        assert as_training_data("toy-dataset") is marker
    finally:
        default_families().unregister("toy-family-from-plugin")


def test_a_family_clashing_with_a_built_in_name_disables_the_plugin() -> None:
    class Impostor(_ToyFamily):
        name = "unet"

    class Bad:
        @hookimpl
        def register_denoiser_families(self, register):
            register(Impostor())

        @hookimpl
        def register_nodes(self, register):
            register(mine_first)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        registry = Registry.from_plugins(load_entrypoints=False, extra_plugins=[("bad", Bad())])
    (failure,) = registry.plugin_manager.load_failures
    assert failure.name == "bad" and "denoiser family named 'unet'" in failure.reason
    assert "mine.First" not in registry  # all or nothing
    from dagfusion.model import default_families

    assert type(next(f for f in default_families() if f.name == "unet")).__name__ == "UNetFamily"
