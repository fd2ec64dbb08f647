"""The speed-at-equal-quality benchmark: reading a speedup at a PSNR, and a tiny run of the script."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def point(knob: str, speed: float, psnr: float) -> dict[str, Any]:
    return {"knob": knob, "mac_speedup": speed, "psnr": psnr}


def test_the_speedup_is_interpolated_between_the_points_around_the_target(benchmark_module: Any) -> None:
    speedup_at = benchmark_module("cache_equal_quality").speedup_at
    curve = [point("K=9", 1.86, 47.7), point("K=5", 2.36, 39.3), point("K=4", 2.70, 35.3)]
    speed, how = speedup_at(curve, 38.3)
    assert speed == pytest.approx(2.36 + (39.3 - 38.3) / (39.3 - 35.3) * (2.70 - 2.36), abs=1e-3)
    assert "K=5" in how and "K=4" in how
    # a target every point keeps: the fastest point, flagged; one none reaches: None
    assert speedup_at(curve, 30.0) == (2.70, "K=4 (not bracketed)")
    assert speedup_at(curve, 60.0) == (None, "not reached")


@pytest.mark.slow
def test_a_dry_run_sweeps_every_scheduler_and_reads_each_at_the_target(tmp_path: Path, benchmark_module: Any) -> None:
    module = benchmark_module("cache_equal_quality")
    out = tmp_path / "result.json"
    assert module.main(["--dry-run", "--repeats", "1", "--json", str(out), "--plot-dir", str(tmp_path)]) == 0
    result = json.loads(out.read_text())
    schedulers = {r["scheduler"] for r in result["rows"]}
    assert {"uncached", "fewer steps", "DeepCache", "CacheQuant"} <= schedulers
    assert {s["scheduler"] for s in result["at_target"]} == schedulers - {"uncached"}
    for row in result["rows"]:
        assert row["mac_speedup"] >= 1.0 and row["cpu_wall_speedup"] > 0
    assert (tmp_path / "cache-speed-psnr-shapes-sd.png").stat().st_size > 1000


def test_the_transformer_sweep_takes_both_spans_and_every_full_step_count(benchmark_module: Any) -> None:
    sweep = benchmark_module("cache_equal_quality").variants("shapes-dit", 25)
    knobs: dict[str, list[str]] = {}
    for variant in sweep:
        knobs.setdefault(variant.scheduler, []).append(variant.knob)
    for span in ("1-7", "1-8"):
        assert knobs[f"CacheQuant {span}"] == [f"K={k}" for k in (13, 11, 9, 8, 7, 6, 5)]
        assert knobs[f"BlockCache {span}"] == ["N=2", "N=3", "N=4", "N=5"]
    assert all(v.steps == 25 for v in sweep if v.scheduler.startswith("CacheQuant"))
