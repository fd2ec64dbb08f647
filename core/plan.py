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

from dagfusion.cache import CacheDamage, DiskCache, OutputCache
from dagfusion.errors import Problem, ValidationError
from dagfusion.fingerprint import SpecialFileError, fingerprint, fingerprint_path, new_hasher
from dagfusion.node import REQUIRED, InputSpec
from dagfusion.types import TypeSystem
from dagfusion.validation import ValidatedWorkflow, effective_default
from dagfusion.workflow import Link
from dagfusion.yamlsource import paused_gc


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
    found = validated.memo.get("default-targets")
    if found is None:
        feeding = {parent for parents in validated.parents.values() for parent in parents}
        found = validated.memo["default-targets"] = tuple(
            n for n in validated.order if n not in feeding or validated.specs[n].output_node
        )
    return found


@dataclass(frozen=True)
class _Keys:
    """Cache keys of a needed-node order, reusable while the files its ``PATH`` inputs name
    fingerprint the same (only when no key holds a run's nonce)."""

    path_fingerprints: Mapping[str, str]
    keys: Mapping[str, str]


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
    """Plan a run of ``validated`` for ``targets`` (see :func:`resolve_targets`).

    Every ``PATH`` input is fingerprinted on every call, and the caches are asked afresh;
    what depends only on the graph (the needed nodes, and the keys while those fingerprints
    are unchanged) is remembered in ``validated.memo``, so planning the same validated
    workflow again costs little more than those checks.
    """
    with paused_gc():
        return _make_plan(validated, run_nonce, types, memory, disk, targets, use_cache)


def _make_plan(
    validated: ValidatedWorkflow,
    run_nonce: str,
    types: TypeSystem,
    memory: OutputCache | None,
    disk: DiskCache | None,
    targets: Iterable[str] | None,
    use_cache: bool,
) -> Plan:
    target_ids = resolve_targets(validated, targets)
    parents = validated.parents
    order = _needed_order(validated, target_ids)
    path_inputs = _path_inputs(validated, order)
    path_fps: dict[str, str] = {}
    for node_id, input_name, value in path_inputs:
        if value not in path_fps:
            path_fps[value] = _path_fingerprint(validated, node_id, input_name, value)
    remembered = validated.memo.get(("keys", order))
    if remembered is not None and remembered.path_fingerprints == path_fps:
        keys = remembered.keys
    else:
        keys, reusable = _cache_keys(validated, order, path_fps, run_nonce)
        if reusable:
            validated.memo[("keys", order)] = _Keys(dict(path_fps), keys)

    hits: dict[str, Mapping[str, Any]] = {}
    warnings: list[tuple[str, str]] = []
    to_run: set[str] = set()
    required = set(target_ids)
    specs = validated.specs
    for node_id in reversed(order):
        if node_id not in required:
            continue
        spec = specs[node_id]
        outputs = None
        if use_cache and spec.pure and not validated.workflow.nodes[node_id].bypass:
            outputs = _lookup(
                keys[node_id], spec, memory, disk, types, lambda damage, n=node_id: warnings.append((n, str(damage)))
            )
        if outputs is not None:
            hits[node_id] = outputs
            continue
        to_run.add(node_id)
        required.update(parents[node_id])

    if len(required) == len(order):
        final_order = order
        generations = validated.memo.get(("generations", order))
        if generations is None:
            generations = validated.memo[("generations", order)] = _generations(parents, order)
    else:
        final_order = tuple(n for n in order if n in required)
        generations = _generations(parents, final_order)
    if len(validated.memo) > MEMO_ENTRIES:
        validated.memo.clear()
    return Plan(
        validated=validated,
        targets=target_ids,
        order=final_order,
        generations=generations,
        keys=keys if final_order is order else {n: keys[n] for n in final_order},
        to_run=frozenset(to_run),
        hits=hits,
        path_fingerprints=path_fps,
        warnings=tuple(warnings),
    )


def _needed_order(validated: ValidatedWorkflow, target_ids: tuple[str, ...]) -> tuple[str, ...]:
    """The targets and their ancestors, topologically ordered (remembered per target set)."""
    memo_key = ("needed", target_ids)
    found = validated.memo.get(memo_key)
    if found is not None:
        return found
    parents = validated.parents
    needed: set[str] = set(target_ids)
    stack = list(target_ids)
    while stack:
        for parent in parents[stack.pop()]:
            if parent not in needed:
                needed.add(parent)
                stack.append(parent)
    order = validated.order if len(needed) == len(validated.order) else tuple(n for n in validated.order if n in needed)
    validated.memo[memo_key] = order
    return order


