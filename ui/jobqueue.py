"""The canvas's runs as jobs of the one job queue: :class:`JobQueue` offers what
:class:`~dagfusion.ui.runs.RunQueue` offers (``submit``, ``get``, ``position``, ``summary``,
``cancel``, ``wait_idle``, ``shutdown``), backed by a
:class:`~dagfusion.ui.jobsources.JobSource` — the job service in this process
(:meth:`JobQueue.local`) or a running ``dagfusion serve`` (:meth:`JobQueue.remote`).

A run is a job: its id is the job's id, its number the job's ``seq``, its state a
:class:`~dagfusion.ui.jobruns.JobRun` folded from the job's event log, refreshed when the
canvas polls. The queue the canvas lists is the queue's recent jobs (``MAX_HISTORY``, newest
first, whoever submitted them), so runs are found again after a page reload or a restart of
the canvas on the same state folder. A run's place in the line follows the scheduler's order
(priority, then submission). Sizes are bounded before anything is stored: the sweep's point
count against ``max_sweep_points`` here, then everything ``dagfusion validate`` checks in the
job service.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagfusion.errors import Problem, ValidationError
from dagfusion.settings import DEFAULT_MAX_SWEEP_POINTS
from dagfusion.ui.jobruns import JobRun
from dagfusion.ui.jobsources import JobRefused, JobSource, LocalJobs, RemoteJobs
from dagfusion.ui.runs import MAX_HISTORY, PREVIEW_HISTORY
from dagfusion.workflow import Workflow, sweep_points

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Events read from the log per request while catching up.
EVENT_BATCH = 1000


def _filename(workflow: Workflow) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", workflow.name or "").strip("-")[:60]
    return (slug or "workflow") + ".yaml"


class JobQueue:
    """The canvas's run queue over a job source (see the module docstring); thread-safe."""

    def __init__(self, jobs: JobSource, engine: Any, *, max_history: int = MAX_HISTORY) -> None:
        self.jobs = jobs
        self.engine = engine
        self.max_history = max_history
        self._views: dict[str, JobRun] = {}
        self._lock = threading.RLock()

    @classmethod
    def local(cls, engine: Any, state_dir: str | Path | None = None, **kwargs: Any) -> JobQueue:
        """The job service in this process on ``state_dir`` (``None``: a temporary folder)."""
        return cls(LocalJobs(engine, state_dir), engine, **kwargs)

    @classmethod
    def remote(
        cls, engine: Any, url: str | None, token: str | None = None, *, state_dir: str | Path | None = None, **kwargs: Any
    ) -> JobQueue:
        """A running job server at ``url``; its token: ``token``, else ``$DAGFUSION_TOKEN``, else
        the token file in ``state_dir`` (default: the settings' ``server_dir``). Checks that the
        server answers (:class:`ConnectionError` otherwise)."""
        from dagfusion.client import Client

        folder = state_dir if state_dir is not None else getattr(engine.settings, "server_dir", None)
        client = Client(url, token, state_dir=folder)
        try:
            client.jobs(limit=1)  # reachable, and the token is accepted
        except Exception as exc:
            client.close()
            raise ConnectionError(f"cannot use the job server at {client.url}: {exc}") from None
        return cls(RemoteJobs(client), engine, **kwargs)

    @property
    def description(self) -> str:
        return self.jobs.description

    @property
    def max_points(self) -> int:
        """Most sweep points one run may have: the engine's ``max_sweep_points`` setting."""
        settings = getattr(self.engine, "settings", None)
        return int(getattr(settings, "max_sweep_points", DEFAULT_MAX_SWEEP_POINTS))

    # --- the RunQueue surface ------------------------------------------------------------

    def submit(self, workflow: Workflow, *, name: str | None = None) -> JobRun:
        """Queue ``workflow`` as a job; :class:`ValidationError` with the problems if refused."""
        points = sweep_points(workflow)
        if points > self.max_points:
            message = f"the sweep describes {points:,} runs; at most {self.max_points:,} are allowed (setting max_sweep_points)"
            raise ValidationError([Problem("sweep-too-large", message)], workflow.source)
        try:
            job = self.jobs.submit(workflow.dump().encode("utf-8"), name or _filename(workflow))
        except JobRefused as exc:
            raise ValidationError(exc.problems or [Problem("refused", str(exc))], workflow.source) from None
        with self._lock:
            view = self._views[job["id"]] = JobRun(job, workflow)
            self._refresh(view)
        return view

    def get(self, run_id: str) -> JobRun | None:
        """The run of job ``run_id``, brought up to date; ``None`` if there is no such job."""
        if not isinstance(run_id, str) or not _JOB_ID.fullmatch(run_id):
            return None
        with self._lock:
            view = self._views.get(run_id)
            if view is None:
                job = self.jobs.job(run_id)
                if job is None:
                    return None
                view = self._views[run_id] = JobRun(job, self.jobs.workflow(run_id))
            self._refresh(view)
            return view

    def position(self, run: JobRun) -> int | None:
        """1-based place of a queued run in the line (the scheduler's order)."""
        if run.status != "queued":
            return None
        return _positions(self.jobs.queued()).get(run.id)

    def summary(self) -> list[dict[str, Any]]:
        """The queue's recent jobs, newest first, with their status and place in the line."""
        with self._lock:
            recent = self.jobs.recent(self.max_history)
            positions = _positions(self.jobs.queued()) if any(j.get("status") == "queued" for j in recent) else {}
            views = []
            for job in recent:
                view = self._views.get(job["id"])
                if view is None:
                    view = self._views[job["id"]] = JobRun(job, self.jobs.workflow(job["id"]))
                self._refresh(view)
                views.append(view)
            self._trim({v.id for v in views}, views)
            return [v.summary(positions.get(v.id)) for v in views]

    def cancel(self, run_id: str) -> bool:
        """Cancel exactly this run's job (queued: at once; running: at its next check)."""
        with self._lock:
            view = self.get(run_id)
            if view is None or not view.active:
                return False
            if self.jobs.cancel(run_id) is None:
                return False
            self._refresh(view)
            return True

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until none of the recent jobs is queued or running (for tests)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not any(r["status"] in ("queued", "running") for r in self.summary()):
                return True
            time.sleep(0.05)
        return False

    def shutdown(self) -> None:
        """Stop the in-process service (its running job is re-queued at the next start) or
        close the connection to the server (its jobs go on)."""
        self.jobs.close()

    # --- keeping views up to date --------------------------------------------------------

    def _refresh(self, view: JobRun) -> None:
        if view.concluded:
            return
        while True:
            batch = self.jobs.events(view.id, view.next_index)
            for index, data in batch:
                view.apply(index, data)
            if len(batch) < EVENT_BATCH:
                break
        if view.ended is not None:
            job = self.jobs.job(view.id)
            if job is not None and job.get("status") not in ("queued", "running"):
                view.conclude(job)

    def _trim(self, listed: set[str], newest_first: list[JobRun]) -> None:
        for run_id in [i for i, v in self._views.items() if i not in listed and not v.active]:
            del self._views[run_id]
        finished = [v for v in newest_first if not v.active]
        for view in finished[PREVIEW_HISTORY:]:
            view.drop_previews()


def open_queue(
    engine: Any, *, server: str | None = None, token: str | None = None, state_dir: str | Path | None = None
) -> JobQueue:
    """The queue ``dagfusion ui`` uses: the server at ``server`` if given; else the job service
    in this process on ``state_dir`` (default: the settings' ``server_dir``) — or, when a job
    server already runs on that folder, that server."""
    from dagfusion.server.state import ServerBusy, read_address

    if server:
        return JobQueue.remote(engine, server, token)
    folder = Path(state_dir) if state_dir is not None else Path(engine.settings.server_dir)
    try:
        return JobQueue.local(engine, folder)
    except ServerBusy:
        url = read_address(folder)
        if url is None:
            raise
        return JobQueue.remote(engine, url, token, state_dir=folder)


def _positions(queued: list[Mapping[str, Any]]) -> dict[str, int]:
    """``{job id: 1-based place}`` of queued jobs: highest priority first, then oldest."""
    order = sorted(queued, key=lambda j: (-int(j.get("priority") or 0), int(j.get("seq") or 0), float(j.get("created") or 0)))
    return {str(j["id"]): i + 1 for i, j in enumerate(order)}


__all__ = ["JobQueue", "open_queue"]
