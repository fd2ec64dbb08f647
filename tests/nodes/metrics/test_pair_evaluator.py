"""ShapeEval-pair: the shipped two-object classifier, its scoring, training, saving and node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dagfusion.errors import NodeInputError
from dagfusion.nodes.metrics.pair_evaluator import (
    HEADS,
    SCORED,
    SHIPPED,
    PairEvalNet,
    canonical,
    held_out_set,
    in_prompt_terms,
    load_pair_evaluator,
    predict,
    read_metadata,
    save_pair_evaluator,
    score,
    train_pair_evaluator,
)
from dagfusion.nodes.shapes.dataset import ShapesDataset
from dagfusion.nodes.shapes.world import parse_pair_caption
from dagfusion.registry import Registry

REGISTRY = Registry.from_plugins(load_entrypoints=False, environ={})


@pytest.fixture(scope="module")
def shipped() -> PairEvalNet:
    return load_pair_evaluator(SHIPPED)


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, list[str]]:
    return held_out_set(48, data_seed=77)  # 36 two-object and 12 single-object renders, both styles


def test_shipped_file_is_small_fp16_and_says_how_it_was_made() -> None:
    assert SHIPPED.stat().st_size < 1024 * 1024
    assert all(t.dtype == torch.float16 for t in load_file(str(SHIPPED)).values())
    meta = read_metadata(SHIPPED)
    assert meta["script"] == "benchmarks/train_pair_evaluator.py"
    assert int(meta["steps"]) > 0 and "seed" in meta and "data_seed" in meta
    accuracy = json.loads(meta["accuracy"])
    assert set(accuracy) == {*SCORED, "all_correct"}


def test_shipped_reads_held_out_renders_as_well_as_measured(shipped: PairEvalNet, held_out: tuple[torch.Tensor, list[str]]) -> None:
    images, captions = held_out
    assert len(captions) == 48 and len({c for c in captions if parse_pair_caption(c)}) >= 30
    measured = json.loads(read_metadata(SHIPPED)["accuracy"])
    scores = score(shipped, images, captions)
    for head, value in measured.items():
        assert scores[head] >= value - 0.02, (head, scores[head], value)


def test_equivalent_captions_score_alike_and_wrong_ones_low(shipped: PairEvalNet) -> None:
    batch = ShapesDataset("eval", 2, 64, seed=9, style="solid").batch(0, 24)
    captions = list(batch.captions)
    swapped = []  # the same picture, described from the other object
    for scene in batch.scenes:
        a, b = scene.objects
        other = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}[scene.relation]
        swapped.append(f"a {b.colour} {b.shape} {other} a {a.colour} {a.shape} on a {scene.background} background")
    assert score(shipped, batch.images, captions) == score(shipped, batch.images, swapped)
    turned = [c.replace(" above ", " left of ") if " above " in c else c.replace(" left of ", " above ") for c in captions]
    turned = [c.replace(" below ", " right of ") if " below " in c else c.replace(" right of ", " below ") for c in turned]
    assert score(shipped, batch.images, turned)["relation"] < 0.2
    shifted = captions[1:] + captions[:1]
    assert score(shipped, batch.images, shifted)["all_correct"] < 0.2


def test_canonical_reading_order() -> None:
    below = parse_pair_caption("a red circle below a blue square on a black background")
    assert canonical(below) == {"count": "2", "colour_a": "blue", "shape_a": "square", "colour_b": "red", "shape_b": "circle", "axis": "vertical"}
    read = in_prompt_terms({k: str(v) for k, v in canonical(below).items()}, below)
    assert read == {"count": "2", "colour_1": "red", "shape_1": "circle", "colour_2": "blue", "shape_2": "square", "relation": "below"}


def test_single_object_prompts_score_count_and_object(shipped: PairEvalNet) -> None:
    batch = ShapesDataset("eval", 1, 64, seed=3, style="flat").batch(0, 16)
    scores = score(shipped, batch.images, list(batch.captions))
    assert scores["count"] >= 0.9 and scores["colour_1"] >= 0.9
    assert scores["relation"] != scores["relation"]  # nan: no prompt has a relation
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        score(shipped, batch.images[:1], ["a cat"])


@pytest.mark.slow  # two short trainings: ~5 s on a busy 2-core machine
def test_training_is_seeded_and_learns(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    losses: list[float] = []
    a, report = train_pair_evaluator(steps=16, batch_size=16, pairs=12, singles=4, seed=2,
                                     progress=lambda step, total, loss: losses.append(loss))
    b, _ = train_pair_evaluator(steps=16, batch_size=16, pairs=12, singles=4, seed=2)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    untrained = sum(torch.log(torch.tensor(float(len(v)))) for v in HEADS.values())
    assert losses[0] == pytest.approx(float(untrained), rel=0.15)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5 and report.final_loss == losses[-1]
    path = tmp_path / "pair.safetensors"
    save_pair_evaluator(a, path, extra={"steps": 16})
    assert read_metadata(path)["steps"] == "16"
    images = ShapesDataset("train", 2, 32, style="solid").batch(0, 4).images
    assert predict(a, images) == predict(load_pair_evaluator(path), images)


def test_other_files_are_refused(tmp_path: Path, shipped: PairEvalNet) -> None:
    state = {k: v.contiguous() for k, v in shipped.state_dict().items()}
    path = tmp_path / "other.safetensors"
    save_file(state, str(path), metadata={"format": "dagfusion.shapeeval-pair/1", "heads": json.dumps({"count": ["1", "2", "3"]})})
    with pytest.raises(ValueError, match="head vocabulary"):
        load_pair_evaluator(path)
    save_file(state, str(path), metadata={"format": "something"})
    with pytest.raises(ValueError, match="not a ShapeEval-pair"):
        load_pair_evaluator(path)


def test_node_scores_and_names_bad_inputs(shipped: PairEvalNet) -> None:
    spec = REGISTRY.get("dagfusion.metrics.ShapeEvalPair")
    batch = ShapesDataset("eval", 2, 64, seed=1, style="flat").batch(0, 4)
    scores, all_correct = spec.fn(None, images=batch.images, prompts=list(batch.captions), evaluator=shipped)
    assert all_correct == scores["all_correct"] and set(scores) == {*SCORED, "all_correct"}
    one_caption, _ = spec.fn(None, images=batch.images[:2], prompts=batch.captions[0], evaluator=shipped)
    assert one_caption["count"] == 1.0
    with pytest.raises(NodeInputError) as caught:
        spec.fn(None, images=batch.images, prompts=list(batch.captions[:3]), evaluator=shipped)
    assert caught.value.input == "prompts" and "(4)" in caught.value.message
    with pytest.raises(NodeInputError) as caught:
        spec.fn(None, images=batch.images, prompts=["a dog"] * 4, evaluator=shipped)
    assert caught.value.input == "prompts"
    with pytest.raises(NodeInputError) as caught:
        spec.fn(None, images=batch.images[:, :2], prompts=list(batch.captions), evaluator=shipped)
    assert caught.value.input == "images"
