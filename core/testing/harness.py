"""Registries, settings and runs for tests: :func:`make_registry`, :func:`make_settings`,
:func:`temporary_plugins`, :func:`run_workflow` and a stand-in node context (see
:mod:`dagfusion.testing`). Imports nothing heavy until a helper is called."""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagfusion.executor import RunResult
    from dagfusion.registry import Registry
    from dagfusion.settings import Settings
    from dagfusion.workflow import Workflow

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


