"""Running a workflow's sweep points on a Ray cluster (``pip install 'dagfusion[ray]'``).

:func:`ray_session` connects to a cluster (or starts a private local one);
:class:`WorkerPool` keeps model-holding worker actors, one :class:`~dagfusion.Engine` each;
:func:`run_sweep` validates a workflow once on the driver and runs its points on the pool,
with the same folders, records, files and events as a local run. Importing this package does
not import Ray.
"""

from __future__ import annotations

from dagfusion.distributed.actor import PointWorker, worker_settings
from dagfusion.distributed.cluster import RayUnavailable, import_ray, ray_session
from dagfusion.distributed.payload import PointReply, PointTask
from dagfusion.distributed.pool import WorkerPool, dispatch
from dagfusion.distributed.sweep import RemoteNodeError, SweepOutcome, run_sweep

__all__ = [
    "PointReply",
    "PointTask",
    "PointWorker",
    "RayUnavailable",
    "RemoteNodeError",
    "SweepOutcome",
    "WorkerPool",
    "dispatch",
    "import_ray",
    "ray_session",
    "run_sweep",
    "worker_settings",
]
