"""A node's look on the canvas — its colours and whether it is collapsed — in the node's ``ui``
mapping: opened and saved back unchanged, written after ``pos`` and only when set, and valid
against the workflow's JSON Schema."""

from __future__ import annotations

from typing import Any

import jsonschema
import yaml
from dagfusion.registry import Registry
from dagfusion.schema import workflow_schema
from dagfusion.ui.graph import graph_to_workflow
from dagfusion.ui.handlers import CanvasBackend

LOOKED = """\
format_version: 1
nodes:
  a:
    type: dagfusion.util.Number
    ui:
      pos:
      - 40
      - 80
      color: '#322'
      bgcolor: '#533'
      collapsed: true
  b:
    type: dagfusion.util.Number
    ui:
      note: kept
      pos:
      - 300
      - 80
      color: '#223'
"""

PLAIN = """\
format_version: 1
nodes:
  a:
    type: dagfusion.util.Number
    ui:
      note: first
      pos:
      - 40
      - 80
  b:
    type: dagfusion.util.Number
    ui:
      pos:
      - 300
      - 80
"""


def _node(graph: dict[str, Any], node_id: str) -> dict[str, Any]:
    return next(n for n in graph["nodes"] if n["id"] == node_id)


def test_colours_and_collapse_open_and_save_back_byte_for_byte(backend: CanvasBackend) -> None:
    opened = backend.open_text(LOOKED, "looked.yaml")
    assert opened["ok"], opened
    a = _node(opened["graph"], "a")
    assert a["pos"] == [40, 80] and a["ui"] == {"color": "#322", "bgcolor": "#533", "collapsed": True}
    assert _node(opened["graph"], "b")["ui"] == {"note": "kept", "color": "#223"}
    assert backend.save(opened["graph"])["yaml"] == LOOKED


def test_a_workflow_without_a_look_saves_back_unchanged(backend: CanvasBackend) -> None:
    opened = backend.open_text(PLAIN, "plain.yaml")
    assert opened["ok"], opened
    assert backend.save(opened["graph"])["yaml"] == PLAIN


def test_the_look_is_written_after_pos_and_only_when_set(backend: CanvasBackend, ui_registry: Registry) -> None:
    # What the canvas sends: the node's own ui keys, then its look (pos travels apart).
    graph = {
        "version": 1,
        "nodes": [
            {"id": "a", "type": "dagfusion.util.Number", "inputs": {}, "pos": [10, 20], "ui": {"note": 1, "color": "#335", "bgcolor": "#446", "collapsed": True}},
            {"id": "b", "type": "dagfusion.util.Number", "inputs": {}, "pos": [30, 40], "ui": {}},
        ],
        "links": [],
        "workflow": {"metadata": {}, "outputs": None, "sweep": [], "ui": {}},
    }
    saved = backend.save(graph)
    assert saved["ok"], saved
    data = yaml.safe_load(saved["yaml"])
    assert list(data["nodes"]["a"]["ui"].items()) == [("note", 1), ("pos", [10, 20]), ("color", "#335"), ("bgcolor", "#446"), ("collapsed", True)]
    assert data["nodes"]["b"]["ui"] == {"pos": [30, 40]}  # nothing else when nothing is set
    jsonschema.Draft202012Validator(workflow_schema(ui_registry)).validate(data)
    # And the file the canvas wrote opens to the same graph and saves to the same bytes.
    again = backend.open_text(saved["yaml"], "again.yaml")
    assert again["ok"] and backend.save(again["graph"])["yaml"] == saved["yaml"]


def test_a_canvas_graph_keeps_a_pos_given_inside_ui_in_place() -> None:
    graph = {
        "version": 1,
        "nodes": [{"id": "a", "type": "dagfusion.util.Number", "inputs": {}, "pos": [5, 6], "ui": {"pos": [0, 0], "color": "#111"}}],
        "links": [],
    }
    workflow, problems = graph_to_workflow(graph)
    assert problems == [] and workflow is not None
    assert list(workflow.nodes["a"].ui.items()) == [("pos", [5, 6]), ("color", "#111")]
