"""The canvas's runs are jobs of the one job queue: in the store, found again after a reload,
and the same through a running job server (``dagfusion ui --server URL``)."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagfusion import Engine
from dagfusion.registry import Registry
from dagfusion.settings import Settings
from dagfusion.ui.graph import empty_graph, workflow_to_graph
from dagfusion.ui.handlers import CanvasBackend
from dagfusion.ui.jobqueue import JobQueue, open_queue
from dagfusion.workflow import parse_workflow

REPO = Path(__file__).resolve().parents[2]


def _graph(text: str) -> dict[str, Any]:
    wf, problems = parse_workflow(text)
    assert wf is not None and problems == []
    return workflow_to_graph(wf)


def _slow(steps: int, delay: float = 0.01) -> dict[str, Any]:
    graph = empty_graph()
    graph["nodes"] = [{"id": "slow", "type": "uitest.Slow", "inputs": {"steps": steps, "delay": delay}, "pos": [0, 0]}]
    return graph


FAILING = "format_version: 1\nnodes:\n  a: {type: dagfusion.util.Number, inputs: {value: 1.0}}\n  clamp: {type: dagfusion.math.Clamp, inputs: {value: {from: a.value}, low: 2.0, high: 1.0}}\n"


def _wait(backend: CanvasBackend, run_id: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = backend.poll(run_id)["run"]
        if state["status"] not in ("queued", "running"):
            return state
        time.sleep(0.02)
    raise AssertionError("the run did not finish")


@pytest.fixture
def local(ui_registry: Registry, ui_settings: Settings, tmp_path: Path) -> Iterator[CanvasBackend]:
    backend = CanvasBackend(Engine(ui_registry, ui_settings), queue=JobQueue.local(Engine(ui_registry, ui_settings), tmp_path / "state"))
    yield backend
    backend.queue.shutdown()


def test_a_canvas_run_is_a_job_in_the_store(local: CanvasBackend, quickstart_yaml: str) -> None:
    submitted = local.submit(_graph(quickstart_yaml))
    assert submitted["ok"], submitted
    run_id = submitted["run"]["id"]
    job = local.queue.jobs.store.get(run_id)  # type: ignore[union-attr]
    assert job is not None and job.submitter == "canvas" and b"dagfusion.tensor.Blur" in job.source
    state = _wait(local, run_id)
    assert state["status"] == "done" and set(state["nodes"].values()) == {"done"}
    assert local.queue.jobs.store.get(run_id).status == "done"  # type: ignore[union-attr]
    assert Path(state["output_dirs"][0], "blurred_noise.png").is_file()
    assert state["previews"][0]["url"].startswith("data:image/png;base64,")


def test_reloading_finds_the_runs_with_their_final_statuses(
    ui_registry: Registry, ui_settings: Settings, tmp_path: Path, quickstart_yaml: str
) -> None:
    state_dir = tmp_path / "state"
    first = CanvasBackend(Engine(ui_registry, ui_settings), queue=JobQueue.local(Engine(ui_registry, ui_settings), state_dir))
    try:
        good = first.submit(_graph(quickstart_yaml))["run"]["id"]
        bad = first.submit(_graph(FAILING))["run"]["id"]
        slow = first.submit(_slow(2000))["run"]["id"]
        before = {r["id"]: r for r in first.poll()["queue"]}
        assert _wait(first, good)["status"] == "done" and _wait(first, bad)["status"] == "failed"
        assert first.cancel(slow)["ok"] and _wait(first, slow)["status"] == "cancelled"
        previews = first.poll(good)["run"]["previews"]
    finally:
        first.queue.shutdown()
    again = CanvasBackend(Engine(ui_registry, ui_settings), queue=JobQueue.local(Engine(ui_registry, ui_settings), state_dir))
    try:
        queue = again.poll()["queue"]  # no run id: the queue with its recent runs
        assert [r["id"] for r in queue] == [slow, bad, good]
        assert [r["status"] for r in queue] == ["cancelled", "failed", "done"]
        assert [r["number"] for r in queue] == [before[i]["number"] for i in (slow, bad, good)]
        failed = again.poll(bad)["run"]
        assert failed["nodes"] == {"a": "done", "clamp": "failed"} and "low" in failed["errors"]["clamp"]
        assert "clamp" in failed["message"]
        assert again.poll(good)["run"]["previews"] == previews  # the same previews, same numbers
        assert again.poll(slow)["run"]["nodes"] == {"slow": "cancelled"}
    finally:
        again.queue.shutdown()


def test_cancelling_a_queued_run_leaves_the_others(local: CanvasBackend) -> None:
    running = local.submit(_slow(400))["run"]["id"]
    waiting = local.submit(_slow(1, 0.0))["run"]["id"]
    third = local.submit(_slow(1, 0.0))["run"]["id"]
    # behind the other two; 3 while the scheduler has not yet started the first
    assert local.poll(third)["run"]["position"] in (2, 3)
    assert local.cancel(waiting)["ok"]
    state = local.poll(waiting)["run"]
    assert state["status"] == "cancelled" and state["message"] == "cancelled before it started"
    assert local.poll(running)["run"]["status"] in ("queued", "running")
    local.cancel(running)
    assert _wait(local, third)["status"] == "done"
    assert _wait(local, running)["status"] == "cancelled"


# --- a real job server ------------------------------------------------------------------------


def _server_helpers() -> Any:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    spec = importlib.util.spec_from_file_location("server_fixtures", REPO / "tests" / "server" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules["server_fixtures"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def job_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    helpers = _server_helpers()
    running = helpers.start_server(tmp_path_factory.mktemp("canvas-server"))
    yield running, helpers
    helpers.stop_server(running)


@pytest.mark.timeout(180)
def test_the_canvas_uses_a_running_server(job_server: Any, registry: Registry, settings: Settings, quickstart_yaml: str) -> None:
    running, helpers = job_server
    engine = Engine(registry, settings)
    backend = CanvasBackend(engine, queue=JobQueue.remote(engine, running.url, running.token))
    try:
        submitted = backend.submit(_graph(quickstart_yaml))
        assert submitted["ok"], submitted
        run_id = submitted["run"]["id"]
        with running.client() as client:
            assert client.job(run_id)["name"] == "blurred-noise.yaml"  # the server's API sees the run
        state = _wait(backend, run_id)
        assert state["status"] == "done" and set(state["nodes"].values()) == {"done"}
        (preview,) = state["previews"]  # previews travel in the job's events
        assert preview["node"] == "save_image" and preview["url"].startswith("data:image/png;base64,")
        assert Path(state["output_dirs"][0], "blurred_noise.png").is_file()

        # Cancel exactly one run: the queued one; then the running one.
        slow = _graph(helpers.SLOW.replace("sigma: 20", "sigma: 30"))
        first = backend.submit(slow)["run"]["id"]
        second = backend.submit(slow)["run"]["id"]
        assert backend.poll(second)["run"]["position"] == 1
        assert backend.cancel(second)["ok"]
        assert backend.poll(second)["run"]["status"] == "cancelled"
        assert backend.poll(first)["run"]["status"] in ("queued", "running")
        assert backend.cancel(first)["ok"]
        assert _wait(backend, first)["status"] in ("cancelled", "done")  # it may finish first
        assert not backend.cancel("nope")["ok"]
        listed = [r["id"] for r in backend.poll()["queue"]]
        assert listed[:3] == [second, first, run_id]
        refused = backend.submit(_graph("format_version: 1\nnodes:\n  b: {type: dagfusion.tensor.Blur}\n"))
        assert not refused["ok"] and refused["problems"]  # invalid: refused with its problems, nothing queued
        assert [r["id"] for r in backend.poll()["queue"]][:1] == [second]
    finally:
        backend.queue.shutdown()
    # A canvas opened on the server's state folder attaches to the server instead.
    attached = open_queue(engine, state_dir=running.state)
    try:
        assert attached.description == f"the server at {running.url}"
        assert run_id in [r["id"] for r in attached.summary()]
    finally:
        attached.shutdown()
