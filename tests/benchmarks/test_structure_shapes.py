"""The ControlNet benchmark runs end to end with the shipped shapes ControlNet, in both guidance modes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.parametrize("guess_mode", [False, True])
def test_structure_shapes_benchmark_scores_guided_and_unguided_images(
    tmp_path: Path, benchmark_module: Any, guess_mode: bool
) -> None:
    from dagfusion.nodes.structure.controlnet import embedded_path

    out = tmp_path / "result.json"
    argv = ["--controlnet", str(embedded_path("shapes-mask")), "--prompts", "2", "--seeds", "1", "--steps", "2",
            "--json", str(out), "--failures", str(tmp_path / "misread.png")] + (["--guess-mode"] if guess_mode else [])
    assert benchmark_module("structure_shapes").main(argv) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2 and result["controlnet_settings"]["guess_mode"] is guess_mode
    assert result["threads"] == 1
    iou = result["iou"]
    assert iou["render"] > iou["vae_round_trip_ceiling"] > 0.5  # the render itself fits its mask best
    assert 0.0 <= result["shapeeval"]["vae_round_trip"]["all_correct"] <= 1.0
    for name in ("unguided", "controlnet"):
        assert 0.0 <= iou[name] <= 1.0 and 0.0 <= result["shapeeval"][name]["all_correct"] <= 1.0
        assert result["seconds_per_image"][name] > 0
    assert result["controlnet_iou_over_ceiling"] == pytest.approx(iou["controlnet"] / iou["vae_round_trip_ceiling"])
    mean, low, high = result["controlnet_minus_unguided_all_correct"]
    shapeeval = result["shapeeval"]
    assert mean == pytest.approx(shapeeval["controlnet"]["all_correct"] - shapeeval["unguided"]["all_correct"])
    assert low <= mean <= high
    assert (tmp_path / "misread.png").exists() == (result["failures_shown"] > 0)
