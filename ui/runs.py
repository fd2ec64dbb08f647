"""The canvas's run queue: runs one at a time on a worker thread, keeps each run's per-node status,
step progress and previews, and cancels exactly the run it is asked to.

A :class:`Run` is the event handler of its own run (the engine's one ``handle(event)`` protocol),
so nothing here knows about Gradio: the canvas polls :meth:`Run.snapshot` and the queue's
:meth:`RunQueue.summary`. Node statuses: ``queued``, ``running``, ``cached``, ``done``,
``failed``, ``skipped``, ``cancelled``. Run statuses: ``queued``, ``running``, ``done``,
``failed`` (some node failed), ``cancelled``, ``invalid`` (refused by validation), ``error``
(the engine itself raised).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from dagfusion.context import CancelToken
from dagfusion.errors import Problem, ValidationError, WorkflowError
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
)
from dagfusion.server.previews import PREVIEW_SIDE, encode_preview
from dagfusion.settings import DEFAULT_MAX_SWEEP_POINTS
from dagfusion.workflow import Workflow, sweep_points

logger = logging.getLogger("dagfusion.ui")

#: Previews kept per run (the oldest are dropped beyond it).
MAX_PREVIEWS = 32
#: Finished runs kept in the queue's history.
MAX_HISTORY = 50
#: Finished runs that keep their previews (older ones keep only their statuses): bounds memory.
PREVIEW_HISTORY = 8

ACTIVE = ("queued", "running")


@dataclass(frozen=True)
class Preview:
    """One picture a node showed: ``url`` is a ``data:`` URL (PNG, or animated GIF for frames)."""

    index: int
    node_id: str
    label: str
    url: str
    width: int
    height: int
    kind: str = "image"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "node": self.node_id,
            "label": self.label,
            "url": self.url,
            "width": self.width,
            "height": self.height,
            "kind": self.kind,
        }


def done_message(seconds: float, ran: int, cached: int, points: int = 1) -> str:
    """The toolbar's line for a finished run: ``done in 1.20s — 2 nodes ran, 7 cached``
    (counted as the nodes are drawn: a node a cached result covers counts as cached)."""
    where = f" over {points} sweep points" if points > 1 else ""
    return f"done in {seconds:.2f}s{where} — {ran} node{'s' if ran != 1 else ''} ran, {cached} cached"


class Run:
    """One submitted run and everything the canvas shows about it; also its event handler."""

    def __init__(self, workflow: Workflow | None, *, name: str | None = None, number: int = 0) -> None:
        """``workflow`` may be unknown (``None``): nodes are then learnt from the events."""
        self.id = uuid.uuid4().hex
        self.number = number
        self.workflow = workflow
        self.name = name or (workflow.name if workflow is not None else "workflow")
        self.token = CancelToken()
        self.status = "queued"
        self.message = ""
        self.submitted = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.points = sweep_points(workflow) if workflow is not None else 1
        self.point = 0
        self.nodes: dict[str, str] = {node_id: "queued" for node_id in workflow.nodes} if workflow is not None else {}
        self.progress: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}
        self.previews: list[Preview] = []
        self.output_dirs: list[str] = []
        self.problems: list[dict[str, Any]] = []
        self._preview_counter = itertools.count()
        self._lock = threading.Lock()

    # --- the event handler -------------------------------------------------------------

    def handle(self, event: Event) -> None:
        preview = None
        if isinstance(event, NodePreview) and event.preview is not None:
            try:  # encode outside the lock: it can take a moment for large pictures
                preview = encode_preview(event.preview)
            except Exception:  # a preview that cannot be shown must not fail the run
                logger.warning("cannot show the preview of node %s", event.node_id, exc_info=True)
        self._apply(event, preview)

    def _apply(self, event: Event, preview: tuple[str, int, int, str] | None) -> None:
        """Fold one event into the run's state; ``preview`` is a ``NodePreview``'s encoded picture."""
        with self._lock:
            if isinstance(event, RunStarted):
                self.point += 1
                planned = set(event.nodes)
                for node_id in event.nodes:  # nodes of an unknown workflow are learnt here
                    self.nodes.setdefault(node_id, "queued")
                covered = self._upstream(planned) - planned
                for node_id in self.nodes:
                    # Upstream of a planned node but not planned: a cached result downstream
                    # already covers it, so it counts as cached; anything else is not needed.
                    self.nodes[node_id] = "queued" if node_id in planned else "cached" if node_id in covered else "idle"
                self.progress.clear()
                self.errors.clear()
            elif isinstance(event, NodeStarted):
                self.nodes[event.node_id] = "running"
            elif isinstance(event, NodeCached):
                self.nodes[event.node_id] = "cached"
            elif isinstance(event, NodeProgress):
                self.progress[event.node_id] = {"step": event.step, "total": event.total, "message": event.message}
            elif isinstance(event, NodeFinished):
                self.nodes[event.node_id] = "done"
            elif isinstance(event, NodeFailed):
                self.nodes[event.node_id] = "failed"
                self.errors[event.node_id] = event.error
            elif isinstance(event, NodeSkipped):
                self.nodes[event.node_id] = "skipped"
                self.errors[event.node_id] = f"skipped because {event.because} failed"
            elif isinstance(event, RunCancelledEvent):
                self._mark_cancelled()
            elif isinstance(event, RunFinished):
                if event.failed:
                    self.message = f"{len(event.failed)} node(s) failed: {', '.join(event.failed)}"
            elif preview is not None:
                url, width, height, kind = preview
                index = next(self._preview_counter)
                self.previews.append(Preview(index, event.node_id, event.label, url, width, height, kind))
                if len(self.previews) > MAX_PREVIEWS:
                    del self.previews[0]

    def drop_previews(self) -> None:
        with self._lock:
            self.previews.clear()

    def _upstream(self, node_ids: set[str]) -> set[str]:
        """``node_ids`` and every node feeding them."""
        if self.workflow is None:
            return set(node_ids)
        seen: set[str] = set()
        stack = list(node_ids)
        while stack:
            node_id = stack.pop()
            if node_id in seen or node_id not in self.workflow.nodes:
                continue
            seen.add(node_id)
            stack.extend(link.node for _, link in self.workflow.nodes[node_id].links())
        return seen

    def tally(self) -> tuple[int, int]:
        """``(ran, cached)``: nodes that ran and nodes drawn as cached (served from the cache, or
        covered by a cached result downstream), as the canvas shows them."""
        with self._lock:
            statuses = list(self.nodes.values())
        return statuses.count("done"), statuses.count("cached")

    def _mark_cancelled(self) -> None:
        for node_id, status in self.nodes.items():
            if status in ACTIVE:
                self.nodes[node_id] = "cancelled"

    # --- what the canvas reads ---------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def summary(self, position: int | None = None) -> dict[str, Any]:
        with self._lock:
            running = next((n for n, s in self.nodes.items() if s == "running"), None)
            done = sum(1 for s in self.nodes.values() if s in ("done", "cached"))
            planned = sum(1 for s in self.nodes.values() if s != "idle")
            return {
                "id": self.id,
                "number": self.number,
                "name": self.name,
                "status": self.status,
                "position": position,
                "message": self.message,
                "node": running,
                "done": done,
                "planned": planned,
                "point": self.point,
                "points": self.points,
                "submitted": self.submitted,
                "seconds": (self.finished or time.time()) - self.started if self.started else None,
                "finished": self.finished,
                "output_dirs": list(self.output_dirs),
            }

    def snapshot(self, since: int = 0) -> dict[str, Any]:
        """Everything the canvas shows about this run; previews numbered ``since`` and later."""
        out = self.summary()
        with self._lock:
            out.update(
                nodes=dict(self.nodes),
                progress={k: dict(v) for k, v in self.progress.items()},
                errors=dict(self.errors),
                previews=[p.to_dict() for p in self.previews if p.index >= since],
                output_dirs=list(self.output_dirs),
                problems=list(self.problems),
            )
        return out

    # --- lifecycle (called by the queue) -------------------------------------------------

    def cancel(self) -> bool:
        """Ask this run to stop; a queued run is cancelled at once. Whether it was active."""
        with self._lock:
            if self.status not in ACTIVE:
                return False
            self.token.cancel()
            if self.status == "queued":
                self.status = "cancelled"
                self.message = "cancelled before it started"
                self.finished = time.time()
                self._mark_cancelled()
            else:
                self.message = "cancelling…"
            return True

    def _start(self) -> bool:
        with self._lock:
            if self.status != "queued":
                return False
            self.status = "running"
            self.started = time.time()
            return True

    def _finish(self, status: str, message: str = "") -> None:
        with self._lock:
            self.status = status
            if message or status != "done":
                self.message = message or self.message
            self.finished = time.time()
            if status == "cancelled":
                self._mark_cancelled()
            for node_id, node_status in self.nodes.items():
                if node_status in ACTIVE:  # never reached (an error before it, or not planned)
                    self.nodes[node_id] = "idle"


class RunQueue:
    """Runs submitted workflows one after another on one worker thread, with one shared engine
    (so later runs reuse earlier results from its cache)."""

    def __init__(self, engine: Any, *, max_history: int = MAX_HISTORY) -> None:
        self.engine = engine
        self.max_history = max_history
        self._runs: dict[str, Run] = {}
        self._order: deque[str] = deque()
        self._pending: deque[Run] = deque()
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        self._stopping = False
        self.current: Run | None = None

    @property
    def max_points(self) -> int:
        """Most sweep points one run may have: the engine's ``max_sweep_points`` setting."""
        settings = getattr(self.engine, "settings", None)
        return int(getattr(settings, "max_sweep_points", DEFAULT_MAX_SWEEP_POINTS))

    def submit(self, workflow: Workflow, *, name: str | None = None) -> Run:
        """Queue a run of ``workflow`` (already validated by the caller; the engine checks again).

        A sweep of more than :attr:`max_points` points raises :class:`ValidationError`
        (``sweep-too-large``) before anything is queued; points are counted, never expanded.
        """
        points = sweep_points(workflow)
        if points > self.max_points:
            message = f"the sweep describes {points:,} runs; at most {self.max_points:,} are allowed (setting max_sweep_points)"
            raise ValidationError([Problem("sweep-too-large", message)], workflow.source)
        with self._lock:
            run = Run(workflow, name=name, number=next(self._counter))
            self._runs[run.id] = run
            self._order.append(run.id)
            self._pending.append(run)
            self._trim()
            if self._worker is None or not self._worker.is_alive():
                self._stopping = False
                self._worker = threading.Thread(target=self._work, name="dagfusion-ui-runs", daemon=True)
                self._worker.start()
            self._wake.notify_all()
        return run

    def get(self, run_id: str) -> Run | None:
        with self._lock:
            return self._runs.get(run_id)

    def cancel(self, run_id: str) -> bool:
        """Cancel one run (queued or running); other runs are untouched."""
        run = self.get(run_id)
        if run is None:
            return False
        cancelled = run.cancel()
        with self._lock:
            if run in self._pending and run.status == "cancelled":
                self._pending.remove(run)
        return cancelled

    def position(self, run: Run) -> int | None:
        """1-based place of a queued run in the waiting line."""
        with self._lock:
            try:
                return list(self._pending).index(run) + 1
            except ValueError:
                return None

    def summary(self) -> list[dict[str, Any]]:
        """Every run still known, newest first, with its status and place in the line."""
        with self._lock:
            runs = [self._runs[i] for i in reversed(self._order)]
            pending = list(self._pending)
        return [r.summary(pending.index(r) + 1 if r in pending else None) for r in runs]

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until nothing is queued or running (for tests and shutdown)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                if not self._pending and self.current is None:
                    return True
            time.sleep(0.02)
        return False

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the worker."""
        with self._lock:
            runs = list(self._pending) + ([self.current] if self.current else [])
            self._stopping = True
            self._wake.notify_all()
        for run in runs:
            run.cancel()
        if self._worker is not None:
            self._worker.join(timeout)

    # --- the worker ---------------------------------------------------------------------

    def _trim(self) -> None:
        while len(self._order) > self.max_history:
            oldest = self._runs.get(self._order[0])
            if oldest is not None and oldest.active:
                break
            self._runs.pop(self._order.popleft(), None)
        finished = [self._runs[i] for i in reversed(self._order) if i in self._runs and not self._runs[i].active]
        for run in finished[PREVIEW_HISTORY:]:
            run.drop_previews()

    def _next(self) -> Run | None:
        with self._lock:
            while not self._stopping:
                while self._pending:
                    run = self._pending.popleft()
                    if run._start():
                        self.current = run
                        return run
                self._wake.wait(timeout=1.0)
            return None

    def _work(self) -> None:
        while True:
            run = self._next()
            if run is None:
                return
            try:
                self._execute(run)
            finally:
                with self._lock:
                    self.current = None
                    self._trim()

    def _execute(self, run: Run) -> None:
        try:
            results = self.engine.run_sweep(run.workflow, handler=run, cancel_token=run.token)
        except ValidationError as exc:
            run.problems = [p.to_dict() for p in exc.problems]
            run._finish("invalid", f"{len(exc.problems)} problem(s): " + "; ".join(str(p) for p in exc.problems[:3]))
            return
        except WorkflowError as exc:
            run._finish("error", str(exc))
            return
        except Exception as exc:  # an engine bug: show it on the canvas, keep the queue alive
            logger.error("run %s raised\n%s", run.id, traceback.format_exc())
            run._finish("error", f"{type(exc).__name__}: {exc}")
            return
        run.output_dirs = [str(r.output_dir) for r in results if r.output_dir is not None]
        if run.token.cancelled or any(r.status == "cancelled" for r in results):
            run._finish("cancelled", "cancelled")
        elif any(r.status == "failed" for r in results):
            run._finish("failed", run.message or "a node failed")
        else:
            seconds = sum(r.seconds for r in results)
            run._finish("done", done_message(seconds, *run.tally(), len(results)))


__all__ = ["PREVIEW_SIDE", "Preview", "Run", "RunQueue", "done_message", "encode_preview"]