def _path_inputs(validated: ValidatedWorkflow, order: tuple[str, ...]) -> tuple[tuple[str, str, str], ...]:
    """``(node id, input, path)`` of every non-empty ``PATH`` constant (or default) in ``order``."""
    memo_key = ("paths", order)
    found = validated.memo.get(memo_key)
    if found is not None:
        return found
    out = []
    nodes = validated.workflow.nodes
    for node_id in order:
        given = nodes[node_id].inputs
        for input_spec in validated.specs[node_id].inputs:
            if input_spec.type_name != "PATH":
                continue
            value = given.get(input_spec.name, REQUIRED)
            if value is REQUIRED:
                value = effective_default(input_spec)
            if isinstance(value, str) and value:
                out.append((node_id, input_spec.name, value))
    found = validated.memo[memo_key] = tuple(out)
    return found


def _cache_keys(
    validated: ValidatedWorkflow, order: tuple[str, ...], path_fps: Mapping[str, str], run_nonce: str
) -> tuple[dict[str, str], bool]:
    """Each node's cache key, and whether none of them holds ``run_nonce`` (so they may be reused)."""
    keys: dict[str, str] = {}
    nodes = validated.workflow.nodes
    specs = validated.specs
    layouts: dict[str, tuple[bytes, tuple[tuple[InputSpec, bytes, bool], ...]]] = {}
    constants: dict[tuple[type, Any], str | None] = {}  # fingerprints of repeated scalars
    reusable = True
    for node_id in order:
        spec = specs[node_id]
        layout = layouts.get(spec.type_id)
        if layout is None:
            layout = layouts[spec.type_id] = (
                f"{spec.type_id}@{spec.version}\0".encode(),
                tuple((i, i.name.encode() + b"=", i.type_name == "PATH") for i in spec.inputs),
            )
        given = nodes[node_id].inputs
        h = new_hasher()
        h.update(layout[0])
        if nodes[node_id].bypass:
            h.update(b"bypass\0")
        cacheable = spec.pure
        for input_spec, name, is_path in layout[1]:
            value = given.get(input_spec.name, REQUIRED)
            h.update(name)
            if isinstance(value, Link):
                h.update(b"L" + keys[value.node].encode() + b"." + value.output.encode() + b";")
                continue
            if value is REQUIRED:
                value = effective_default(input_spec)
            if is_path and isinstance(value, str) and value:
                h.update(b"P" + value.encode() + b"\0" + path_fps[value].encode() + b";")
                continue
            if type(value) in _SCALARS:
                memo_key = (type(value), value)
                fp = constants.get(memo_key, _UNSEEN)
                if fp is _UNSEEN:
                    fp = constants[memo_key] = fingerprint(value)
            else:
                fp = fingerprint(value)
            if fp is None:
                cacheable = False
                break
            h.update(b"C" + fp.encode() + b";")
        if not cacheable:
            reusable = False
            h.update(b"run:" + run_nonce.encode() + b":" + node_id.encode())
        keys[node_id] = h.hexdigest()
    return keys, reusable


_SCALARS = frozenset({int, str, bool, type(None)})  # floats left out: NaN is never equal to itself
_UNSEEN: Any = object()
MEMO_ENTRIES = 64
"""Most planning results remembered per validated workflow (cleared when exceeded)."""


def _path_fingerprint(validated: ValidatedWorkflow, node_id: str, input_name: str, path: str) -> str:
    """:func:`fingerprint_path` of a ``PATH`` input; a special file is a :class:`ValidationError`."""
    try:
        return fingerprint_path(path)
    except SpecialFileError as exc:
        problem = Problem("special-file", str(exc), node=node_id, input=input_name)
        raise ValidationError([problem], validated.workflow.source) from exc


def _generations(parents: Mapping[str, tuple[str, ...]], order: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Topological generations of ``order`` (a topologically sorted node subset), in one pass."""
    level: dict[str, int] = {}
    for node_id in order:
        level[node_id] = 1 + max((level[p] for p in parents[node_id] if p in level), default=-1)
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
