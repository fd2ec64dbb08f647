"""The canvas's own graph schema, its conversion to and from :class:`~dagfusion.Workflow`, and the
palette catalogue the canvas is built from.

The browser never sees litegraph's raw JSON on the server side, nor the server litegraph's: the
two exchange this small, documented schema (``GRAPH_VERSION``)::

    {
      "version": 1,
      "nodes": [
        {"id": "blur", "type": "dagfusion.tensor.Blur", "version": null,
         "inputs": {"sigma": 3.0},          # constants the user set (defaults are left out)
         "order": ["tensor", "sigma"],      # optional: the order inputs are written in
         "pos": [320, 80],                  # canvas position, saved as the node's ui.pos
         "auto_pos": true,                  # optional: pos was laid out, not read from ui.pos
         "bypass": true,                    # optional: the node is bypassed (docs/format.md)
         "ui": {}}                          # any other ui keys of the node, kept as they are
                                            # (the canvas's color, bgcolor and collapsed too)
      ],
      "links": [{"from": ["noise", "tensor"], "to": ["blur", "tensor"]}],
      "workflow": {"metadata": {}, "outputs": null, "sweep": [],
                   "ui": {"groups": [{"title": "inputs", "bounding": [0, 0, 400, 300]}]},
                   "source": "blur.yaml"}        # optional: the file it was opened from

The workflow's ``ui`` section holds the canvas's groups (``groups``: title, ``bounding``
``[x, y, width, height]`` and optional ``color``). A node whose type is not registered is kept as
it is (its constants and links) and drawn as a placeholder; saving writes it back unchanged.
    }

:func:`graph_to_workflow` gives exactly the :class:`Workflow` the CLI runs (its ``dump()`` is the
saved YAML), :func:`workflow_to_graph` the reverse; a workflow whose nodes all carry ``ui.pos``
survives the round trip byte for byte. The catalogue (:func:`catalog`) describes every node type,
socket type, colour, widget and which types may connect, computed from the registry alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagfusion.errors import Problem, ValidationError
from dagfusion.node import REQUIRED, InputSpec, NodeSpec
from dagfusion.types import UnionType, type_name
from dagfusion.workflow import FORMAT_VERSION, NODE_ID, Link, Workflow, workflow_from_dict
from dagfusion.yamlsource import MAX_BYTES

GRAPH_VERSION = 1
"""Version of the canvas graph schema above."""

MAX_NODES = 2000
"""A graph with more nodes is refused before any work (the canvas is not meant for generated giants)."""

MAX_LINKS = 10_000
"""A graph with more links is refused before any work."""

MAX_GRAPH_BYTES = MAX_BYTES
"""A graph whose JSON form is larger is refused before any work (the limit of a workflow file)."""

#: The keys of a node's ``ui`` the canvas writes after ``pos``, each only when set: its title and
#: body colours (``color``, ``bgcolor``, litegraph's ``#rrggbb``) and ``collapsed: true``.
LOOK_KEYS = ("color", "bgcolor", "collapsed")

#: Columns and rows of the automatic layout for nodes without ``ui.pos``.
COLUMN_WIDTH = 280
ROW_HEIGHT = 200
ORIGIN = (40, 40)


# --- the palette catalogue -----------------------------------------------------------------


def widget_for(spec: InputSpec, registry: Any) -> str | None:
    """The canvas widget for an input: ``combo``, ``seed``, ``int``, ``float``, ``toggle``,
    ``text``, ``multiline``, ``path``, or ``None`` for a socket-only input (links only)."""
    if spec.link_only:
        return None
    if isinstance(spec.ui, Mapping) and isinstance(spec.ui.get("widget"), str):
        hinted = spec.ui["widget"]
        if hinted in {"combo", "seed", "int", "float", "slider", "toggle", "text", "multiline", "path"}:
            return hinted
    if spec.choices is not None:
        return "combo"
    t = spec.type
    if isinstance(t, UnionType):
        return None
    name = type_name(t)
    types = registry.types
    if name == "ANY" or name not in types:
        return None

    def is_a(parent: str) -> bool:
        return parent in types and types.accepts(parent, name)

    if is_a("SEED"):
        return "seed"
    if is_a("INT"):
        return "int"
    if is_a("FLOAT"):
        return "float"
    if is_a("BOOLEAN"):
        return "toggle"
    if is_a("PATH"):
        return "path"
    if is_a("STRING"):
        return "multiline" if isinstance(spec.ui, Mapping) and spec.ui.get("multiline") else "text"
    return None


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (tuples become lists); ``None`` if it has no JSON form."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    return None


def _input_entry(spec: InputSpec, registry: Any) -> dict[str, Any]:
    return {
        "name": spec.name,
        "type": spec.type_name,
        "required": spec.required,
        "optional": spec.optional,
        "has_default": spec.default is not REQUIRED,
        "default": None if spec.default is REQUIRED else jsonable(spec.default),
        "min": spec.min,
        "max": spec.max,
        "exclusive_min": spec.exclusive_min,
        "exclusive_max": spec.exclusive_max,
        "choices": [jsonable(c) for c in spec.choices] if spec.choices is not None else None,
        "description": spec.description,
        "link_only": spec.link_only,
        "widget": widget_for(spec, registry),
        "ui": jsonable(dict(spec.ui)) if isinstance(spec.ui, Mapping) else {},
    }


def node_entry(spec: NodeSpec, registry: Any) -> dict[str, Any]:
    """One palette entry: everything the canvas needs to draw and edit a node of this type."""
    try:
        plugin = registry.origin(spec.type_id)
    except KeyError:
        plugin = None
    return {
        "type": spec.type_id,
        "title": spec.type_id.rsplit(".", 1)[-1],
        "version": spec.version,
        "category": spec.category or "other",
        "summary": spec.summary,
        "description": spec.description.strip(),
        "plugin": plugin,
        "pure": spec.pure,
        "output_node": spec.output_node,
        "inputs": [_input_entry(i, registry) for i in spec.inputs],
        "outputs": [{"name": o.name, "type": o.type_name, "description": o.description} for o in spec.outputs],
        "ui": jsonable(dict(spec.ui)) if isinstance(spec.ui, Mapping) else {},
    }


def catalog(registry: Any, settings: Any = None) -> dict[str, Any]:
    """The palette and type information of ``registry`` as JSON data for the canvas.

    ``types`` maps each socket type (and each union used by a node) to its colour, description
    and parents; ``accepts[expected]`` lists every type name an input of type ``expected`` may
    be linked from (the registry's own :meth:`~dagfusion.types.TypeSystem.accepts`).
    """
    types = registry.types
    specs = sorted(registry, key=lambda s: ((s.category or "other").lower(), s.type_id.lower()))
    entries = [node_entry(s, registry) for s in specs]
    type_info: dict[str, dict[str, Any]] = {
        t.name: {"color": t.color, "description": t.description, "parents": list(t.parents)} for t in types
    }
    unions: dict[str, UnionType] = {}
    for spec in specs:
        for port in (*spec.inputs, *spec.outputs):
            if isinstance(port.type, UnionType):
                unions[port.type.name] = port.type
    for name, union in unions.items():
        first = union.members[0]
        color = type_info.get(first, {}).get("color", "#9e9e9e")
        type_info[name] = {"color": color, "description": f"any of {', '.join(union.members)}", "parents": []}
    refs: dict[str, Any] = {t.name: t.name for t in types}
    refs.update(unions)
    accepts = {
        expected: sorted(got for got, got_ref in refs.items() if types.accepts(exp_ref, got_ref))
        for expected, exp_ref in refs.items()
    }
    categories: list[str] = []
    for entry in entries:
        if entry["category"] not in categories:
            categories.append(entry["category"])
    roots = [str(r) for r in settings.readable_roots] if settings is not None else []
    return {
        "graph_version": GRAPH_VERSION,
        "format_version": FORMAT_VERSION,
        "nodes": entries,
        "categories": categories,
        "types": type_info,
        "accepts": accepts,
        "roots": roots,
    }


# --- graph -> workflow -------------------------------------------------------------------------


def _bad(message: str, node: str | None = None, input: str | None = None) -> Problem:
    return Problem("bad-graph", message, node=node, input=input)


def _pos(raw: Any) -> list[int] | None:
    if isinstance(raw, (list, tuple)) and len(raw) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in raw
    ):
        return [int(round(raw[0])), int(round(raw[1]))]
    return None


def size_problem(graph: Mapping[str, Any]) -> Problem | None:
    """Why ``graph`` is too large for the canvas (:data:`MAX_NODES`, :data:`MAX_LINKS`,
    :data:`MAX_GRAPH_BYTES`), or ``None``. Counts first, then one C-speed ``json.dumps``:
    nothing is converted or validated before this passes."""
    nodes, links = (len(v) if isinstance(v, list) else 0 for v in (graph.get("nodes"), graph.get("links")))
    if nodes > MAX_NODES:
        return _bad(f"the graph has {nodes:,} nodes; the canvas handles at most {MAX_NODES:,}")
    if links > MAX_LINKS:
        return _bad(f"the graph has {links:,} links; the canvas handles at most {MAX_LINKS:,}")
    try:
        size = len(json.dumps(graph, separators=(",", ":"), default=repr))
    except (ValueError, TypeError, RecursionError):
        return _bad("the graph is not plain JSON data")
    if size > MAX_GRAPH_BYTES:
        return _bad(f"the graph is {size:,} bytes of JSON; the canvas handles at most {MAX_GRAPH_BYTES:,}")
    return None


def graph_to_data(graph: Any) -> tuple[dict[str, Any] | None, list[Problem]]:
    """The plain workflow data (as in a YAML file) of a canvas graph, plus its schema problems."""
    if not isinstance(graph, Mapping):
        return None, [_bad(f"the canvas sent {type(graph).__name__}, not a graph")]
    version = graph.get("version", GRAPH_VERSION)
    if version != GRAPH_VERSION:
        return None, [_bad(f"graph schema version {version!r}; this dagfusion reads {GRAPH_VERSION}")]
    raw_nodes = graph.get("nodes") or []
    raw_links = graph.get("links") or []
    if not isinstance(raw_nodes, list) or not isinstance(raw_links, list):
        return None, [_bad("'nodes' and 'links' must be lists")]
    too_large = size_problem(graph)
    if too_large is not None:
        return None, [too_large]
    problems: list[Problem] = []
    nodes: dict[str, dict[str, Any]] = {}
    for raw in raw_nodes:
        if not isinstance(raw, Mapping):
            problems.append(_bad("a node must be a mapping"))
            continue
        node_id = raw.get("id")
        if not isinstance(node_id, str) or not NODE_ID.match(node_id):
            problems.append(_bad(f"node id {node_id!r} must start with a letter or '_' and hold only letters, digits, '_' and '-'"))
            continue
        if node_id in nodes:
            problems.append(_bad(f"two nodes are called {node_id!r}", node=node_id))
            continue
        node_type = raw.get("type")
        if not isinstance(node_type, str) or not node_type:
            problems.append(_bad("the node has no type", node=node_id))
            continue
        entry: dict[str, Any] = {"type": node_type}
        version = raw.get("version")
        if isinstance(version, str) and version:
            entry["version"] = version
        if raw.get("bypass") is True:
            entry["bypass"] = True
        inputs = raw.get("inputs") or {}
        if not isinstance(inputs, Mapping):
            problems.append(_bad("'inputs' must be a mapping", node=node_id))
            inputs = {}
        entry["inputs"] = {str(k): v for k, v in inputs.items() if not (isinstance(v, Mapping) and "from" in v)}
        ui = dict(raw.get("ui") or {}) if isinstance(raw.get("ui"), Mapping) else {}
        pos = _pos(raw.get("pos"))
        if pos is not None:
            if "pos" in ui:
                ui["pos"] = pos
            else:
                # pos goes after the node's own keys and before the canvas's look (colours,
                # collapsed), so a file the canvas wrote is written back the same.
                look = {k: ui.pop(k) for k in LOOK_KEYS if k in ui}
                ui = {**ui, "pos": pos, **look}
        entry["ui"] = ui
        order = raw.get("order")
        entry["order"] = [n for n in order if isinstance(n, str)] if isinstance(order, list) else []
        nodes[node_id] = entry
    for raw in raw_links:
        ends = (raw.get("from"), raw.get("to")) if isinstance(raw, Mapping) else (None, None)
        if not all(isinstance(e, (list, tuple)) and len(e) == 2 and all(isinstance(p, str) for p in e) for e in ends):
            problems.append(_bad(f"malformed link {raw!r}"))
            continue
        (src, output), (dst, input_name) = ends
        if dst not in nodes:
            continue  # the node it fed was refused above and reported
        if src not in nodes:
            problems.append(_bad(f"links to node {src!r}, which is not on the canvas", node=dst, input=input_name))
            continue
        if input_name in nodes[dst]["inputs"] and isinstance(nodes[dst]["inputs"][input_name], Link):
            problems.append(_bad(f"input {input_name!r} has two links", node=dst, input=input_name))
            continue
        nodes[dst]["inputs"][input_name] = Link(src, output)
    data: dict[str, Any] = {"format_version": FORMAT_VERSION}
    meta = graph.get("workflow") if isinstance(graph.get("workflow"), Mapping) else {}
    metadata = meta.get("metadata")
    if isinstance(metadata, Mapping) and metadata:
        data["metadata"] = dict(metadata)
    # Nodes keep the canvas's order; empty inputs/ui are left out like the canonical dump does.
    data["nodes"] = {}
    for node_id, entry in nodes.items():
        out: dict[str, Any] = {"type": entry["type"]}
        if "version" in entry:
            out["version"] = entry["version"]
        if entry.get("bypass"):
            out["bypass"] = True
        if entry["inputs"]:
            rank = {name: index for index, name in enumerate(entry["order"])}
            names = sorted(entry["inputs"], key=lambda n: rank.get(n, len(rank)))  # stable for the rest
            out["inputs"] = {name: entry["inputs"][name] for name in names}
        if entry["ui"]:
            out["ui"] = entry["ui"]
        data["nodes"][node_id] = out
    outputs = meta.get("outputs")
    if isinstance(outputs, list):
        # Targets and sweep keys naming nodes deleted on the canvas go with them.
        data["outputs"] = [t for t in outputs if isinstance(t, str) and t.partition(".")[0] in nodes]
    sweep = meta.get("sweep")
    if isinstance(sweep, list) and sweep:
        kept = []
        for group in sweep:
            if isinstance(group, Mapping):
                group = {k: v for k, v in group.items() if isinstance(k, str) and k.partition(".")[0] in nodes}
                if group:
                    kept.append(group)
        if kept:
            data["sweep"] = kept
    ui = meta.get("ui")
    if isinstance(ui, Mapping) and ui:
        data["ui"] = dict(ui)
    return data, problems


def _is_float_type(t: Any, registry: Any) -> bool:
    if isinstance(t, UnionType):
        return False
    name = type_name(t)
    types = registry.types
    return name in types and types.accepts("FLOAT", name) and not types.accepts("INT", name) and name != "ANY"


def restore_floats(data: dict[str, Any], registry: Any) -> None:
    """Make whole numbers given to ``FLOAT`` inputs floats again, in place.

    JSON (and so the browser) cannot tell ``3.0`` from ``3``; without this a file opened and
    saved on the canvas would turn ``sigma: 3.0`` into ``sigma: 3``. Constants and sweep values
    of inputs declared ``FLOAT`` (or a subtype that is not an ``INT``) are converted.
    """

    def fix(spec: NodeSpec | None, name: str, value: Any) -> Any:
        found = spec.input(name) if spec is not None else None
        if found is not None and isinstance(value, int) and not isinstance(value, bool) and _is_float_type(found.type, registry):
            return float(value)
        return value

    nodes = data.get("nodes") or {}
    for entry in nodes.values():
        spec = registry.get(entry.get("type", ""))
        inputs = entry.get("inputs")
        if spec is not None and isinstance(inputs, dict):
            for name, value in inputs.items():
                inputs[name] = fix(spec, name, value)
    for group in data.get("sweep") or []:
        for key, values in group.items():
            node_id, _, name = key.partition(".")
            node = nodes.get(node_id)
            spec = registry.get(node.get("type", "")) if isinstance(node, dict) else None
            if isinstance(values, list):
                group[key] = [fix(spec, name, v) for v in values]


def graph_to_workflow(graph: Any, source: str | None = None, registry: Any = None) -> tuple[Workflow | None, list[Problem]]:
    """The :class:`Workflow` a canvas graph describes, or ``None`` plus the reasons it has none.

    The result is what the CLI would read from the saved file; registry checks are left to
    :func:`dagfusion.validation.check`. With a ``registry``, whole numbers sent for ``FLOAT``
    inputs become floats again (see :func:`restore_floats`).
    """
    data, problems = graph_to_data(graph)
    if data is None:
        return None, problems
    if registry is not None:
        restore_floats(data, registry)
    if source is None:  # the name of the file the graph was opened from, if any
        meta = graph.get("workflow") if isinstance(graph, Mapping) else None
        named = meta.get("source") if isinstance(meta, Mapping) else None
        source = named if isinstance(named, str) and named else None
    try:
        workflow = workflow_from_dict(data, source)
    except ValidationError as exc:
        return None, problems + list(exc.problems)
    return workflow, problems


# --- workflow -> graph -------------------------------------------------------------------------


def auto_layout(workflow: Workflow) -> dict[str, list[int]]:
    """Positions for the nodes of ``workflow`` that have no ``ui.pos``: one column per depth."""
    depth: dict[str, int] = {}

    def depth_of(node_id: str, trail: frozenset[str] = frozenset()) -> int:
        if node_id in depth:
            return depth[node_id]
        if node_id in trail:  # a cycle (reported by validation): stop here
            return 0
        inst = workflow.nodes[node_id]
        parents = [link.node for _, link in inst.links() if link.node in workflow.nodes]
        d = 1 + max((depth_of(p, trail | {node_id}) for p in parents), default=-1)
        depth[node_id] = d
        return d

    rows: dict[int, int] = {}
    placed: dict[str, list[int]] = {}
    for node_id, inst in workflow.nodes.items():
        if _pos(inst.ui.get("pos")) is not None:
            continue
        d = depth_of(node_id)
        row = rows.get(d, 0)
        rows[d] = row + 1
        placed[node_id] = [ORIGIN[0] + d * COLUMN_WIDTH, ORIGIN[1] + row * ROW_HEIGHT]
    return placed


def workflow_to_graph(workflow: Workflow) -> dict[str, Any]:
    """The canvas graph of ``workflow`` (positions from ``ui.pos``, else laid out automatically)."""
    layout = auto_layout(workflow)
    nodes = []
    links = []
    for node_id, inst in workflow.nodes.items():
        ui = {k: jsonable(v) for k, v in inst.ui.items() if k != "pos"}
        pos = _pos(inst.ui.get("pos"))
        constants = {}
        for name, value in inst.inputs.items():
            if isinstance(value, Link):
                links.append({"from": [value.node, value.output], "to": [node_id, name]})
            else:
                constants[name] = _plain(value)
        nodes.append(
            {
                "id": node_id,
                "type": inst.type,
                "version": inst.version,
                "inputs": constants,
                "order": list(inst.inputs),
                "pos": pos or layout[node_id],
                "ui": ui,
                **({} if pos else {"auto_pos": True}),  # the canvas may tidy these up
                **({"bypass": True} if inst.bypass else {}),
            }
        )
    return {
        "version": GRAPH_VERSION,
        "nodes": nodes,
        "links": links,
        "workflow": {
            "metadata": _plain(dict(workflow.metadata)),
            "outputs": list(workflow.outputs) if workflow.outputs is not None else None,
            "sweep": [{k: _plain(list(v)) for k, v in group.items()} for group in workflow.sweep],
            "ui": _plain(dict(workflow.ui)),
            "source": Path(workflow.source).name if workflow.source else None,
        },
    }


def _plain(value: Any) -> Any:
    """YAML data as JSON-safe data (tuples to lists; values JSON cannot hold are kept as is for
    the server side, which never sends them: inputs of such types have no widget)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def empty_graph() -> dict[str, Any]:
    """A canvas with nothing on it."""
    return {"version": GRAPH_VERSION, "nodes": [], "links": [], "workflow": {"metadata": {}, "outputs": None, "sweep": [], "ui": {}}}


__all__ = [
    "GRAPH_VERSION",
    "MAX_GRAPH_BYTES",
    "MAX_LINKS",
    "MAX_NODES",
    "auto_layout",
    "catalog",
    "empty_graph",
    "graph_to_data",
    "graph_to_workflow",
    "jsonable",
    "node_entry",
    "restore_floats",
    "size_problem",
    "widget_for",
    "workflow_to_graph",
]
