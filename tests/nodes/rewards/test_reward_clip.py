"""CLIP-score and aesthetic-head rewards from tiny random folders, loaded through the nodes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("transformers")

from dagfusion.errors import NodeInputError  # noqa: E402
from dagfusion.nodes.rewards.aesthetic import EmbeddingHead, load_head, save_head  # noqa: E402
from dagfusion.nodes.rewards.clip import load_clip_reward  # noqa: E402
from dagfusion.nodes.rewards.tiny import write_tiny_clip, write_tiny_head  # noqa: E402
from dagfusion.testing import make_registry, run_workflow  # noqa: E402


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("rewards") / "clip")


def _load_node(folder: Path, tmp_path: Path, head: Path | None = None) -> dict[str, Any]:
    """Run LoadCLIP (and Aesthetic) through the engine with ``folder``'s parent readable."""
    from dagfusion.testing import make_settings

    nodes: dict[str, Any] = {"clip": {"type": "dagfusion.reward.LoadCLIP", "inputs": {"path": str(folder)}}}
    if head is not None:
        nodes["head"] = {"type": "dagfusion.reward.Aesthetic", "inputs": {"clip": {"from": "clip.reward"}, "path": str(head)}}
    settings = make_settings(tmp_path, read_dirs=[tmp_path, folder.parent])
    result = run_workflow({"format_version": 1, "nodes": nodes}, registry=make_registry(), settings=settings)
    return {name: outputs["reward"] for name, outputs in result.outputs.items()}


def _test_image() -> tuple[np.ndarray, torch.Tensor]:
    """A smooth 48 × 80 image (not square, not the model's size) as uint8 HWC and float BCHW."""
    base = torch.rand(1, 3, 6, 10, generator=torch.Generator().manual_seed(0))
    image = F.interpolate(base, size=(48, 80), mode="bilinear", align_corners=False)
    array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return array, torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


def test_torch_preprocessing_matches_the_image_processor(clip_folder: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor

    reward = load_clip_reward(clip_folder)
    array, tensor = _test_image()
    processor = AutoImageProcessor.from_pretrained(str(clip_folder), local_files_only=True)
    reference = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    ours = reward.preprocess(tensor)
    assert ours.shape == reference.shape == (1, 3, 32, 32)
    assert (ours - reference).abs().max() < 0.05  # uint8 rounding and PIL's bicubic kernel
    model = reward.model
    with torch.no_grad():
        expected = model.visual_projection(model.vision_model(pixel_values=reference).pooler_output)
        got = reward.image_embeddings(tensor)
    assert F.cosine_similarity(expected, got).min() > 0.999


def test_score_is_scaled_cosine_and_differentiable(clip_folder: Path, tmp_path: Path) -> None:
    reward = _load_node(clip_folder, tmp_path)["clip"]
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1), requires_grad=True)
    prompts = ["a red circle", "a blue square"]
    scores = reward.score(images, prompts)
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert scores.shape == (2,) and grad.abs().sum() > 0
    with torch.no_grad():
        model = reward.model
        tokens = reward.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        text = model.text_projection(model.text_model(**tokens).pooler_output)
        image = reward.image_embeddings(images)
        expected = model.logit_scale.exp() * F.cosine_similarity(image, text)
    torch.testing.assert_close(scores.detach(), expected, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in reward.model.parameters())


def test_loading_is_offline_and_fingerprinted_by_content(clip_folder: Path, tmp_path: Path) -> None:
    from dagfusion.fingerprint import fingerprint

    a, b = load_clip_reward(clip_folder), load_clip_reward(clip_folder)
    assert fingerprint(a) == fingerprint(b) and a.name == "clip:clip"
    assert fingerprint(load_clip_reward(clip_folder, "bfloat16")) != fingerprint(a)


def test_pickle_only_folders_are_refused(clip_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((clip_folder / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        load_clip_reward(folder)


def test_folders_outside_the_read_dirs_are_refused(clip_folder: Path, tmp_path: Path) -> None:
    from dagfusion.errors import ValidationError

    workflow = {"format_version": 1, "nodes": {"clip": {"type": "dagfusion.reward.LoadCLIP", "inputs": {"path": str(clip_folder)}}}}
    with pytest.raises(ValidationError, match="outside the allowed read folders"):
        run_workflow(workflow, registry=make_registry(), tmp_path=tmp_path)


def test_aesthetic_head_round_trips_and_scores(clip_folder: Path, tmp_path: Path) -> None:
    head_folder = write_tiny_head(tmp_path / "head", seed=3)
    assert json.loads((head_folder / "config.json").read_text())["layers"] == [16, 8, 1]
    rewards = _load_node(clip_folder, tmp_path, head=head_folder)
    aesthetic, clip = rewards["head"], rewards["clip"]
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    scores = aesthetic.score(images, "ignored")
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert scores.shape == (3,) and grad.abs().sum() > 0
    head = load_head(head_folder)
    with torch.no_grad():
        x = F.normalize(clip.image_embeddings(images), dim=-1)
        expected = head.linear[1](torch.relu(head.linear[0](x)))[:, 0]
    torch.testing.assert_close(scores.detach(), expected)


def test_head_size_mismatch_names_both_sizes(clip_folder: Path, tmp_path: Path) -> None:
    from dagfusion.nodes.rewards.aesthetic import AestheticReward

    head = EmbeddingHead([32, 4, 1])
    with pytest.raises(NodeInputError, match=r"32-d .* 16-d"):
        AestheticReward(load_clip_reward(clip_folder), head, name="h", fingerprint="x")


def test_head_files_are_checked(tmp_path: Path) -> None:
    save_head(EmbeddingHead([4, 2, 1], activation="gelu", normalize=False), tmp_path / "ok")
    head = load_head(tmp_path / "ok")
    assert head.layers == [4, 2, 1] and head.activation_name == "gelu" and not head.normalize
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "layers": [4, 3, 1]}))
    with pytest.raises(ValueError, match="shape"):
        load_head(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "format": "other"}))
    with pytest.raises(ValueError, match="format"):
        load_head(tmp_path / "ok")
    with pytest.raises(ValueError, match="ending in 1"):
        EmbeddingHead([4, 2])
