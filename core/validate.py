"""Validation: every problem of a workflow against a registry, reported at once.

:func:`check` never raises for user mistakes: it returns a :class:`ValidatedWorkflow` (or
``None``) plus every :class:`~dagfusion.errors.Problem` and warning. :func:`validate` raises
:class:`~dagfusion.errors.ValidationError` when there is any problem. Checks: unknown node
type (with a suggestion), unknown or unsatisfied version (newer major names the plugin), old
major versions migrated (with a warning), missing required input, unknown input, type mismatch
(expected vs got), value out of bounds or not among the choices, paths outside the allowed
read folders, dangling references, cycles (printed as node ids), unknown output targets and
sweep keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

from dagfusion.errors import Problem, UnsafeOperationError, ValidationError, did_you_mean
from dagfusion.node import REQUIRED, NodeSpec
from dagfusion.registry import Registry
from dagfusion.semver import parse_version
from dagfusion.settings import Settings
from dagfusion.workflow import NODE_ID, Link, NodeInstance, Workflow, sweep_points


@dataclass(frozen=True)
class ValidatedWorkflow:
    """A workflow that passed validation, with each node's spec and the dependency graph.

    ``workflow`` has migrations applied (its nodes carry the installed versions);
    ``order`` is a topological order of all node ids.
    """

    workflow: Workflow
    specs: Mapping[str, NodeSpec]
    graph: nx.DiGraph = field(repr=False)
    order: tuple[str, ...]
    warnings: tuple[str, ...] = ()


def check(
    workflow: Workflow,
    registry: Registry,
    settings: Settings | None = None,
    *,
    initial_problems: list[Problem] | None = None,
) -> tuple[ValidatedWorkflow | None, list[Problem], list[str]]:
    """Validate ``workflow``; return ``(validated or None, problems, warnings)``."""
    problems: list[Problem] = list(initial_problems or [])
    warnings: list[str] = []
    specs: dict[str, NodeSpec] = {}
    nodes: dict[str, NodeInstance] = {}
    known_types = registry.node_types()

    # Pass 1: types, versions and migrations.
    for node_id, inst in workflow.nodes.items():
        line = workflow.node_line(node_id)
        spec = registry.get(inst.type)
        if spec is None:
            if inst.type:
                problems.append(
                    Problem(
                        "unknown-node-type",
                        f"unknown node type {inst.type!r}{did_you_mean(inst.type, known_types)}",
                        node=node_id,
                        line=workflow.line("nodes", node_id, "type") or line,
                    )
                )
            nodes[node_id] = inst
            continue
        inst = _resolve_version(workflow, inst, spec, registry, problems, warnings)
        specs[node_id] = spec
        nodes[node_id] = inst

    # Pass 2: inputs.
    types = registry.types
    for node_id, inst in nodes.items():
        spec = specs.get(node_id)
        if spec is None:
            continue
        declared = [i.name for i in spec.inputs]
        for name, value in inst.inputs.items():
            input_spec = spec.input(name)
            if input_spec is None:
                problems.append(
                    Problem(
                        "unknown-input",
                        f"{spec.type_id} has no input {name!r}{did_you_mean(name, declared)}"
                        f" (inputs: {', '.join(declared) or 'none'})",
                        node=node_id,
                        input=name,
                        line=workflow.node_line(node_id, name),
                    )
                )
                continue
            if isinstance(value, Link):
                source = nodes.get(value.node)
                if source is None:
                    problems.append(
                        Problem(
                            "dangling-reference",
                            f"links to node {value.node!r}, which does not exist{did_you_mean(value.node, list(nodes))}",
                            node=node_id,
                            input=name,
                            line=workflow.node_line(node_id, name),
                        )
                    )
                    continue
                source_spec = specs.get(value.node)
                if source_spec is None:
                    continue  # its unknown type is already reported
                output = source_spec.output(value.output)
                if output is None:
                    names = [o.name for o in source_spec.outputs]
                    problems.append(
                        Problem(
                            "dangling-reference",
                            f"links to output {value.output!r} of {value.node!r} ({source_spec.type_id}), which has "
                            f"outputs {names}{did_you_mean(value.output, names)}",
                            node=node_id,
                            input=name,
                            line=workflow.node_line(node_id, name),
                        )
                    )
                    continue
                if not types.accepts(input_spec.type, output.type):
                    problems.append(
                        Problem(
                            "type-mismatch",
                            f"expected {input_spec.type_name}, got {output.type_name} from {value}",
                            node=node_id,
                            input=name,
                            line=workflow.node_line(node_id, name),
                        )
                    )
                continue
            problem = check_constant(registry, spec, input_spec.name, value, settings)
            if problem:
                problems.append(Problem(problem[0], problem[1], node=node_id, input=name, line=workflow.node_line(node_id, name)))
        if spec.check is not None:
            problems.extend(_node_check_problems(workflow, node_id, inst, spec))
        for input_spec in spec.inputs:
            if input_spec.required and input_spec.name not in inst.inputs:
                problems.append(
                    Problem(
                        "missing-input",
                        f"required input {input_spec.name!r} ({input_spec.type_name}) is not connected or set",
                        node=node_id,
                        input=input_spec.name,
                        line=workflow.node_line(node_id),
                    )
                )

    # Pass 3: graph and cycles.
    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    for node_id, inst in nodes.items():
        for _, link in inst.links():
            if link.node in nodes:
                graph.add_edge(link.node, node_id)
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1 or any(graph.has_edge(n, n) for n in component):
            cycle = _cycle_in(graph, component)
            first = cycle[0]
            problems.append(
                Problem(
                    "cycle",
                    "cycle: " + " -> ".join([*cycle, first]),
                    node=first,
                    line=workflow.node_line(first),
                )
            )

    # Pass 4: targets and sweeps.
    for index, target in enumerate(workflow.outputs or ()):
        node_id, _, output = target.partition(".")
        if node_id not in nodes:
            problems.append(
                Problem(
                    "dangling-reference",
                    f"output target {target!r} names no node{did_you_mean(node_id, list(nodes))}",
                    line=workflow.line("outputs", index),
                )
            )
        elif output and node_id in specs and specs[node_id].output(output) is None:
            problems.append(
                Problem(
                    "dangling-reference",
                    f"output target {target!r}: {specs[node_id].type_id} has no output {output!r}",
                    node=node_id,
                    line=workflow.line("outputs", index),
                )
            )
    limit = (settings or Settings()).max_sweep_points
    points = sweep_points(workflow)
    if points > limit:
        problems.append(
            Problem(
                "sweep-too-large",
                f"the sweep describes {points:,} runs; at most {limit:,} are allowed "
                "(setting max_sweep_points, or DAGFUSION_MAX_SWEEP_POINTS)",
                line=workflow.line("sweep"),
            )
        )
    for index, group in enumerate(workflow.sweep):
        for key, values in group.items():
            line = workflow.line("sweep", index, key)
            link = Link.parse(key)
            if link is None:
                continue
            if link.node not in nodes:
                problems.append(Problem("dangling-reference", f"sweep key {key!r} names no node", line=line))
                continue
            spec = specs.get(link.node)
            if spec is None:
                continue
            input_spec = spec.input(link.output)
            if input_spec is None:
                problems.append(
                    Problem("unknown-input", f"sweep key {key!r}: {spec.type_id} has no input {link.output!r}", node=link.node, line=line)
                )
                continue
            for value in values:
                problem = check_constant(registry, spec, link.output, value, settings)
                if problem:
                    problems.append(
                        Problem(problem[0], f"sweep value: {problem[1]}", node=link.node, input=link.output, line=line)
                    )

    if problems:
        problems.sort(key=lambda p: (p.line is None, p.line or 0))
        return None, problems, warnings
    resolved = workflow.with_nodes(nodes)
    order = tuple(nx.topological_sort(graph))
    return ValidatedWorkflow(resolved, specs, graph, order, tuple(warnings)), [], warnings


def validate(workflow: Workflow, registry: Registry, settings: Settings | None = None) -> ValidatedWorkflow:
    """Validate ``workflow``; raise :class:`ValidationError` with every problem if any."""
    validated, problems, _ = check(workflow, registry, settings)
    if validated is None:
        raise ValidationError(problems, workflow.source)
    return validated


def check_constant(
    registry: Registry, spec: NodeSpec, input_name: str, value: Any, settings: Settings | None
) -> tuple[str, str] | None:
    """``(code, message)`` if a constant is not acceptable for ``spec``'s input, else ``None``."""
    input_spec = spec.input(input_name)
    assert input_spec is not None
    if value is None and (input_spec.optional or input_spec.default is None):
        return None
    if input_spec.link_only:
        return ("link-required", f"expected a link from a node producing {input_spec.type_name}, got a constant")
    if not registry.types.value_matches(input_spec.type, value):
        return (
            "type-mismatch",
            f"expected {input_spec.type_name}, got {registry.types.describe_value(value)} {_short(value)}",
        )
    why = input_spec.bound_problem(value)
    if why:
        return ("out-of-range" if input_spec.choices is None else "not-a-choice", why)
    if settings is not None and input_spec.type_name == "PATH" and isinstance(value, str):
        try:
            settings.check_readable(value)
        except UnsafeOperationError as exc:
            return ("path-not-allowed", str(exc))
    return None


