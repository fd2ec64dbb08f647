"""Where the canvas's runs live: the job server's queue, in this process or over HTTP.

A :class:`JobSource` is the handful of queue operations the canvas needs, on job records in
the API's JSON form (:meth:`dagfusion.server.store.Job.public`):

- :class:`LocalJobs` runs the job service in this process: the server's
  :class:`~dagfusion.server.store.JobStore` (SQLite in a state folder), its
  :class:`~dagfusion.server.scheduler.Scheduler` and an
  :class:`~dagfusion.server.inprocess.InProcessExecutor` running jobs with the canvas's own
  engine (its plugins, settings and cache) on one slot. It holds the state folder's lock like
  ``dagfusion serve`` (one queue service per folder: :class:`~dagfusion.server.state.ServerBusy`
  when a server already runs there). With no folder it uses a fresh temporary one, removed
  when it closes.
- :class:`RemoteJobs` talks to a running ``dagfusion serve`` through
  :class:`dagfusion.client.Client`; a job's events come from its event stream, followed on a
  background thread per job and buffered until read.

Refusals (an invalid workflow, a full queue) raise :class:`JobRefused` with the problems.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from dagfusion.errors import Problem
from dagfusion.sources import read_text
from dagfusion.workflow import Workflow, parse_workflow

log = logging.getLogger("dagfusion.ui")
#: Most queued jobs looked at to find a run's place in the line.
MAX_QUEUED_SCAN = 500


class JobRefused(Exception):
    """The queue refused a submission: why, and the workflow's problems if it was invalid."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


class JobSource(Protocol):
    """The queue operations the canvas uses (see the module docstring)."""

    description: str

    def submit(self, source: bytes, name: str) -> dict[str, Any]: ...

    def job(self, job_id: str) -> dict[str, Any] | None: ...

    def recent(self, limit: int) -> list[dict[str, Any]]: ...

    def queued(self) -> list[dict[str, Any]]: ...

    def events(self, job_id: str, since: int) -> list[tuple[int, dict[str, Any]]]: ...

    def cancel(self, job_id: str) -> dict[str, Any] | None: ...

    def workflow(self, job_id: str) -> Workflow | None: ...

    def close(self) -> None: ...


def workflow_of(source: bytes, name: str) -> Workflow | None:
    """The workflow in a job's file (YAML or PNG), or ``None`` if it does not parse."""
    found, _ = read_text(source, name)
    if found is None:
        return None
    workflow, problems = parse_workflow(found.text, name)
    return workflow if not problems else None


class LocalJobs:
    """The job service run in this process on ``state_dir`` (see the module docstring)."""

    def __init__(self, engine: Any, state_dir: str | Path | None = None, *, submitter: str = "") -> None:
        from dagfusion.server.executor import detect_slots
        from dagfusion.server.inprocess import InProcessExecutor
        from dagfusion.server.scheduler import Scheduler
        from dagfusion.server.service import JobService
        from dagfusion.server.state import DATABASE_FILE, FolderLock, prepare_folder
        from dagfusion.server.store import JobStore

        settings = engine.settings
        self.temporary = state_dir is None
        self.folder = Path(tempfile.mkdtemp(prefix="dagfusion-canvas-")) if state_dir is None else prepare_folder(Path(state_dir))
        self.submitter = submitter
        self._lock = FolderLock(self.folder)
        self._lock.__enter__()  # ServerBusy when a server (or another canvas) uses the folder
        try:
            self.store = JobStore(self.folder / DATABASE_FILE, Path(settings.output_dir).absolute() / "jobs")
            self.store.recover(requeue=settings.server_requeue_interrupted)
            self.store.expire(settings.server_history_days)
            slot = detect_slots(settings.device, 1)[0]
            self.executor = InProcessExecutor(engine)
            self.scheduler = Scheduler(self.store, self.executor, [slot], history_days=settings.server_history_days)
            self.service = JobService(self.store, self.scheduler, engine, max_queue=settings.server_max_queue)
            self.scheduler.start()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        self.description = "a temporary queue" if self.temporary else f"the queue in {self.folder}"

    def submit(self, source: bytes, name: str) -> dict[str, Any]:
        from dagfusion.server.service import Refused

        try:
            job = self.service.submit(source, name=name, submitter=self.submitter or "canvas")
        except Refused as exc:
            raise JobRefused(exc.detail or exc.title, exc.problems) from None
        return job.public()

    def job(self, job_id: str) -> dict[str, Any] | None:
        job = self.store.get(job_id)
        return job.public() if job is not None else None

    def recent(self, limit: int) -> list[dict[str, Any]]:
        return [j.public() for j in self.store.query(limit=limit)[0]]

    def queued(self) -> list[dict[str, Any]]:
        return [j.public() for j in self.store.query(status="queued", limit=MAX_QUEUED_SCAN)[0]]

    def events(self, job_id: str, since: int) -> list[tuple[int, dict[str, Any]]]:
        return self.store.events(job_id, since)

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        if self.scheduler.cancel(job_id) is None:
            return None
        return self.job(job_id)

    def workflow(self, job_id: str) -> Workflow | None:
        job = self.store.get(job_id)
        return workflow_of(job.source, job.name) if job is not None else None

    def close(self) -> None:
        self.scheduler.stop()
        self.executor.close()
        self.store.close()
        self._lock.__exit__(None, None, None)
        if self.temporary:
            shutil.rmtree(self.folder, ignore_errors=True)


