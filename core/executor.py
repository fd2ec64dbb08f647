"""Execution: run a :class:`~dagfusion.plan.Plan` node by node, emitting typed events.

A failing node becomes a :class:`~dagfusion.errors.NodeExecutionError` that keeps the original
exception; nodes depending on it are skipped (and listed), independent nodes still run, and
every finished output is kept in the :class:`RunResult`. The cancel token is checked between
nodes and by long nodes through their context.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagfusion.cache import DiskCache, OutputCache
from dagfusion.context import CancelToken, RunContext
from dagfusion.errors import NodeExecutionError, PluginError, Problem, RunCancelled, ValidationError
from dagfusion.events import (
    NodeCached,
    NodeFailed,
    NodeFinished,
    NodeSkipped,
    NodeStarted,
    ProgressHandler,
    RunCancelledEvent,
    RunFinished,
    RunStarted,
    RunWarning,
)
from dagfusion.fingerprint import fingerprint
from dagfusion.node import REQUIRED, NodeSpec
from dagfusion.plan import Plan
from dagfusion.registry import Registry
from dagfusion.settings import Settings
from dagfusion.threads import ThreadPolicy
from dagfusion.validation import TypeChecks, bypass_input, effective_default
from dagfusion.workflow import Link

logger = logging.getLogger("dagfusion.executor")


@dataclass
class RunResult:
    """The outcome of one run.

    Attributes:
        run_id: The run's id.
        status: ``"ok"``, ``"failed"`` (some node failed) or ``"cancelled"``.
        outputs: ``{node id: {output name: value}}`` of every node that finished or was cached.
        errors: ``{node id: NodeExecutionError}`` of the nodes that failed.
        skipped: ``{node id: failed upstream node id}`` of the nodes that did not run.
        executed, cached: Node ids that ran, and that were served from the cache.
        output_dir: The run's output folder (its record lives there).
        warnings: Warnings from validation (migrations) and the run.
    """

    run_id: str
    status: str = "ok"
    outputs: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    errors: dict[str, NodeExecutionError] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    output_dir: Path | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def output(self, ref: str) -> Any:
        """The value of ``"node.output"`` (or the single output of ``"node"``)."""
        node_id, _, name = ref.partition(".")
        values = self.outputs[node_id]
        if not name:
            if len(values) != 1:
                raise KeyError(f"node {node_id!r} has outputs {list(values)}; name one as 'node.output'")
            return next(iter(values.values()))
        return values[name]

    def raise_for_status(self) -> RunResult:
        """Raise the first node error (or :class:`RunCancelled`) unless the run succeeded."""
        if self.status == "cancelled":
            raise RunCancelled("the run was cancelled")
        if self.errors:
            raise next(iter(self.errors.values()))
        return self


class _NullHandler:
    def handle(self, event: Any) -> None:
        pass


def execute(
    plan: Plan,
    *,
    registry: Registry,
    settings: Settings,
    run_id: str,
    output_dir: Path,
    handler: ProgressHandler | None = None,
    cancel_token: CancelToken | None = None,
    memory: OutputCache | None = None,
    disk: DiskCache | None = None,
    check_mutation: bool = False,
    provenance: Mapping[str, Any] | None = None,
) -> RunResult:
    """Run ``plan`` and return its :class:`RunResult` (never raises for node failures).

    :param check_mutation: Fingerprint linked inputs before and after each node and fail a
        node that changed one it did not declare ``mutates`` (slow; meant for tests).

    Torch gets the settings' thread count (:mod:`dagfusion.threads`) before the first node that
    runs with torch imported; a run that never imports torch never touches it.
    """
    threads = ThreadPolicy(settings.threads)
    handler = handler or _NullHandler()
    cancel_token = cancel_token or CancelToken()
    hook = registry.hook
    types = registry.types
    checks = TypeChecks(registry)
    validated = plan.validated
    nodes = validated.workflow.nodes
    result = RunResult(run_id=run_id, output_dir=output_dir, warnings=list(validated.warnings))
    values: dict[str, Mapping[str, Any]] = result.outputs
    broken: dict[str, str] = {}  # node id -> root failed node
    start = time.perf_counter()
    handler.handle(RunStarted(run_id, nodes=plan.order))
    for warned_node, message in plan.warnings:
        _warn(result, handler, warned_node, message)
    node_logger = logging.getLogger("dagfusion.node")

    for node_id in plan.order:
        if cancel_token.cancelled:
            result.status = "cancelled"
            handler.handle(RunCancelledEvent(run_id, node_id=node_id))
            break
        spec = validated.specs[node_id]
        cached = plan.hits.get(node_id)
        if cached is not None:
            values[node_id] = cached
            result.cached.append(node_id)
            handler.handle(NodeCached(run_id, node_id=node_id, node_type=spec.type_id))
            continue
        inst = nodes[node_id]
        root = next((broken[link.node] for _, link in inst.links() if link.node in broken), None)
        if root is not None:
            broken[node_id] = root
            result.skipped[node_id] = root
            handler.handle(NodeSkipped(run_id, node_id=node_id, because=root))
            continue

        handler.handle(NodeStarted(run_id, node_id=node_id, node_type=spec.type_id))
        if inst.bypass:  # not run: each output passes on its input of the same type
            try:
                inputs = _gather_inputs(node_id, spec, inst.inputs, values, registry, checks)
            except ValidationError as exc:
                error = NodeExecutionError(node_id, spec.type_id, exc)
                result.errors[node_id] = error
                broken[node_id] = node_id
                handler.handle(NodeFailed(run_id, node_id=node_id, node_type=spec.type_id, error=str(error), traceback=""))
                continue
            values[node_id] = {o.name: inputs.get(bypass_input(spec, o.name, inst.inputs) or "") for o in spec.outputs}
            result.executed.append(node_id)
            handler.handle(NodeFinished(run_id, node_id=node_id, node_type=spec.type_id, seconds=0.0))
            continue
        ctx = RunContext(
            node_id=node_id,
            run_id=run_id,
            settings=settings,
            output_dir=output_dir,
            cancel_token=cancel_token,
            handler=handler,
            logger=node_logger,
            provenance=provenance or {},
        )
        try:
            inputs = _gather_inputs(node_id, spec, inst.inputs, values, registry, checks)
            before = _input_fingerprints(spec, inputs) if check_mutation else None
            hook.before_node_run(node_id=node_id, spec=spec, inputs=inputs, context=ctx)
            threads.apply_if_imported()
            t0 = time.perf_counter()
            outputs = spec.normalize_outputs(spec.fn(ctx, **inputs))
            seconds = time.perf_counter() - t0
            _check_outputs(spec, outputs, registry, checks)
            if before is not None:
                _check_unchanged(spec, before, _input_fingerprints(spec, inputs))
        except RunCancelled:
            result.status = "cancelled"
            handler.handle(RunCancelledEvent(run_id, node_id=node_id))
            break
        except Exception as exc:
            error = NodeExecutionError(node_id, spec.type_id, exc)
            error.__cause__ = exc
            result.errors[node_id] = error
            broken[node_id] = node_id
            _observe(result, handler, node_id, hook.on_node_error, node_id=node_id, spec=spec, error=exc, context=ctx)
            handler.handle(
                NodeFailed(
                    run_id,
                    node_id=node_id,
                    node_type=spec.type_id,
                    error=str(error),
                    traceback="".join(traceback.format_exception(exc)),
                )
            )
            continue
        values[node_id] = outputs
        result.executed.append(node_id)
        if spec.pure:
            key = plan.keys[node_id]
            if memory is not None:
                memory.put(key, outputs)
            if disk is not None and spec.persist:
                output_types = {o.name: o.type_name for o in spec.outputs}
                if disk.can_store(types, output_types):
                    disk.put(
                        key, outputs, output_types, types,
                        on_error=lambda message, n=node_id: _warn(result, handler, n, message),
                    )
        _observe(
            result, handler, node_id, hook.after_node_run,
            node_id=node_id, spec=spec, outputs=outputs, seconds=seconds, context=ctx,
        )
        handler.handle(NodeFinished(run_id, node_id=node_id, node_type=spec.type_id, seconds=seconds))

    if result.status != "cancelled" and result.errors:
        result.status = "failed"
    result.seconds = time.perf_counter() - start
    if result.status != "cancelled":
        handler.handle(
            RunFinished(
                run_id,
                seconds=result.seconds,
                executed=len(result.executed),
                cached=len(result.cached),
                failed=tuple(result.errors),
                skipped=tuple(result.skipped),
            )
        )
    return result


def _observe(result: RunResult, handler: ProgressHandler, observed: str, hook: Any, **kwargs: Any) -> None:
    """Call an observing lifecycle hook about node ``observed``; a plugin failing in it is a run
    warning, not the end of the run."""
    try:
        hook(**kwargs)
    except PluginError as exc:
        _warn(result, handler, observed, str(exc))


def _warn(result: RunResult, handler: ProgressHandler, node_id: str | None, message: str) -> None:
    """Record a warning that does not stop the run: in the result, as an event and in the log."""
    text = f"node '{node_id}': {message}" if node_id else message
    result.warnings.append(text)
    logger.warning("%s", text)
    handler.handle(RunWarning(result.run_id, node_id=node_id, message=message))


def _gather_inputs(
    node_id: str,
    spec: NodeSpec,
    given: Mapping[str, Any],
    values: Mapping[str, Mapping[str, Any]],
    registry: Registry,
    checks: TypeChecks,
) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    problems: list[Problem] = []
    for input_spec in spec.inputs:
        name = input_spec.name
        value = given.get(name, REQUIRED)
        if isinstance(value, Link):
            value = values[value.node][value.output]
            if value is None and input_spec.optional:
                inputs[name] = None
                continue
            if not checks.value_matches(input_spec, value):
                problems.append(
                    Problem(
                        "type-mismatch",
                        f"expected {input_spec.type_name}, got {registry.types.describe_value(value)} from {given[name]}",
                        node=node_id,
                        input=name,
                    )
                )
                continue
            why = input_spec.bound_problem(value)
            if why:
                problems.append(Problem("out-of-range", why, node=node_id, input=name))
                continue
        elif value is REQUIRED:
            value = effective_default(input_spec)
        if input_spec.mutates and value is not None:
            value = copy.deepcopy(value)
        inputs[name] = value
    if problems:
        raise ValidationError(problems)
    return inputs


def _check_outputs(spec: NodeSpec, outputs: Mapping[str, Any], registry: Registry, checks: TypeChecks) -> None:
    for output in spec.outputs:
        value = outputs[output.name]
        if value is not None and not checks.value_matches(output, value):
            raise TypeError(
                f"output {output.name!r} is declared {output.type_name} but the node returned "
                f"{registry.types.describe_value(value)}"
            )


_IMMUTABLE = (type(None), bool, int, float, str, bytes)


def _input_fingerprints(spec: NodeSpec, inputs: Mapping[str, Any]) -> dict[str, str | None]:
    """Fingerprints of every input that could be changed in place (links, defaults, constants)."""
    out = {}
    for input_spec in spec.inputs:
        value = inputs.get(input_spec.name)
        if input_spec.mutates or isinstance(value, _IMMUTABLE):
            continue
        out[input_spec.name] = _deep_fingerprint(value)
    return out


def _deep_fingerprint(value: Any) -> str | None:
    """Fingerprint including a module's hooks, so patching by hooks also counts as mutation."""
    base = fingerprint(value)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.nn.Module):
        hooks = [
            (name, len(m._forward_hooks), len(m._forward_pre_hooks), type(m).__name__, m.training)
            for name, m in value.named_modules()
        ]
        return f"{base}:{hash(tuple(hooks))}"
    return base


def _check_unchanged(spec: NodeSpec, before: Mapping[str, str | None], after: Mapping[str, str | None]) -> None:
    changed = [name for name in before if before[name] is not None and before[name] != after[name]]
    if changed:
        raise RuntimeError(
            f"{spec.type_id} modified its input(s) {changed} in place; return a new object or declare "
            "the input with mutates=True so the executor hands it a private copy"
        )
