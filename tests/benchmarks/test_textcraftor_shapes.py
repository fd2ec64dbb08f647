"""The TextCraftor shapes benchmark runs end to end on tiny settings (train, export, eval, interpolate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

@pytest.mark.slow
def test_train_eval_and_interpolate_on_tiny_settings(tmp_path: Path, benchmark_module: Any) -> None:
    module = benchmark_module("textcraftor_shapes")
    tiny = ["--steps", "2", "--batch", "1", "--sample-steps", "2", "--grad-steps", "1", "--checkpoint-every", "1"]
    assert module.main(["train", "--out", str(tmp_path / "a"), "--lr", "1e-3", *tiny]) == 0
    record = json.loads((tmp_path / "a" / "train.json").read_text())
    assert len(record["reward_curve"]) == 2 and record["cpu_seconds"] > 0
    assert (tmp_path / "a" / "encoder" / "text_encoder" / "config.json").is_file()
    assert module.main(["train", "--out", str(tmp_path / "u"), "--trainable", "none", "--unet-lora-rank", "2",
                        "--unet-lr", "1e-3", *tiny]) == 0
    assert (tmp_path / "u" / "unet_lora.safetensors").is_file() and not (tmp_path / "u" / "encoder").exists()
    assert module.main(["export", "--checkpoint", str(tmp_path / "a" / "checkpoints" / "step-00000001"),
                        "--out", str(tmp_path / "a1")]) == 0
    out = tmp_path / "eval.json"
    assert module.main(["eval", "--encoder", str(tmp_path / "a"), "--encoder", str(tmp_path / "u"),
                        "--prompts", "2", "--seeds", "2", "--train-prompts", "1", "--steps", "2",
                        "--cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"original", str(tmp_path / "a"), str(tmp_path / "u")}
    for name in (str(tmp_path / "a"), str(tmp_path / "u")):
        gain = result["variants"][name]["gain_over_original"]["independent_classifier"]
        low, high = gain["ci95"]
        assert low <= gain["all_correct_gain"] <= high
    curve = tmp_path / "curve.png"
    assert module.main(["curves", "--run", f"a={tmp_path / 'a'}", "--run", str(tmp_path / "u"), "--plot", str(curve)]) == 0
    assert curve.stat().st_size > 1000
    plot = tmp_path / "alpha.png"
    assert module.main(["interpolate", "--encoder-a", str(tmp_path / "a"), "--encoder-b", str(tmp_path / "a1"),
                        "--prompts", "2", "--seeds", "1", "--steps", "2", "--plot", str(plot),
                        "--json", str(tmp_path / "alpha.json")]) == 0
    rows = json.loads((tmp_path / "alpha.json").read_text())["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0] and plot.stat().st_size > 1000
