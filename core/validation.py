"""Validation: every problem of a workflow against a registry, reported at once.

:func:`check` never raises for user mistakes: it returns a :class:`ValidatedWorkflow` (or
``None``) plus every :class:`~dagfusion.errors.Problem` and warning. :func:`validate` raises
:class:`~dagfusion.errors.ValidationError` when there is any problem. Checks: unknown node
type (with a suggestion), unknown or unsatisfied version (newer major names the plugin), old
major versions migrated (with a warning), missing required input, unknown input, type mismatch
(expected vs got), value out of bounds or not among the choices, paths outside the allowed
read folders, dangling references, cycles (printed as node ids), unknown output targets and
sweep keys. :func:`sweep_point_problems` runs node checks on the combinations a sweep makes,
and :func:`with_constants` derives one sweep point's validated workflow from the base one.

(This module is ``dagfusion.validation``; ``dagfusion.validate`` is the function.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from dagfusion.errors import Problem, UnsafeOperationError, ValidationError, did_you_mean
from dagfusion.migration import resolve_version
from dagfusion.node import REQUIRED, InputSpec, NodeSpec, OutputSpec
from dagfusion.registry import Registry
from dagfusion.settings import Settings
from dagfusion.workflow import NODE_ID, Link, NodeInstance, Workflow, sweep_points
from dagfusion.yamlsource import paused_gc

if TYPE_CHECKING:
    import networkx as nx


@dataclass(frozen=True)
class ValidatedWorkflow:
    """A workflow that passed validation, with each node's spec and its dependencies.

    ``workflow`` has migrations applied (its nodes carry the installed versions) and no sweep
    when it is one point of a sweep; ``parents`` maps every node id to the ids it reads from;
    ``order`` is a topological order of all node ids. ``memo`` holds data that planning
    derives from the graph (not part of the value); instances are otherwise immutable.
    """

    workflow: Workflow
    specs: Mapping[str, NodeSpec]
    parents: Mapping[str, tuple[str, ...]] = field(repr=False)
    order: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def graph(self) -> nx.DiGraph:
        """The dependency graph as a ``networkx.DiGraph`` (edges parent → child), built on first use."""
        import networkx as nx

        graph = nx.DiGraph()
        graph.add_nodes_from(self.order)
        graph.add_edges_from((parent, child) for child, parents in self.parents.items() for parent in parents)
        return graph


def effective_default(input_spec: InputSpec) -> Any:
    """The value a node receives for an input that is neither linked nor set: its declared
    default, or ``None`` when it has none (an optional input). The one rule planning,
    execution and node checks share."""
    default = input_spec.default
    return None if default is REQUIRED else default


class TypeChecks:
    """Type questions asked many times in one pass (a check, a run), answered once per distinct
    question: whether a value of a builtin scalar class fits a socket type, and whether an
    output type may feed an input type. Only exact builtin scalar classes are remembered;
    other values are asked of the registry's type system each time."""

    _SCALARS = (int, float, str, bool, type(None))

    def __init__(self, registry: Registry) -> None:
        self.types = registry.types
        self._matches: dict[tuple[int, type], bool] = {}
        self._accepts: dict[tuple[int, int], bool] = {}

    def value_matches(self, socket: InputSpec | OutputSpec, value: Any) -> bool:
        """Whether ``value`` is a valid value of the socket's type (see ``TypeSystem.value_matches``)."""
        cls = type(value)
        if cls not in self._SCALARS:
            return self.types.value_matches(socket.type, value)
        key = (id(socket), cls)  # sockets are held by their specs for the whole pass
        found = self._matches.get(key)
        if found is None:
            found = self._matches[key] = self.types.value_matches(socket.type, value)
        return found

    def accepts(self, input_spec: InputSpec, output: OutputSpec) -> bool:
        """Whether ``output`` may be linked into ``input_spec`` (see ``TypeSystem.accepts``)."""
        key = (id(input_spec), id(output))
        found = self._accepts.get(key)
        if found is None:
            found = self._accepts[key] = self.types.accepts(input_spec.type, output.type)
        return found