class _Follower:
    """Follows one job's event stream on a thread, buffering ``(index, event)`` pairs."""

    def __init__(self, client: Any, job_id: str, since: int = 0) -> None:
        self.client = client
        self.job_id = job_id
        self.start = since
        self.events: list[tuple[int, dict[str, Any]]] = []
        self.done = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._follow, name=f"dagfusion-follow-{job_id}", daemon=True).start()

    def _follow(self) -> None:
        try:
            for event in self.client.events(self.job_id, since=self.start, reconnect=2):
                index = int(event.pop("index", -1))
                with self.lock:
                    self.events.append((index, event))
        except Exception:  # the server went away or forgot the job: the poller sees it
            log.debug("following job %s stopped", self.job_id, exc_info=True)
        finally:
            self.done.set()

    def since(self, index: int) -> list[tuple[int, dict[str, Any]]]:
        with self.lock:
            return [e for e in self.events if e[0] >= index]


class RemoteJobs:
    """A running job server, through :class:`dagfusion.client.Client` (see the module docstring)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.description = f"the server at {client.url}"
        self._followers: dict[str, _Follower] = {}
        self._lock = threading.Lock()

    def _missing(self, exc: Exception) -> bool:
        from dagfusion.client import ServerError

        return isinstance(exc, ServerError) and exc.status == 404

    def submit(self, source: bytes, name: str) -> dict[str, Any]:
        from dagfusion.client import ServerError

        try:
            job_id = self.client.submit(source.decode("utf-8"), name=name)
        except ServerError as exc:
            problems = [_problem(p) for p in exc.problems]
            raise JobRefused(str(exc.body.get("detail") or exc.body.get("title") or exc), problems) from None
        return dict(self.client.job(job_id))

    def job(self, job_id: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.job(job_id))
        except Exception as exc:
            if self._missing(exc):
                return None
            raise

    def recent(self, limit: int) -> list[dict[str, Any]]:
        return list(self.client.jobs(limit=limit)["jobs"])

    def queued(self) -> list[dict[str, Any]]:
        return list(self.client.jobs(status="queued", limit=MAX_QUEUED_SCAN)["jobs"])

    def events(self, job_id: str, since: int) -> list[tuple[int, dict[str, Any]]]:
        with self._lock:
            follower = self._followers.get(job_id)
            if follower is None:
                follower = self._followers[job_id] = _Follower(self.client, job_id, since)
            if follower.done.is_set():  # its stream ended: hand over the rest; the next call follows anew
                del self._followers[job_id]
        return follower.since(since)

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.cancel(job_id))
        except Exception as exc:
            if self._missing(exc):
                return None
            raise

    def workflow(self, job_id: str) -> Workflow | None:
        return None  # the API does not give a job's file back: nodes are learnt from its events

    def close(self) -> None:
        self.client.close()


def _problem(data: Any) -> Problem:
    data = data if isinstance(data, dict) else {}
    return Problem(
        str(data.get("code") or "refused"), str(data.get("message") or ""),
        node=data.get("node"), input=data.get("input"), line=data.get("line"),
    )


__all__ = ["JobRefused", "JobSource", "LocalJobs", "RemoteJobs", "workflow_of"]
