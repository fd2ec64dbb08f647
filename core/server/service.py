"""What the job server does, apart from HTTP: accept, list, cancel and delete jobs.

:class:`JobService` holds the :class:`~dagfusion.server.store.JobStore`, the
:class:`~dagfusion.server.scheduler.Scheduler` and an :class:`~dagfusion.Engine` used only to
validate. :meth:`JobService.submit` checks, in this order and before any work, the queue length
(``server_max_queue``), then the workflow exactly as ``dagfusion validate`` does (structure,
registry, overrides, every sweep point, the sweep's size against ``max_sweep_points``), and
refuses with :class:`Refused` carrying the same problems ``validate`` prints.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dagfusion.errors import Problem
from dagfusion.server.executor import CPU, GPU
from dagfusion.server.scheduler import Scheduler
from dagfusion.server.store import RUNNING, Job, JobStore, NewJob, QueueFull

DEVICES = ("auto", CPU, GPU)


class Refused(Exception):
    """A submission or request the server refuses: HTTP ``status``, a ``title``, the
    ``field`` concerned and, for an invalid workflow, its ``problems``."""

    def __init__(
        self, status: int, title: str, detail: str = "", field: str | None = None, problems: Sequence[Problem] = ()
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.problems = list(problems)


def problems_text(problems: Sequence[Problem], source: str) -> str:
    """The lines ``dagfusion validate`` prints for these problems of ``source``."""
    count = len(problems)
    lines = [f"{source}: {count} problem{'s' if count != 1 else ''}:"]
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


class JobService:
    """The job server's operations (see the module docstring)."""

    def __init__(self, store: JobStore, scheduler: Scheduler, engine: Any, *, max_queue: int) -> None:
        self.store = store
        self.scheduler = scheduler
        self.engine = engine
        self.max_queue = max_queue

    def submit(
        self,
        source: bytes,
        *,
        name: str = "workflow.yaml",
        overrides: Sequence[str] = (),
        priority: int = 0,
        submitter: str = "",
        device: str = "auto",
    ) -> Job:
        """Validate and queue a workflow file's bytes (YAML or PNG); raises :class:`Refused`."""
        if device not in DEVICES:
            raise Refused(422, "unknown device", f"device must be one of {', '.join(DEVICES)}", "device")
        if device == GPU and GPU not in self.scheduler.kinds:
            raise Refused(422, "no GPU", "this server has no GPU slot; submit with device auto or cpu", "device")
        waiting = self.store.counts()["queued"]
        if waiting >= self.max_queue:
            raise Refused(429, "the queue is full", f"{waiting} jobs wait (server_max_queue is {self.max_queue})")
        validated, problems, _ = self.engine.check_source(source, overrides=list(overrides))
        if validated is None:
            label = name or "workflow"
            raise Refused(422, "invalid workflow", problems_text(problems, label), "workflow", list(problems))
        from dagfusion.workflow import sweep_points

        points = sweep_points(validated.workflow)
        new = NewJob(source, name=name, overrides=tuple(overrides), priority=priority, submitter=submitter,
                     device=device, points=points)
        try:
            job = self.store.add(new, max_queue=self.max_queue)
        except QueueFull as exc:
            raise Refused(429, "the queue is full", str(exc)) from None
        self.scheduler.wake()
        return job

    def job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise Refused(404, "no such job", f"no job {job_id!r}", "job_id")
        return job

    def cancel(self, job_id: str) -> Job:
        if self.scheduler.cancel(job_id) is None:
            raise Refused(404, "no such job", f"no job {job_id!r}", "job_id")
        return self.job(job_id)

    def delete(self, job_id: str) -> None:
        """Forget a finished or queued job and remove its output folder (a running one: 409)."""
        job = self.job(job_id)
        if job.status == RUNNING:
            raise Refused(409, "the job is running", "cancel it first, then delete it", "job_id")
        if job.status == "queued":
            self.scheduler.cancel(job_id)
        if not self.store.delete(job_id):
            raise Refused(409, "the job is running", "cancel it first, then delete it", "job_id")
        folder = Path(job.output_dir)
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


__all__ = ["DEVICES", "JobService", "Refused", "problems_text"]
