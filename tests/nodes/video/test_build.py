"""Untrained SVD-layout models from the built-in configs."""

from __future__ import annotations

import pytest
import torch
from dagfusion.nodes.video.build import CONFIGS, build_video_pipeline, handles

torch.set_num_threads(1)


def test_the_same_config_and_seed_give_the_same_weights() -> None:
    a, b, c = (build_video_pipeline("tiny-svd", seed) for seed in (0, 0, 1))
    for name in ("unet", "vae", "image_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].numel() > 1)


def test_shapes_video_is_the_documented_architecture() -> None:
    pipe = build_video_pipeline("shapes-video")
    assert sum(p.numel() for p in pipe.unet.parameters()) == pytest.approx(3.18e6, rel=0.01)
    assert pipe.unet.config.in_channels == 8 and pipe.unet.config.num_frames == 8
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 4
    assert pipe.image_encoder.config.image_size == 32
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_handles_are_fingerprinted_by_the_config_not_the_object() -> None:
    from dagfusion.fingerprint import fingerprint

    one = handles(build_video_pipeline("tiny-svd"), "tiny-svd@x (seed 0)", "cpu")
    two = handles(build_video_pipeline("tiny-svd"), "tiny-svd@x (seed 0)", "cpu")
    for name in ("model", "clip_vision", "vae"):
        assert fingerprint(one[name]) == fingerprint(two[name])


def test_the_scheduler_spec_has_no_private_keys() -> None:
    """diffusers' ``_use_default_values`` lists a set in hash order: kept, it would change the model's
    fingerprint from process to process, and a training's checkpoints would not be found again."""
    spec = handles(build_video_pipeline("tiny-svd"), "x", "cpu")["model"].scheduler
    assert spec.config and not [k for k in spec.config if k.startswith("_")]


def test_an_unknown_config_is_refused() -> None:
    with pytest.raises(ValueError, match="tiny-svd"):
        build_video_pipeline("svd-xl")
    assert set(CONFIGS) == {"tiny-svd", "shapes-video"}
