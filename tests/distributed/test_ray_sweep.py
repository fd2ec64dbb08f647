"""Sweeps on Ray workers give the same folders, files, records and events as local runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dagfusion import Engine
from dagfusion.context import CancelToken
from dagfusion.distributed import WorkerPool, run_sweep
from dagfusion.events import EventCollector
from dagfusion.model import default_cache

from .conftest import REPO, make_settings, with_sweep

pytestmark = pytest.mark.slow  # starts a browser, a cluster or servers: full suite only


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def same_outputs(local: Path, remote: Path) -> None:
    """Same files; equal pixels, reports and resolved workflows; records present."""
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())
    for name in names:
        if name.endswith(".png"):
            assert np.array_equal(pixels(local / name), pixels(remote / name)), name
        elif name.endswith((".txt", "workflow.yaml")):
            assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    assert any(n.endswith("events.jsonl") for n in names)


def test_workers_run_elsewhere(pool: WorkerPool) -> None:
    infos = pool.info()
    assert len({i["pid"] for i in infos}) == 2
    for info in infos:
        assert info["pid"] != os.getpid()
        assert Path(info["cwd"]).name.startswith("dagfusion-ray-")
        assert Path(info["cwd"]).resolve() != Path.cwd().resolve()


def test_tensor_sweep_matches_local(pool: WorkerPool, driver: Engine, root: Path) -> None:
    workflow = with_sweep(REPO / "workflows" / "blurred_noise.yaml", root / "noise.yaml", "{noise.seed: [1, 2, 3, 4]}")
    events = EventCollector()
    outcome = run_sweep(driver, workflow, pool, out=root / "ray-noise", handler=events)
    local = Engine(settings=make_settings(root)).run_sweep(workflow, out=root / "local-noise")
    assert [r.status for r in outcome.results] == ["ok"] * 4
    assert [r.output_dir for r in outcome.results] == [root / "ray-noise" / f"sweep-{i:03d}" for i in range(4)]
    same_outputs(root / "local-noise", root / "ray-noise")
    for ours, theirs in zip(outcome.results, local):
        assert np.array_equal(ours.output("normalize.tensor").numpy(), theirs.output("normalize.tensor").numpy())
        assert ours.output("report.text") == theirs.output("report.text")
    kinds = [e.kind for e in events.events]
    assert kinds.count("RunStarted") == 4 and kinds.count("RunFinished") == 4
    assert {e.run_id for e in events.events} == {r.run_id for r in outcome.results}
    recorded = (root / "ray-noise" / "sweep-002" / "events.jsonl").read_text().splitlines()
    assert len(recorded) == sum(e.run_id == outcome.results[2].run_id for e in events.events)


@pytest.mark.slow
def test_quickstart_loads_models_once_per_worker(pool: WorkerPool, driver: Engine, root: Path) -> None:
    workflow = with_sweep(REPO / "workflows" / "quickstart.yaml", root / "quick.yaml", "{sample.seed: [7, 8]}")
    overrides = ["sample.steps=2"]
    default_cache().clear()  # earlier tests in this process may have loaded shapes-sd already
    before = default_cache().stats.loads
    local = Engine(settings=make_settings(root)).run_sweep(workflow, overrides=overrides, out=root / "local-quick")
    local_loads = default_cache().stats.loads - before  # the second point loads nothing
    first = run_sweep(driver, workflow, pool, overrides=overrides, out=root / "ray-quick")
    assert [r.status for r in first.results] == [r.status for r in local] == ["ok", "ok"]
    same_outputs(root / "local-quick", root / "ray-quick")
    assert local_loads > 0
    assert sorted(first.loads.values()) == [local_loads, local_loads]  # each worker ran one point
    again = run_sweep(driver, workflow, pool, overrides=overrides, out=root / "ray-quick-2")
    assert pool.loads() == {"ray-0": local_loads, "ray-1": local_loads}  # nothing loaded again
    assert all(r.ok for r in again.results)


SLOW = """\
format_version: 1
nodes:
  n: {type: dagfusion.tensor.Noise, inputs: {height: 1024, width: 1024, channels: 3}}
  b1: {type: dagfusion.tensor.Blur, inputs: {tensor: {from: n.tensor}, sigma: 20}}
  b2: {type: dagfusion.tensor.Blur, inputs: {tensor: {from: b1.tensor}, sigma: 20}}
  s: {type: dagfusion.tensor.Stats, inputs: {tensor: {from: b2.tensor}}}
sweep:
  - {n.seed: [1, 2, 3, 4, 5, 6]}
"""


class _CancelOnStart(EventCollector):
    def __init__(self, token: CancelToken) -> None:
        super().__init__()
        self.token = token

    def handle(self, event: object) -> None:
        super().handle(event)
        if getattr(event, "kind", "") == "NodeStarted":
            self.token.cancel()


def test_cancel_reaches_the_workers(pool: WorkerPool, driver: Engine, root: Path) -> None:
    workflow = root / "slow.yaml"
    workflow.write_text(SLOW)
    token = CancelToken()
    events = _CancelOnStart(token)
    outcome = run_sweep(driver, workflow, pool, out=root / "ray-cancel", handler=events, cancel_token=token, use_cache=False)
    assert 1 <= len(outcome.results) <= 2  # no point started after the cancellation
    assert "cancelled" in [r.status for r in outcome.results]
    assert "RunCancelled" in [e.kind for e in events.events]
    # the pool still works afterwards
    assert len(pool.info()) == 2
