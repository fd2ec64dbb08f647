"""The shapes-video world: clips stay in frame, move as their first frame and speed say, and the
motion read back from masks is right."""

from __future__ import annotations

import pytest
import torch

from dagfusion.nodes.shapes.motion import (
    DIRECTIONS,
    SPEEDS,
    ShapesVideoDataset,
    all_clips,
    clips,
    motion_from_masks,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_splits_partition_every_combination_and_cover_each_value() -> None:
    train, held = clips("train"), clips("eval")
    assert len(train) + len(held) == len(all_clips()) == 864
    assert not set(train) & set(held)
    assert 0.08 < len(held) / 864 < 0.17
    for attribute in ("colour", "shape", "size", "background", "lane", "speed"):
        assert {getattr(c, attribute) for c in held} == {getattr(c, attribute) for c in all_clips()}


def test_batches_are_reproducible_and_differ_by_index() -> None:
    data = ShapesVideoDataset("train", resolution=32, seed=3)
    a, b = data.batch(5, 3), data.batch(5, 3)
    assert torch.equal(a.video, b.video) and a.clips == b.clips
    assert a.video.shape == (3, 8, 3, 32, 32) and a.rendered.mask.shape == (3, 8, 1, 32, 32)
    assert not torch.equal(data.batch(6, 3).video, a.video)


def test_objects_stay_inside_every_frame() -> None:
    data = ShapesVideoDataset("train", resolution=32, seed=0)
    batch = data.batch(0, 48)
    mask = batch.rendered.mask
    border = torch.cat([mask[..., 0, :], mask[..., -1, :], mask[..., :, 0], mask[..., :, -1]], dim=-1)
    assert float(border.max()) == 0.0
    area = mask.sum(dim=(2, 3, 4))
    assert float((area.max(dim=1).values / area.min(dim=1).values).max()) < 1.05  # the object is never cut off


@pytest.mark.parametrize("resolution", [32, 64])
def test_motion_read_from_true_masks_is_the_clips_motion(resolution: int) -> None:
    data = ShapesVideoDataset("eval", resolution=resolution, seed=1)
    batch = data.batch(0, 40)
    for masks, clip, centres in zip(batch.rendered.mask, batch.clips, batch.rendered.centres):
        motion = motion_from_masks(masks)
        assert (motion.direction, motion.speed) == (clip.direction, clip.speed)
        step = SPEEDS[clip.speed][1]
        dx, dy = DIRECTIONS[clip.shape]
        assert motion.velocity[0] == pytest.approx(dx * step, abs=0.004)
        assert motion.velocity[1] == pytest.approx(dy * step, abs=0.004)
        assert float((centres[1:] - centres[:-1]).norm(dim=1).mean()) == pytest.approx(step, abs=1e-5)


def test_a_still_or_empty_clip_is_not_read_as_motion() -> None:
    batch = ShapesVideoDataset("train", resolution=32).batch(0, 1)
    still = batch.rendered.mask[0, :1].expand(8, -1, -1, -1)
    assert motion_from_masks(still).speed == "still"
    assert not motion_from_masks(torch.zeros(8, 1, 32, 32)).found


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="frames"):
        ShapesVideoDataset(frames=1)
    with pytest.raises(ValueError, match="resolution"):
        ShapesVideoDataset(resolution=48)
    with pytest.raises(ValueError, match="split"):
        clips("test")
