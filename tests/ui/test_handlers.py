"""The canvas's server-side handlers: checking, saving, opening, running, polling, cancelling."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

import pytest

from dagfusion.cli import main as cli_main
from dagfusion.pngmeta import png_info
from dagfusion.ui.graph import empty_graph, workflow_to_graph
from dagfusion.ui.handlers import CanvasBackend
from dagfusion.workflow import parse_workflow


def _graph(text: str) -> dict[str, Any]:
    wf, problems = parse_workflow(text)
    assert wf is not None and problems == []
    return workflow_to_graph(wf)


def _wait(backend: CanvasBackend, run_id: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = backend.poll(run_id)["run"]
        if state["status"] not in ("queued", "running"):
            return state
        time.sleep(0.02)
    raise AssertionError("the run did not finish")


def test_catalog_is_cached_json(backend: CanvasBackend) -> None:
    first = backend.catalog()
    assert first is backend.catalog()
    assert any(e["type"] == "uitest.Slow" for e in first["nodes"])  # plugin nodes are in the palette
    assert first["roots"]  # path widgets show where files may be read


def test_sizes_are_bounded_before_any_work(backend: CanvasBackend) -> None:
    from dagfusion.ui.graph import MAX_NODES

    text = "format_version: 1\nnodes:\n" + "".join(f"  n{i}: {{type: dagfusion.util.Number}}\n" for i in range(MAX_NODES + 1))
    opened = backend.open_text(text, "giant.yaml")
    assert not opened["ok"] and f"{MAX_NODES + 1:,} nodes" in opened["error"]
    graph = _graph("format_version: 1\nnodes:\n  s: {type: uitest.Slow}\nsweep:\n  - {s.x: [1.0, 2.0, 3.0]}\n  - {s.steps: [1, 2]}\n")
    assert backend.check(graph)["points"] == 6
    graph["workflow"]["sweep"] = [{"s.x": [float(i) for i in range(1000)]}, {"s.steps": list(range(1, 1001))}]
    started = time.perf_counter()
    checked, submitted = backend.check(graph), backend.submit(graph)
    assert time.perf_counter() - started < 1.0
    assert checked["points"] == 1_000_000 and [p["code"] for p in checked["problems"]] == ["sweep-too-large"]
    assert not submitted["ok"] and "1,000,000 runs" in submitted["error"] and backend.queue.summary() == []


def test_check_reports_problems_on_their_nodes(backend: CanvasBackend, quickstart_yaml: str) -> None:
    graph = _graph(quickstart_yaml)
    assert backend.check(graph) == {"ok": True, "problems": [], "warnings": [], "points": 0}
    blur = next(n for n in graph["nodes"] if n["id"] == "blur")
    blur["inputs"]["sigma"] = 100.0
    graph["links"] = [link for link in graph["links"] if link["to"] != ["save_image", "tensor"]]
    result = backend.check(graph)
    assert not result["ok"]
    located = {(p["node"], p["input"], p["code"]) for p in result["problems"]}
    assert ("blur", "sigma", "out-of-range") in located
    assert ("save_image", "tensor", "missing-input") in located


def test_save_writes_the_clis_format(backend: CanvasBackend, quickstart_yaml: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graph = _graph(quickstart_yaml)
    saved = backend.save(graph)
    assert saved["ok"] and saved["filename"] == "blurred-noise.yaml" and saved["problems"] == []
    wf, problems = parse_workflow(saved["yaml"])
    assert problems == [] and wf is not None and wf.dump() == saved["yaml"]
    path = tmp_path / saved["filename"]
    path.write_text(saved["yaml"], encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["validate", str(path)]) == 0


def test_an_incomplete_workflow_is_still_saved_with_its_problems(backend: CanvasBackend) -> None:
    graph = empty_graph()
    graph["nodes"] = [{"id": "save", "type": "dagfusion.io.SaveTensorPNG", "inputs": {}, "pos": [0, 0]}]
    saved = backend.save(graph)
    assert saved["ok"] and "dagfusion.io.SaveTensorPNG" in saved["yaml"]
    assert [p["code"] for p in saved["problems"]] == ["missing-input"]
    assert not backend.save({"nodes": [{"id": "9"}]})["ok"]


def test_a_file_without_a_name_is_saved_under_the_name_it_was_opened_with(backend: CanvasBackend) -> None:
    opened = backend.open_text("format_version: 1\nnodes: {a: {type: dagfusion.util.Number}}\n", "my-draft.yaml")
    assert backend.save(opened["graph"])["filename"] == "my-draft.yaml"
    assert backend.save(empty_graph() | {"nodes": [{"id": "a", "type": "dagfusion.util.Number"}]})["filename"] == "workflow.yaml"


def test_open_a_valid_file(backend: CanvasBackend, quickstart_yaml: str) -> None:
    opened = backend.open_text(quickstart_yaml, "quickstart.yaml")
    assert opened["ok"] and opened["problems"] == [] and opened["name"] == "blurred-noise"
    assert [n["id"] for n in opened["graph"]["nodes"]][:2] == ["noise", "blur"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("format_version: 99\nnodes: {a: {type: dagfusion.util.Number}}\n", "reads up to 1"),
        ("format_version: 1\nnodes: [unclosed\n", "cannot open"),
        ("just text\n", "YAML mapping"),
        ("format_version: 1\nnodes: {a: {type: dagfusion.util.Number, inputs: {valu: 1.0}}}\n", "has no input"),
        (
            "format_version: 1\nnodes:\n  t: {type: dagfusion.util.Text}\n  b: {type: dagfusion.tensor.Blur, inputs: {tensor: {from: t.text}}}\n",
            "expected TENSOR, got STRING",
        ),
        ("format_version: 1\nnodes: {a: {type: dagfusion.util.Number}}\noutputs: [ghost]\n", "names no node"),
    ],
)
def test_files_the_canvas_cannot_draw_are_refused(backend: CanvasBackend, text: str, expected: str) -> None:
    opened = backend.open_text(text, "bad.yaml")
    assert not opened["ok"] and "graph" not in opened
    assert expected in opened["error"], opened["error"]


PLACEHOLDER_YAML = """\
format_version: 1
nodes:
  noise:
    type: dagfusion.tensor.Noise
    inputs: {seed: 3}
    ui: {pos: [0, 0]}
  magic:
    type: someplugin.Magic
    version: 2.0.0
    inputs: {tensor: {from: noise.tensor}, strength: 0.5, mode: fancy}
    ui: {pos: [300, 0]}
  blur:
    type: dagfusion.tensor.Blur
    inputs: {tensor: {from: magic.result}}
    ui: {pos: [600, 0]}
