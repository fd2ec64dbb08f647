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

import copy
import inspect
import os
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

try:  # the plugin is loaded by pytest; the helpers also work without it
    import pytest
except ImportError:  # pragma: no cover - pytest is a dev dependency
    pytest = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from dagfusion.engine import Engine
    from dagfusion.executor import RunResult
    from dagfusion.node import NodeSpec
    from dagfusion.registry import Registry
    from dagfusion.settings import Settings
    from dagfusion.workflow import Workflow

__all__ = [
    "WorkflowRunFailed",
    "assert_node_contract",
    "check_node_contract",
    "example_inputs",
    "make_registry",
    "make_settings",
    "run_workflow",
    "temporary_plugins",
]

#: Type id of the helper node that feeds example values over links.
EXAMPLE_FEEDER = "dagfusion_testing.ExampleInputs"
_TESTED_ID = "node"
_FEEDER_ID = "example"
_IMMUTABLE = (type(None), bool, int, float, str)

PluginArg = tuple[str, object] | ModuleType | object


class NodeCallContext:
    """A stand-in for the :class:`~dagfusion.RunContext` a node's function receives, for calling
    ``spec.fn(ctx, **inputs)`` directly in a test: files the node writes go under ``folder``
    (``output_path`` creates the parent folders), input paths are used as given, and every
    ``progress(step, total)`` call is kept in ``steps`` as ``(step, total)``.

    Attributes:
        folder: Where ``output_path`` puts files.
        node_id: The id the node sees (``"node"``).
        steps: The recorded progress calls.
    """

    def __init__(self, folder: str | os.PathLike[str], node_id: str = "node") -> None:
        self.folder = Path(folder)
        self.node_id = node_id
        self.steps: list[tuple[int, int]] = []

    def progress(self, step: int, total: int | None = None, message: str = "", **values: float) -> None:
        self.steps.append((step, total or 0))

    def output_path(self, relative: str) -> Path:
        target = self.folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def input_path(self, path: str) -> Path:
        return Path(path)

    def check_cancelled(self) -> None:
        """Never cancelled."""


class WorkflowRunFailed(AssertionError):
    """A run in :func:`run_workflow` failed or was cancelled; ``result`` is its RunResult."""

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


# --- registries, settings, engines ---------------------------------------------------------


def _plugin_pairs(plugins: Iterable[PluginArg]) -> list[tuple[str, object]]:
    pairs = []
    for item in plugins:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            pairs.append((item[0], item[1]))
        elif isinstance(item, ModuleType):
            pairs.append((item.__name__, item))
        elif isinstance(item, type):
            pairs.append((f"{item.__module__}.{item.__qualname__}", item))
        else:
            pairs.append((f"{type(item).__module__}.{type(item).__qualname__}", item))
    return pairs


def make_registry(
    *plugins: PluginArg,
    builtins: bool = True,
    entrypoints: bool = False,
    environ: Mapping[str, str] | None = None,
) -> Registry:
    """A registry with the built-in packs (unless ``builtins=False``) and ``plugins``.

    :param plugins: ``(name, module_or_object)`` pairs, or modules/objects with hook
        implementations (named after their module).
    :param builtins: Register dagfusion's own node packs.
    :param entrypoints: Also load the installed entry-point plugins.
    :param environ: Environment for ``DAGFUSION_PLUGINS``/``DAGFUSION_DISABLE_PLUGINS``
        (default: empty, so the caller's shell does not change test results).
    """
    from dagfusion.registry import Registry

    return Registry.from_plugins(
        load_entrypoints=entrypoints,
        extra_plugins=_plugin_pairs(plugins),
        include_builtins=builtins,
        environ=dict(environ) if environ is not None else {},
    )


def make_settings(folder: str | os.PathLike[str], **overrides: Any) -> Settings:
    """Settings confined to ``folder`` (outputs, cache, readable), device ``cpu``.

    No settings file and no environment variable is read.
    """
    from dagfusion.settings import Settings

    root = Path(folder)
    settings = Settings(
        output_dir=root / "outputs",
        cache_dir=root / "cache",
        read_dirs=(root,),
        device="cpu",
        source="dagfusion.testing",
    )
    return settings.with_overrides(**overrides) if overrides else settings