def _node_check_problems(workflow: Workflow, node_id: str, inst: NodeInstance, spec: NodeSpec) -> list[Problem]:
    """The problems ``spec.check`` finds in the node's constant inputs, located in the file."""
    assert spec.check is not None
    values = {
        i.name: inst.inputs.get(i.name, i.default)
        for i in spec.inputs
        if not isinstance(inst.inputs.get(i.name), Link) and (i.name in inst.inputs or not i.required)
    }
    values = {k: (None if v is REQUIRED else v) for k, v in values.items()}
    try:
        found = list(spec.check(values))
    except Exception as exc:  # a broken check is the node's bug, reported without losing the rest
        return [Problem("check-failed", f"{spec.type_id}'s input check raised {type(exc).__name__}: {exc}", node=node_id)]
    located = []
    for problem in found:
        if isinstance(problem, str):
            problem = Problem("bad-value", problem)
        line = workflow.node_line(node_id, problem.input) if problem.input else workflow.node_line(node_id)
        located.append(replace(problem, node=node_id, line=problem.line or line))
    return located


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _cycle_in(graph: nx.DiGraph, component: set[str]) -> list[str]:
    sub = graph.subgraph(component)
    start = min(component)
    edges = nx.find_cycle(sub, source=start)
    return [u for u, _ in edges]