class _SpecIndex:
    """A node spec's inputs and outputs by name, and its required inputs (built once per type)."""

    __slots__ = ("inputs", "outputs", "required", "declared")

    def __init__(self, spec: NodeSpec) -> None:
        self.inputs = {i.name: i for i in spec.inputs}
        self.outputs = {o.name: o for o in spec.outputs}
        self.required = tuple(i for i in spec.inputs if i.required)
        self.declared = [i.name for i in spec.inputs]


def check(
    workflow: Workflow,
    registry: Registry,
    settings: Settings | None = None,
    *,
    initial_problems: list[Problem] | None = None,
) -> tuple[ValidatedWorkflow | None, list[Problem], list[str]]:
    """Validate ``workflow``; return ``(validated or None, problems, warnings)``.

    Linear in the size of the workflow: each node, input and link is looked at once, and
    per-type answers (does a value of this class fit, may this output feed that input) are
    computed once per distinct question.
    """
    with paused_gc():
        return _check(workflow, registry, settings, list(initial_problems or []))


def _check(
    workflow: Workflow, registry: Registry, settings: Settings | None, problems: list[Problem]
) -> tuple[ValidatedWorkflow | None, list[Problem], list[str]]:
    warnings: list[str] = []
    specs: dict[str, NodeSpec] = {}
    nodes: dict[str, NodeInstance] = {}
    indexes: dict[str, _SpecIndex] = {}
    types = TypeChecks(registry)

    # Pass 1: types, versions and migrations.
    for node_id, inst in workflow.nodes.items():
        spec = registry.get(inst.type)
        if spec is None:
            if inst.type:
                problems.append(
                    Problem(
                        "unknown-node-type",
                        f"unknown node type {inst.type!r}{did_you_mean(inst.type, registry.node_types())}",
                        node=node_id,
                        line=workflow.line("nodes", node_id, "type"),
                    )
                )
            nodes[node_id] = inst
            continue
        if spec.type_id != inst.type:
            warnings.append(
                f"node '{node_id}': node type {inst.type} is now {spec.type_id}; saving the workflow writes the new id"
            )
            inst = replace(inst, type=spec.type_id)
        if inst.version is not None:
            inst = resolve_version(workflow, inst, spec, registry, problems, warnings)
        specs[node_id] = spec
        nodes[node_id] = inst
        if spec.type_id not in indexes:
            indexes[spec.type_id] = _SpecIndex(spec)

    # Pass 2: inputs, and each node's parents.
    parents: dict[str, tuple[str, ...]] = {}
    for node_id, inst in nodes.items():
        spec = specs.get(node_id)
        linked: list[str] = []
        if spec is None:
            parents[node_id] = tuple(dict.fromkeys(link.node for _, link in inst.links() if link.node in nodes))
            continue
        index = indexes[spec.type_id]
        given = inst.inputs
        for name, value in given.items():
            input_spec = index.inputs.get(name)
            if input_spec is None:
                problems.append(
                    Problem(
                        "unknown-input",
                        f"{spec.type_id} has no input {name!r}{did_you_mean(name, index.declared)}"
                        f" (inputs: {', '.join(index.declared) or 'none'})",
                        node=node_id,
                        input=name,
                        line=workflow.node_line(node_id, name),
                    )
                )
                if isinstance(value, Link) and value.node in nodes:
                    linked.append(value.node)
                continue
            if isinstance(value, Link):
                source_spec = specs.get(value.node)
                if source_spec is not None:
                    output = indexes[source_spec.type_id].outputs.get(value.output)
                    if output is not None and types.accepts(input_spec, output):
                        linked.append(value.node)
                        continue  # the usual case, settled without building a problem
                problem = _link_problem(value, input_spec, nodes, specs, indexes, types)
                if value.node in nodes:
                    linked.append(value.node)
                if problem is not None:
                    problems.append(
                        Problem(problem[0], problem[1], node=node_id, input=name, line=workflow.node_line(node_id, name))
                    )
                continue
            problem = _constant_problem(types, input_spec, value, settings)
            if problem:
                problems.append(Problem(problem[0], problem[1], node=node_id, input=name, line=workflow.node_line(node_id, name)))
        if spec.check is not None:
            problems.extend(node_check_problems(workflow, node_id, inst, spec))
        if inst.bypass:
            for output in spec.outputs:
                if bypass_input(spec, output.name, given) is None:
                    problems.append(
                        Problem(
                            "bypass-impossible",
                            f"node {node_id!r} cannot be bypassed: its output {output.name!r} ({output.type_name}) "
                            f"has no {output.type_name} input to pass through",
                            node=node_id,
                            line=workflow.line("nodes", node_id, "bypass"),
                        )
                    )
        for input_spec in index.required:
            if input_spec.name not in given:
                problems.append(
                    Problem(
                        "missing-input",
                        f"required input {input_spec.name!r} ({input_spec.type_name}) is not connected or set",
                        node=node_id,
                        input=input_spec.name,
                        line=workflow.node_line(node_id),
                    )
                )
        parents[node_id] = tuple(dict.fromkeys(linked)) if len(linked) > 1 else tuple(linked)

    # Pass 3: order and cycles.
    order = _topological_order(parents)
    if len(order) < len(parents):
        problems.extend(_cycle_problems(workflow, parents, set(order)))

    # Pass 4: targets and sweeps.
    for index_, target in enumerate(workflow.outputs or ()):
        node_id, _, output = target.partition(".")
        if node_id not in nodes:
            problems.append(
                Problem(
                    "dangling-reference",
                    f"output target {target!r} names no node{did_you_mean(node_id, list(nodes))}",
                    line=workflow.line("outputs", index_),
                )
            )
        elif output and node_id in specs and specs[node_id].output(output) is None:
            problems.append(
                Problem(
                    "dangling-reference",
                    f"output target {target!r}: {specs[node_id].type_id} has no output {output!r}",
                    node=node_id,
                    line=workflow.line("outputs", index_),
                )
            )
    problems.extend(_sweep_problems(workflow, registry, settings, nodes, specs))

    if problems:
        problems.sort(key=lambda p: (p.line is None, p.line or 0))
        return None, problems, warnings
    resolved = workflow.with_nodes(nodes)
    return ValidatedWorkflow(resolved, specs, parents, order, tuple(warnings)), [], warnings


