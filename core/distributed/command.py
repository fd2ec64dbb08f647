"""``dagfusion run --executor ray``: a sweep on Ray from the command line.

:func:`run_on_ray` validates the workflow on the driver first (an invalid file never starts
Ray), then connects to the cluster at ``address`` or starts a private local one, starts one
worker per point up to ``workers`` (default: the cluster's CPUs), runs the sweep and stops
the workers (and a local cluster) again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dagfusion.distributed.actor import worker_settings
from dagfusion.distributed.cluster import import_ray, ray_session
from dagfusion.distributed.pool import WorkerPool
from dagfusion.distributed.sweep import SweepOutcome, run_sweep


def pool_size(ray: Any, points: int, workers: int | None) -> int:
    """How many workers a sweep of ``points`` gets: ``workers``, else the cluster's CPUs; never
    more than the points, at least one."""
    wanted = workers if workers else int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(wanted, points))


def run_on_ray(
    engine: Any,
    source: Any,
    *,
    address: str | None = None,
    workers: int | None = None,
    overrides: Sequence[str] = (),
    **options: Any,
) -> SweepOutcome:
    """Run ``source``'s sweep on Ray (see the module docstring); ``options`` as
    :func:`~dagfusion.distributed.sweep.run_sweep` takes them."""
    prepared = engine.prepare(source, overrides)  # raises before Ray starts; remembered for run_sweep
    import_ray()
    with ray_session(address) as ray:
        pool = WorkerPool(pool_size(ray, len(prepared), workers), worker_settings(engine.settings))
        try:
            return run_sweep(engine, source, pool, overrides=overrides, **options)
        finally:
            pool.close()


__all__ = ["pool_size", "run_on_ray"]
