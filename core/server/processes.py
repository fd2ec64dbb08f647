"""The job executor that runs jobs in local worker processes, one long-lived process per slot.

Each :class:`~dagfusion.server.executor.Slot` gets a worker (:mod:`dagfusion.server.worker`),
started on its first job and kept for the next ones, so a job pays neither the start of
Python and torch nor a cold cache. A thread per worker reads its JSON lines and forwards them
to the :class:`~dagfusion.server.executor.JobSink`. When a worker dies (a crash, out of memory,
killed), the job it ran is reported ``failed`` with the reason, its finished outputs stay in
its folder, and the slot's next job starts a fresh worker. A cancelled job that does not stop
within ``cancel_grace`` seconds (default :data:`CANCEL_GRACE`) has its worker killed.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

from dagfusion.server.executor import JobSink, JobSpec, Outcome, Slot

#: Seconds a cancelled job may take to stop before its worker is killed (the default).
CANCEL_GRACE = 20.0


def describe_exit(code: int | None) -> str:
    """``exit code 3`` or ``killed by SIGKILL`` for a process's return code."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Worker:
    def __init__(self, slot: Slot, command: list[str], env: Mapping[str, str] | None, grace: float = CANCEL_GRACE) -> None:
        self.slot = slot
        self.grace = grace
        self.lock = threading.Lock()
        self.job: str | None = None
        self.cancelled = False
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8", env=env,
            bufsize=1,
        )
        self.sink: JobSink | None = None
        self.reader = threading.Thread(target=self._read, name=f"dagfusion-worker-{slot.name}", daemon=True)
        self.reader.start()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            op = message.get("op")
            with self.lock:
                sink, job = self.sink, self.job
            if sink is None or job is None or message.get("job") != job:
                continue
            if op == "event":
                sink.event(job, message.get("data") or {})
            elif op == "done":
                with self.lock:
                    self.job = None
                sink.finished(job, Outcome(message.get("status", "failed"), message.get("error"), message.get("result") or []))
        code = self.proc.wait()
        with self.lock:
            sink, job, cancelled = self.sink, self.job, self.cancelled
            self.job = None
        if sink is not None and job is not None:
            if cancelled:
                sink.finished(job, Outcome("cancelled", f"stopped by force after {self.grace:g} s"))
            else:
                sink.finished(
                    job,
                    Outcome("failed", f"the worker process running this job died ({describe_exit(code)}); "
                            "the outputs it had finished are kept"),
                )

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()


class ProcessExecutor:
    """Runs each slot's jobs in a worker process of its own (see the module docstring).

    ``settings`` are overrides (JSON-compatible, as :meth:`Settings.load` takes them) applied in
    every worker; ``env`` its environment (default: this process's); ``cancel_grace`` the
    seconds a cancelled job may take to stop before its worker is killed.
    """

    def __init__(
        self, settings: Mapping[str, Any] | None = None, *, env: Mapping[str, str] | None = None,
        cancel_grace: float = CANCEL_GRACE,
    ) -> None:
        if not cancel_grace > 0:
            raise ValueError(f"cancel_grace must be a positive number of seconds, got {cancel_grace!r}")
        self.settings = dict(settings or {})
        self.env = dict(env) if env is not None else None
        self.cancel_grace = float(cancel_grace)
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _command(self, slot: Slot) -> list[str]:
        return [sys.executable, "-m", "dagfusion.server.worker", "--device", slot.device,
                "--settings", json.dumps(self.settings)]

    def start(self, slot: Slot, job: JobSpec, sink: JobSink) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the executor is closed")
            worker = self._workers.get(slot.name)
            if worker is None or not worker.alive:
                worker = self._workers[slot.name] = _Worker(slot, self._command(slot), self.env, self.cancel_grace)
        with worker.lock:
            worker.sink, worker.job, worker.cancelled = sink, job.id, False
        try:
            worker.send({
                "op": "run",
                "job": {
                    "id": job.id,
                    "source": base64.b64encode(job.source).decode("ascii"),
                    "name": job.name,
                    "overrides": list(job.overrides),
                    "output_dir": os.fspath(job.output_dir),
                },
            })
        except OSError:
            worker.kill()  # its reader reports the job failed once the process is gone

    def cancel(self, job_id: str) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            with worker.lock:
                if worker.job != job_id:
                    continue
                worker.cancelled = True
            try:
                worker.send({"op": "cancel", "job": job_id})
            except OSError:
                pass
            timer = threading.Timer(self.cancel_grace, self._force_stop, args=(worker, job_id))
            timer.daemon = True
            timer.start()

    @staticmethod
    def _force_stop(worker: _Worker, job_id: str) -> None:
        with worker.lock:
            still = worker.job == job_id
        if still:
            worker.kill()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            with worker.lock:
                worker.sink = None  # outcomes are no longer reported: the store re-queues
            try:
                if worker.proc.stdin is not None:
                    worker.proc.stdin.close()  # the worker exits when its stdin closes
            except OSError:
                pass
        for worker in workers:
            try:
                worker.proc.wait(5)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.proc.wait(5)


__all__ = ["CANCEL_GRACE", "ProcessExecutor", "describe_exit"]
