"""Tuning end to end: the Tune node on tiny models, and ``dagfusion tune`` on the embedded shapes-sd."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dagfusion import CancelToken, RunContext, Settings

PROMPTS = ["a large red circle on the left on a black background", "a small blue square at the top on a white background"]


def cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGFUSION_OUTPUT_DIR": str(cwd / "outputs"), "DAGFUSION_CACHE_DIR": str(cwd / "cache"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dagfusion.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def tiny() -> dict[str, Any]:
    from dagfusion.testing import models

    return models.sd_handles()


def run_tune(tiny: dict[str, Any], tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    from dagfusion.nodes.tune.nodes import tune_node

    settings = Settings.load(overrides={"cache_dir": str(tmp_path / "cache"), "device": "cpu"}, environ={})
    ctx = RunContext("tune", "run", settings, tmp_path / "out", CancelToken())
    inputs = {"prompts": PROMPTS, "calibration_prompts": PROMPTS[:1], "floor": "psnr=30", "steps": 4, "step_counts": "4, 3",
              "caches": "all", "quants": "none, int8", "budget": 64, "guidance_scale": 7.5, "seed": 0, "resolution": 32,
              "batch_size": 8, **overrides}
    return tune_node.fn(ctx, tiny["model"], tiny["clip"], tiny["vae"], **inputs)


@pytest.mark.slow
def test_the_tune_node_measures_the_space_and_chooses_the_fastest_point_above_the_floor(tiny: dict[str, Any], tmp_path: Path) -> None:
    out = run_tune(tiny, tmp_path)
    results = out["results"]
    settings = [r["setting"] for r in results]
    assert len(settings) == len(set(settings)) and "steps=4 cache=none quant=none" in settings
    full = next(r for r in results if r["setting"] == "steps=4 cache=none quant=none")
    assert full["mac_speedup"] == 1.0 and math.isinf(full["psnr"])
    fewer_steps = next(r for r in results if r["setting"] == "steps=3 cache=none quant=none")
    # counted, not assumed: the tiny model's PNDM makes one call more than it has steps (5 against 4)
    assert fewer_steps["mac_speedup"] == pytest.approx(5 / 4, rel=1e-3)
    assert all(r["weight_bits"] < 9 for r in results if r["quant"] == "int8")
    assert all(r["mac_speedup"] > 1.0 for r in results if r["cache"] != "none")
    meeting = [r for r in results if r["psnr"] >= 30]
    best = max(r["mac_speedup"] for r in meeting)
    assert out["chosen"]["mac_speedup"] == best and out["chosen"]["psnr"] >= 30
    assert out["chosen"]["setting"] in {r["setting"] for r in out["pareto"]}
    workflow = yaml.safe_load(out["workflow"])
    assert workflow["nodes"]["sample"]["inputs"]["steps"] == out["chosen"]["steps"]
    assert out["plot"].startswith("<svg") and out["plot"].count("<circle") >= len(results)


@pytest.mark.slow
def test_the_tune_node_resumes_from_the_points_it_measured(tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = run_tune(tiny, tmp_path, step_counts="4", quants="none", caches="none, deepcache")

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a measured point was measured again")

    monkeypatch.setattr("dagfusion.nodes.tune.measure.measure_point", never)
    again = run_tune(tiny, tmp_path, step_counts="4", quants="none", caches="none, deepcache")
    assert again["results"] == first["results"]


def test_the_tune_node_refuses_bad_inputs_before_any_work(tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dagfusion.errors import NodeInputError

    monkeypatch.setattr("dagfusion.nodes.tune.measure.reference_run", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(NodeInputError, match="floor"):
        run_tune(tiny, tmp_path, floor="fid=3")
    with pytest.raises(NodeInputError, match="at most 256 prompts"):
        run_tune(tiny, tmp_path, prompts=["a red circle"] * 257)
    with pytest.raises(NodeInputError, match="evaluator"):
        run_tune(tiny, tmp_path, floor="shapeeval=2")
    with pytest.raises(NodeInputError, match="does not suit"):
        run_tune(tiny, tmp_path, caches="blockcache")


@pytest.mark.slow
def test_dagfusion_tune_sweeps_the_points_writes_a_runnable_choice_and_resumes(tmp_path: Path) -> None:
    args = ("tune", "shapes-sd", "--floor", "psnr=30", "--count", "2", "--steps", "4", "--step-counts", "4",
            "--caches", "none,deepcache", "--quants", "none,int8", "--out", "tuned")
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "tuned"
    results = json.loads((out / "results.json").read_text())
    # none and DeepCache N=2, 3 (N=4, 5 leave one full step of 4), each plain and int8
    assert sorted(r["setting"] for r in results) == sorted(
        f"steps=4 cache={c} quant={q}" for c in ("none", "deepcache:2", "deepcache:3") for q in ("none", "int8"))
    assert all(r["shapeeval"] is not None for r in results)  # shapes captions are scored
    sweep = yaml.safe_load((out / "tune.yaml").read_text())
    assert sweep["sweep"][0]["measure.setting"] == [r["setting"] for r in results]
    pareto = json.loads((out / "pareto.json").read_text())
    assert {p["setting"] for p in pareto} <= {r["setting"] for r in results}
    assert (out / "plot.svg").read_text().startswith("<svg")
    check = cli("validate", str(out / "chosen.yaml"), cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "cached" in again.stderr
    assert json.loads((out / "results.json").read_text()) == results


def test_dagfusion_tune_refuses_bad_input_with_a_clear_message(tmp_path: Path) -> None:
    many = tmp_path / "many.txt"
    many.write_text("\n".join(["a red circle"] * 300))
    cases = [
        (("--floor", "fid=3"), "floor"),
        (("--floor", "psnr=30", "--prompts", str(many)), "at most 256"),
        (("--floor", "psnr=30", "--caches", "blockcache"), "does not suit"),
        (("--floor", "psnr=30", "--budget", "0"), "--budget"),
    ]
    for extra, says in cases:
        done = cli("tune", "shapes-sd", *extra, "--out", "never", cwd=tmp_path, timeout=120)
        assert done.returncode == 2, (extra, done.stderr)
        assert says in done.stderr, (extra, done.stderr)
        assert not (tmp_path / "never").exists()
    done = cli("tune", str(tmp_path / "nowhere"), "--floor", "psnr=30", cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "model_index.json" in done.stderr
