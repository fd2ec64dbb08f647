"""Sweep points from one validation: :func:`with_constants` derives a point's validated workflow
by setting its swept constants (no second validation), and :func:`sweep_point_problems` runs
the node checks of swept nodes once per distinct combination of their swept values."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from dagfusion.errors import Problem
from dagfusion.validation import ValidatedWorkflow, node_check_problems
from dagfusion.workflow import Link


def with_constants(validated: ValidatedWorkflow, values: Mapping[tuple[str, str], Any]) -> ValidatedWorkflow:
    """``validated`` with ``{(node id, input): constant}`` set and its sweep removed, without
    validating again: the caller vouches for the values (:func:`check` checked every swept
    value, :func:`sweep_point_problems` every node check they take part in). A constant that
    replaces a link drops that dependency; the order stays topological."""
    workflow = validated.workflow
    nodes = dict(workflow.nodes)
    parents = validated.parents
    changed: dict[str, list[str]] = {}
    for (node_id, input_name), value in values.items():
        inst = nodes[node_id]
        inputs = dict(inst.inputs)
        if isinstance(inputs.get(input_name), Link):
            changed[node_id] = []
        inputs[input_name] = value
        nodes[node_id] = replace(inst, inputs=inputs)
    if changed:
        parents = dict(parents)
        for node_id in changed:
            parents[node_id] = tuple(dict.fromkeys(link.node for _, link in nodes[node_id].links()))
    return ValidatedWorkflow(
        replace(workflow, nodes=nodes, sweep=()), validated.specs, parents, validated.order, validated.warnings
    )


def sweep_point_problems(validated: ValidatedWorkflow, limit: int | None = None) -> list[Problem]:
    """Problems the node checks (``@node(check=...)``) of swept nodes find in sweep points.

    A node check sees a combination of values; it is run once for each distinct combination
    of the swept inputs of its node (at most the number of sweep points, usually far fewer),
    so every point is covered without building the points. Each problem names the swept
    values, ``sweep point {key=value, ...}: ...``. Stops after ``limit`` problems.
    """
    workflow = validated.workflow
    groups = workflow.sweep
    touched: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        for key in group:
            link = Link.parse(key)
            if link is not None and link.node in validated.specs and validated.specs[link.node].check is not None:
                if index not in touched.setdefault(link.node, []):
                    touched[link.node].append(index)
    problems: list[Problem] = []
    for node_id, indexes in touched.items():
        spec = validated.specs[node_id]
        inst = workflow.nodes[node_id]
        # Per group: its rows, each the node's swept values at one position of the group's lists.
        per_group = []
        for index in indexes:
            group = groups[index]
            keys = [k for k in group if k.startswith(node_id + ".") and Link.parse(k) is not None]
            rows = dict.fromkeys(tuple(group[k][i] for k in keys) for i in range(min(len(v) for v in group.values())))
            per_group.append((index, keys, list(rows)))
        for combo in itertools.product(*(rows for _, _, rows in per_group)):
            given = dict(inst.inputs)
            named = []
            for (index, keys, _), row in zip(per_group, combo):
                for key, value in zip(keys, row):
                    given[key.partition(".")[2]] = value
                    named.append(f"{key}={value!r}")
            found = node_check_problems(
                workflow, node_id, replace(inst, inputs=given), spec, sweep_line=workflow.line("sweep", per_group[0][0])
            )
            for problem in found:
                problems.append(replace(problem, message=f"sweep point {', '.join(named)}: {problem.message}"))
            if limit is not None and len(problems) >= limit:
                return problems
    return problems