def _resolve_version(
    workflow: Workflow,
    inst: NodeInstance,
    spec: NodeSpec,
    registry: Registry,
    problems: list[Problem],
    warnings: list[str],
) -> NodeInstance:
    if inst.version is None:
        return inst
    line = workflow.line("nodes", inst.id, "version")
    pinned = parse_version(inst.version)
    installed = spec.parsed_version
    if pinned is None:
        problems.append(Problem("bad-version", f"version {inst.version!r} is not MAJOR.MINOR.PATCH", node=inst.id, line=line))
        return inst
    if pinned.major > installed.major or (pinned.major == installed.major and pinned > installed):
        problems.append(
            Problem(
                "version-unsatisfied",
                f"the file needs {spec.type_id} {pinned}, but {registry.origin_description(spec.type_id)} "
                f"provides {installed}; upgrade that plugin",
                node=inst.id,
                line=line,
            )
        )
        return inst
    if pinned.major == installed.major:
        return replace(inst, version=str(installed))
    inputs = dict(inst.inputs)
    for major in range(pinned.major, installed.major):
        migrate = spec.migrations.get(major)
        if migrate is None:
            problems.append(
                Problem(
                    "version-unsatisfied",
                    f"the file was written for {spec.type_id} {pinned}; installed {installed} has no migration "
                    f"from major version {major}",
                    node=inst.id,
                    line=line,
                )
            )
            return inst
        try:
            inputs = dict(migrate(dict(inputs)))
        except Exception as exc:  # a migration that cannot handle this file is a user-facing problem
            problems.append(
                Problem("migration-failed", f"migrating from {major}.x failed: {type(exc).__name__}: {exc}", node=inst.id, line=line)
            )
            return inst
    warnings.append(
        f"node '{inst.id}' ({spec.type_id}) was written for version {pinned}; its inputs were migrated to {installed}. "
        "Save the workflow to keep the upgrade."
    )
    return replace(inst, version=str(installed), inputs=inputs)


__all__ = ["ValidatedWorkflow", "check", "validate", "check_constant", "NODE_ID"]