"""


def canonical(text: str) -> str:
    from dagfusion.workflow import parse_workflow

    workflow, problems = parse_workflow(text, "x.yaml")
    assert workflow is not None and problems == []
    return workflow.dump()


def test_unknown_node_types_open_as_placeholders_and_save_back_unchanged(backend: CanvasBackend) -> None:
    text = canonical(PLACEHOLDER_YAML)
    opened = backend.open_text(text, "plugin.yaml")
    assert opened["ok"], opened
    assert [(p["code"], p["node"]) for p in opened["problems"]] == [("unknown-node-type", "magic")]
    (magic,) = [n for n in opened["graph"]["nodes"] if n["id"] == "magic"]
    assert magic["type"] == "someplugin.Magic" and magic["version"] == "2.0.0"
    assert magic["inputs"] == {"strength": 0.5, "mode": "fancy"}
    assert {"from": ["magic", "result"], "to": ["blur", "tensor"]} in opened["graph"]["links"]
    saved = backend.save(opened["graph"])
    assert saved["ok"] and saved["yaml"] == text
    assert not backend.submit(opened["graph"])["ok"]  # it cannot run until the type is installed


def test_bypass_travels_through_the_graph(backend: CanvasBackend) -> None:
    text = PLACEHOLDER_YAML.replace("someplugin.Magic", "dagfusion.tensor.Blur").replace(
        "    version: 2.0.0\n    inputs: {tensor: {from: noise.tensor}, strength: 0.5, mode: fancy}",
        "    bypass: true\n    inputs: {tensor: {from: noise.tensor}}",
    ).replace("magic.result", "magic.tensor")
    text = canonical(text)
    opened = backend.open_text(text, "bypass.yaml")
    assert opened["ok"] and opened["problems"] == [], opened
    assert [n.get("bypass", False) for n in opened["graph"]["nodes"]] == [False, True, False]
    assert backend.save(opened["graph"])["yaml"] == text
    noise = text.replace("    type: dagfusion.tensor.Noise\n", "    type: dagfusion.tensor.Noise\n    bypass: true\n")
    checked = backend.check(backend.open_text(noise.replace("    bypass: true\n    inputs: {tensor: {from: noise.tensor}}", "    inputs: {tensor: {from: noise.tensor}}"), "x.yaml")["graph"])
    assert [p["code"] for p in checked["problems"]] == ["bypass-impossible"]


def test_fixable_problems_open_and_are_marked(backend: CanvasBackend) -> None:
    text = (
        "format_version: 1\nnodes:\n"
        "  save: {type: dagfusion.io.SaveTensorPNG}\n"
        "  blur: {type: dagfusion.tensor.Blur, inputs: {sigma: 500.0}}\n"
    )
    opened = backend.open_text(text, "draft.yaml")
    assert opened["ok"]
    assert {(p["node"], p["code"]) for p in opened["problems"]} >= {("save", "missing-input"), ("blur", "out-of-range")}


def _png(workflow: str | None) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.new("RGB", (8, 8), (200, 30, 30))
    if workflow is None:
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="PNG", pnginfo=png_info(workflow, {"run_id": "x"}))
    return buffer.getvalue()


def test_open_the_workflow_embedded_in_a_png(backend: CanvasBackend, quickstart_yaml: str) -> None:
    opened = backend.open_upload({"name": "picture.png", "data": base64.b64encode(_png(quickstart_yaml)).decode()})
    assert opened["ok"] and len(opened["graph"]["nodes"]) == 7
    plain = backend.open_upload({"name": "holiday.png", "data": base64.b64encode(_png(None)).decode()})
    assert not plain["ok"] and "carries no dagfusion workflow" in plain["error"]
    assert not backend.open_upload({"name": "x.yaml", "data": "***"})["ok"]
    assert not backend.open_upload(None)["ok"]


def test_submit_refuses_invalid_graphs_with_every_problem(backend: CanvasBackend) -> None:
    graph = empty_graph()
    graph["nodes"] = [
        {"id": "save", "type": "dagfusion.io.SaveTensorPNG", "pos": [0, 0]},
        {"id": "blur", "type": "dagfusion.tensor.Blur", "inputs": {"sigma": -1.0}, "pos": [0, 0]},
    ]
    result = backend.submit(graph)
    assert not result["ok"] and len(result["problems"]) == 3
    assert backend.queue.summary() == []


def test_run_reports_statuses_previews_and_cache(backend: CanvasBackend, quickstart_yaml: str) -> None:
    graph = _graph(quickstart_yaml)
    submitted = backend.submit(graph)
    assert submitted["ok"] and submitted["run"]["status"] in ("queued", "running")
    state = _wait(backend, submitted["run"]["id"])
    assert state["status"] == "done", state
    assert set(state["nodes"].values()) == {"done"}
    (preview,) = state["previews"]
    assert preview["node"] == "save_image" and preview["url"].startswith("data:image/png;base64,")
    assert backend.poll(submitted["run"]["id"], since=preview["index"] + 1)["run"]["previews"] == []
    assert Path(state["output_dirs"][0], "blurred_noise.png").is_file()
    # The same graph again: pure nodes come from the engine's cache.
    again = _wait(backend, backend.submit(graph)["run"]["id"])
    assert again["nodes"]["noise"] == "cached" and again["nodes"]["save_image"] == "done"
    queue = backend.poll()["queue"]
    assert [r["status"] for r in queue] == ["done", "done"] and queue[0]["number"] == 2


def test_cancel_stops_only_the_run_named(backend: CanvasBackend) -> None:
    slow = empty_graph()
    slow["nodes"] = [{"id": "slow", "type": "uitest.Slow", "inputs": {"steps": 400, "delay": 0.01}, "pos": [0, 0]}]
    quick = empty_graph()
    quick["nodes"] = [{"id": "slow", "type": "uitest.Slow", "inputs": {"steps": 2, "delay": 0.0}, "pos": [0, 0]}]
    first = backend.submit(slow)["run"]["id"]
    second = backend.submit(quick)["run"]["id"]
    deadline = time.time() + 10
    while backend.poll(first)["run"]["progress"].get("slow") is None and time.time() < deadline:
        time.sleep(0.01)
    running = backend.poll(first)["run"]
    assert running["status"] == "running" and running["progress"]["slow"]["total"] == 400
    assert backend.poll(second)["run"]["position"] == 1
    assert backend.cancel(first)["ok"]
    assert _wait(backend, first)["status"] == "cancelled"
    assert _wait(backend, second)["status"] == "done"  # the queued run went ahead untouched
    assert backend.poll(first)["run"]["nodes"]["slow"] == "cancelled"
    assert not backend.cancel(first)["ok"] and not backend.cancel("nope")["ok"]


def test_paths_suggest_files_under_allowed_folders(backend: CanvasBackend, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.safetensors").write_bytes(b"x")
    (tmp_path / "models" / "other.bin").write_bytes(b"x")
    assert backend.paths(f"{tmp_path}/models/ti") == [f"{tmp_path}/models/tiny.safetensors"]
    assert f"{tmp_path}/models/" in backend.paths(f"{tmp_path}/mo")
    assert backend.paths("/etc/pass") == []  # outside the allowed folders: nothing suggested
    assert backend.paths("")  # the allowed folders themselves


def test_results_of_a_finished_run_are_read_from_its_output_folder(backend: CanvasBackend, quickstart_yaml: str) -> None:
    import base64

    assert backend.results("no-such-run") == {"ok": False, "error": "no such run"}
    run_id = backend.submit(_graph(quickstart_yaml))["run"]["id"]
    state = _wait(backend, run_id)
    assert state["status"] == "done"
    (folder,) = backend.poll(run_id)["queue"][0]["output_dirs"]
    secret = Path(folder).parent.parent.parent / "secret.txt"  # outside the run's folder
    secret.write_text("not for the canvas", encoding="utf-8")
    (Path(folder) / "linked.txt").symlink_to(secret)
    results = backend.results(run_id)
    assert results["ok"] and results["folders"] == [folder]
    names = [i["name"] for i in results["images"]] + [t["name"] for t in results["texts"]]
    assert names and "linked.txt" not in names and not {"workflow.yaml", "manifest.json", "events.jsonl"} & set(names)
    image = results["images"][0]
    assert image["url"].startswith("data:image/png;base64,")
    assert base64.b64decode(image["url"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert all("not for the canvas" not in t["text"] for t in results["texts"])
    assert any(t["name"] == "report.txt" and t["text"].startswith("blurred noise: mean=") for t in results["texts"])
