"""The job server's API against a real server: jobs, events, outputs, validation, cancel."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dagfusion.client import Client, ServerError

from .conftest import SLOW, TINY, Running

pytestmark = pytest.mark.timeout(120)
INVALID = "format_version: 1\nnodes:\n  a: {type: nope.Missing}\n  b: {type: dagfusion.tensor.Noise, inputs: {height: -3}}\n"


def test_submit_events_outputs_download(server: Running, tmp_path: Path) -> None:
    with server.client(submitter="alice") as client:
        job_id = client.submit(TINY, overrides=["n.seed=5"])
        kinds = [e["event"] for e in client.events(job_id)]
        assert kinds[0] == "JobQueued" and kinds[1] == "JobStarted" and kinds[-1] == "JobFinished"
        assert "RunStarted" in kinds and "RunFinished" in kinds
        job = client.wait(job_id, timeout=60)
        assert job["status"] == "done" and job["submitter"] == "alice" and job["overrides"] == ["n.seed=5"]
        names = {f["name"] for f in client.outputs(job_id)}
        assert {"noise.png", "events.jsonl", "manifest.json", "workflow.yaml"} <= names
        saved = client.download(job_id, "noise.png", tmp_path)
        assert saved.read_bytes().startswith(b"\x89PNG")
        assert Path(job["output_dir"]) == server.root / "outputs" / "jobs" / job_id
        page = client.jobs(submitter="alice", status="done")
        assert page["total"] >= 1 and all(j["submitter"] == "alice" for j in page["jobs"])


def test_sse_resumes_from_an_index(server: Running) -> None:
    with server.client() as client:
        job_id = client.submit(TINY)
        client.wait(job_id, timeout=60)
        everything = list(client.events(job_id))
        assert [e["index"] for e in everything] == list(range(len(everything)))
        assert [e["index"] for e in client.events(job_id, since=3)] == list(range(3, len(everything)))
        headers = {"Authorization": f"Bearer {server.token}", "Last-Event-ID": "5"}
        text = httpx.get(f"{server.url}/jobs/{job_id}/events", headers=headers, timeout=30).text
        assert text.startswith("id: 6\n") and "event: JobFinished" in text


def test_invalid_workflow_refused_with_validates_problems(server: Running, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(INVALID)
    env = {**os.environ, "DAGFUSION_TOKEN": server.token}
    validate = subprocess.run([sys.executable, "-m", "dagfusion.cli", "validate", str(path)], capture_output=True, text=True, env=env)
    submit = subprocess.run(
        [sys.executable, "-m", "dagfusion.cli", "submit", str(path), "--server", server.url], capture_output=True, text=True, env=env
    )
    assert validate.returncode == submit.returncode == 2
    assert submit.stderr == validate.stderr and "unknown node type" in submit.stderr
    with server.client() as client, pytest.raises(ServerError) as refused:
        client.submit(INVALID)
    assert refused.value.status == 422 and refused.value.body["field"] == "workflow"
    assert {p["code"] for p in refused.value.problems} >= {"unknown-node-type"}
    assert client_count(server, "queued") == 0


def client_count(server: Running, status: str) -> int:
    with server.client() as client:
        return int(client.jobs(status=status)["total"])


def test_cancel_a_running_and_a_queued_job(server: Running) -> None:
    with server.client() as client:
        running = client.submit(SLOW, overrides=["n.seed=102"])
        queued = client.submit(SLOW, overrides=["n.seed=103"], priority=-5)
        deadline = time.monotonic() + 60
        while client.job(running)["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.cancel(queued)["status"] == "cancelled"
        client.cancel(running)
        assert client.wait(running, timeout=60)["status"] == "cancelled"
        assert client.job(queued)["attempts"] == 0
        client.delete(running)
        with pytest.raises(ServerError) as gone:
            client.job(running)
        assert gone.value.status == 404


def test_priority_runs_first(server: Running) -> None:
    with server.client() as client:
        blocker = client.submit(SLOW, overrides=["n.seed=101"])
        deadline = time.monotonic() + 60
        while client.job(blocker)["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        low = client.submit(TINY, priority=0)
        high = client.submit(TINY, priority=9)
        for job_id in (blocker, low, high):
            client.wait(job_id, timeout=60)
        assert client.job(high)["started"] < client.job(low)["started"]


def test_guard_token_host_origin(server: Running) -> None:
    url = server.url
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/health", headers={"Host": "evil.example"}).status_code == 403
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = httpx.get(f"{url}/jobs", headers=headers)
        assert refused.status_code == 403 and refused.json()["field"] == "token"
    good = {"Authorization": f"Bearer {server.token}"}
    assert httpx.get(f"{url}/jobs", headers=good).status_code == 200
    foreign = httpx.get(f"{url}/jobs", headers={**good, "Origin": "http://evil.example"})
    assert foreign.status_code == 403 and foreign.json()["field"] == "Origin"
    rebinding = httpx.get(f"{url}/jobs", headers={**good, "Host": "evil.example:80"})
    assert rebinding.status_code == 403 and rebinding.json()["field"] == "Host"
    assert httpx.get(f"{url}/openapi.json", headers=good).json()["paths"]["/jobs"]


def test_output_paths_are_confined(server: Running, tmp_path: Path) -> None:
    with server.client() as client:
        job_id = client.submit(TINY)
        job = client.wait(job_id, timeout=60)
    (Path(job["output_dir"]) / "link").symlink_to(tmp_path)
    (tmp_path / "secret.txt").write_text("no")
    good = {"Authorization": f"Bearer {server.token}"}
    base = f"{server.url}/jobs/{job_id}/outputs/"
    for name, status in (("..%2Fx", 400), ("%2E%2E%2F%2E%2E%2Fstate%2Ftoken", 400), ("%2Fetc%2Fpasswd", 400),
                         ("link%2Fsecret.txt", 400), ("missing.png", 404)):
        answer = httpx.get(base + name, headers=good)
        assert answer.status_code == status, (name, answer.text)
        assert answer.json()["field"] == "name"
    with httpx.Client() as raw:  # a literal ../ (not normalised by the client)
        request = raw.build_request("GET", base, headers=good)
        request.url = request.url.copy_with(raw_path=f"/jobs/{job_id}/outputs/../../x".encode())
        assert raw.send(request).status_code in (400, 404)


def test_malformed_and_oversized_requests(server: Running) -> None:
    good = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}
    url = f"{server.url}/jobs"
    broken = httpx.post(url, content=b'{"workflow": ', headers=good)
    assert broken.status_code == 400 and broken.json()["field"] == "body"
    typed = httpx.post(url, json={"workflow": TINY, "priority": "high"}, headers=good)
    assert typed.status_code == 422 and typed.json()["field"] == "body.priority"
    neither = httpx.post(url, json={"priority": 1}, headers=good)
    assert neither.status_code == 422 and neither.json()["field"] == "workflow"
    huge = httpx.post(url, json={"workflow": "#" * 300_000}, headers=good)
    assert huge.status_code == 413 and huge.json()["field"] == "body"
    assert httpx.get(f"{server.url}/jobs?limit=0", headers=good).json()["field"] == "query.limit"
    assert httpx.get(f"{server.url}/jobs/nope", headers=good).status_code == 404


def test_cli_submit_wait_jobs_cancel(server: Running, tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    env = {**os.environ, "DAGFUSION_TOKEN": server.token}
    cmd = [sys.executable, "-m", "dagfusion.cli"]
    done = subprocess.run([*cmd, "submit", str(path), "--server", server.url, "--wait", "--json-events"],
                          capture_output=True, text=True, env=env, timeout=90)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.splitlines()[0]
    assert '"JobFinished"' in done.stdout
    listed = subprocess.run([*cmd, "jobs", "--server", server.url], capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0 and job_id in listed.stdout
    cancel = subprocess.run([*cmd, "cancel", job_id, "--server", server.url], capture_output=True, text=True, env=env, timeout=60)
    assert cancel.returncode == 0 and "done" in cancel.stdout


def test_client_finds_the_token_file(server: Running) -> None:
    with Client(server.url, state_dir=server.state) as client:
        assert client.token == server.token and client.jobs(limit=1)["jobs"] is not None
    assert (server.state / "token").stat().st_mode & 0o777 == 0o600
