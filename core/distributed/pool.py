"""A pool of :class:`~dagfusion.distributed.actor.PointWorker` actors, and running points on them.

:class:`WorkerPool` starts ``size`` actors (one CPU each; a GPU each when the device is
CUDA) and keeps them for every sweep it runs, so their model caches stay warm.
:func:`dispatch` gives each idle actor the next point — at most one per actor, so a point
never waits behind another on a busy worker — streams the points' events to the driver as
they come and yields each :class:`~dagfusion.distributed.payload.PointReply` once all of
its events were delivered. Placement, transport and failure detection are Ray's.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from dagfusion.distributed.actor import PointWorker
from dagfusion.distributed.cluster import import_ray
from dagfusion.distributed.payload import PointReply, PointTask

#: Seconds a cancelled point may take to stop on its own before its Ray task is cancelled.
CANCEL_GRACE = 10.0
#: Seconds the driver waits for a finished point's last events before reporting it anyway.
EVENT_GRACE = 10.0
_TICK = 0.05


class WorkerPool:
    """``size`` model-holding Ray actors (see the module docstring); ``settings`` as
    :func:`~dagfusion.distributed.actor.worker_settings`. Needs Ray initialised."""

    def __init__(self, size: int, settings: Mapping[str, Any]) -> None:
        if size < 1:
            raise ValueError("a worker pool needs at least one worker")
        ray = import_ray()
        gpus = 1 if str(settings.get("device", "")).startswith("cuda") else 0
        remote = ray.remote(PointWorker).options(num_cpus=1, num_gpus=gpus, max_concurrency=2, max_restarts=0)
        self.actors = [remote.remote(f"ray-{i}", dict(settings)) for i in range(size)]
        self._queue: Any = None
        self._routed: dict[str, list[tuple[int, int, Any]]] = {}
        self._lock = threading.RLock()

    @property
    def events(self) -> Any:
        """The Ray queue the workers send events to (made on first use; no CPU of its own)."""
        with self._lock:
            if self._queue is None:
                from ray.util.queue import Queue

                self._queue = Queue(actor_options={"num_cpus": 0})
            return self._queue

    def open_stream(self) -> str:
        """A new stream name: events of the points tagged with it are kept for :meth:`take`."""
        name = uuid.uuid4().hex
        with self._lock:
            self._routed[name] = []
        return name

    def close_stream(self, stream: str) -> None:
        with self._lock:
            self._routed.pop(stream, None)

    def take(self, stream: str) -> list[tuple[int, int, Any]]:
        """The ``(index, seq, event)`` items of ``stream`` that arrived, taking every stream's
        new items off the shared queue (several sweeps may run on one pool at once)."""
        with self._lock:
            queue = self.events
            size = queue.size()
            if size:
                for name, index, seq, event in queue.get_nowait_batch(size):
                    if name in self._routed:
                        self._routed[name].append((index, seq, event))
            items, self._routed[stream] = self._routed.get(stream, []), []
        return items

    def info(self) -> list[dict[str, Any]]:
        """Each worker's ``info()``; waits until every actor has started."""
        ray = import_ray()
        return ray.get([a.info.remote() for a in self.actors])

    def loads(self) -> dict[str, int]:
        """``{worker name: model-cache loads so far}``."""
        return {i["name"]: i["loads"] for i in self.info()}

    def close(self) -> None:
        """Delete the workers' scratch folders and stop them."""
        ray = import_ray()
        try:
            ray.get([a.close.remote() for a in self.actors], timeout=10)
        except Exception:  # a dead worker has nothing left to clean
            pass
        for actor in [*self.actors, *([self._queue.actor] if self._queue is not None else [])]:
            ray.kill(actor)
        self.actors, self._queue = [], None


class _Delivery:
    """Puts each point's events in order (``seq``) before handing them to ``deliver``."""

    def __init__(self, deliver: Callable[[int, Any], None]) -> None:
        self.deliver = deliver
        self.delivered: dict[int, int] = {}
        self._held: dict[int, dict[int, Any]] = {}

    def take(self, items: Iterable[tuple[int, int, Any]]) -> None:
        for index, seq, event in items:
            self._held.setdefault(index, {})[seq] = event
            held = self._held[index]
            while self.delivered.get(index, 0) in held:
                self.deliver(index, held.pop(self.delivered.get(index, 0)))
                self.delivered[index] = self.delivered.get(index, 0) + 1


def dispatch(
    pool: WorkerPool,
    actors: Sequence[Any],
    tasks: Iterable[PointTask],
    deliver: Callable[[int, Any], None],
    cancelled: Callable[[], bool] = lambda: False,
) -> Iterator[PointReply]:
    """Run ``tasks`` on ``actors`` of ``pool`` (see the module docstring), yielding replies as
    they finish.

    ``deliver(index, event)`` receives every event, in order per point, live. Once
    ``cancelled()`` turns true no new point starts; running ones are asked to stop (their
    replies still come, ``cancelled``), and their Ray tasks are cancelled after
    :data:`CANCEL_GRACE` seconds. A worker that fails raises its error here.
    """
    ray = import_ray()
    stream = pool.open_stream()
    pending = (dataclasses.replace(task, stream=stream) for task in tasks)
    idle = list(actors)
    running: dict[Any, tuple[Any, PointTask]] = {}
    delivery = _Delivery(deliver)
    cancel_at: float | None = None
    exhausted = False
    try:
        while True:
            stop = cancelled()
            while idle and not stop and not exhausted:
                task = next(pending, None)
                if task is None:
                    exhausted = True
                    break
                actor = idle.pop(0)
                running[actor.run.remote(task, pool.events)] = (actor, task)
            if not running:
                return
            if stop and cancel_at is None:
                cancel_at = time.monotonic()
                for actor, _ in running.values():
                    actor.cancel.remote()
            elif cancel_at is not None and time.monotonic() - cancel_at > CANCEL_GRACE:
                cancel_at = float("inf")  # once
                for ref in running:
                    ray.cancel(ref)
            done, _ = ray.wait(list(running), num_returns=1, timeout=_TICK)
            delivery.take(pool.take(stream))
            for ref in done:
                actor, task = running.pop(ref)
                reply: PointReply = ray.get(ref)
                deadline = time.monotonic() + EVENT_GRACE
                while delivery.delivered.get(task.index, 0) < reply.events and time.monotonic() < deadline:
                    time.sleep(0.01)
                    delivery.take(pool.take(stream))
                idle.append(actor)
                yield reply
    finally:
        pool.close_stream(stream)
        for actor, _ in running.values():  # left early (an error, a closed generator): stop the rest
            actor.cancel.remote()


__all__ = ["CANCEL_GRACE", "EVENT_GRACE", "WorkerPool", "dispatch"]
