"""The joint-vs-RGB structural benchmark runs end to end on untrained copies of shapes-sd."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


def test_structure_joint_benchmark_scores_both_models(tmp_path: Path, benchmark_module: Any) -> None:
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.shapes.models import folder
    from dagfusion.nodes.structure.structural import structural_from_unet
    from dagfusion.nodes.structure.structural_io import save

    shapes_sd = load_diffusers_folder(folder("shapes-sd"), source="test")
    joint = save(structural_from_unet(shapes_sd.model, ("rgb", "depth", "normal"), 2), tmp_path / "joint")
    rgb = save(structural_from_unet(shapes_sd.model, ("rgb",), 2), tmp_path / "rgb")
    out = tmp_path / "result.json"
    result = benchmark_module("structure_joint").main([
        "--joint", str(joint), "--rgb", str(rgb), "--vae", str(folder("shapes-sd")), "--prompts", "2", "--seeds", "2",
        "--steps", "1", "--batch", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["images"] == 4 and result["layout"] == "prompt"
    assert result["parameters"]["joint"] > result["parameters"]["rgb-only"]
    for name in ("joint", "rgb-only"):
        assert 0.0 <= result[name]["relation"] <= 1.0 and 0.0 <= result[name]["all_correct"] <= 1.0
        assert result[name]["seconds_per_image"] > 0
    assert set(result["joint_structure"]) == {"depth_foreground_iou", "depth_mae_vs_layout"}
    assert len(result["relation_error_ratio"]) == 3


def test_held_out_captions_are_two_object_evaluation_scenes(benchmark_module: Any) -> None:
    from dagfusion.nodes.shapes.world import parse_any_caption, scenes

    captions = benchmark_module("structure_joint").held_out_captions(8)
    pool = {s.caption for s in scenes("eval", 2)}
    assert len(set(captions)) == 8 and set(captions) <= pool
    assert all(parse_any_caption(c) is not None for c in captions)


def test_ratio_interval_brackets_the_ratio(benchmark_module: Any) -> None:
    module = benchmark_module("structure_joint")
    point, low, high = module.ratio_interval([1.0, 0.0] * 20, [1.0, 1.0] * 20)
    assert point == 0.5 and low <= point <= high
    assert math.isnan(module.ratio_interval([0.0] * 4, [0.0] * 4)[0])


def test_structure_agreement_is_perfect_for_a_depth_drawn_from_the_objects(benchmark_module: Any) -> None:
    images = torch.zeros(1, 3, 32, 32)
    images[:, 0, 8:20, 8:20] = 1.0
    depth = torch.zeros(1, 1, 32, 32)
    depth[:, :, 8:20, 8:20] = 0.8
    agreement = benchmark_module("structure_joint").structure_agreement(images, depth, depth, 0.1)
    assert agreement["depth_foreground_iou"] == 1.0 and agreement["depth_mae_vs_layout"] == 0.0