def bypass_input(spec: NodeSpec, output_name: str, given: Mapping[str, Any]) -> str | None:
    """The input a bypassed node passes on as its output ``output_name``: the first input of
    exactly the output's type that is linked, else the first of that type; ``None`` if none."""
    output = spec.output(output_name)
    if output is None:
        return None
    same = [i.name for i in spec.inputs if i.type_name == output.type_name]
    linked = [name for name in same if isinstance(given.get(name), Link)]
    return (linked or same or [None])[0]


def _link_problem(
    link: Link,
    input_spec: InputSpec,
    nodes: Mapping[str, NodeInstance],
    specs: Mapping[str, NodeSpec],
    indexes: Mapping[str, _SpecIndex],
    types: TypeChecks,
) -> tuple[str, str] | None:
    """``(code, message)`` when a link names no node or output, or an output of the wrong type."""
    if link.node not in nodes:
        return ("dangling-reference", f"links to node {link.node!r}, which does not exist{did_you_mean(link.node, list(nodes))}")
    source_spec = specs.get(link.node)
    if source_spec is None:
        return None  # its unknown type is already reported
    output = indexes[source_spec.type_id].outputs.get(link.output)
    if output is None:
        names = [o.name for o in source_spec.outputs]
        return (
            "dangling-reference",
            f"links to output {link.output!r} of {link.node!r} ({source_spec.type_id}), which has "
            f"outputs {names}{did_you_mean(link.output, names)}",
        )
    if not types.accepts(input_spec, output):
        return ("type-mismatch", f"expected {input_spec.type_name}, got {output.type_name} from {link}")
    return None


