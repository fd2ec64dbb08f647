"""Jobs survive the server being killed: queued ones run, the running one runs again, once."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from .conftest import SLOW, start_server, stop_server

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def test_kill_and_restart_runs_every_job_exactly_once(tmp_path: Path) -> None:
    first = start_server(tmp_path)
    try:
        with first.client() as client:
            ids = [client.submit(SLOW, overrides=[f"n.seed={seed}"]) for seed in range(4)]
            deadline = time.monotonic() + 60
            victim = None
            while victim is None and time.monotonic() < deadline:
                running = client.jobs(status="running")["jobs"]
                if running and any(e["event"] == "NodeStarted" for e in _events(client, running[0]["id"])):
                    victim = running[0]["id"]
                time.sleep(0.05)
            assert victim is not None, "no job started"
    finally:
        stop_server(first, signal.SIGKILL)
    second = start_server(tmp_path, port=int(first.url.rsplit(":", 1)[1]))
    try:
        with second.client() as client:
            jobs = {job_id: client.wait(job_id, timeout=90) for job_id in ids}
            for job_id, job in jobs.items():
                kinds = [e["event"] for e in _events(client, job_id)]
                assert job["status"] == "done", job
                assert kinds.count("JobFinished") == 1 and kinds[-1] == "JobFinished"
                again = job_id == victim
                assert job["attempts"] == (2 if again else 1) and job["interruptions"] == (1 if again else 0)
                assert kinds.count("JobStarted") == job["attempts"] and kinds.count("JobInterrupted") == job["interruptions"]
                started = [e for e in _events(client, job_id) if e["event"] == "JobStarted"]
                finished = [e for e in _events(client, job_id) if e["event"] == "RunFinished"]
                assert len(finished) == 1 and finished[0]["time"] > started[-1]["time"]
            assert client.jobs()["total"] == len(ids)
    finally:
        stop_server(second)


def _events(client, job_id: str) -> list[dict]:  # type: ignore[no-untyped-def, type-arg]
    return list(client.events(job_id)) if client.job(job_id)["status"] in ("done", "failed", "cancelled") else _so_far(client, job_id)


def _so_far(client, job_id: str) -> list[dict]:  # type: ignore[no-untyped-def, type-arg]
    import httpx

    headers = {"Authorization": f"Bearer {client.token}"}
    count = client.job(job_id)["event_count"]
    found: list[dict] = []  # type: ignore[type-arg]
    with httpx.stream("GET", f"{client.url}/jobs/{job_id}/events", headers=headers, timeout=30) as response:
        from dagfusion.client import _parse_sse

        for event in _parse_sse(response.iter_lines()):
            found.append(event)
            if event["index"] + 1 >= count:
                break
    return found
