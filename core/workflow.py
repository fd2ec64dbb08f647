"""The workflow model and its YAML form.

A workflow file looks like this (the format reference is ``docs/format.md``)::

    format_version: 1
    metadata: {name: quickstart}
    nodes:
      noise:
        type: dagfusion.tensor.Noise
        inputs: {seed: 7, height: 32, width: 32}
      blur:
        type: dagfusion.tensor.Blur
        version: 1.0.0                 # optional pin
        inputs:
          image: {from: noise.tensor}  # a link: node id '.' output name
          radius: 2                    # a constant
        ui: {pos: [320, 80]}           # canvas layout, optional
    outputs: [blur.tensor]             # optional; default: every sink node
    sweep:                             # optional; zip within a group, product across groups
      - {noise.seed: [1, 2, 3]}

:func:`parse_workflow` turns text into a :class:`Workflow` plus every structural problem it
found (unknown keys, malformed references, …); :func:`load_workflow` raises them all at once.
Registry-dependent checks (node types, types, bounds, cycles) live in
:mod:`dagfusion.validation`. Saving is canonical: ``dump(load(text))`` is stable byte for byte.
YAML comments are not preserved.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from dagfusion.errors import Problem, ValidationError, did_you_mean
from dagfusion.yamlsource import SourceMap, load_yaml, paused_gc

FORMAT_VERSION = 1
"""The newest workflow format this dagfusion reads and the one it writes."""

NODE_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
TOP_LEVEL_KEYS = ("format_version", "metadata", "nodes", "outputs", "sweep", "ui")
NODE_KEYS = ("type", "version", "bypass", "inputs", "ui")
LINK_KEY = "from"
_NODE_KEY_SET = frozenset(NODE_KEYS)
_LINK = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*)\.([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class Link:
    """A reference to another node's output (``{from: node.output}`` in YAML)."""

    node: str
    output: str

    def __str__(self) -> str:
        return f"{self.node}.{self.output}"

    @classmethod
    def parse(cls, text: str) -> Link | None:
        """``"node.output"`` → Link, or ``None`` if malformed."""
        match = _LINK.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            return None
        link = object.__new__(cls)
        object.__setattr__(link, "node", match[1])
        object.__setattr__(link, "output", match[2])
        return link


@dataclass(frozen=True)
class NodeInstance:
    """One node of a workflow: its id, type, optional pinned version, inputs and layout.

    ``inputs`` maps input names to constants or :class:`Link` objects. A ``bypass`` node is not
    run: each of its outputs passes on its first input of the same type.
    """

    id: str
    type: str
    inputs: Mapping[str, Any] = field(default_factory=dict)
    version: str | None = None
    ui: Mapping[str, Any] = field(default_factory=dict)
    bypass: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))
        object.__setattr__(self, "ui", MappingProxyType(dict(self.ui)))

    @classmethod
    def _trusted(
        cls, id: str, type: str, inputs: dict[str, Any], version: str | None, ui: dict[str, Any], bypass: bool = False
    ) -> NodeInstance:
        """An instance over freshly built dicts it may own (no copies, no checks)."""
        inst = object.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(inst, "id", id)
        setattr_(inst, "type", type)
        setattr_(inst, "inputs", MappingProxyType(inputs))
        setattr_(inst, "version", version)
        setattr_(inst, "ui", MappingProxyType(ui))
        setattr_(inst, "bypass", bypass)
        return inst

    def links(self) -> Iterator[tuple[str, Link]]:
        """``(input name, link)`` for each linked input."""
        for name, value in self.inputs.items():
            if isinstance(value, Link):
                yield name, value