@contextmanager
def temporary_plugins(
    *plugins: PluginArg,
    builtins: bool = True,
    entrypoints: bool = False,
    settings: Settings | None = None,
) -> Iterator[Registry]:
    """Make ``make_registry(*plugins, …)`` the process-wide registry until the block ends.

    :func:`dagfusion.run`, :func:`dagfusion.default_registry`, ``Engine()`` without a registry
    and the CLI's ``main()`` see exactly these plugins inside the block. The default engine is
    replaced too (over ``settings``, or built lazily from the usual settings when ``None``).
    """
    from dagfusion import engine as engine_module
    from dagfusion import registry as registry_module

    registry = make_registry(*plugins, builtins=builtins, entrypoints=entrypoints)
    previous_registry = registry_module.set_default_registry(registry)
    previous_engine = engine_module.set_default_engine(
        engine_module.Engine(registry, settings) if settings is not None else None
    )
    try:
        yield registry
    finally:
        registry_module.set_default_registry(previous_registry)
        engine_module.set_default_engine(previous_engine)


def _load_source(workflow: Any) -> Workflow:
    from dagfusion.workflow import Workflow, load_workflow, workflow_from_dict

    if isinstance(workflow, Workflow):
        return workflow
    if isinstance(workflow, Mapping):
        return workflow_from_dict(workflow)
    if isinstance(workflow, bytes) or (isinstance(workflow, str) and "\n" in workflow):
        return load_workflow(workflow, text=True)
    if isinstance(workflow, (str, os.PathLike)):
        return load_workflow(workflow)
    raise TypeError(f"expected a Workflow, a mapping, YAML text or a path, got {type(workflow).__name__}")


def run_workflow(
    workflow: Any,
    *,
    registry: Registry | None = None,
    plugins: Iterable[PluginArg] = (),
    settings: Settings | None = None,
    overrides: Sequence[str] = (),
    tmp_path: str | os.PathLike[str] | None = None,
    raise_on_error: bool = True,
    **run_options: Any,
) -> RunResult:
    """Run one workflow with ``check_mutation=True``; see the module docstring.

    :raises ValidationError: the workflow is invalid (every problem listed).
    :raises WorkflowRunFailed: a node failed or the run was cancelled (unless
        ``raise_on_error=False``; the result then tells).
    """
    from dagfusion.engine import Engine

    plugins = list(plugins)
    if registry is not None and plugins:
        raise TypeError("pass either registry= or plugins=, not both (make_registry(*plugins) builds one)")
    if registry is None:
        registry = make_registry(*plugins)
    if settings is None:
        folder = Path(tmp_path) if tmp_path is not None else Path(tempfile.mkdtemp(prefix="dagfusion-test-"))
        settings = make_settings(folder)
    run_options.setdefault("check_mutation", True)
    result = Engine(registry, settings).run(_load_source(workflow), overrides=list(overrides), **run_options)
    if raise_on_error and not result.ok:
        raise _run_failure(result)
    return result


def _run_failure(result: RunResult) -> WorkflowRunFailed:
    if result.status == "cancelled" and not result.errors:
        return WorkflowRunFailed("the run was cancelled", result)
    lines = [f"the run {result.status}: {len(result.errors)} node(s) failed"]
    for error in result.errors.values():
        lines.append(f"\n--- {error} ---")
        original = error.original
        lines.append("".join(traceback.format_exception(type(original), original, original.__traceback__)).rstrip())
    if result.skipped:
        skipped = ", ".join(f"{n} (after {root})" for n, root in result.skipped.items())
        lines.append(f"\nskipped: {skipped}")
    failure = WorkflowRunFailed("\n".join(lines), result)
    first = next(iter(result.errors.values()), None)
    if first is not None:
        failure.__cause__ = first.original
    return failure


# --- the node contract -----------------------------------------------------------------------


def assert_node_contract(spec: NodeSpec | str, registry: Registry, **options: Any) -> None:
    """Raise ``AssertionError`` listing every contract problem of ``spec`` (see the module docstring)."""
    problems = check_node_contract(spec, registry, **options)
    if problems:
        type_id = spec if isinstance(spec, str) else spec.type_id
        listing = "\n".join(f"  - {p}" for p in problems)
        raise AssertionError(f"{type_id} breaks the node contract:\n{listing}")


