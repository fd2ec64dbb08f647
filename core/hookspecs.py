"""The hooks a dagfusion plugin may implement.

A plugin is a module (or object) with functions decorated by :data:`dagfusion.hookimpl`,
named like the specs below, and published through the ``dagfusion`` entry-point group::

    [project.entry-points.dagfusion]
    mypack = "mypack.plugin"

Every hook takes keyword arguments only. Implementations may accept any subset of a hook's
arguments, so new arguments can be added without breaking existing plugins. Built-in node
packs are registered through these same hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from dagfusion.context import RunContext
    from dagfusion.model import Family
    from dagfusion.node import NodeSpec
    from dagfusion.types import SocketType

PROJECT = "dagfusion"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Hooks called while a workflow runs; an exception one raises becomes a ``PluginError`` naming the plugin.
LIFECYCLE_HOOKS = ("before_node_run", "after_node_run", "on_node_error")


@hookspec
def register_types(register: Callable[[SocketType], None]) -> None:
    """Register the socket types this plugin defines.

    Called once per registry, before :func:`register_nodes` of any plugin, so nodes may use
    types from other plugins.

    :param register: Call ``register(socket_type)`` for each :class:`~dagfusion.SocketType`.
        A name another plugin registered first disables this plugin, as does a hook that raises;
        a disabled plugin registers nothing at all (see ``dagfusion plugins``).
    """


@hookspec
def register_nodes(register: Callable[[NodeSpec], None]) -> None:
    """Register the node types this plugin provides.

    :param register: Call ``register(spec)`` for each :class:`~dagfusion.NodeSpec` (the object
        the :func:`~dagfusion.node` decorator returns). A type id another plugin registered
        first, an input or output naming an unregistered socket type, or a hook that raises
        disables this plugin, with everything it registered (see ``dagfusion plugins``).
    """


@hookspec
def register_denoiser_families(register: Callable[[Family], None]) -> None:
    """Register the denoiser families this plugin provides: how samplers, caches and training
    call a new kind of denoiser (see :class:`dagfusion.model.Family`).

    Called once per registry, after :func:`register_nodes`. Families of plugins registered later
    are asked first; registering the same family (same name and class) again changes nothing.

    :param register: Call ``register(family)`` for each family instance. An object that is not a
        family, or a name another plugin's family of a different class holds, disables this
        plugin with everything it registered.
    """


@hookspec
def register_data_adapters(register: Callable[[Callable[[Any], Any]], None]) -> None:
    """Register adapters that turn this plugin's dataset objects into training data.

    :param register: Call ``register(adapter)`` for each: ``adapter(value)`` returns the
        training pack's ``TrainingData`` for values it knows, else ``None``. Adapters of later
        plugins are asked first; the built-in ``batch()`` rule last. Something not callable
        disables this plugin.
    """


@hookspec
def before_node_run(node_id: str, spec: NodeSpec, inputs: dict[str, Any], context: RunContext) -> None:
    """Called just before a node's run function, after its inputs are resolved.

    Use it for tracing, timing or profiling. It must not modify ``inputs``. An exception it
    raises fails the node with a :class:`~dagfusion.PluginError` naming this plugin.

    :param node_id: The node's id in the workflow.
    :param spec: The node's declaration.
    :param inputs: The input values the node is about to receive (read only).
    :param context: The node's run context (run id, output folder, settings).
    """


@hookspec
def after_node_run(
    node_id: str, spec: NodeSpec, outputs: dict[str, Any], seconds: float, context: RunContext
) -> None:
    """Called after a node returned successfully (not for cache hits).

    An exception it raises becomes a run warning (a ``RunWarning`` event and an entry in
    ``RunResult.warnings``) naming this plugin; the node's result stands and the run goes on.

    :param node_id: The node's id in the workflow.
    :param spec: The node's declaration.
    :param outputs: What the node returned, by output name (read only).
    :param seconds: Wall-clock time the run function took.
    :param context: The node's run context.
    """


@hookspec
def on_node_error(node_id: str, spec: NodeSpec, error: BaseException, context: RunContext) -> None:
    """Called when a node's run function raised (not for cancellation).

    The run continues with the nodes that do not depend on this one; this hook only observes.
    An exception it raises becomes a run warning naming this plugin.

    :param node_id: The node's id in the workflow.
    :param spec: The node's declaration.
    :param error: The exception the node raised.
    :param context: The node's run context.
    """
