"""The shapes-video world as training data and as rendered ground truth."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dagfusion import NodeInputError
from dagfusion.nodes.shapes.motion import ShapesVideoDataset, parse_description
from dagfusion.nodes.training.data import as_training_data
from dagfusion.nodes.video.sfv import as_video_clips, clip_buckets
from dagfusion.nodes.video.shapes_data import (
    ShapesVideoSource,
    render_shapes_clip,
    shapes_clips,
)


def _ctx() -> Any:
    from types import SimpleNamespace

    return SimpleNamespace()


def test_the_source_serves_the_loop_and_sfv_with_each_clips_bucket() -> None:
    data, clips, count = shapes_clips.fn(_ctx(), "train", 32, 3, 0)
    assert data is clips and count == len(ShapesVideoDataset("train", resolution=32, frames=3))
    examples = as_training_data(data).examples(5, 4)
    assert tuple(examples.images.shape) == (4, 3, 3, 32, 32)
    assert torch.equal(as_video_clips(clips).clips(5, 4), examples.images)
    buckets = clip_buckets(clips, 5, 4)
    assert buckets == list(examples.raw.motion_bucket_ids)
    assert buckets == [parse_description(c).motion_bucket_id for c in examples.captions]
    assert set(buckets) <= {64, 192}


def test_a_source_without_buckets_gives_none() -> None:
    from dagfusion.nodes.video.sfv import ClipSet

    assert clip_buckets(ClipSet(torch.zeros(2, 2, 3, 8, 8)), 0, 2) is None


def test_fingerprints_follow_the_dataset() -> None:
    from dagfusion.fingerprint import fingerprint

    a = ShapesVideoSource(ShapesVideoDataset("train", resolution=32, frames=3, seed=0))
    b = ShapesVideoSource(ShapesVideoDataset("train", resolution=32, frames=3, seed=0))
    c = ShapesVideoSource(ShapesVideoDataset("train", resolution=32, frames=3, seed=1))
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_render_gives_the_clip_its_first_frame_and_bucket() -> None:
    text = "a small blue square moving left slow along the near lane on a white background"
    video, first, bucket, texts = render_shapes_clip.fn(_ctx(), [text], 32, 4, 0)
    assert tuple(video.shape) == (1, 4, 3, 32, 32) and torch.equal(first, video[:, 0])
    assert bucket == 64 and texts == [text]
    from dagfusion.nodes.metrics.video import score_motion

    assert score_motion(video, texts)["motion"] == 1.0


def test_bad_descriptions_are_named_all_at_once() -> None:
    good = "a small blue square moving left slow along the near lane on a white background"
    with pytest.raises(NodeInputError) as err:
        render_shapes_clip.fn(_ctx(), [good, "a red circle", "a small blue square moving up slow along the near lane on a white background"], 32, 4, 0)
    assert err.value.input == "descriptions" and "#1" in str(err.value) and "#2" in str(err.value)
