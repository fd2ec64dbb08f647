"""The refiner benchmark runs both stages end to end on untrained copies of shapes-sd."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def test_structure_refiner_benchmark_scores_every_stage(tmp_path: Path, benchmark_module: Any) -> None:
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.shapes.models import folder
    from dagfusion.nodes.structure.controlnet import embedding_channels
    from dagfusion.nodes.structure.controlnet_model import from_unet, save_single_file
    from dagfusion.nodes.structure.structural import structural_from_unet
    from dagfusion.nodes.structure.structural_io import save

    shapes_sd = load_diffusers_folder(folder("shapes-sd"), source="test")
    joint = save(structural_from_unet(shapes_sd.model, ("rgb", "depth", "normal"), 2), tmp_path / "joint")
    refiner = save_single_file(
        from_unet(shapes_sd.model.denoiser, conditioning_channels=6, seed=0, source="test", fingerprint="test",
                  embedding_channels=embedding_channels(shapes_sd.model.vae_scale_factor)),
        tmp_path / "refiner.safetensors")
    out = tmp_path / "result.json"
    result = benchmark_module("structure_refiner").main([
        "--joint", str(joint), "--base", str(folder("shapes-sd")), "--refiner", str(refiner), "--prompts", "2",
        "--seeds", "2", "--steps", "1", "--batch", "2", "--json", str(out), "--picture", str(tmp_path / "grid.png")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (4 * 64 * 3, 2 * 64 * 3)
    assert result["images"] == 4 and result["conditions"] == ["depth", "normal", "layout"]
    for name in ("joint", "refiner", "base"):
        assert 0.0 <= result[name]["all_correct"] <= 1.0 and 0.0 <= result[name]["layout_iou"] <= 1.0
        assert result[name]["seconds_per_image"] > 0
    # an untrained ControlNet adds zero residuals: the refiner's images are the base's
    assert result["refiner"]["all_correct"] == result["base"]["all_correct"]
    assert result["refiner"]["layout_iou"] == pytest.approx(result["base"]["layout_iou"], abs=1e-6)
    low, high = result["all_correct_refiner_minus_joint"][1:]
    assert low <= result["all_correct_refiner_minus_joint"][0] <= high


def test_conditions_are_a_named_subset(benchmark_module: Any) -> None:
    module = benchmark_module("structure_refiner")
    assert module.parse_conditions("depth, layout") == ("depth", "layout")
    for bad in ("", "depth, pose"):
        with pytest.raises(ValueError, match="subset"):
            module.parse_conditions(bad)


def test_renders_keep_their_own_layout(benchmark_module: Any) -> None:
    import torch

    from dagfusion.nodes.structure.layout import render_structure

    module = benchmark_module("structure_refiner")
    captions = module.held_out_captions(4)
    renders = render_structure(captions, module.RESOLUTION, "solid")["image"]
    assert module.layout_iou(torch.cat([renders, renders]), captions, 2) > 0.9  # measured 0.94
    assert module.layout_iou(torch.zeros(8, 3, 64, 64), captions, 2) == 0.0  # no object found