def _topological_order(parents: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Node ids, parents first: file order when that already puts parents first, else a
    breadth-first order with ties in file order. Nodes on or behind a cycle are left out."""
    placed: set[str] = set()
    for node_id, ps in parents.items():
        for parent in ps:
            if parent not in placed:
                break
        else:
            placed.add(node_id)
            continue
        break
    else:
        return tuple(parents)
    waiting = {node_id: len(ps) for node_id, ps in parents.items()}
    children: dict[str, list[str]] = {}
    for node_id, ps in parents.items():
        for parent in ps:
            children.setdefault(parent, []).append(node_id)
    order = [node_id for node_id, count in waiting.items() if count == 0]
    for node_id in order:  # grows while iterated: a breadth-first sweep
        for child in children.get(node_id, ()):
            waiting[child] -= 1
            if waiting[child] == 0:
                order.append(child)
    return tuple(order)


def _cycle_problems(workflow: Workflow, parents: Mapping[str, tuple[str, ...]], ordered: set[str]) -> list[Problem]:
    """One ``cycle`` problem per cycle among the nodes a topological order could not place."""
    import networkx as nx

    graph = nx.DiGraph()
    rest = [n for n in parents if n not in ordered]
    graph.add_nodes_from(rest)
    graph.add_edges_from((p, n) for n in rest for p in parents[n] if p not in ordered)
    problems = []
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1 or any(graph.has_edge(n, n) for n in component):
            cycle = _cycle_in(graph, component)
            first = cycle[0]
            problems.append(Problem("cycle", "cycle: " + " -> ".join([*cycle, first]), node=first, line=workflow.node_line(first)))
    return problems


def _sweep_problems(
    workflow: Workflow,
    registry: Registry,
    settings: Settings | None,
    nodes: Mapping[str, NodeInstance],
    specs: Mapping[str, NodeSpec],
) -> list[Problem]:
    """The sweep's size against the limit, its keys, and each swept value against its input."""
    problems = []
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
    types = TypeChecks(registry)
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
                problem = _constant_problem(types, input_spec, value, settings)
                if problem:
                    problems.append(
                        Problem(problem[0], f"sweep value: {problem[1]}", node=link.node, input=link.output, line=line)
                    )
    return problems


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
    return _constant_problem(TypeChecks(registry), input_spec, value, settings)


def _constant_problem(types: TypeChecks, input_spec: InputSpec, value: Any, settings: Settings | None) -> tuple[str, str] | None:
    if value is None and (input_spec.optional or input_spec.default is None):
        return None
    if input_spec.link_only:
        return ("link-required", f"expected a link from a node producing {input_spec.type_name}, got a constant")
    if not types.value_matches(input_spec, value):
        return (
            "type-mismatch",
            f"expected {input_spec.type_name}, got {types.types.describe_value(value)} {_short(value)}",
        )
    why = input_spec.bound_problem(value)
    if why:
        return ("out-of-range" if input_spec.choices is None else "not-a-choice", why)
    if settings is not None and isinstance(value, str) and input_spec.type_name == "PATH":
        try:
            settings.check_tree_readable(value)
        except UnsafeOperationError as exc:
            return ("path-not-allowed", str(exc))
    return None


def node_check_values(spec: NodeSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    """What ``spec.check`` receives: every input that is not linked, set or defaulted
    (:func:`effective_default`); required inputs left unset are left out."""
    values = {}
    for i in spec.inputs:
        value = given.get(i.name, REQUIRED)
        if value is REQUIRED:
            if i.required:
                continue
            value = effective_default(i)
        elif isinstance(value, Link):
            continue
        values[i.name] = value
    return values


def node_check_problems(
    workflow: Workflow, node_id: str, inst: NodeInstance, spec: NodeSpec, *, sweep_line: int | None = None
) -> list[Problem]:
    """The problems ``spec.check`` finds in the node's constant inputs, located in the file
    (at ``sweep_line`` when the values come from a sweep point)."""
    assert spec.check is not None
    values = node_check_values(spec, inst.inputs)
    try:
        found = list(spec.check(values))
    except Exception as exc:  # a broken check is the node's bug, reported without losing the rest
        return [Problem("check-failed", f"{spec.type_id}'s input check raised {type(exc).__name__}: {exc}", node=node_id)]
    located = []
    for problem in found:
        if isinstance(problem, str):
            problem = Problem("bad-value", problem)
        if sweep_line is not None:
            line = sweep_line
        else:
            line = workflow.node_line(node_id, problem.input) if problem.input else workflow.node_line(node_id)
        located.append(replace(problem, node=node_id, line=problem.line or line))
    return located


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _cycle_in(graph: nx.DiGraph, component: set[str]) -> list[str]:
    import networkx as nx

    sub = graph.subgraph(component)
    start = min(component)
    edges = nx.find_cycle(sub, source=start)
    return [u for u, _ in edges]


__all__ = [
    "NODE_ID",
    "TypeChecks",
    "ValidatedWorkflow",
    "check",
    "check_constant",
    "effective_default",
    "node_check_problems",
    "node_check_values",
    "validate",
]
