"""The Ray worker: one long-lived process holding one :class:`~dagfusion.Engine`.

:class:`PointWorker` is a plain class; :mod:`dagfusion.distributed.pool` makes it a Ray actor
(one CPU, two threads of methods: one runs a point while the other can take :meth:`cancel`).
At start it moves into a scratch folder of its own, so it never writes where the driver does;
each point runs into a fresh folder there, whose files go back to the driver in the reply and
are then deleted. The engine — its output cache and the process's model cache — stays for
the worker's life, so a sweep loads each model once per worker, not once per point. Events
go to the driver live, in small batches, through a Ray queue (``(stream, index, seq, event)``
items).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagfusion.distributed.payload import PointReply, PointTask, collect_files, portable_outputs

#: Seconds between two batches of events sent to the driver (terminal events go at once).
FLUSH_EVERY = 0.1


def worker_settings(settings: Any) -> dict[str, Any]:
    """The settings a worker applies (JSON-compatible; paths made absolute on the driver).

    Torch computes with one thread in each worker: the cluster gives each worker one CPU.
    """
    return {
        "model_dirs": [str(Path(p).absolute()) for p in settings.model_dirs],
        "read_dirs": [str(Path(p).absolute()) for p in settings.read_dirs],
        "cache_dir": str(Path(settings.cache_dir).absolute()),
        "cache_bytes": settings.cache_bytes,
        "model_cache_bytes": settings.model_cache_bytes,
        "device": settings.device,
        "allow_pickle": settings.allow_pickle,
        "max_image_pixels": settings.max_image_pixels,
        "max_video_pixels": settings.max_video_pixels,
        "threads": 1,
    }


class _EventStream:
    """A progress handler sending a point's events to the driver's queue (previews dropped)."""

    def __init__(self, queue: Any, stream: str, index: int) -> None:
        self.queue = queue
        self.stream = stream
        self.index = index
        self.count = 0
        self._buffer: list[tuple[str, int, int, Any]] = []
        self._last = time.monotonic()

    def handle(self, event: Any) -> None:
        if hasattr(event, "preview"):
            event = dataclasses.replace(event, preview=None)
        self._buffer.append((self.stream, self.index, self.count, event))
        self.count += 1
        if event.kind in ("RunFinished", "RunCancelled") or time.monotonic() - self._last >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self._buffer and self.queue is not None:
            self.queue.actor.put_nowait_batch.remote(self._buffer)  # no wait: order is kept per caller
        self._buffer = []
        self._last = time.monotonic()


class PointWorker:
    """Runs sweep points (see the module docstring); ``settings`` as :func:`worker_settings`."""

    def __init__(self, name: str, settings: Mapping[str, Any]) -> None:
        from dagfusion.engine import Engine
        from dagfusion.settings import Settings

        self.name = name
        self.home = Path(tempfile.mkdtemp(prefix="dagfusion-ray-"))
        os.chdir(self.home)
        overrides = {**settings, "output_dir": str(self.home / "outputs")}
        self.engine = Engine(settings=Settings.load(overrides))
        self._lock = threading.Lock()
        self._token: Any = None

    def info(self) -> dict[str, Any]:
        """``{"name", "pid", "cwd", "loads"}``: who and where this worker is."""
        return {"name": self.name, "pid": os.getpid(), "cwd": os.getcwd(), "loads": self.loads()}

    def loads(self) -> int:
        """How many times this worker loaded weights into its model cache."""
        from dagfusion.model import default_cache

        return default_cache().stats.loads

    def run(self, task: PointTask, queue: Any = None) -> PointReply:
        """Run one point; its files come back in the reply. Raises what validation raises."""
        from dagfusion.context import CancelToken
        from dagfusion.engine import SweepPoint
        from dagfusion.errors import ValidationError
        from dagfusion.workflow import parse_workflow

        token = CancelToken()
        with self._lock:
            self._token = token
        folder = self.home / "points" / f"{task.index:06d}-{uuid.uuid4().hex[:8]}"
        stream = _EventStream(queue, task.stream, task.index)
        try:
            workflow, problems = parse_workflow(task.workflow_text, task.source)
            if workflow is None or problems:
                raise ValidationError(problems, task.source)
            (base,) = self.engine.prepare(workflow)
            point = SweepPoint(task.index, dict(task.assignment), base.validated)
            result = self.engine.run_point(
                point, out=folder, handler=stream, cancel_token=token, use_cache=task.use_cache,
                targets=task.targets, record=task.record,
            )
            stream.flush()
            return PointReply(
                index=task.index, run_id=result.run_id, status=result.status, seconds=result.seconds,
                executed=list(result.executed), cached=list(result.cached), skipped=dict(result.skipped),
                errors={n: (e.node_type, str(e), f"{type(e.original).__name__}: {e.original}") for n, e in result.errors.items()},
                warnings=list(result.warnings), outputs=portable_outputs(result.outputs),
                files=collect_files(folder), events=stream.count, loads=self.loads(), worker=self.name,
            )
        finally:
            with self._lock:
                self._token = None
            shutil.rmtree(folder, ignore_errors=True)

    def cancel(self) -> bool:
        """Ask the point running now to stop; ``False`` when none runs."""
        with self._lock:
            token = self._token
        if token is None:
            return False
        token.cancel()
        return True

    def close(self) -> None:
        """Delete the scratch folder."""
        os.chdir(tempfile.gettempdir())
        shutil.rmtree(self.home, ignore_errors=True)


__all__ = ["FLUSH_EVERY", "PointWorker", "worker_settings"]
