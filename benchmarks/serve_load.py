"""Load on the job server: N tiny tensor-only jobs submitted by 8 concurrent clients.

Starts ``dagfusion serve`` on a free loopback port with a fresh state folder, submits ``--jobs``
jobs (default 1,000; ``--quick``: 50) from ``--clients`` threads, waits for all of them, and
prints submit latency (p50/p99), jobs per second end to end and the server's peak RSS. With
``--kill`` it SIGKILLs the server half-way through the submissions, restarts it on the same
state folder and checks that every job finished exactly once (one ``JobFinished`` event each).

    .venv/bin/python benchmarks/serve_load.py --quick
    .venv/bin/python benchmarks/serve_load.py --jobs 300 --kill
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TINY = """\
format_version: 1
nodes:
  n: {type: dagfusion.tensor.Noise, inputs: {height: 8, width: 8, channels: 3}}
  s: {type: dagfusion.tensor.Stats, inputs: {tensor: {from: n.tensor}}}
"""


def start(root: Path, port: int = 0, cpu_jobs: int = 1) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "DAGFUSION_OUTPUT_DIR": str(root / "outputs"), "DAGFUSION_CACHE_DIR": str(root / "cache"),
           "DAGFUSION_THREADS": "1", "DAGFUSION_SERVER_DIR": str(root / "state")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagfusion.cli", "serve", "--port", str(port), "--cpu-jobs", str(cpu_jobs)],
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
        raise SystemExit("the server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()  # drain its output
    return proc, url


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and its children (the workers), in KiB (Linux; 0 elsewhere)."""
    total = 0
    try:
        pids = [pid, *(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
        for one in pids:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    except OSError:
        pass
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="50 jobs")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cpu-jobs", type=int, default=1, help="jobs the server runs at once")
    parser.add_argument("--kill", action="store_true", help="SIGKILL the server half-way and restart it")
    parser.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    args = parser.parse_args()
    count = 50 if args.quick else args.jobs
    from dagfusion.client import Client

    with tempfile.TemporaryDirectory(prefix="dagfusion-serve-load-") as tmp:
        root = Path(tmp)
        proc, url = start(root, cpu_jobs=args.cpu_jobs)
        port = int(url.rsplit(":", 1)[1])
        state = root / "state"
        latencies: list[float] = []
        ids: list[str] = []
        lock = threading.Lock()
        peak = [rss_kib(proc.pid)]
        killed = threading.Event()
        stop_sampling = threading.Event()
        deadline = time.monotonic() + args.timeout

        def sample() -> None:
            while not stop_sampling.wait(0.5):
                peak[0] = max(peak[0], rss_kib(proc.pid))

        def submitter(share: int) -> None:
            with Client(url, state_dir=state, submitter="bench") as client:
                for i in range(share):
                    while time.monotonic() < deadline:
                        begin = time.perf_counter()
                        try:
                            job_id = client.submit(TINY, overrides=[f"n.seed={threading.get_ident() % 100000 + i}"])
                        except Exception:  # the server is restarting
                            time.sleep(0.2)
                            continue
                        with lock:
                            latencies.append(time.perf_counter() - begin)
                            ids.append(job_id)
                            if args.kill and not killed.is_set() and len(ids) >= count // 2:
                                killed.set()
                                proc.send_signal(signal.SIGKILL)
                        break

        threading.Thread(target=sample, daemon=True).start()
        begin = time.perf_counter()
        shares = [count // args.clients + (1 if i < count % args.clients else 0) for i in range(args.clients)]
        threads = [threading.Thread(target=submitter, args=(share,)) for share in shares]
        for t in threads:
            t.start()
        if args.kill:
            killed.wait(args.timeout)
            proc.wait()
            proc, url = start(root, port=port, cpu_jobs=args.cpu_jobs)
        for t in threads:
            t.join()
        submitted = time.perf_counter() - begin
        with Client(url, state_dir=state) as client:
            jobs = [client.wait(job_id, timeout=max(1.0, deadline - time.monotonic())) for job_id in ids]
            elapsed = time.perf_counter() - begin
            finished_once = sum(
                1 for job in jobs
                if [e["event"] for e in client.events(job["id"])].count("JobFinished") == 1
            ) if args.kill else len(jobs)
        stop_sampling.set()
        peak[0] = max(peak[0], rss_kib(proc.pid))
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    done = sum(1 for j in jobs if j["status"] == "done")
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(f"jobs: {count} submitted by {args.clients} clients, {done} done, {len(jobs) - done} not done")
    print(f"submit latency: p50 {statistics.median(lat) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms "
          f"(submissions took {submitted:.1f} s)")
    print(f"throughput: {len(jobs) / elapsed:.1f} jobs/s end to end ({elapsed:.1f} s)")
    print(f"server RSS (with its workers), peak: {peak[0] / 1024:.0f} MiB")
    if args.kill:
        print(f"after SIGKILL and restart: {finished_once} of {count} jobs finished exactly once")
    ok = done == count and (not args.kill or finished_once == count)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
