"""dagfusion: a node-graph workflow engine for making diffusion models fast and small.

This module is the public surface plugins and scripts import. It changes only compatibly;
deprecations are announced a minor release before removal.

Declaring nodes and types::

    from dagfusion import node, Input, Output, hookimpl, SocketType

Running workflows::

    import dagfusion
    wf = dagfusion.load_workflow("workflows/quickstart.yaml")
    result = dagfusion.run(wf, overrides=["noise.seed=3"])
    result.output("stats.mean")

Importing dagfusion never imports torch; node packs import it when they run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dagfusion.context import CancelToken, RunContext
from dagfusion.errors import (
    NodeDefinitionError,
    NodeExecutionError,
    NodeInputError,
    PluginError,
    Problem,
    RunCancelled,
    UnsafeOperationError,
    ValidationError,
    WorkflowError,
)
from dagfusion.events import (
    Event,
    EventCollector,
    NodeCached,
    NodeFailed,
    NodeFinished,
    NodePreview,
    NodeProgress,
    NodeSkipped,
    NodeStarted,
    ProgressHandler,
    RunCancelledEvent,
    RunFinished,
    RunStarted,
    RunWarning,
)
from dagfusion.hookspecs import hookimpl, hookspec
from dagfusion.node import REQUIRED, Input, InputSpec, NodeSpec, Output, OutputSpec, node
from dagfusion.settings import Settings
from dagfusion.types import (
    ANY,
    BOOLEAN,
    DICT,
    FLOAT,
    INT,
    LIST,
    MODULE,
    PATH,
    SEED,
    STRING,
    TENSOR,
    Serializer,
    SocketType,
    UnionType,
    union,
)
from dagfusion.workflow import Link, NodeInstance, Workflow, load_workflow

__version__ = "0.1.0"

if TYPE_CHECKING:
    from dagfusion.engine import Engine, run
    from dagfusion.executor import RunResult
    from dagfusion.registry import Registry, default_registry
    from dagfusion.validation import ValidatedWorkflow, validate

_LAZY = {
    "Engine": "dagfusion.engine",
    "run": "dagfusion.engine",
    "RunResult": "dagfusion.executor",
    "Registry": "dagfusion.registry",
    "default_registry": "dagfusion.registry",
    "ValidatedWorkflow": "dagfusion.validation",
    "validate": "dagfusion.validation",
}


def __getattr__(name: str) -> Any:
    """Import the engine's heavier parts (networkx) only when first used."""
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'dagfusion' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


__all__ = [
    "ANY", "BOOLEAN", "DICT", "FLOAT", "INT", "LIST", "MODULE", "PATH", "SEED", "STRING", "TENSOR",
    "CancelToken", "Engine", "Event", "EventCollector", "Input", "InputSpec", "Link", "NodeCached",
    "NodeDefinitionError", "NodeExecutionError", "NodeFailed", "NodeInputError", "NodeFinished", "NodeInstance",
    "NodePreview", "NodeProgress", "NodeSkipped", "NodeSpec", "NodeStarted", "Output", "OutputSpec",
    "PluginError", "Problem", "ProgressHandler", "REQUIRED", "Registry", "RunCancelled",
    "RunCancelledEvent", "RunContext", "RunFinished", "RunResult", "RunStarted", "RunWarning", "Serializer",
    "Settings", "SocketType", "UnionType", "UnsafeOperationError", "ValidatedWorkflow",
    "ValidationError", "Workflow", "WorkflowError", "default_registry", "hookimpl", "hookspec",
    "load_workflow", "node", "run", "union", "validate", "__version__",
]
