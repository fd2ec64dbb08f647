"""A job of the job server's queue, as the canvas shows it: a :class:`~dagfusion.ui.runs.Run`
rebuilt from the job's event log.

:class:`JobRun` folds the job's events in order (:meth:`JobRun.apply`): the run's own events
(``RunStarted``, ``NodeStarted``, ``NodeProgress``, ``NodePreview``, ``NodeFinished``, …, in
their JSON form) give per-node statuses, progress, previews and errors exactly as a live
:class:`~dagfusion.ui.runs.Run` handler would; the job's own events give its status
(``JobStarted``: running; ``JobInterrupted`` with ``requeued``: queued again;
``JobFinished``: the end, completed by :meth:`JobRun.conclude` with the job's record). The
same log always gives the same state, so a canvas that reloads (or a new canvas process)
finds its runs as they were. Only ``data:image/png`` and ``data:image/gif`` previews are shown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from dagfusion.events import (
    Event,
    NodeCached,
    NodeFailed,
    NodeFinished,
    NodePreview,
    NodeProgress,
    NodeSkipped,
    NodeStarted,
    RunCancelledEvent,
    RunFinished,
    RunStarted,
    RunWarning,
)
from dagfusion.ui.runs import Run, done_message
from dagfusion.workflow import Workflow

_EVENTS: dict[str, type[Event]] = {
    "RunStarted": RunStarted,
    "NodeStarted": NodeStarted,
    "NodeCached": NodeCached,
    "NodeProgress": NodeProgress,
    "NodeFinished": NodeFinished,
    "NodeFailed": NodeFailed,
    "NodeSkipped": NodeSkipped,
    "RunWarning": RunWarning,
    "RunFinished": RunFinished,
    "RunCancelled": RunCancelledEvent,
}
_TUPLES = frozenset({"nodes", "failed", "skipped"})
_PREVIEW_PREFIXES = ("data:image/png;base64,", "data:image/gif;base64,")


def event_from_dict(data: Mapping[str, Any]) -> Event | None:
    """The run event of a JSON event (``to_dict`` form), or ``None`` for another kind."""
    kind = _EVENTS.get(str(data.get("event")))
    if kind is None:
        return None
    names = {f.name for f in fields(kind)} - {"preview"}
    values = {k: tuple(v) if k in _TUPLES and isinstance(v, list) else v for k, v in data.items() if k in names}
    values.setdefault("run_id", "")
    try:
        return kind(**values)
    except TypeError:
        return None


def preview_tuple(data: Any) -> tuple[str, int, int, str] | None:
    """``(url, width, height, kind)`` of an event's ``preview`` if it is a picture data URL."""
    if not isinstance(data, Mapping):
        return None
    url, width, height = data.get("url"), data.get("width"), data.get("height")
    if not isinstance(url, str) or not url.startswith(_PREVIEW_PREFIXES):
        return None
    kind = "video" if data.get("kind") == "video" else "image"
    return url, int(width) if isinstance(width, int) else 0, int(height) if isinstance(height, int) else 0, kind


class JobRun(Run):
    """One job, rebuilt from its event log (see the module docstring)."""

    def __init__(self, job: Mapping[str, Any], workflow: Workflow | None) -> None:
        super().__init__(workflow, name=_display_name(job, workflow), number=int(job.get("seq") or 0))
        self.id = str(job["id"])
        self.submitted = float(job.get("created") or self.submitted)
        self.points = int(job.get("points") or self.points)
        self.next_index = 0
        self.ended: str | None = None  # the JobFinished status, once seen
        self.concluded = False
        self._totals = [0.0, 0, 0]  # seconds, executed, cached over the sweep's points

    def apply(self, index: int, data: Mapping[str, Any]) -> None:
        """Fold event number ``index`` (events already folded are ignored)."""
        if index < self.next_index:
            return
        self.next_index = index + 1
        kind = data.get("event")
        if kind == "JobStarted":
            with self._lock:
                self.status, self.message, self.point = "running", "", 0
                self.started = float(data.get("time") or 0.0) or None
        elif kind == "JobInterrupted":
            if data.get("requeued"):
                with self._lock:
                    self.status, self.message = "queued", "re-queued: the server stopped while it ran"
        elif kind == "JobFinished":
            self.ended = str(data.get("status") or "failed")
        elif kind == "NodePreview":
            preview = preview_tuple(data.get("preview"))
            if preview is not None:
                event = NodePreview("", node_id=str(data.get("node_id", "")), label=str(data.get("label", "")))
                self._apply(event, preview)
        else:
            event = event_from_dict(data)
            if isinstance(event, RunFinished):
                self._totals[0] += float(event.seconds or 0.0)
                self._totals[1] += int(event.executed or 0)
                self._totals[2] += int(event.cached or 0)
            if event is not None:
                self._apply(event, None)

    def conclude(self, job: Mapping[str, Any]) -> None:
        """End the run with its job's final record (status, error, result, times)."""
        status = str(job.get("status") or self.ended or "failed")
        root = Path(str(job.get("output_dir") or "."))
        result = job.get("result") if isinstance(job.get("result"), list) else []
        self.output_dirs = [
            str(root / r["output_dir"]) if r.get("output_dir") not in (None, ".") else str(root)
            for r in result if isinstance(r, Mapping) and r.get("output_dir") is not None
        ]
        seconds = self._totals[0]
        if status == "done":
            message = done_message(seconds, *self.tally(), max(self.point, 1))
        elif status == "cancelled":
            message = "cancelled" if self.started else "cancelled before it started"
        else:
            message = self.message or str(job.get("error") or "") or "a node failed"
        self._finish(status, message)
        with self._lock:
            self.started = job.get("started") or self.started
            self.finished = job.get("finished") or self.finished
        self.concluded = True


def _display_name(job: Mapping[str, Any], workflow: Workflow | None) -> str:
    if workflow is not None and workflow.name:
        return workflow.name
    name = str(job.get("name") or "workflow")
    return name.removesuffix(".yaml")


__all__ = ["JobRun", "event_from_dict", "preview_tuple"]
