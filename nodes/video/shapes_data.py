"""The shapes-video world as workflow values: training clips and single rendered clips.

- ``dagfusion.video.ShapesClips`` — a split of the shapes-video world
  (:class:`~dagfusion.nodes.shapes.motion.ShapesVideoDataset`) as training data: ``data`` for
  ``dagfusion.train.Train`` (with :class:`~dagfusion.nodes.video.edm.EDMVideoObjective`) and
  ``clips`` for ``dagfusion.video.TrainSFV``. Both carry each clip's motion bucket id (its speed),
  so the model is trained on the micro-condition that determines the motion.
- ``dagfusion.video.RenderShapesClip`` — one clip rendered from its description ("a small red
  circle moving right fast along the near lane on a black background"): the ground-truth clip, its
  first frame (what an image-to-video model is given) and the motion bucket id that asks for its
  speed.
"""

from __future__ import annotations

from typing import Any

from dagfusion import (
    INT,
    LIST,
    SEED,
    STRING,
    Input,
    NodeInputError,
    Output,
    RunContext,
    node,
)
from dagfusion.nodes.diffusion.types import IMAGE, VIDEO
from dagfusion.nodes.training.data import Examples, TrainingData
from dagfusion.nodes.training.types import TRAINING_DATA
from dagfusion.nodes.video.sfv import VIDEO_CLIPS, VideoClips


class ShapesVideoSource(TrainingData, VideoClips):
    """A shapes-video split as both a training-data source and a clip source.

    Sample ``i`` is clip ``i`` of the dataset's seeded stream; ``examples`` returns the clips
    ``(B, F, 3, H, W)`` with their descriptions as captions and the dataset's batch (with
    ``motion_bucket_ids``) as ``raw``; ``clips`` the clips alone and ``motion_bucket_ids`` each
    clip's bucket.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def examples(self, first: int, count: int) -> Examples:
        batch = self.dataset.batch(first, count)
        return Examples(batch.images, batch.captions, batch)

    def clips(self, first: int, count: int) -> Any:
        return self.dataset.batch(first, count).images

    def motion_bucket_ids(self, first: int, count: int) -> list[int]:
        """The motion bucket id of clips ``first … first + count − 1`` (no rendering)."""
        return [self.dataset.clip_at(first + k).motion_bucket_id for k in range(count)]

    def describe(self) -> dict[str, Any]:
        return {"source": "shapes-video", **self.dataset.describe()}

    def __dagfusion_fingerprint__(self) -> str:
        return "shapes-video-source:" + self.dataset.__dagfusion_fingerprint__()


@node(
    "dagfusion.video.ShapesClips",
    version="1.0.0",
    category="shapes",
    inputs=[
        Input("split", STRING, "train", choices=("train", "eval"),
              description="'train' or 'eval' (the held-out combinations of colour, shape, size, background, lane and speed)."),
        Input("resolution", INT, 64, choices=(32, 64), description="Frame side in pixels."),
        Input("frames", INT, 8, min=2, max=64, description="Frames per clip."),
        Input("seed", SEED, 0, min=0, max=2**31 - 1, description="Seeds the order and every clip's jitter."),
    ],
    outputs=[
        Output("data", TRAINING_DATA, "Clips with their motion bucket ids, for dagfusion.train.Train with the EDM video objective."),
        Output("clips", VIDEO_CLIPS, "The same clips for dagfusion.video.TrainSFV."),
        Output("count", INT, "Combinations in the split."),
    ],
    examples=[{"split": "train", "resolution": 32, "frames": 3, "seed": 0}],
)
def shapes_clips(ctx: RunContext, split: str, resolution: int, frames: int, seed: int) -> tuple[Any, Any, int]:
    """A split of the shapes-video world as training data (each clip with its motion bucket id)."""
    from dagfusion.nodes.shapes.motion import ShapesVideoDataset

    source = ShapesVideoSource(ShapesVideoDataset(split, resolution=resolution, frames=frames, seed=seed))
    return source, source, len(source.dataset)


@node(
    "dagfusion.video.RenderShapesClip",
    version="1.0.0",
    category="shapes",
    inputs=[
        Input("descriptions", LIST, ["a large red circle moving right fast along the middle lane on a black background"],
              description="Clip descriptions: 'a SIZE COLOUR SHAPE moving DIRECTION SPEED along the LANE lane on a BACKGROUND "
                          "background' (circles move right, squares left, triangles up, crosses down)."),
        Input("resolution", INT, 64, choices=(32, 64), description="Frame side in pixels."),
        Input("frames", INT, 8, min=2, max=64, description="Frames per clip."),
        Input("seed", SEED, 0, min=0, max=2**31 - 1, description="Seeds each clip's jitter (start, size, rotation)."),
    ],
    outputs=[
        Output("video", VIDEO, "The rendered clips (B, F, 3, H, W)."),
        Output("first_frame", IMAGE, "Their first frames (B, 3, H, W): what an image-to-video model is given."),
        Output("motion_bucket_id", INT, "The motion bucket id of the first clip's speed (64 slow, 192 fast)."),
        Output("descriptions", LIST, "The descriptions, for the video metrics."),
    ],
    examples=[{"descriptions": ["a small blue square moving left slow along the near lane on a white background"],
               "resolution": 32, "frames": 3, "seed": 0}],
)
def render_shapes_clip(ctx: RunContext, descriptions: list[Any], resolution: int, frames: int, seed: int) -> tuple[Any, Any, int, list[str]]:
    """Render shapes-video clips from their descriptions (ground truth, first frames, motion bucket)."""
    import torch
    from dagfusion.nodes.shapes.motion import parse_description, render_clip
    from dagfusion.nodes.shapes.render import _sample_seed

    texts = [str(d) for d in descriptions]
    if not texts or len(texts) > 256:
        raise NodeInputError("descriptions", f"expected 1 to 256 descriptions, got {len(texts)}")
    clips, bad = [], []
    for i, text in enumerate(texts):
        clip = parse_description(text)
        if clip is None:
            bad.append(f"#{i} {text!r}")
        clips.append(clip)
    if bad:
        raise NodeInputError("descriptions", "expected descriptions like 'a small red circle moving right fast along the "
                                             "near lane on a black background' (circles move right, squares left, "
                                             "triangles up, crosses down), got " + ", ".join(bad))
    parts = [render_clip(c, resolution, frames, torch.Generator().manual_seed(_sample_seed(seed, i)))
             for i, c in enumerate(clips)]
    video = torch.cat([p.video for p in parts])
    return video, video[:, 0].contiguous(), clips[0].motion_bucket_id, texts


NODES = (shapes_clips, render_shapes_clip)