def check_node_contract(
    spec: NodeSpec | str,
    registry: Registry,
    *,
    tmp_path: str | os.PathLike[str] | None = None,
    settings: Settings | None = None,
    run_examples: bool = True,
    require_input_docs: bool = False,
) -> list[str]:
    """Every contract problem of ``spec`` as a sentence; empty when it passes.

    :param spec: The node, or a type id registered in ``registry``.
    :param registry: Types and nodes to check against (and run the examples with).
    :param tmp_path: Scratch folder for example files and outputs (default: a temporary one,
        removed afterwards).
    :param settings: Settings to run the examples with (default :func:`make_settings`); the
        scratch folder is added to their read folders.
    :param run_examples: Run the examples (otherwise only the declaration is checked).
    :param require_input_docs: Every input and output must have a description too.
    """
    if isinstance(spec, str):
        found = registry.get(spec)
        if found is None:
            return [f"node type {spec!r} is not registered"]
        spec = found
    problems = _declaration_problems(spec, registry, require_input_docs)
    if not run_examples or any("unregistered type" in p for p in problems):
        return problems
    with _scratch(tmp_path) as folder:
        problems += _example_problems(spec, registry, folder, settings)
    return problems


@contextmanager
def _scratch(tmp_path: str | os.PathLike[str] | None) -> Iterator[Path]:
    if tmp_path is not None:
        folder = Path(tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="dagfusion-contract-") as name:
        yield Path(name)


def _declaration_problems(spec: NodeSpec, registry: Registry, require_input_docs: bool) -> list[str]:
    from dagfusion.node import REQUIRED

    types = registry.types
    problems: list[str] = []
    if not spec.description.strip():
        problems.append("no description: give the run function a docstring or pass description=")
    if not spec.category.strip():
        problems.append("no category")
    for kind, sockets in (("input", spec.inputs), ("output", spec.outputs)):
        for socket in sockets:
            unknown = types.unknown_names(socket.type)
            if unknown:
                problems.append(f"{kind} {socket.name!r} has unregistered type(s) {unknown}")
            if require_input_docs and not socket.description.strip():
                problems.append(f"{kind} {socket.name!r} has no description")
    for inp in spec.inputs:
        if types.unknown_names(inp.type):
            continue
        where = f"input {inp.name!r} ({inp.type_name})"
        if inp.min is not None and inp.max is not None and inp.min > inp.max:
            problems.append(f"{where}: min {inp.min} is greater than max {inp.max}")
        if (inp.min is not None or inp.max is not None) and not (
            types.value_matches(inp.type, 0) or types.value_matches(inp.type, 0.0)
        ):
            problems.append(f"{where}: min/max are set but the type is not numeric")
        if inp.choices is not None:
            if not inp.choices:
                problems.append(f"{where}: choices is empty")
            for choice in inp.choices:
                if not types.value_matches(inp.type, choice):
                    problems.append(f"{where}: choice {choice!r} is not a {inp.type_name} value")
        if inp.default is not REQUIRED and inp.default is not None:
            if not types.value_matches(inp.type, inp.default):
                problems.append(
                    f"{where}: default {inp.default!r} is {types.describe_value(inp.default)}, not {inp.type_name}"
                )
            else:
                why = inp.bound_problem(inp.default)
                if why:
                    problems.append(f"{where}: default {why}")
    if spec.persist:
        for out in spec.outputs:
            if out.type_name not in types or types.get(out.type_name).serializer is None:
                problems.append(
                    f"persist=True but output {out.name!r} has type {out.type_name}, which has no serializer"
                )
    return problems


