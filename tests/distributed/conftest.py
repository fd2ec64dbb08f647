"""A local Ray cluster (2 CPUs, loopback, small object store) and a pool of 2 workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from dagfusion import Engine, Settings  # noqa: E402
from dagfusion.distributed import WorkerPool, worker_settings  # noqa: E402
from dagfusion.distributed.cluster import local_init_options  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def with_sweep(source: Path, target: Path, sweep: str, extra: str = "") -> Path:
    """``source``'s workflow with a ``sweep:`` section added, written to ``target``."""
    target.write_text(source.read_text(encoding="utf-8") + extra + f"sweep:\n  - {sweep}\n", encoding="utf-8")
    return target


def make_settings(root: Path) -> Settings:
    return Settings.load(
        {"output_dir": str(root / "outputs"), "cache_dir": str(root / "cache"), "read_dirs": [str(root)],
         "device": "cpu", "threads": 1},
        environ={},
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    if ray.is_initialized():
        ray.shutdown()
    ray.init(**local_init_options(num_cpus=2, object_store_memory=200 * 1024**2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray")


@pytest.fixture(scope="module")
def driver(root: Path) -> Engine:
    return Engine(settings=make_settings(root))


@pytest.fixture(scope="module")
def pool(cluster: object, driver: Engine) -> Iterator[WorkerPool]:
    workers = WorkerPool(2, worker_settings(driver.settings))
    yield workers
    workers.close()
