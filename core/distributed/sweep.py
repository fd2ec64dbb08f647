"""Running a workflow's sweep on Ray: validated once on the driver, points run on workers.

:func:`run_sweep` is :meth:`dagfusion.Engine.run_sweep` with the points run by a
:class:`~dagfusion.distributed.pool.WorkerPool`: the same folders (``out/sweep-000`` …, or
``out`` itself without a sweep, or a new folder under the output setting without ``out``),
the same files and run records in them, and the same events to ``handler`` — live, in order
within a point, interleaved between points that run at once. Results come back in point
order, with the outputs that are plain data (models stay on the workers).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagfusion.distributed.payload import PointReply, PointTask, write_files
from dagfusion.distributed.pool import WorkerPool, dispatch


class RemoteNodeError(Exception):
    """A node's exception as it was raised on a worker (its type name and message)."""


@dataclass
class SweepOutcome:
    """The runs of a sweep (in point order) and what the workers loaded.

    ``loads`` is ``{worker name: model-cache loads so far}`` of the workers that ran points.
    """

    results: list[Any] = field(default_factory=list)
    loads: dict[str, int] = field(default_factory=dict)


def point_tasks(prepared: Any, *, use_cache: bool = True, targets: Iterable[str] | None = None,
                record: bool = True) -> Iterator[PointTask]:
    """One :class:`PointTask` per point of a :class:`~dagfusion.engine.Prepared`, built lazily."""
    source = prepared.validated.workflow.source
    target_tuple = tuple(targets) if targets is not None else None
    for point in prepared:
        yield PointTask(point.index, dict(point.assignment), point.validated.workflow.dump(), source,
                        use_cache, target_tuple, record)


def default_output_dir(settings: Any, workflow: Any, run_id: str) -> Path:
    """A new folder under the output setting, named as the engine names its runs' folders."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in workflow.name)[:40] or "workflow"
    return Path(settings.output_dir) / f"{stamp}-{safe}-{run_id[:6]}"


def run_result(reply: PointReply, output_dir: Path) -> Any:
    """The driver's :class:`~dagfusion.RunResult` of a worker's reply."""
    from dagfusion.errors import NodeExecutionError
    from dagfusion.executor import RunResult

    errors = {
        node: NodeExecutionError(node, node_type, RemoteNodeError(original))
        for node, (node_type, _, original) in reply.errors.items()
    }
    return RunResult(
        run_id=reply.run_id, status=reply.status, outputs=dict(reply.outputs), errors=errors,
        skipped=dict(reply.skipped), executed=list(reply.executed), cached=list(reply.cached),
        output_dir=output_dir, seconds=reply.seconds, warnings=list(reply.warnings),
    )


def _replies(pool: WorkerPool, actors: Sequence[Any], tasks: Iterable[PointTask], deliver: Any,
             cancelled: Any) -> Iterator[PointReply]:
    """:func:`dispatch`'s replies; a Ray error after a cancellation (a task Ray cancelled,
    a worker hit by Ctrl-C) ends the sweep quietly instead."""
    from ray.exceptions import RayError

    try:
        yield from dispatch(pool, actors, tasks, deliver, cancelled)
    except RayError:
        if not cancelled():
            raise


def run_sweep(
    engine: Any,
    source: Any,
    pool: WorkerPool,
    *,
    actors: Sequence[Any] | None = None,
    overrides: Sequence[str] = (),
    out: str | os.PathLike[str] | None = None,
    handler: Any = None,
    cancel_token: Any = None,
    use_cache: bool = True,
    targets: Iterable[str] | None = None,
    record: bool = True,
) -> SweepOutcome:
    """Run every point of ``source``'s sweep on ``pool`` (its ``actors``, default all of them).

    Options as :meth:`dagfusion.Engine.run_sweep`. Validation (and its errors) happen here,
    before anything is sent; a worker that dies or cannot run a point raises its error.
    """
    from dagfusion.outdir import OutputLock

    prepared = engine.prepare(source, overrides)
    count = len(prepared)
    sweep_out = Path(out) if out is not None and count > 1 else None
    if sweep_out is not None:
        engine.check_output_dir(sweep_out)
    workflow = prepared.validated.workflow
    outcome = SweepOutcome()
    deliver = (lambda index, event: handler.handle(event)) if handler is not None else (lambda index, event: None)
    cancelled = (lambda: cancel_token.cancelled) if cancel_token is not None else (lambda: False)
    tasks = point_tasks(prepared, use_cache=use_cache, targets=targets, record=record)
    with OutputLock(sweep_out) if sweep_out is not None else nullcontext():
        for reply in _replies(pool, actors or pool.actors, tasks, deliver, cancelled):
            if out is None:
                folder = default_output_dir(engine.settings, workflow, reply.run_id)
            else:
                folder = Path(out) if count == 1 else Path(out) / f"sweep-{reply.index:03d}"
            if reply.files or record or out is not None:
                engine.check_output_dir(folder)
                with OutputLock(folder) if record else nullcontext():
                    write_files(folder, reply.files)
            outcome.results.append((reply.index, run_result(reply, folder)))
            outcome.loads[reply.worker] = reply.loads
    outcome.results = [result for _, result in sorted(outcome.results, key=lambda pair: pair[0])]
    return outcome


__all__ = ["RemoteNodeError", "SweepOutcome", "default_output_dir", "point_tasks", "run_result", "run_sweep"]
