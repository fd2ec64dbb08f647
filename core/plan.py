"""Planning: which nodes a run needs, their cache keys, and which of them are cache hits.

A node's cache key is computed once, in topological order, from its ``type@version``, the
fingerprints of its constant inputs (``PATH`` inputs by file content) and the keys of the
upstream outputs it reads — so the whole pass is linear in the graph. Impure nodes (and nodes
with a constant that cannot be fingerprinted) get a key unique to the run, which makes every
node downstream of them miss as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from dagfusion.cache import CacheDamage, DiskCache, OutputCache
from dagfusion.errors import Problem, ValidationError
from dagfusion.fingerprint import SpecialFileError, fingerprint, fingerprint_path, new_hasher
from dagfusion.node import REQUIRED
from dagfusion.types import TypeSystem
from dagfusion.validate import ValidatedWorkflow
from dagfusion.workflow import Link


@dataclass(frozen=True)
class Plan:
    """What a run will do.

    Attributes:
        validated: The validated workflow.
        targets: Node ids whose outputs were requested.
        order: Every needed node (targets and their ancestors), topologically ordered.
        generations: ``order`` grouped into topological generations (nodes of one
            generation do not depend on each other).
        keys: Cache key of each needed node.
        to_run: Nodes that will execute.
        hits: Outputs of the needed nodes served from a cache.
        path_fingerprints: Fingerprint of each file/folder a ``PATH`` input names.
        warnings: ``(node id, message)`` of trouble met while planning (damaged cache
            entries, deleted and to be recomputed); the executor reports them.
    """

    validated: ValidatedWorkflow
    targets: tuple[str, ...]
    order: tuple[str, ...]
    generations: tuple[tuple[str, ...], ...]
    keys: Mapping[str, str]
    to_run: frozenset[str]
    hits: Mapping[str, Mapping[str, Any]] = field(repr=False)
    path_fingerprints: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[tuple[str, str], ...] = ()


def resolve_targets(validated: ValidatedWorkflow, requested: Iterable[str] | None = None) -> tuple[str, ...]:
    """Target node ids: ``requested`` (``node`` or ``node.output``), else the workflow's
    ``outputs``, else every sink node and every ``output_node``."""
    wanted = list(requested) if requested is not None else validated.workflow.outputs
    if wanted is not None:
        return tuple(dict.fromkeys(t.partition(".")[0] for t in wanted))
    graph = validated.graph
    return tuple(
        n for n in validated.order if graph.out_degree(n) == 0 or validated.specs[n].output_node
    )


def make_plan(
    validated: ValidatedWorkflow,
    *,
    run_nonce: str,
    types: TypeSystem,
    memory: OutputCache | None = None,
    disk: DiskCache | None = None,
    targets: Iterable[str] | None = None,
    use_cache: bool = True,
) -> Plan:
    """Plan a run of ``validated`` for ``targets`` (see :func:`resolve_targets`)."""
    target_ids = resolve_targets(validated, targets)
    graph = validated.graph
    needed: set[str] = set(target_ids)
    stack = list(target_ids)
    while stack:
        for parent in graph.predecessors(stack.pop()):
            if parent not in needed:
                needed.add(parent)
                stack.append(parent)
    order = tuple(n for n in validated.order if n in needed)

    keys: dict[str, str] = {}
    path_fps: dict[str, str] = {}
    nodes = validated.workflow.nodes
    for node_id in order:
        spec = validated.specs[node_id]
        inst = nodes[node_id]
        h = new_hasher()
        h.update(f"{spec.type_id}@{spec.version}\0".encode())
        cacheable = spec.pure
        for input_spec in spec.inputs:
            value = inst.inputs.get(input_spec.name, REQUIRED)
            h.update(input_spec.name.encode() + b"=")
            if isinstance(value, Link):
                h.update(b"L" + keys[value.node].encode() + b"." + value.output.encode() + b";")
                continue
            if value is REQUIRED:
                value = None if input_spec.optional and input_spec.default is REQUIRED else input_spec.default
            if input_spec.type_name == "PATH" and isinstance(value, str) and value:
                fp = path_fps.get(value)
                if fp is None:
                    fp = path_fps[value] = _path_fingerprint(validated, node_id, input_spec.name, value)
                h.update(b"P" + value.encode() + b"\0" + fp.encode() + b";")
                continue
            fp = fingerprint(value)
            if fp is None:
                cacheable = False
                break
            h.update(b"C" + fp.encode() + b";")
        if not cacheable:
            h.update(b"run:" + run_nonce.encode() + b":" + node_id.encode())
        keys[node_id] = h.hexdigest()

    hits: dict[str, Mapping[str, Any]] = {}
    warnings: list[tuple[str, str]] = []
    to_run: set[str] = set()
    required = set(target_ids)
    for node_id in reversed(order):
        if node_id not in required:
            continue
        spec = validated.specs[node_id]
        outputs = None
        if use_cache and spec.pure:
            outputs = _lookup(
                keys[node_id], spec, memory, disk, types, lambda damage, n=node_id: warnings.append((n, str(damage)))
            )
        if outputs is not None:
            hits[node_id] = outputs
            continue
        to_run.add(node_id)
        required.update(graph.predecessors(node_id))

    final_order = tuple(n for n in order if n in required)
    generations = _generations(graph, final_order)
    return Plan(
        validated=validated,
        targets=target_ids,
        order=final_order,
        generations=generations,
        keys={n: keys[n] for n in final_order},
        to_run=frozenset(to_run),
        hits=hits,
        path_fingerprints=path_fps,
        warnings=tuple(warnings),
    )


def _path_fingerprint(validated: ValidatedWorkflow, node_id: str, input_name: str, path: str) -> str:
    """:func:`fingerprint_path` of a ``PATH`` input; a special file is a :class:`ValidationError`."""
    try:
        return fingerprint_path(path)
    except SpecialFileError as exc:
        problem = Problem("special-file", str(exc), node=node_id, input=input_name)
        raise ValidationError([problem], validated.workflow.source) from exc


def _generations(graph: nx.DiGraph, order: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Topological generations of ``order`` (a topologically sorted node subset), in one pass."""
    included = set(order)
    level: dict[str, int] = {}
    for node_id in order:
        level[node_id] = 1 + max((level[p] for p in graph.predecessors(node_id) if p in included), default=-1)
    grouped: dict[int, list[str]] = {}
    for node_id in order:
        grouped.setdefault(level[node_id], []).append(node_id)
    return tuple(tuple(grouped[i]) for i in sorted(grouped))


def _lookup(
    key: str,
    spec: Any,
    memory: OutputCache | None,
    disk: DiskCache | None,
    types: TypeSystem,
    on_damage: Callable[[CacheDamage], None] | None = None,
) -> Mapping[str, Any] | None:
    if memory is not None:
        outputs = memory.get(key)
        if outputs is not None:
            return outputs
    if disk is not None and spec.persist:
        outputs = disk.get(key, types, on_damage=on_damage)
        if outputs is not None:
            if memory is not None:
                memory.put(key, outputs)
            return outputs
    return None
