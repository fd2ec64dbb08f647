"""The job server's executor that runs jobs on a Ray cluster (``dagfusion serve --executor ray``).

It keeps a :class:`~dagfusion.distributed.WorkerPool` of model-holding Ray workers and offers
one :class:`~dagfusion.server.executor.Slot` per worker (``ray-0``, ``ray-1`` …): the
scheduler runs one job per slot, and a job's points run on its slot's worker, so jobs run in
parallel across the cluster and each worker keeps its models loaded from job to job. Each
job is validated on the server, then run by a thread of its own, which reports every event
(previews dropped) and exactly one outcome to the sink — ``failed`` with the reason when
the job cannot run or its worker dies (the pool then starts no new worker in its place: the
slot's later jobs fail too until the server restarts). Files come back from the workers and
are written in the job's output folder, as the process executor's jobs write them.
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
from typing import Any

from dagfusion.server.executor import CPU, GPU, JobSink, JobSpec, Outcome, Slot


class _SinkEvents:
    """A progress handler forwarding each event's JSON form (previews dropped) to the sink."""

    def __init__(self, sink: JobSink, job_id: str) -> None:
        self.sink = sink
        self.job_id = job_id

    def handle(self, event: Any) -> None:
        data = event.to_dict()
        data.pop("preview", None)
        self.sink.event(self.job_id, data)


def job_outcome(results: list[Any], out: Any, cancelled: bool) -> Outcome:
    """The :class:`Outcome` of a job's runs (as the process executor's worker reports it)."""
    runs = [
        {
            "run_id": r.run_id,
            "status": r.status,
            "output_dir": os.path.relpath(r.output_dir, out) if r.output_dir is not None else None,
            "seconds": round(r.seconds, 4),
            "executed": len(r.executed),
            "cached": len(r.cached),
            "errors": {node: str(err) for node, err in r.errors.items()},
        }
        for r in results
    ]
    if cancelled or any(r.status == "cancelled" for r in results):
        return Outcome("cancelled", None, runs)
    failed = [f"{node}: {err}" for r in results for node, err in r.errors.items()]
    if failed:
        return Outcome("failed", "; ".join(failed)[:4000], runs)
    return Outcome("done", None, runs)


class RayExecutor:
    """Runs the server's jobs on Ray workers (see the module docstring).

    ``address`` is a running cluster's (default: a private local one, stopped by
    :meth:`close`); ``workers`` the pool size (default: the cluster's CPUs).
    """

    def __init__(self, settings: Any, *, address: str | None = None, workers: int | None = None) -> None:
        from dagfusion.distributed import WorkerPool, ray_session, worker_settings
        from dagfusion.engine import Engine

        self.engine = Engine(settings=settings)
        self._session = contextlib.ExitStack()
        ray = self._session.enter_context(ray_session(address))
        size = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        try:
            self.pool = WorkerPool(size, worker_settings(settings))
        except BaseException:
            self._session.close()
            raise
        kind = GPU if str(settings.device).startswith("cuda") else CPU
        self.slots = [Slot(f"ray-{i}", kind, str(settings.device) if kind == GPU else "cpu") for i in range(size)]
        self._tokens: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self, slot: Slot, job: JobSpec, sink: JobSink) -> None:
        from dagfusion.context import CancelToken

        with self._lock:
            if self._closed:
                raise RuntimeError("the executor is closed")
            token = self._tokens[job.id] = CancelToken()
        actor = self.pool.actors[[s.name for s in self.slots].index(slot.name)]
        thread = threading.Thread(target=self._run, args=(actor, job, sink, token), name=f"dagfusion-ray-{job.id}", daemon=True)
        thread.start()

    def _run(self, actor: Any, job: JobSpec, sink: JobSink, token: Any) -> None:
        from dagfusion.distributed import run_sweep
        from dagfusion.errors import ValidationError, WorkflowError

        try:
            outcome = run_sweep(
                self.engine, job.source, self.pool, actors=[actor], overrides=job.overrides,
                out=job.output_dir, handler=_SinkEvents(sink, job.id), cancel_token=token,
            )
            result = job_outcome(outcome.results, job.output_dir, token.cancelled)
        except ValidationError as exc:
            result = Outcome("failed", "\n".join(str(p) for p in exc.problems))
        except WorkflowError as exc:
            result = Outcome("failed", str(exc))
        except Exception as exc:  # a dead worker, a Ray failure: the job fails, the server goes on
            traceback.print_exc()
            result = Outcome("failed", f"the Ray worker running this job failed: {type(exc).__name__}: {exc}")
        with self._lock:
            self._tokens.pop(job.id, None)
            closed = self._closed
        if not closed:
            sink.finished(job.id, result)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            token = self._tokens.get(job_id)
        if token is not None:
            token.cancel()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            tokens = list(self._tokens.values())
        for token in tokens:
            token.cancel()
        try:
            self.pool.close()
        finally:
            self._session.close()


__all__ = ["RayExecutor", "job_outcome"]