@dataclass(frozen=True)
class Workflow:
    """A whole workflow: nodes keyed by id (in file order), targets, sweep, layout.

    Instances are immutable; :meth:`with_inputs` and :meth:`with_nodes` return changed copies.
    """

    nodes: Mapping[str, NodeInstance]
    format_version: int = FORMAT_VERSION
    metadata: Mapping[str, Any] = field(default_factory=dict)
    outputs: tuple[str, ...] | None = None
    sweep: tuple[Mapping[str, tuple[Any, ...]], ...] = ()
    ui: Mapping[str, Any] = field(default_factory=dict)
    source_map: SourceMap = field(default_factory=SourceMap, compare=False, repr=False)
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", MappingProxyType(dict(self.nodes)))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        object.__setattr__(self, "ui", MappingProxyType(dict(self.ui)))

    @property
    def name(self) -> str:
        name = self.metadata.get("name")
        if isinstance(name, str) and name:
            return name
        return Path(self.source).stem if self.source else "workflow"

    def line(self, *path: str | int) -> int | None:
        """The YAML line of a key path (``line("nodes", "blur", "inputs", "radius")``)."""
        return self.source_map.line(*path)

    def node_line(self, node_id: str, input_name: str | None = None) -> int | None:
        if input_name is None:
            return self.line("nodes", node_id)
        return self.line("nodes", node_id, "inputs", input_name)

    def with_inputs(self, values: Mapping[tuple[str, str], Any]) -> Workflow:
        """A copy with ``{(node id, input name): value}`` set (constants or :class:`Link`)."""
        nodes = dict(self.nodes)
        for (node_id, input_name), value in values.items():
            inst = nodes[node_id]
            nodes[node_id] = replace(inst, inputs={**inst.inputs, input_name: value})
        return replace(self, nodes=nodes)

    def with_nodes(self, nodes: Mapping[str, NodeInstance]) -> Workflow:
        return replace(self, nodes=nodes)

    def without_sweep(self) -> Workflow:
        return replace(self, sweep=())

    # --- saving -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The canonical plain-data form (what :meth:`dump` writes)."""
        out: dict[str, Any] = {"format_version": self.format_version}
        if self.metadata:
            out["metadata"] = _plain(self.metadata)
        nodes: dict[str, Any] = {}
        for node_id, inst in self.nodes.items():
            entry: dict[str, Any] = {"type": inst.type}
            if inst.version is not None:
                entry["version"] = inst.version
            if inst.bypass:
                entry["bypass"] = True
            if inst.inputs:
                entry["inputs"] = {k: _plain(v) for k, v in inst.inputs.items()}
            if inst.ui:
                entry["ui"] = _plain(inst.ui)
            nodes[node_id] = entry
        out["nodes"] = nodes
        if self.outputs is not None:
            out["outputs"] = list(self.outputs)
        if self.sweep:
            out["sweep"] = [{k: list(v) for k, v in group.items()} for group in self.sweep]
        if self.ui:
            out["ui"] = _plain(self.ui)
        return out

    def dump(self) -> str:
        """Canonical YAML text; loading it gives an equal workflow."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(self.dump(), encoding="utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, Link):
        return value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


_LINE_BREAKS = ("\x85", "\u2028", "\u2029")


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes links as ``{from: node.output}``, never emits aliases, and escapes
    the Unicode line breaks a reader would otherwise fold into spaces."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def write_double_quoted(self, text: str, split: bool = True) -> None:
        if not any(c in text for c in _LINE_BREAKS):
            super().write_double_quoted(text, split)
            return
        saved, self.allow_unicode = self.allow_unicode, False
        try:
            super().write_double_quoted(text, split)
        finally:
            self.allow_unicode = saved


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if any(c in value for c in _LINE_BREAKS):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    return yaml.SafeDumper.represent_str(dumper, value)


def _represent_link(dumper: yaml.SafeDumper, link: Link) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", {LINK_KEY: str(link)}, flow_style=True)


_Dumper.add_representer(Link, _represent_link)
_Dumper.add_representer(str, _represent_str)


# --- parsing --------------------------------------------------------------------------



def parse_workflow(text: str | bytes, source: str | None = None) -> tuple[Workflow | None, list[Problem]]:
    """Parse YAML text into a :class:`Workflow`, collecting every structural problem.

    Returns ``(workflow, problems)``: the workflow holds whatever could be understood (so
    registry checks can still run and report more problems); it is ``None`` only when the
    text is not a YAML mapping at all.
    """
    with paused_gc():
        try:
            data, smap, problems = load_yaml(text, source)
        except ValidationError as exc:
            return None, list(exc.problems)
        problems = list(problems)
        if not isinstance(data, dict):
            got = "an empty document" if data is None else type(data).__name__
            problems.append(Problem("not-a-mapping", f"a workflow is a YAML mapping with a 'nodes' key, got {got}", line=1))
            return None, problems
        return _from_data(data, smap, problems, source), problems


def workflow_from_dict(data: Mapping[str, Any], source: str | None = None) -> Workflow:
    """Build a workflow from plain data (as ``yaml.safe_load`` or :meth:`Workflow.to_dict` gives)."""
    problems: list[Problem] = []
    if not isinstance(data, Mapping):
        raise ValidationError([Problem("not-a-mapping", f"a workflow is a mapping, got {type(data).__name__}")], source)
    wf = _from_data(dict(data), SourceMap(), problems, source)
    if problems:
        raise ValidationError(problems, source)
    return wf


def _from_data(data: dict[str, Any], smap: SourceMap, problems: list[Problem], source: str | None) -> Workflow:
    def add(code: str, message: str, *path: str | int, node: str | None = None, input: str | None = None) -> None:
        problems.append(Problem(code, message, node=node, input=input, line=smap.line(*path) if path else None))

    for key in data:
        if key not in TOP_LEVEL_KEYS:
            add("unknown-key", f"unknown top-level key {key!r}{did_you_mean(key, TOP_LEVEL_KEYS)}", key)

    fmt = data.get("format_version")
    format_version = FORMAT_VERSION
    if fmt is None:
        add("missing-key", f"'format_version' is missing (this dagfusion writes {FORMAT_VERSION})")
    elif isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        add("bad-value", f"'format_version' must be a positive integer, got {fmt!r}", "format_version")
    elif fmt > FORMAT_VERSION:
        add(
            "format-too-new",
            f"this file uses workflow format {fmt}; this dagfusion reads up to {FORMAT_VERSION} (upgrade dagfusion)",
            "format_version",
        )
    else:
        format_version = fmt

    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        add("bad-value", f"'metadata' must be a mapping, got {type(metadata).__name__}", "metadata")
        metadata = {}

    ui = data.get("ui") or {}
    if not isinstance(ui, dict):
        add("bad-value", f"'ui' must be a mapping, got {type(ui).__name__}", "ui")
        ui = {}

    nodes: dict[str, NodeInstance] = {}
    raw_nodes = data.get("nodes")
    if raw_nodes is None:
        add("missing-key", "'nodes' is missing: a workflow needs at least one node")
    elif not isinstance(raw_nodes, dict):
        add("bad-value", f"'nodes' must be a mapping of node id to node, got {type(raw_nodes).__name__}", "nodes")
    else:
        if not raw_nodes:
            add("bad-value", "'nodes' is empty: a workflow needs at least one node", "nodes")
        for node_id, raw in raw_nodes.items():
            inst = _parse_node(node_id, raw, smap, problems)
            if inst is not None:
                nodes[node_id] = inst

    outputs: tuple[str, ...] | None = None
    raw_outputs = data.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list) or not all(isinstance(o, str) for o in raw_outputs):
            add("bad-value", "'outputs' must be a list of 'node' or 'node.output' strings", "outputs")
        else:
            good = []
            for index, target in enumerate(raw_outputs):
                if NODE_ID.match(target) or Link.parse(target) is not None:
                    good.append(target)
                else:
                    add("bad-reference", f"output target {target!r} is not 'node' or 'node.output'", "outputs", index)
            outputs = tuple(good)

    sweep = _parse_sweep(data.get("sweep"), smap, problems)

    return Workflow(
        nodes=nodes,
        format_version=format_version,
        metadata=metadata,
        outputs=outputs,
        sweep=sweep,
        ui=ui,
        source_map=smap,
        source=source,
    )


def _parse_node(node_id: Any, raw: Any, smap: SourceMap, problems: list[Problem]) -> NodeInstance | None:
    def add(code: str, message: str, *path: str | int, input: str | None = None) -> None:
        problems.append(
            Problem(code, message, node=str(node_id), input=input, line=smap.line("nodes", node_id, *path))
        )

    if not isinstance(node_id, str) or not NODE_ID.match(node_id):
        add("bad-node-id", f"node id {node_id!r} must start with a letter or '_' and hold only letters, digits, '_' and '-'")
        return None
    if type(raw) is not dict:
        add("bad-value", f"a node is a mapping with 'type' and 'inputs', got {type(raw).__name__}")
        return None
    if not _NODE_KEY_SET.issuperset(raw):
        for key in raw:
            if key not in NODE_KEYS:
                add("unknown-key", f"unknown node key {key!r}{did_you_mean(key, NODE_KEYS)}", key)
    node_type = raw.get("type")
    if type(node_type) is not str or not node_type:
        add("missing-key" if node_type is None else "bad-value", "every node needs a 'type' (e.g. dagfusion.math.Add)", "type")
        node_type = ""
    version = raw.get("version")
    if version is not None and not isinstance(version, str):
        add("bad-value", f"'version' must be a string like '1.2.0', got {version!r}", "version")
        version = None
    bypass = raw.get("bypass", False)
    if not isinstance(bypass, bool):
        add("bad-value", f"'bypass' must be true or false, got {bypass!r}", "bypass")
        bypass = False
    node_ui = raw.get("ui") or {}
    if not isinstance(node_ui, dict):
        add("bad-value", f"'ui' must be a mapping, got {type(node_ui).__name__}", "ui")
        node_ui = {}
    raw_inputs = raw.get("inputs") or {}
    inputs: dict[str, Any] = {}
    if not isinstance(raw_inputs, dict):
        add("bad-value", f"'inputs' must be a mapping of input name to value, got {type(raw_inputs).__name__}", "inputs")
    else:
        for name, value in raw_inputs.items():
            if type(value) is dict and LINK_KEY in value:
                if len(value) != 1:
                    extra = sorted(set(value) - {LINK_KEY})
                    add("bad-reference", f"a link has only the key 'from'; found also {extra}", "inputs", name, input=name)
                    continue
                link = Link.parse(value[LINK_KEY])
                if link is None:
                    add(
                        "bad-reference",
                        f"link {value[LINK_KEY]!r} must be 'node.output' (node id, one dot, output name)",
                        "inputs",
                        name,
                        input=name,
                    )
                    continue
                inputs[name] = link
            else:
                inputs[name] = value
    return NodeInstance._trusted(node_id, node_type, inputs, version, dict(node_ui), bypass)


def _parse_sweep(raw: Any, smap: SourceMap, problems: list[Problem]) -> tuple[Mapping[str, tuple[Any, ...]], ...]:
    if raw is None:
        return ()
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        problems.append(Problem("bad-value", "'sweep' must be a list of groups ({node.input: [values]})", line=smap.line("sweep")))
        return ()
    groups = []
    for index, group in enumerate(raw):
        line = smap.line("sweep", index)
        if not isinstance(group, dict) or not group:
            problems.append(Problem("bad-value", "each sweep group maps 'node.input' to a list of values", line=line))
            continue
        lengths = set()
        clean: dict[str, tuple[Any, ...]] = {}
        for key, values in group.items():
            if Link.parse(key) is None:
                problems.append(
                    Problem("bad-reference", f"sweep key {key!r} must be 'node.input'", line=smap.line("sweep", index, key))
                )
                continue
            if not isinstance(values, list) or not values:
                problems.append(
                    Problem("bad-value", f"sweep values of {key!r} must be a non-empty list", line=smap.line("sweep", index, key))
                )
                continue
            lengths.add(len(values))
            clean[key] = tuple(values)
        if len(lengths) > 1:
            problems.append(
                Problem("bad-value", f"lists in one sweep group are zipped and must have equal lengths, got {sorted(lengths)}", line=line)
            )
            continue
        if clean:
            groups.append(clean)
    return tuple(groups)


def load_workflow(source: str | os.PathLike[str] | bytes, *, text: bool = False) -> Workflow:
    """Load a workflow from a YAML or PNG file path (or YAML text with ``text=True``).

    Raises :class:`ValidationError` listing every structural problem; registry checks are
    done by :func:`dagfusion.validate`. Files are read by :func:`dagfusion.sources.read_source`.
    """
    if text:
        wf, problems = parse_workflow(source if isinstance(source, (str, bytes)) else str(source))
        name = None
    else:
        from dagfusion.sources import read_source

        path = Path(source if not isinstance(source, bytes) else source.decode())
        name = str(path)
        wf, problems = read_source(path)
    if problems or wf is None:
        raise ValidationError(problems, name)
    return wf


# --- overrides and sweeps ------------------------------------------------------------------


def parse_assignment(text: str) -> tuple[str, str, Any]:
    """``"node.input=value"`` → ``(node, input, value)``; the value is read as YAML (``3`` is an int)."""
    key, sep, raw_value = text.partition("=")
    link = Link.parse(key.strip())
    if not sep or link is None:
        raise ValidationError([Problem("bad-override", f"override {text!r} must look like node.input=value")])
    try:
        value, _, problems = load_yaml(raw_value)
    except ValidationError:
        value, problems = raw_value, []
    if problems:
        value = raw_value
    return link.node, link.output, value


def apply_overrides(workflow: Workflow, assignments: list[str] | tuple[str, ...]) -> Workflow:
    """Apply ``--set node.input=value`` overrides, reporting every unknown node at once."""
    values: dict[tuple[str, str], Any] = {}
    problems = []
    for text in assignments:
        try:
            node_id, input_name, value = parse_assignment(text)
        except ValidationError as exc:
            problems.extend(exc.problems)
            continue
        if node_id not in workflow.nodes:
            problems.append(
                Problem("unknown-node", f"--set {text!r}: no node {node_id!r}{did_you_mean(node_id, list(workflow.nodes))}", node=node_id)
            )
            continue
        values[(node_id, input_name)] = value
    if problems:
        raise ValidationError(problems, workflow.source)
    return workflow.with_inputs(values)


def sweep_points(workflow: Workflow) -> int:
    """How many runs the workflow's sweep describes (1 without a sweep), from its group sizes.

    Nothing is expanded: a sweep of 10^9 points is counted as cheaply as one of 3.
    """
    count = 1
    for group in workflow.sweep:
        count *= min((len(values) for values in group.values()), default=1)
    return count


def iter_sweep(workflow: Workflow) -> Iterator[tuple[dict[str, Any], Workflow]]:
    """Every run a sweep describes, one at a time: ``(assignment, workflow)`` pairs.

    Lists within a group are zipped; groups are combined as a cartesian product. Points are
    built lazily, so only the run in hand is held in memory.
    """
    if not workflow.sweep:
        yield {}, workflow
        return
    per_group = []
    for group in workflow.sweep:
        keys = list(group)
        per_group.append([dict(zip(keys, combo)) for combo in zip(*(group[k] for k in keys))])
    base = workflow.without_sweep()
    for combo in itertools.product(*per_group):
        assignment: dict[str, Any] = {}
        for part in combo:
            assignment.update(part)
        values = {}
        for key, value in assignment.items():
            link = Link.parse(key)
            assert link is not None  # checked when parsed
            values[(link.node, link.output)] = value
        yield assignment, base.with_inputs(values)


def expand_sweep(workflow: Workflow) -> list[tuple[dict[str, Any], Workflow]]:
    """Every run a sweep describes, as a list (see :func:`iter_sweep`; check :func:`sweep_points` first)."""
    return list(iter_sweep(workflow))