def example_inputs(spec: NodeSpec, folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The node's examples as input mappings; callables are called (with ``folder`` if they take an argument).

    :raises TypeError: an example is neither a mapping nor a callable returning one.
    """
    return [_resolve_example(example, Path(folder)) for example in spec.examples]


def _resolve_example(example: Any, folder: Path) -> dict[str, Any]:
    if callable(example) and not isinstance(example, Mapping):
        folder.mkdir(parents=True, exist_ok=True)
        value = example(folder) if _wants_argument(example) else example()
    else:
        value = example
    if not isinstance(value, Mapping):
        raise TypeError(f"an example must be a mapping of input names to values (or a callable returning one), got {type(value).__name__}")
    return dict(value)


def _wants_argument(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params
    )


def _fresh(example: Any, first: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A second, independent copy of an example's inputs (for the determinism run)."""
    if callable(example) and not isinstance(example, Mapping):
        return _resolve_example(example, folder)
    try:
        return copy.deepcopy(first)
    except Exception:  # uncopyable values: reuse them (mutation is checked separately)
        return dict(first)


def _example_problems(spec: NodeSpec, registry: Registry, folder: Path, settings: Settings | None) -> list[str]:
    problems: list[str] = []
    examples: list[Any] = list(spec.examples)
    label_prefix = "example"
    if not examples:
        if all(not inp.required for inp in spec.inputs):
            examples = [{}]
            label_prefix = "run with defaults"
        elif spec.pure:
            required = [inp.name for inp in spec.inputs if inp.required]
            return [
                f"no examples: a pure node with required inputs {required} must declare examples=[...] "
                "(a mapping, or a callable returning one so tensors are built lazily)"
            ]
        else:
            return []
    if settings is None:
        settings = make_settings(folder)
    else:
        settings = settings.with_overrides(read_dirs=[*settings.read_dirs, folder])
    contract = _contract_registry(registry, spec)
    patched: list[tuple[str, str | None, dict[str, str | None]]] = []
    for index, example in enumerate(examples, 1):
        label = label_prefix if label_prefix != "example" else f"example {index}"
        example_dir = folder / "examples" / f"{index}"
        try:
            inputs = _resolve_example(example, example_dir)
        except Exception as exc:
            problems.append(f"{label}: could not be built: {type(exc).__name__}: {exc}")
            continue
        unknown = sorted(set(inputs) - {inp.name for inp in spec.inputs})
        if unknown:
            problems.append(f"{label}: names undeclared inputs {unknown}")
            continue
        first = _run_example(spec, contract, inputs, settings, folder / "runs" / f"{index}-a", label, problems)
        if first is None:
            continue
        if spec.pure:
            patched.append((label, _fingerprint_or_none(inputs), _patched_handles(first)))
        if spec.pure:
            try:
                again = _fresh(example, inputs, example_dir)
            except Exception as exc:
                problems.append(f"{label}: could not be built a second time: {type(exc).__name__}: {exc}")
                continue
            second = _run_example(spec, contract, again, settings, folder / "runs" / f"{index}-b", label, problems)
            if second is not None:
                problems += _determinism_problems(first, second, label)
        if spec.persist:
            problems += _persist_problems(spec, registry, first, folder / "persist" / f"{index}", label)
    return problems + _patch_key_problems(patched)


def _fingerprint_or_none(value: Any) -> str | None:
    from dagfusion.fingerprint import fingerprint

    try:
        return fingerprint(value)
    except Exception:  # a value whose fingerprint fails is simply not compared
        return None


def _patched_handles(outputs: Mapping[str, Any]) -> dict[str, str | None]:
    """``{output: fingerprint}`` of the outputs that are handles carrying patches."""
    return {
        name: _fingerprint_or_none(value)
        for name, value in outputs.items()
        if isinstance(getattr(value, "patches", None), tuple) and value.patches
        and hasattr(value, "__dagfusion_fingerprint__")
    }


def _patch_key_problems(runs: list[tuple[str, str | None, dict[str, str | None]]]) -> list[str]:
    """Examples with different inputs whose patched handles fingerprint the same: a setting is
    missing from a patch's key, so the engine's cache would serve one handle for the other."""
    problems = []
    for i, (label_a, inputs_a, handles_a) in enumerate(runs):
        for label_b, inputs_b, handles_b in runs[i + 1:]:
            if inputs_a is None or inputs_b is None or inputs_a == inputs_b:
                continue
            for name, fp in handles_a.items():
                if fp is not None and handles_b.get(name) == fp:
                    problems.append(
                        f"{label_a} and {label_b}: different inputs give output {name!r} the same fingerprint "
                        "(a setting is missing from a patch's key, so caches would mix the two handles up)"
                    )
    return problems


def _contract_registry(registry: Registry, spec: NodeSpec) -> Registry:
    """``registry`` plus ``spec`` (if not registered as is); the feeder node is added per run."""
    if registry.get(spec.type_id) is spec:
        return registry
    return _registry_with(registry, [spec])


def _registry_with(registry: Registry, specs: Sequence[NodeSpec]) -> Registry:
    """A shallow copy of ``registry`` that also knows ``specs`` (types and plugins are shared)."""
    return registry.with_nodes(specs, "dagfusion.testing")


def _feeder(values: Mapping[str, Any]) -> NodeSpec:
    from dagfusion.node import NodeSpec, OutputSpec

    def emit(ctx: Any) -> dict[str, Any]:
        return dict(values)

    return NodeSpec(
        type_id=EXAMPLE_FEEDER,
        version="1.0.0",
        category="testing",
        description="Emits a contract example's non-constant input values (dagfusion.testing).",
        inputs=(),
        outputs=tuple(OutputSpec(name, "ANY") for name in values),
        fn=emit,
        pure=False,
    )


def _run_example(
    spec: NodeSpec,
    registry: Registry,
    inputs: Mapping[str, Any],
    settings: Settings,
    out: Path,
    label: str,
    problems: list[str],
) -> dict[str, Any] | None:
    """Run the node once on ``inputs``; its outputs, or ``None`` after adding the problems."""
    from dagfusion.engine import Engine
    from dagfusion.errors import ValidationError
    from dagfusion.workflow import Link, NodeInstance, Workflow

    by_name = {inp.name: inp for inp in spec.inputs}
    constants: dict[str, Any] = {}
    fed: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, _IMMUTABLE) and not by_name[name].link_only:
            constants[name] = value
        else:
            fed[name] = value
    nodes = {}
    run_registry = registry
    if fed:
        run_registry = _registry_with(registry, [_feeder(fed)])
        nodes[_FEEDER_ID] = NodeInstance(_FEEDER_ID, EXAMPLE_FEEDER)
    links = {name: Link(_FEEDER_ID, name) for name in fed}
    nodes[_TESTED_ID] = NodeInstance(_TESTED_ID, spec.type_id, inputs={**constants, **links})
    workflow = Workflow(nodes=nodes, metadata={"name": f"contract-{spec.type_id}"}, outputs=(_TESTED_ID,))
    try:
        result = Engine(run_registry, settings).run(
            workflow, out=out, use_cache=False, record=False, check_mutation=True
        )
    except ValidationError as exc:
        problems.append(f"{label}: invalid inputs: " + "; ".join(p.message if not p.input else f"{p.input}: {p.message}" for p in exc.problems))
        return None
    if not result.ok:
        error = result.errors.get(_TESTED_ID) or next(iter(result.errors.values()), None)
        if error is None:
            problems.append(f"{label}: the run ended {result.status}")
        else:
            original = error.original
            problems.append(f"{label}: failed: {type(original).__name__}: {original}")
        return None
    outputs = dict(result.outputs[_TESTED_ID])
    types = registry.types
    for out_spec in spec.outputs:
        value = outputs.get(out_spec.name)
        if value is None and not types.value_matches(out_spec.type, None):
            problems.append(f"{label}: output {out_spec.name!r} is None, which is not a {out_spec.type_name} value")
    if spec.pure and out.exists() and any(out.iterdir()):
        written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) or sorted(
            str(p.relative_to(out)) for p in out.rglob("*")
        )
        problems.append(f"{label}: a pure node wrote files {written[:5]} into the output folder; declare pure=False")
    return outputs


