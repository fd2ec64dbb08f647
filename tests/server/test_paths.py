"""Paths the main API tests leave out: PNG upload, a full queue over HTTP, ``HEAD /health``,
and the force-kill of a cancelled job that ignores cancellation."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dagfusion.server.executor import JobSpec, Outcome, Slot
from dagfusion.server.processes import ProcessExecutor

from . import slowplugin
from .conftest import SLOW, TINY, Running, start_server, stop_server

pytestmark = pytest.mark.timeout(120)


def auth(server: Running) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token}"}


def dagfusion_png(workflow: str) -> bytes:
    """An 8×8 PNG carrying ``workflow`` the way dagfusion writes it."""
    from dagfusion.pngmeta import png_info
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG", pnginfo=png_info(workflow, {"note": "test"}))
    return buffer.getvalue()


def test_upload_a_dagfusion_png_runs_its_workflow(server: Running) -> None:
    png = dagfusion_png(TINY)
    files = {"file": ("made-by-dagfusion.png", png, "image/png")}
    data = {"overrides": ["n.seed=11"], "priority": "3", "submitter": "png-user"}
    answer = httpx.post(f"{server.url}/jobs/upload", headers=auth(server), files=files, data=data, timeout=30)
    assert answer.status_code == 201, answer.text
    job = answer.json()
    assert job["name"] == "made-by-dagfusion.png" and job["overrides"] == ["n.seed=11"]
    assert job["priority"] == 3 and job["submitter"] == "png-user"
    with server.client() as client:
        done = client.wait(job["id"], timeout=60)
        assert done["status"] == "done", done
        assert "noise.png" in {f["name"] for f in client.outputs(job["id"])}


def test_upload_of_a_png_without_a_workflow_is_refused(server: Running) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    files = {"file": ("plain.png", buffer.getvalue(), "image/png")}
    answer = httpx.post(f"{server.url}/jobs/upload", headers=auth(server), files=files, timeout=30)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["field"] == "workflow"


def test_head_health_answers_200_without_token(server: Running) -> None:
    answer = httpx.head(f"{server.url}/health", timeout=10)
    assert answer.status_code == 200 and answer.content == b""
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
    assert httpx.head(f"{server.url}/jobs", timeout=10).status_code == 403  # the rest still needs the token


@pytest.fixture()
def small_queue(tmp_path: Path) -> Iterator[Running]:
    running = start_server(tmp_path, env={"DAGFUSION_SERVER_MAX_QUEUE": "2"})
    yield running
    stop_server(running)


def test_a_full_queue_answers_429_over_http(small_queue: Running) -> None:
    server = small_queue
    url = f"{server.url}/jobs"
    first = httpx.post(url, headers=auth(server), json={"workflow": SLOW, "overrides": ["n.seed=1"]}, timeout=30)
    assert first.status_code == 201, first.text
    with server.client() as client:  # the first one runs, so the next two fill the queue
        deadline = time.monotonic() + 60
        while client.job(first.json()["id"])["status"] == "queued" and time.monotonic() < deadline:
            time.sleep(0.05)
    codes = [
        httpx.post(url, headers=auth(server), json={"workflow": SLOW, "overrides": [f"n.seed={i}"]}, timeout=30)
        for i in (2, 3, 4)
    ]
    assert [c.status_code for c in codes[:2]] == [201, 201]
    full = codes[2]
    assert full.status_code == 429, full.text
    assert full.headers["content-type"].startswith("application/problem+json")
    assert "queue is full" in full.json()["title"] and "server_max_queue" in full.json()["detail"]
    upload = httpx.post(f"{url}/upload", headers=auth(server), files={"file": ("w.yaml", TINY.encode())}, timeout=30)
    assert upload.status_code == 429
    with server.client() as client:
        for answer in (first, *codes[:2]):
            client.cancel(answer.json()["id"])


class Sink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.outcome: Outcome | None = None
        self.finished_at = 0.0
        self.done = threading.Event()
        self.started = threading.Event()

    def event(self, job_id: str, event: dict[str, Any]) -> None:
        self.events.append(event)
        if event.get("event") == "NodeStarted":
            self.started.set()

    def finished(self, job_id: str, outcome: Outcome) -> None:
        self.outcome, self.finished_at = outcome, time.monotonic()
        self.done.set()
        self.started.set()  # stop waiting for a start that will not come


def test_a_cancelled_job_that_ignores_it_is_killed_after_the_grace(tmp_path: Path) -> None:
    env = slowplugin.environ(tmp_path / "plugin")
    env.update({"DAGFUSION_CACHE_DIR": str(tmp_path / "cache"), "DAGFUSION_THREADS": "1"})
    executor = ProcessExecutor({"output_dir": str(tmp_path / "out")}, env=env, cancel_grace=1.0)
    slot = Slot("cpu-0", "cpu", "cpu")
    try:
        sink = Sink()
        executor.start(slot, JobSpec("stubborn", slowplugin.STUBBORN.encode(), "s.yaml", (), tmp_path / "out" / "a"), sink)
        assert sink.started.wait(60) and sink.outcome is None, sink.outcome
        cancelled_at = time.monotonic()
        executor.cancel("stubborn")
        assert sink.done.wait(15), "the worker was not killed"
        assert sink.outcome is not None and sink.outcome.status == "cancelled"
        assert sink.outcome.error == "stopped by force after 1 s"
        assert 0.9 <= sink.finished_at - cancelled_at < 10
        # the slot's next job gets a fresh worker
        again = Sink()
        executor.start(slot, JobSpec("tiny", TINY.encode(), "t.yaml", (), tmp_path / "out" / "b"), again)
        assert again.done.wait(60) and again.outcome is not None and again.outcome.status == "done", again.outcome
    finally:
        executor.close()


def test_cancel_grace_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ProcessExecutor(cancel_grace=0)


def test_the_event_bell_wakes_a_waiting_stream_at_once() -> None:
    import asyncio

    from dagfusion.server.app import EventBell

    bell = EventBell()

    async def main() -> tuple[float, float]:
        began = time.monotonic()
        await bell.wait("j", 0.05, lambda: False)  # nobody rings: waits out its timeout
        quiet = time.monotonic() - began
        threading.Timer(0.01, bell.ring, args=("j",)).start()
        began = time.monotonic()
        await bell.wait("j", 10.0, lambda: False)
        return quiet, time.monotonic() - began

    quiet, rung = asyncio.run(main())
    assert quiet >= 0.04 and rung < 2.0
    assert asyncio.run(asyncio.wait_for(bell.wait("j", 10.0, lambda: True), 2)) is None  # ready: no wait
    bell.ring("nobody-waits")
