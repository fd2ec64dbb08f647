"""Event latency of the job server: from a node's progress event to an SSE client.

Starts ``dagfusion serve`` on a free loopback port with a fresh state folder and a small test
plugin (``testslow.Ticker``, from ``tests/server/slowplugin.py``) on ``PYTHONPATH``, submits one
job whose node reports ``--events`` progress events ``--interval`` seconds apart, and follows
``GET /jobs/{id}/events`` as it runs. Each ``NodeProgress`` event carries its ``time`` (a
``time.time()`` stamp taken when the node reported it, in the worker process); the latency of
an event is the client's clock when its SSE ``data:`` line arrives minus that stamp (one
machine, one clock). Prints p50, p95 and max in ms, over the events of ``--jobs`` jobs
(the first job also pays for the worker's start, which the stamps do not include).

    .venv/bin/python benchmarks/serve_latency.py
    .venv/bin/python benchmarks/serve_latency.py --events 500 --interval 0.002 --jobs 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLUGIN_FILE = HERE.parent / "tests" / "server" / "slowplugin.py"


def load_plugin_helper():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("dagfusion_bench_slowplugin", PLUGIN_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start(root: Path, plugin: object) -> tuple[subprocess.Popen[str], str, str]:
    env = plugin.environ(root / "plugin")  # type: ignore[attr-defined]
    env.update({"DAGFUSION_OUTPUT_DIR": str(root / "outputs"), "DAGFUSION_CACHE_DIR": str(root / "cache"),
                "DAGFUSION_THREADS": "1", "DAGFUSION_SERVER_DIR": str(root / "state")})
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagfusion.cli", "serve", "--port", "0", "--device", "cpu"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    url = ""
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if line.startswith("dagfusion server: "):
            url = line.split(": ", 1)[1].strip()
        if line.strip().startswith("slots:") or time.monotonic() > deadline:
            break
    if not url:
        proc.kill()
        raise SystemExit("the server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()  # drain its output
    token = (root / "state" / "token").read_text().strip()
    return proc, url, token


def follow(url: str, token: str, job_id: str, timeout: float) -> list[float]:
    """Latencies (s) of the job's NodeProgress events, read as they arrive."""
    import httpx

    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", headers=headers, timeout=timeout) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            arrived = time.time()
            if line.startswith("data: "):
                data = json.loads(line[6:])
                if data.get("event") == "NodeProgress":
                    latencies.append(arrived - float(data["time"]))
                if data.get("event") == "JobFinished":
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"job {job_id} did not finish within {timeout:g} s")
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200, help="progress events per job (1 to 20000)")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between events (0 to 1)")
    parser.add_argument("--jobs", type=int, default=2, help="jobs, one after the other (1 to 20)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one job may take")
    args = parser.parse_args(argv)
    if not (1 <= args.events <= 20000 and 0 <= args.interval <= 1 and 1 <= args.jobs <= 20):
        parser.error("--events 1..20000, --interval 0..1, --jobs 1..20")
    import httpx

    plugin = load_plugin_helper()
    workflow = plugin.TICKER.format(count=args.events, interval=args.interval)
    with tempfile.TemporaryDirectory(prefix="dagfusion-latency-") as folder:
        proc, url, token = start(Path(folder), plugin)
        try:
            headers = {"Authorization": f"Bearer {token}"}
            everything: list[float] = []
            for number in range(args.jobs):
                answer = httpx.post(f"{url}/jobs", headers=headers, json={"workflow": workflow}, timeout=30)
                if answer.status_code != 201:
                    raise SystemExit(f"submission refused: {answer.status_code} {answer.text}")
                job_id = answer.json()["id"]
                latencies = follow(url, token, job_id, args.timeout)
                status = httpx.get(f"{url}/jobs/{job_id}", headers=headers, timeout=30).json()["status"]
                if status != "done" or len(latencies) != args.events:
                    raise SystemExit(f"job {number}: {status}, {len(latencies)} of {args.events} progress events")
                everything += latencies
            ms = [v * 1000 for v in everything]
            print(f"serve_latency: {len(ms)} NodeProgress events ({args.jobs} jobs x {args.events}, "
                  f"{args.interval * 1000:g} ms apart), node -> SSE client")
            print(f"  p50 {statistics.median(ms):.1f} ms  p95 {percentile(ms, 0.95):.1f} ms  max {max(ms):.1f} ms"
                  f"  (min {min(ms):.1f} ms)")
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
