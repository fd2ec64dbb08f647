"""The canvas graph ⇄ Workflow conversion and the palette catalogue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dagfusion.registry import Registry
from dagfusion.ui.graph import (
    GRAPH_VERSION,
    MAX_GRAPH_BYTES,
    MAX_LINKS,
    MAX_NODES,
    auto_layout,
    catalog,
    empty_graph,
    graph_to_workflow,
    widget_for,
    workflow_to_graph,
)
from dagfusion.workflow import Link, load_workflow, parse_workflow

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.yaml"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_example_survives_the_round_trip(path: Path) -> None:
    original = load_workflow(path)
    graph = workflow_to_graph(original)
    json.dumps(graph)  # what the browser receives is plain JSON
    again, problems = graph_to_workflow(graph)
    assert problems == [] and again is not None
    # Same nodes, inputs (in file order), targets, sweep and metadata; layout added as ui.pos.
    assert list(again.nodes) == list(original.nodes)
    for node_id, inst in original.nodes.items():
        assert list(again.nodes[node_id].inputs.items()) == list(inst.inputs.items())
        assert again.nodes[node_id].type == inst.type and again.nodes[node_id].version == inst.version
        assert len(again.nodes[node_id].ui["pos"]) == 2
    assert again.outputs == original.outputs and again.sweep == original.sweep and again.metadata == original.metadata


def test_a_laid_out_workflow_round_trips_byte_for_byte() -> None:
    first, _ = graph_to_workflow(workflow_to_graph(load_workflow(REPO / "workflows" / "blurred_noise.yaml")))
    assert first is not None
    text = first.dump()
    parsed, problems = parse_workflow(text)
    assert problems == [] and parsed is not None
    second, problems = graph_to_workflow(workflow_to_graph(parsed))
    assert problems == [] and second is not None
    assert second.dump() == text
    assert "ui:\n      pos:" in text  # layout lives in each node's optional ui section


def test_links_constants_order_and_extra_ui_keys() -> None:
    graph = {
        "version": GRAPH_VERSION,
        "nodes": [
            {"id": "noise", "type": "dagfusion.tensor.Noise", "inputs": {"seed": 3}, "pos": [10.4, 20.6], "ui": {"color": "#123"}},
            {
                "id": "blur",
                "type": "dagfusion.tensor.Blur",
                "inputs": {"sigma": 2.0, "tensor": 99},  # a constant under a link: the link wins
                "order": ["tensor", "sigma"],
                "pos": [300, 20],
            },
        ],
        "links": [{"from": ["noise", "tensor"], "to": ["blur", "tensor"]}],
        "workflow": {"metadata": {"name": "demo"}, "outputs": ["blur.tensor"], "sweep": [{"noise.seed": [1, 2]}], "ui": {}},
    }
    wf, problems = graph_to_workflow(graph)
    assert problems == [] and wf is not None
    assert list(wf.nodes["blur"].inputs.items()) == [("tensor", Link("noise", "tensor")), ("sigma", 2.0)]
    assert dict(wf.nodes["noise"].ui) == {"color": "#123", "pos": [10, 21]}
    assert wf.outputs == ("blur.tensor",) and wf.sweep == ({"noise.seed": (1, 2)},) and wf.name == "demo"
    back = workflow_to_graph(wf)
    assert back["nodes"][0]["ui"] == {"color": "#123"} and back["nodes"][0]["pos"] == [10, 21]
    assert back["links"] == [{"from": ["noise", "tensor"], "to": ["blur", "tensor"]}]


def test_nodes_deleted_on_the_canvas_leave_targets_and_sweeps() -> None:
    graph = empty_graph()
    graph["nodes"] = [{"id": "a", "type": "dagfusion.util.Number", "inputs": {"value": 1.0}, "pos": [0, 0]}]
    graph["workflow"]["outputs"] = ["a.value", "gone.value"]
    graph["workflow"]["sweep"] = [{"gone.value": [1, 2]}, {"a.value": [3.0, 4.0]}]
    wf, problems = graph_to_workflow(graph)
    assert problems == [] and wf is not None
    assert wf.outputs == ("a.value",) and wf.sweep == ({"a.value": (3.0, 4.0)},)


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        ("not a graph", "not a graph"),
        ({"version": 99, "nodes": []}, "schema version"),
        ({"nodes": [{"id": "1bad", "type": "x.Y"}]}, "node id"),
        ({"nodes": [{"id": "a", "type": "x.Y"}, {"id": "a", "type": "x.Y"}]}, "two nodes are called 'a'"),
        ({"nodes": [{"id": "a"}]}, "no type"),
        ({"nodes": [{"id": "a", "type": "x.Y"}], "links": [{"from": ["ghost", "y"], "to": ["a", "x"]}]}, "not on the canvas"),
        ({"nodes": [{"id": "a", "type": "x.Y"}], "links": [{"from": "a.y", "to": ["a", "x"]}]}, "malformed link"),
    ],
)
def test_malformed_graphs_are_reported(graph: object, message: str) -> None:
    wf, problems = graph_to_workflow(graph)
    assert any(message in p.message for p in problems), problems


def test_oversized_graphs_are_refused_before_conversion() -> None:
    many = {"nodes": [{"id": f"n{i}", "type": "x.Y"} for i in range(MAX_NODES + 1)]}
    link = {"from": ["a", "y"], "to": ["b", "x"]}
    wide = {"nodes": [{"id": "a", "type": "x.Y"}], "links": [link] * (MAX_LINKS + 1)}
    heavy = {"nodes": [{"id": "a", "type": "x.Y", "inputs": {"text": "x" * MAX_GRAPH_BYTES}}]}
    for graph, message in ((many, f"{MAX_NODES + 1:,} nodes"), (wide, f"{MAX_LINKS + 1:,} links"), (heavy, "bytes of JSON")):
        wf, problems = graph_to_workflow(graph)
        assert wf is None and len(problems) == 1 and message in problems[0].message, problems
    assert graph_to_workflow({"nodes": many["nodes"][:MAX_NODES]})[0] is not None


def test_two_links_into_one_input_are_refused() -> None:
    graph = {
        "nodes": [
            {"id": "a", "type": "dagfusion.util.Number"},
            {"id": "b", "type": "dagfusion.util.Number"},
            {"id": "c", "type": "dagfusion.math.Add"},
        ],
        "links": [{"from": ["a", "value"], "to": ["c", "a"]}, {"from": ["b", "value"], "to": ["c", "a"]}],
    }
    _, problems = graph_to_workflow(graph)
    assert [p.message for p in problems] == ["input 'a' has two links"]


def test_auto_layout_puts_each_depth_in_a_column() -> None:
    wf = load_workflow(REPO / "workflows" / "blurred_noise.yaml")
    layout = auto_layout(wf)
    assert layout["noise"][0] < layout["blur"][0] < layout["normalize"][0] == layout["stats"][0]
    assert layout["normalize"][1] != layout["stats"][1]  # same column, different rows


def test_catalog_lists_every_node_with_json_data(registry: Registry) -> None:
    data = catalog(registry)
    json.dumps(data)
    assert {e["type"] for e in data["nodes"]} == set(registry.node_types())
    assert data["categories"] == sorted(data["categories"], key=str.lower)
    noise = next(e for e in data["nodes"] if e["type"] == "dagfusion.tensor.Noise")
    assert noise["category"] == "tensor" and noise["summary"].startswith("Seeded random noise")
    assert noise["plugin"] and noise["title"] == "Noise"
    inputs = {i["name"]: i for i in noise["inputs"]}
    assert inputs["seed"]["widget"] == "seed" and inputs["seed"]["min"] == 0
    assert inputs["distribution"]["widget"] == "combo" and inputs["distribution"]["choices"] == ["normal", "uniform"]
    assert inputs["channels"]["widget"] == "int" and inputs["channels"]["default"] == 3
    assert data["types"]["TENSOR"]["color"].startswith("#")


def test_catalog_connection_rules_are_the_registrys(registry: Registry) -> None:
    accepts = catalog(registry)["accepts"]
    types = registry.types
    for expected, allowed in accepts.items():
        if " | " in expected:
            continue
        for got in accepts:
            if " | " not in got:
                assert (got in allowed) == types.accepts(expected, got), (expected, got)
    assert "INT" in accepts["FLOAT"] and "FLOAT" not in accepts["INT"] and "TENSOR" not in accepts["FLOAT"]


def test_widgets_follow_input_specs(registry: Registry) -> None:
    def widget(type_id: str, name: str) -> str | None:
        spec = registry.get(type_id)
        assert spec is not None
        found = spec.input(name)
        assert found is not None
        return widget_for(found, registry)

    assert widget("dagfusion.tensor.Blur", "sigma") == "float"
    assert widget("dagfusion.tensor.Blur", "tensor") is None  # tensors come from links only
    assert widget("dagfusion.io.LoadTensor", "path") == "path"
    assert widget("dagfusion.util.Text", "text") == "multiline"
    assert widget("dagfusion.io.SaveText", "filename") == "text"
    assert widget("dagfusion.sampling.Sample", "model") is None  # link_only


_ids = st.sampled_from(["a", "b", "c", "d", "e"])


@given(
    nodes=st.lists(st.tuples(_ids, st.integers(-500, 500), st.integers(-500, 500), st.floats(0, 64)), unique_by=lambda t: t[0], min_size=1, max_size=5),
    edges=st.lists(st.tuples(_ids, _ids), max_size=6),
)
def test_graph_round_trip_property(nodes: list[tuple[str, int, int, float]], edges: list[tuple[str, str]]) -> None:
    ids = [n[0] for n in nodes]
    graph = {
        "version": GRAPH_VERSION,
        "nodes": [{"id": i, "type": "dagfusion.tensor.Blur", "inputs": {"sigma": s}, "pos": [x, y]} for i, x, y, s in nodes],
        "links": [],
    }
    seen = set()
    for src, dst in edges:
        if src in ids and dst in ids and dst not in seen:
            seen.add(dst)
            graph["links"].append({"from": [src, "tensor"], "to": [dst, "tensor"]})
    wf, problems = graph_to_workflow(graph)
    assert problems == [] and wf is not None
    again, problems = graph_to_workflow(workflow_to_graph(wf))
    assert problems == [] and again is not None and again.dump() == wf.dump()


def _like_javascript(value: object) -> object:
    """What a value looks like after a trip through the browser: JSON has one number type."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _like_javascript(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_like_javascript(v) for v in value]
    return value


def test_whole_floats_survive_the_browser(registry: Registry) -> None:
    text = (
        "format_version: 1\nnodes:\n"
        "  noise: {type: dagfusion.tensor.Noise, inputs: {seed: 7}, ui: {pos: [0, 0]}}\n"
        "  blur: {type: dagfusion.tensor.Blur, inputs: {tensor: {from: noise.tensor}, sigma: 3.0}, ui: {pos: [300, 0]}}\n"
        "sweep:\n- {blur.sigma: [1.0, 2.5], noise.seed: [1, 2]}\n"
    )
    wf, _ = parse_workflow(text)
    assert wf is not None
    graph = _like_javascript(workflow_to_graph(wf))
    assert graph["nodes"][1]["inputs"]["sigma"] == 3 and isinstance(graph["nodes"][1]["inputs"]["sigma"], int)
    back, problems = graph_to_workflow(graph, registry=registry)
    assert problems == [] and back is not None
    assert back.dump() == wf.dump()
    assert isinstance(back.nodes["noise"].inputs["seed"], int)
