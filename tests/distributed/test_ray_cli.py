"""``dagfusion run --executor ray`` and ``dagfusion serve --executor ray`` end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .conftest import REPO, with_sweep

pytestmark = pytest.mark.slow  # starts a browser, a cluster or servers: full suite only


def test_cli_runs_on_ray(cluster: object, root: Path, capsys: pytest.CaptureFixture[str]) -> None:

    from dagfusion.cli import main

    workflow = with_sweep(REPO / "workflows" / "blurred_noise.yaml", root / "cli.yaml", "{noise.seed: [5, 6]}")
    code = main(["run", str(workflow), "--executor", "ray", "--ray-workers", "2", "--out", str(root / "cli-out"),
                 "--json-events", "--threads", "1", "--read-dir", str(root)])
    assert code == 0
    kinds = [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert kinds.count("RunFinished") == 2
    assert (root / "cli-out" / "sweep-001" / "blurred_noise.png").is_file()


def test_server_runs_a_job_on_ray(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import importlib.util

    spec = importlib.util.spec_from_file_location("server_fixtures", REPO / "tests" / "server" / "conftest.py")
    assert spec is not None and spec.loader is not None
    fixtures = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fixtures
    spec.loader.exec_module(fixtures)
    start_server, stop_server = fixtures.start_server, fixtures.stop_server
    running = start_server(tmp_path, "--executor", "ray", "--ray-workers", "1", timeout=120)
    try:
        workflow = with_sweep(REPO / "workflows" / "blurred_noise.yaml", tmp_path / "job.yaml", "{noise.seed: [1, 2]}")
        with running.client() as client:
            job_id = client.submit(workflow)
            events = [e["event"] for e in client.events(job_id)]
            job = client.job(job_id)
        assert job["status"] == "done", job
        assert events.count("RunFinished") == 2
        assert len(job["result"]) == 2
        out = Path(job["output_dir"])
        assert (out / "sweep-001" / "report.txt").read_text().startswith("blurred noise:")
    finally:
        stop_server(running)


def test_tune_measures_its_points_on_ray(cluster: object, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dagfusion.cli import main

    monkeypatch.setenv("DAGFUSION_CACHE_DIR", str(root / "tune-cache"))
    out = root / "tune-out"
    code = main(["tune", "shapes-sd", "--floor", "psnr=30", "--count", "2", "--steps", "4", "--step-counts", "4",
                 "--caches", "deepcache", "--quants", "none", "--executor", "ray", "--ray-workers", "1",
                 "--out", str(out), "--threads", "1"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["setting"] for r in results) == sorted(
        f"steps=4 cache={c} quant=none" for c in ("deepcache:2", "deepcache:3"))
    assert (out / "chosen.yaml").is_file()
