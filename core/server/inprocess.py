"""A job executor that runs jobs on threads of this process, with an engine it is given.

:class:`InProcessExecutor` implements :class:`~dagfusion.server.executor.Executor` for a
process that already holds an :class:`~dagfusion.Engine` — the canvas (``dagfusion ui``):
its jobs use that engine's registry (plugins loaded there), settings and cache, exactly as
the canvas's own runs did. Each job runs on a thread of its own (the scheduler starts at most
one per slot) through :func:`dagfusion.server.worker.run_job`, so a job's events, previews
(small data URLs) and outcome are those a worker process reports. :meth:`close` cancels what
runs and reports nothing more: the store finds those jobs ``running`` at its next opening
and re-queues them, as for a stopped server.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from typing import Any

from dagfusion.server.executor import JobSink, JobSpec, Outcome, Slot

log = logging.getLogger("dagfusion.server")


class _SinkChannel:
    """The worker protocol's ``event`` messages, delivered straight to a sink."""

    def __init__(self, executor: InProcessExecutor, sink: JobSink) -> None:
        self.executor = executor
        self.sink = sink

    def send(self, message: dict[str, Any]) -> None:
        if message.get("op") == "event" and not self.executor.closed:
            self.sink.event(str(message["job"]), message.get("data") or {})


class InProcessExecutor:
    """Runs jobs on threads with one shared engine (see the module docstring); thread-safe."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._tokens: dict[str, Any] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self.closed = False

    def start(self, slot: Slot, job: JobSpec, sink: JobSink) -> None:
        from dagfusion.context import CancelToken

        with self._lock:
            if self.closed:
                raise RuntimeError("the executor is closed")
            token = self._tokens[job.id] = CancelToken()
            thread = threading.Thread(
                target=self._run, args=(job, sink, token), name=f"dagfusion-job-{slot.name}", daemon=True
            )
            self._threads[job.id] = thread
        thread.start()

    def _run(self, job: JobSpec, sink: JobSink, token: Any) -> None:
        from dagfusion.server.worker import run_job

        message = {
            "id": job.id,
            "source": base64.b64encode(job.source).decode("ascii"),
            "name": job.name,
            "overrides": list(job.overrides),
            "output_dir": os.fspath(job.output_dir),
        }
        try:
            done = run_job(self.engine, message, _SinkChannel(self, sink), token)
        except Exception as exc:  # run_job reports failures itself; this is a last resort
            log.exception("job %s raised", job.id)
            done = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "result": []}
        with self._lock:
            self._tokens.pop(job.id, None)
            self._threads.pop(job.id, None)
            closed = self.closed
        if not closed:
            sink.finished(job.id, Outcome(done["status"], done.get("error"), done.get("result") or []))

    def cancel(self, job_id: str) -> None:
        with self._lock:
            token = self._tokens.get(job_id)
        if token is not None:
            token.cancel()

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self.closed = True
            tokens = list(self._tokens.values())
            threads = list(self._threads.values())
        for token in tokens:
            token.cancel()
        for thread in threads:
            thread.join(timeout)


__all__ = ["InProcessExecutor"]
