"""The structure-VAE benchmark runs end to end on a few small scenes; a VAE compared with itself scores the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def test_structure_vae_benchmark_compares_a_vae_with_itself(tmp_path: Path, benchmark_module: Any, capsys: Any) -> None:
    from dagfusion.nodes.shapes.models import folder

    module = benchmark_module("structure_vae")
    out = tmp_path / "result.json"
    assert module.main(["--vae", str(folder("shapes-sd")), "--scenes", "2", "--resolution", "32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["scenes"] == 2 and result["resolution"] == 32
    assert set(result["original_objects"]) == {"rgb", "depth", "normal"}
    assert list(result["vaes"]) == ["shapes-sd", "fine-tuned"]
    for row in result["vaes"].values():
        assert set(row) == {"psnr", "objects_lost", "single_object_rgb_psnr"}
        assert set(row["psnr"]) == set(row["objects_lost"]) == {"rgb", "depth", "normal"}
        assert all(value > 0 for value in row["psnr"].values()) and row["single_object_rgb_psnr"] > 0
        assert all(0 <= lost <= 2 for lost in row["objects_lost"].values())
    assert result["vaes"]["shapes-sd"] == result["vaes"]["fine-tuned"]
    printed = capsys.readouterr().out
    assert printed.count("\n| shapes-sd |") == 1 and "| fine-tuned |" in printed


def test_objects_lost_counts_scenes_with_fewer_objects(benchmark_module: Any) -> None:
    module = benchmark_module("structure_vae")
    two = torch.zeros(2, 3, 32, 32)
    two[:, 0, 4:12, 4:12] = 1.0
    two[:, 1, 20:28, 20:28] = 1.0
    one = two.clone()
    one[1, 1] = 0.0  # the second scene's green square is gone
    assert module.objects_lost(two, two) == 0
    assert module.objects_lost(two, one) == 1
    assert module.psnr(two, two) == 120.0
