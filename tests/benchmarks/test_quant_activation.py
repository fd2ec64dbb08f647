"""The activation-quantization benchmark: a tiny run of the whole script on shapes-sd."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.slow
def test_a_dry_run_scores_every_variant_against_fp32(tmp_path: Path, benchmark_module: Any) -> None:
    module = benchmark_module("quant_activation")
    out = tmp_path / "result.json"
    assert module.main(["--dry-run", "--models", "shapes-sd", "--intervals", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    variants = [r["variant"] for r in rows]
    assert variants[:4] == ["fp32", "W8", "W8A8 per-tensor", "W8A8 DGQ"] and "W4A8 DGQ" in variants
    assert any(v.startswith("W8A8 DGQ groups, uniform attention, margin") for v in variants)
    assert any(v.startswith("W8A8 DGQ") and v.endswith(")") and "+ CacheQuant" in v for v in variants)
    by_name = {r["variant"]: r for r in rows}
    assert by_name["W8"]["compression"] > 3 and by_name["W4A8 DGQ"]["compression"] > by_name["W8"]["compression"]
    assert by_name["W8A8 DGQ"]["summary"]["method"] == "dgq" and by_name["W8A8 per-tensor"]["summary"]["groups"] == 1
    timed = by_name["W8A8 DGQ, 2 timestep intervals"]["summary"]["timestep_intervals"]
    assert len(timed) == 2 and timed[0][0] > timed[1][1]  # sampling order: the noisier run first
    assert by_name["W8A8 DGQ"]["summary"]["timestep_intervals"] == "one set for all steps"
    joint = next(r for r in rows if "+ CacheQuant" in r["variant"])
    assert joint["mac_speedup"] > 1.0
    for row in rows[1:]:
        assert row["psnr"] > 10 and 0.0 <= row["shapeeval"] <= 1.0 and row["fd"] >= 0.0
    # the margin is chosen on the calibration prompts, and the groups' rows say which
    chosen = rows[0]["summary"]
    assert chosen["margin"] in module.MARGINS and chosen["margin_from"].startswith("chosen on the calibration prompts")
    assert f"W8A8 DGQ groups, uniform attention, margin {chosen['margin']:g}" in variants


def test_unknown_models_are_refused(benchmark_module: Any) -> None:
    module = benchmark_module("quant_activation")
    with pytest.raises(SystemExit):
        module.main(["--dry-run", "--models", "shapes-xl"])


@pytest.mark.parametrize("intervals", ["0", "6"])
def test_intervals_need_as_many_recorded_steps(benchmark_module: Any, intervals: str) -> None:
    with pytest.raises(SystemExit):
        benchmark_module("quant_activation").main(["--dry-run", "--models", "shapes-sd", "--intervals", intervals])


@pytest.mark.parametrize("margin", ["wide", "-1", "9"])
def test_a_margin_is_a_number_in_range_or_auto(benchmark_module: Any, margin: str) -> None:
    with pytest.raises(SystemExit):
        benchmark_module("quant_activation").main(["--dry-run", "--models", "shapes-sd", "--margin", margin])