def _determinism_problems(first: Mapping[str, Any], second: Mapping[str, Any], label: str) -> list[str]:
    from dagfusion.fingerprint import fingerprint

    problems = []
    for name, value in first.items():
        a, b = fingerprint(value), fingerprint(second.get(name))
        if a is not None and b is not None and a != b:
            problems.append(
                f"{label}: not deterministic: output {name!r} differs between two runs on the same inputs "
                "(seed the randomness from an input, or declare pure=False)"
            )
    return problems


def _persist_problems(spec: NodeSpec, registry: Registry, outputs: Mapping[str, Any], folder: Path, label: str) -> list[str]:
    from dagfusion.fingerprint import fingerprint

    problems = []
    folder.mkdir(parents=True, exist_ok=True)
    for out_spec in spec.outputs:
        if out_spec.type_name not in registry.types:
            continue
        serializer = registry.types.get(out_spec.type_name).serializer
        value = outputs.get(out_spec.name)
        if serializer is None or value is None:
            continue
        path = str(folder / out_spec.name)
        try:
            serializer.save(value, path)
            loaded = serializer.load(path)
        except Exception as exc:
            problems.append(f"{label}: output {out_spec.name!r} cannot be persisted: {type(exc).__name__}: {exc}")
            continue
        if fingerprint(loaded) != fingerprint(value):
            problems.append(f"{label}: output {out_spec.name!r} changes when saved and loaded by its serializer")
    return problems


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
