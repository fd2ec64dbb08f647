"""The shapes-video benchmark runs end to end on tiny saved models and scores real clips as perfect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def test_video_shapes_benchmark_scores_every_variant(tmp_path: Path, benchmark_module: Any) -> None:
    from dagfusion.nodes.video.export import save_svd
    from dagfusion.nodes.video.sfv import OneStepPatch, one_step_scheduler
    from dagfusion.nodes.video.svd import _tiny_cached

    parts = _tiny_cached()
    base = save_svd(parts["model"], parts["clip_vision"], parts["vae"], tmp_path / "base")
    marked = parts["model"].with_scheduler(one_step_scheduler(700.0)).with_patch(OneStepPatch(700.0))
    one = save_svd(marked, parts["clip_vision"], parts["vae"], tmp_path / "one")
    module = benchmark_module("video_shapes")
    out = tmp_path / "result.json"
    module.main(["--base", str(base), "--one-step", str(one), "--limit", "2", "--seeds", "1", "--steps", "2",
                 "--frames", "3", "--repeats", "1", "--json", str(out), "--gif-dir", str(tmp_path / "gifs")])
    result = json.loads(out.read_text())
    assert result["clips"] == 2
    assert result["real"]["motion"] == 1.0 and result["real"]["frames_all_correct"] == 1.0
    assert {"teacher", "one-step", "vae round trip"} <= set(result)
    assert set(result["seconds_per_clip"]) == {"2 steps, VAE fp32", "one step, VAE fp32", "2 steps, VAE bf16",
                                               "one step, VAE bf16"}
    assert set(result["speedup"]) == {"fp32", "bf16"} and all(v > 0 for v in result["speedup"].values())
    assert sorted(p.name for p in (tmp_path / "gifs").iterdir()) == [
        "video-shapes-2-steps.gif", "video-shapes-one-step.gif", "video-shapes-real.gif"]


def test_parts_timing_names_every_part(tmp_path: Path, benchmark_module: Any) -> None:
    from dagfusion.nodes.video.export import save_svd
    from dagfusion.nodes.video.sfv import OneStepPatch, one_step_scheduler
    from dagfusion.nodes.video.svd import _tiny_cached

    parts = _tiny_cached()
    base = save_svd(parts["model"], parts["clip_vision"], parts["vae"], tmp_path / "base")
    marked = parts["model"].with_scheduler(one_step_scheduler(700.0)).with_patch(OneStepPatch(700.0))
    one = save_svd(marked, parts["clip_vision"], parts["vae"], tmp_path / "one")
    result = benchmark_module("video_shapes").main(["--base", str(base), "--one-step", str(one), "--parts", "--limit", "1",
                                                    "--seeds", "1", "--steps", "2", "--frames", "2", "--repeats", "1"])
    assert set(result["parts_seconds"]) == {"conditioning", "one-step sampling", "2-step sampling", "decoding",
                                            "UNet call, batch 1", "UNet call, batch 2"}
    assert all(v > 0 for v in result["parts_seconds"].values())


def test_time_only_times_both_vae_precisions_and_scores_nothing(tmp_path: Path, benchmark_module: Any) -> None:
    from dagfusion.nodes.video.export import save_svd
    from dagfusion.nodes.video.sfv import OneStepPatch, one_step_scheduler
    from dagfusion.nodes.video.svd import _tiny_cached

    parts = _tiny_cached()
    base = save_svd(parts["model"], parts["clip_vision"], parts["vae"], tmp_path / "base")
    marked = parts["model"].with_scheduler(one_step_scheduler(700.0)).with_patch(OneStepPatch(700.0))
    one = save_svd(marked, parts["clip_vision"], parts["vae"], tmp_path / "one")
    result = benchmark_module("video_shapes").main(["--base", str(base), "--one-step", str(one), "--time-only",
                                                    "--limit", "1", "--seeds", "1", "--steps", "2", "--frames", "2",
                                                    "--repeats", "1", "--vae-dtype", "bf16"])
    assert result["vae_dtype"] == "bf16" and "teacher" not in result
    assert set(result["speedup"]) == {"fp32", "bf16"}


def test_the_vae_loads_in_the_precision_asked_and_the_unet_stays_fp32(tmp_path: Path, benchmark_module: Any) -> None:
    import torch
    from dagfusion.nodes.video.export import save_svd
    from dagfusion.nodes.video.svd import _tiny_cached

    parts = _tiny_cached()
    base = save_svd(parts["model"], parts["clip_vision"], parts["vae"], tmp_path / "base")
    loaded = benchmark_module("video_shapes").load(str(base), "shapes-video", "bf16")
    assert next(loaded["vae"].module.parameters()).dtype == torch.bfloat16
    assert next(loaded["model"].denoiser.parameters()).dtype == torch.float32
