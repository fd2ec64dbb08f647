from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dagfusion.nodes.shapes.dataset import ShapesDataset
from dagfusion.nodes.metrics.evaluator import (
    SHIPPED,
    load_shapeeval,
    predict,
    save_shapeeval,
    score,
    train_shapeeval,
)


@pytest.fixture(scope="module")
def shipped():
    return load_shapeeval(SHIPPED)


@pytest.mark.parametrize("resolution", [64, 32])
def test_shipped_classifier_reads_held_out_renders(shipped, resolution: int) -> None:
    batch = ShapesDataset("eval", 1, resolution, seed=2024).batch(0, 240)
    scores = score(shipped, batch.images, list(batch.captions))
    assert scores["all_correct"] >= 0.99, scores


def test_wrong_prompts_score_low(shipped) -> None:
    batch = ShapesDataset("eval", 1, 64, seed=5).batch(0, 48)
    shifted = list(batch.captions[1:]) + [batch.captions[0]]
    assert score(shipped, batch.images, shifted)["all_correct"] < 0.2
    with pytest.raises(ValueError, match="not a single-object"):
        score(shipped, batch.images[:1], ["a red circle above a blue square on a black background"])


def test_shipped_file_is_small_and_fp16() -> None:
    assert SHIPPED.stat().st_size < 2 * 1024 * 1024
    assert all(t.dtype == torch.float16 for t in load_file(str(SHIPPED)).values())


def test_training_is_seeded_and_learns(tmp_path: Path) -> None:
    a, report = train_shapeeval(steps=30, batch_size=32, pool_size=256, seed=3)
    b, _ = train_shapeeval(steps=30, batch_size=32, pool_size=256, seed=3)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert report.final_loss < 5.0  # the untrained loss is sum(log(classes)) ~ 6.9
    save_shapeeval(a, tmp_path / "w.safetensors")
    again = load_shapeeval(tmp_path / "w.safetensors")
    images = ShapesDataset("train", 1, 32).batch(0, 8).images
    assert predict(a, images) == predict(again, images)


def test_vocabulary_mismatch_is_refused(tmp_path: Path, shipped) -> None:
    path = tmp_path / "odd.safetensors"
    state = {k: v.contiguous() for k, v in shipped.state_dict().items()}
    save_file(state, str(path), metadata={"format": "dagfusion.shapeeval/1", "attributes": json.dumps({"colour": ["red"]})})
    with pytest.raises(ValueError, match="another attribute vocabulary"):
        load_shapeeval(path)
    save_file(state, str(path), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a ShapeEval checkpoint"):
        load_shapeeval(path)
