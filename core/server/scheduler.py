"""The job server's scheduler: hands queued jobs to free slots and records what comes back.

One thread loops: for every free :class:`~dagfusion.server.executor.Slot` it claims the best
queued job that slot may run (highest priority, then oldest; :meth:`JobStore.claim`) and
starts it on the :class:`~dagfusion.server.executor.Executor`. A slot runs one job at a
time: one per GPU, and ``server_cpu_jobs`` CPU slots. The scheduler is the executor's
:class:`~dagfusion.server.executor.JobSink`: events go to the store as they come, and a job's
outcome ends it (once) and frees its slot. Finished jobs older than the retention period are
forgotten every :data:`EXPIRE_EVERY` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dagfusion.server.executor import CPU, GPU, Executor, JobSpec, Outcome, Slot
from dagfusion.server.store import RUNNING, JobStore

EXPIRE_EVERY = 3600.0
log = logging.getLogger("dagfusion.server")


def accepted_devices(slot: Slot, slots: Sequence[Slot]) -> tuple[str, ...]:
    """The job ``device`` values ``slot`` runs: its kind, and ``auto`` (which means a GPU when
    the server has one, else the CPU)."""
    has_gpu = any(s.kind == GPU for s in slots)
    if slot.kind == GPU or not has_gpu:
        return (slot.kind, "auto")
    return (CPU,)


class Scheduler:
    """Matches queued jobs to free slots (see the module docstring); thread-safe."""

    def __init__(self, store: JobStore, executor: Executor, slots: Sequence[Slot], *, history_days: int = 0) -> None:
        if not slots:
            raise ValueError("the scheduler needs at least one slot")
        self.store = store
        self.executor = executor
        self.slots = list(slots)
        self.history_days = history_days
        self._busy: dict[str, str] = {}  # slot name → job id
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dagfusion-scheduler", daemon=True)
        self._last_expire = 0.0

    @property
    def kinds(self) -> frozenset[str]:
        """The slot kinds this server has (``cpu``, ``gpu``)."""
        return frozenset(s.kind for s in self.slots)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Look for work now (after a submission)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def running(self) -> dict[str, str]:
        """``{slot name: job id}`` of the jobs running now."""
        with self._lock:
            return dict(self._busy)

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job (queued: at once; running: asks its executor). Its status after, or ``None``."""
        with self._lock:  # never between a claim and its start
            status = self.store.cancel(job_id)
            if status == RUNNING:
                self.executor.cancel(job_id)
        return status

    # --- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._fill_slots()
                self._expire()
            except Exception:  # keep scheduling; the store or executor will say what broke
                log.exception("scheduling failed")
                time.sleep(0.5)

    def _fill_slots(self) -> None:
        for slot in self.slots:
            with self._lock:
                if slot.name in self._busy or self._stop.is_set():
                    continue
                job = self.store.claim(accepted_devices(slot, self.slots), slot.name)
                if job is None:
                    continue
                self._busy[slot.name] = job.id
                self.store.append_events(job.id, [{
                    "event": "JobStarted", "attempt": job.attempts, "slot": slot.name, "time": time.time(),
                }])
                spec = JobSpec(job.id, job.source, job.name, job.overrides, Path(job.output_dir))
                try:
                    self.executor.start(slot, spec, self)
                except Exception as exc:
                    self._busy.pop(slot.name, None)
                    self.store.finish(job.id, "failed", error=f"the job could not be started: {exc}")
                    continue
                if job.cancel_requested:
                    self.executor.cancel(job.id)

    def _expire(self) -> None:
        now = time.monotonic()
        if now - self._last_expire < EXPIRE_EVERY:
            return
        self._last_expire = now
        self.store.expire(self.history_days)

    # --- the executor's sink ----------------------------------------------------------------

    def event(self, job_id: str, event: dict[str, Any]) -> None:
        self.store.append_events(job_id, [event])

    def finished(self, job_id: str, outcome: Outcome) -> None:
        self.store.finish(job_id, outcome.status, error=outcome.error, result=outcome.result)
        with self._lock:
            for name, running in list(self._busy.items()):
                if running == job_id:
                    del self._busy[name]
        self._wake.set()


__all__ = ["EXPIRE_EVERY", "Scheduler", "accepted_devices"]
