"""``dagfusion.testing``: helpers and a pytest plugin for testing nodes and plugins.

Installing dagfusion registers this module with pytest (entry point ``pytest11``), so the
fixtures below exist in every test session without a ``conftest.py``. Importing it is cheap:
dagfusion's engine (and torch) load only when a helper is first called.

A plugin package's test, in full::

    import dagfusion_mypack
    from dagfusion.testing import assert_node_contract, make_registry, run_workflow

    REGISTRY = make_registry(("mypack", dagfusion_mypack))    # built-ins + this plugin

    @pytest.mark.parametrize("spec", REGISTRY.nodes_of("mypack"), ids=lambda s: s.type_id)
    def test_node_contract(spec, tmp_path):
        assert_node_contract(spec, REGISTRY, tmp_path=tmp_path)

    def test_blur_runs(tmp_path):
        result = run_workflow('''
    format_version: 1
    nodes:
      noise: {type: dagfusion.tensor.Noise, inputs: {seed: 1, height: 16, width: 16}}
      blur:  {type: mypack.Blur, inputs: {tensor: {from: noise.tensor}}}
    ''', registry=REGISTRY, tmp_path=tmp_path)
        assert result.output("blur.tensor").shape == (3, 16, 16)

Tiny models
===========
:mod:`dagfusion.testing.models` (imported only when you import it) builds tiny random
diffusion models offline from configs — SD, SDXL, DiT, PixArt, a video UNet — and writes them as
diffusers folders: ``models.write_model("sd", tmp_path / "tiny-sd")``, or in-memory handles with
``models.sd_handles()``.

Functions
=========
``make_registry(*plugins, builtins=True, entrypoints=False, environ=None) -> Registry``
    A registry with temporary plugins. Each plugin is a ``(name, module_or_object)`` pair, or
    a module/object (named after its module). Installed entry-point plugins are *not* loaded
    unless ``entrypoints=True``, and the allow/block variables of your shell are ignored unless
    you pass ``environ=os.environ``, so tests do not depend on what else is installed.

``make_settings(folder, **overrides) -> Settings``
    Settings confined to ``folder``: outputs in ``folder/outputs``, the disk cache in
    ``folder/cache``, ``folder`` readable, device ``"cpu"``. No settings file and no
    ``DAGFUSION_*`` variable is read. ``overrides`` are validated like settings-file keys
    (``make_settings(tmp_path, device="cuda")``).

``run_workflow(workflow, *, registry=None, plugins=(), settings=None, overrides=(), tmp_path=None, raise_on_error=True, **run_options) -> RunResult``
    Validate and run one workflow with ``check_mutation=True`` (a node that modifies an input
    in place fails). ``workflow`` is a :class:`~dagfusion.Workflow`, a mapping (the YAML's
    plain-data form), YAML text (any ``str`` containing a newline), or a path. Without
    ``registry`` one is made from the built-ins plus ``plugins``; without ``settings`` they are
    :func:`make_settings` of ``tmp_path`` (a new temporary folder if that is ``None`` too).
    ``overrides`` are ``"node.input=value"`` strings, like ``--set``. An invalid workflow raises
    :class:`~dagfusion.ValidationError` listing every problem; a failed or cancelled run raises
    :class:`WorkflowRunFailed` (an ``AssertionError``) naming each failed node with its
    traceback, unless ``raise_on_error=False``. Other keyword arguments go to
    :meth:`dagfusion.Engine.run` (``targets``, ``use_cache``, ``handler``, ``out`` …).

``NodeCallContext(folder, node_id="node")``
    A stand-in for the run context when a test calls a node's function directly
    (``spec.fn(NodeCallContext(tmp_path), **inputs)``): outputs under ``folder``, input paths as
    given, progress calls recorded in ``.steps``.

``temporary_plugins(*plugins, builtins=True, entrypoints=False, settings=None)``
    A context manager that makes ``make_registry(*plugins, …)`` dagfusion's process-wide
    registry (what :func:`dagfusion.run`, :func:`dagfusion.default_registry`, ``Engine()`` and the
    CLI called in-process use) and yields it; the previous registry and default engine are
    restored on exit. With ``settings``, :func:`dagfusion.run` runs with them.

``check_node_contract(spec, registry, *, tmp_path=None, settings=None, run_examples=True, require_input_docs=False) -> list[str]``
    Every way a node breaks the contract below, as sentences; an empty list means it passes.
    ``spec`` is a :class:`~dagfusion.NodeSpec` or a type id registered in ``registry``; a spec
    that is not registered is checked as if it were (its types must be registered).

``assert_node_contract(spec, registry, **options)``
    The same, raising ``AssertionError`` that lists every problem.

``example_inputs(spec, folder) -> list[dict]``
    The node's examples resolved to input mappings (callables called).

Fixtures
========
``dagfusion_settings``
    ``make_settings(tmp_path)``.
``dagfusion_registry``
    The function :func:`make_registry` (call it: ``dagfusion_registry(mypack)``).
``dagfusion_engine``
    A factory: ``dagfusion_engine(*plugins, builtins=True, entrypoints=False)`` returns an
    :class:`~dagfusion.Engine` over ``make_registry(*plugins, …)`` and ``dagfusion_settings``.
``dagfusion_run``
    :func:`run_workflow` with ``tmp_path`` filled in.
``dagfusion_plugins``
    :func:`temporary_plugins` for one test: ``dagfusion_plugins(mypack)`` makes the process-wide
    registry built-ins + ``mypack`` (and ``dagfusion.run`` use ``dagfusion_settings``) until the
    test ends; returns the registry.

The node contract
=================
Every registered node must pass it; dagfusion's own suite runs it over every built-in node.

Declaration (no running):

- the node has a description (the function's docstring) and a category;
- every input and output type is registered in the registry (unions: every member);
- ``min <= max``; bounds only on numeric types (INT, FLOAT, their subtypes, ANY);
- choices are non-empty and each choice is a value of the input's type;
- each default is a value of the input's type and within its bounds and choices
  (``None`` is allowed as a default: it means "not set");
- a ``persist`` node's output types all have a serializer (otherwise nothing would persist);
- with ``require_input_docs=True``: every input and output has a description.

Examples (``run_examples=True``): a node declares example inputs with ``examples=[...]``. An
example is a mapping of input names to values, or a callable returning one, so that tensors
and modules are built only when the contract runs (and the node module never imports torch at
import time). A callable taking one argument receives a scratch folder (a :class:`pathlib.Path`
inside the allowed read folders) where it may write files a node reads::

    def _example(folder):
        import torch
        from safetensors.torch import save_file
        save_file({"tensor": torch.ones(2, 2)}, folder / "t.safetensors")
        return {"path": str(folder / "t.safetensors")}

    @node("mypack.Load", ..., examples=[_example, {"path": "data/known.safetensors"}])

Each example runs through the real engine, in a one-node workflow with ``check_mutation=True``
and the cache off. Plain immutable values (numbers, strings, booleans, ``None``) are given as
constants, so the validator checks their types, bounds and choices; every other value (tensors,
modules, lists, dicts) and every ``link_only`` input arrives over a link from a helper node that
emits the example value, exactly as it would from an upstream node. Then:

- the example's keys are declared inputs, and the run succeeds (validation, the node itself,
  the engine's check that every returned value is an instance of its declared output type);
- no output is ``None`` unless its type is ``ANY`` (``None`` fits no other socket type, so a
  downstream node would fail on it);
- the node did not modify an input in place (unless that input declares ``mutates=True``);
  inputs are compared by content fingerprint, so values that cannot be fingerprinted (objects
  without ``__dagfusion_fingerprint__``) are not checked;
- pure nodes write no files into the output folder (side effects need ``pure=False``);
- pure nodes are deterministic: a second run on fresh copies of the same example gives outputs
  with equal content fingerprints (tensors by bytes; outputs that cannot be fingerprinted are
  not compared);
- ``persist`` nodes: each output survives its type's serializer (save, load, same fingerprint);
- pure nodes returning handles that carry patches (a patched ``MODEL``, ``VAE`` or ``CLIP``): two
  examples with different inputs give handles with different fingerprints — a setting left out
  of a patch's key would let the engine's cache serve one handle for the other. Give such a
  node at least two examples that differ in its settings.

Nodes without examples: if every input has a default (or is optional), the node is run once
with its defaults, as if ``examples=[{}]``. Otherwise a **pure** node without examples is a
contract problem ("no examples") — with callable examples every input, tensors and modules
included, can be given one. An **impure** node (saving files, unseeded randomness, training)
is not required to have examples, since its effects may need an environment a test cannot
provide; when it has some they are run with every check above except determinism and the
output-folder check. Examples run on the CPU (``device="cpu"`` in :func:`make_settings`); pass
``settings=`` to run them elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:  # the plugin is loaded by pytest; the helpers also work without it
    import pytest
except ImportError:  # pragma: no cover - pytest is a dev dependency
    pytest = None  # type: ignore[assignment]

from dagfusion.testing.contract import assert_node_contract, check_node_contract, example_inputs
from dagfusion.testing.harness import (
    EXAMPLE_FEEDER,
    NodeCallContext,
    PluginArg,
    WorkflowRunFailed,
    make_registry,
    make_settings,
    run_workflow,
    temporary_plugins,
)

if TYPE_CHECKING:
    from dagfusion.engine import Engine
    from dagfusion.executor import RunResult
    from dagfusion.registry import Registry
    from dagfusion.settings import Settings

__all__ = [
    "EXAMPLE_FEEDER",
    "NodeCallContext",
    "WorkflowRunFailed",
    "assert_node_contract",
    "check_node_contract",
    "example_inputs",
    "make_registry",
    "make_settings",
    "run_workflow",
    "temporary_plugins",
]

def __getattr__(name: str) -> Any:
    """``dagfusion.testing.models`` on first use (it is never imported with this module)."""
    if name == "models":
        import importlib

        return importlib.import_module("dagfusion.testing.models")
    raise AttributeError(f"module 'dagfusion.testing' has no attribute {name!r}")


# --- pytest fixtures --------------------------------------------------------------------------

if pytest is not None:

    @pytest.fixture
    def dagfusion_settings(tmp_path: Path) -> Settings:
        """Settings confined to ``tmp_path`` (see :func:`make_settings`)."""
        return make_settings(tmp_path)

    @pytest.fixture
    def dagfusion_registry() -> Callable[..., Registry]:
        """:func:`make_registry`: ``dagfusion_registry(mypack)`` → built-ins + ``mypack``."""
        return make_registry

    @pytest.fixture
    def dagfusion_engine(dagfusion_settings: Settings) -> Callable[..., Engine]:
        """A factory of engines over ``make_registry(*plugins, …)`` and ``dagfusion_settings``."""

        def factory(*plugins: PluginArg, builtins: bool = True, entrypoints: bool = False) -> Engine:
            from dagfusion.engine import Engine

            return Engine(make_registry(*plugins, builtins=builtins, entrypoints=entrypoints), dagfusion_settings)

        return factory

    @pytest.fixture
    def dagfusion_plugins(dagfusion_settings: Settings) -> Iterator[Callable[..., Registry]]:
        """:func:`temporary_plugins` for the duration of one test (see the module docstring)."""
        stack: list[Any] = []

        def install(*plugins: PluginArg, builtins: bool = True, entrypoints: bool = False) -> Registry:
            manager = temporary_plugins(*plugins, builtins=builtins, entrypoints=entrypoints, settings=dagfusion_settings)
            registry = manager.__enter__()
            stack.append(manager)
            return registry

        yield install
        while stack:
            stack.pop().__exit__(None, None, None)

    @pytest.fixture
    def dagfusion_run(tmp_path: Path) -> Callable[..., RunResult]:
        """:func:`run_workflow` with ``tmp_path`` filled in."""

        def run(workflow: Any, **options: Any) -> RunResult:
            options.setdefault("tmp_path", tmp_path)
            return run_workflow(workflow, **options)

        return run

