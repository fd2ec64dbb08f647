"""Connecting to Ray: an existing cluster by address, or a private local one started on demand.

A local cluster listens on 127.0.0.1 only, with the dashboard off, usage statistics off and
Ray's own logging at warnings; it is stopped when the :func:`ray_session` that started it
ends. A session inside an already initialised Ray (a test, a notebook) uses it and leaves it
running. Ray runs any code its clients send: see docs/serving.md, "Running on Ray".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagfusion.errors import WorkflowError

#: Bytes of Ray's object store for a local cluster (outputs travel through it).
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


class RayUnavailable(WorkflowError):
    """Ray is not installed (``pip install 'dagfusion[ray]'``)."""


def import_ray() -> Any:
    """The ``ray`` module, or :class:`RayUnavailable` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable(f"running on Ray needs the ray extra (pip install 'dagfusion[ray]'): {exc}") from exc
    return ray


def local_init_options(num_cpus: int | None = None, object_store_memory: int | None = None) -> dict[str, Any]:
    """``ray.init`` keywords of a private local cluster (see the module docstring)."""
    from dagfusion.threads import usable_cpus

    return {
        "num_cpus": num_cpus or usable_cpus(),
        "include_dashboard": False,
        "_node_ip_address": "127.0.0.1",
        "object_store_memory": object_store_memory or LOCAL_OBJECT_STORE_BYTES,
        "logging_level": logging.WARNING,
        "configure_logging": True,
        "log_to_driver": True,
    }


@contextmanager
def ray_session(
    address: str | None = None, *, num_cpus: int | None = None, object_store_memory: int | None = None
) -> Iterator[Any]:
    """Ray, initialised for the ``with`` block; yields the ``ray`` module.

    ``address`` (``HOST:PORT`` of a running cluster, or ``auto``) connects to it; without one a
    local cluster of ``num_cpus`` CPUs (default: this machine's usable CPUs) is started and
    stopped at the end. Does nothing when Ray is already initialised in this process.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        ray.init(**local_init_options(num_cpus, object_store_memory))
    try:
        yield ray
    finally:
        ray.shutdown()


__all__ = ["LOCAL_OBJECT_STORE_BYTES", "RayUnavailable", "import_ray", "local_init_options", "ray_session"]
