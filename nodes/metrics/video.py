"""Metrics of generated shapes-video clips: motion, per-frame attributes, a clip feature distance.

- **Motion** (:func:`score_motion`): each frame's object is segmented against the plain
  background (:func:`~dagfusion.nodes.structure.maps.segment_objects`: the border's median colour,
  a colour-distance threshold, the largest connected component), a least-squares line through
  the centroids gives the velocity, and its direction and speed
  (:func:`~dagfusion.nodes.shapes.motion.motion_from_masks`) are compared with what the clip's
  description implies. ``motion`` is the fraction of clips with both right.
- **Per-frame attributes** (:func:`score_frames`): an evaluator reads every frame; colour, shape, size
  and background must stay the clip's. Use ShapeEval-frames
  (:mod:`~dagfusion.nodes.metrics.frame_evaluator`, trained on video frames at every position);
  the still-image ShapeEval knows five positions only and misreads shapes between them.
  ``all_correct`` is the fraction of frames with all four right.
- **FD-shapes-video** (:func:`fd_video`): the Fréchet distance between real and generated clips
  over a per-clip feature — the mean of the frames' ShapeEval features concatenated with the mean
  absolute change of those features between consecutive frames. Use the still-image ShapeEval
  here: its features see position, so they see motion (ShapeEval-frames' are trained to ignore
  it). The features are 256-d, so compare sets of about 100 clips or more (held-out real vs real
  clips of another render seed: 8.6; real vs the same clips frozen on their first frame: 107).
  It is a distance over this project's own small classifier's features, **not FVD** (no video
  network is involved).
"""

from __future__ import annotations

from typing import Any

from dagfusion import FLOAT, LIST, PATH, Input, NodeInputError, Output, RunContext, node

MOTION_KEYS = ("direction", "speed", "motion", "found")
FRAME_ATTRIBUTES = ("colour", "shape", "size", "background")


def _clips(descriptions: list[str], count: int, input: str = "descriptions") -> list[Any]:
    from dagfusion.nodes.shapes.motion import parse_description

    if len(descriptions) != count:
        raise NodeInputError(input, f"expected one description per clip ({count}), got {len(descriptions)}")
    clips = []
    for text in descriptions:
        clip = parse_description(str(text))
        if clip is None:
            raise NodeInputError(
                input, f"expected shapes-video descriptions like 'a small red circle moving right fast along the near "
                       f"lane on a black background' (direction matching the shape), got {text!r}")
        clips.append(clip)
    return clips


def _check_video(video: Any, input: str = "video") -> None:
    if getattr(video, "ndim", None) != 5 or video.shape[2] != 3:
        raise NodeInputError(input, f"expected RGB clips (B, F, 3, H, W) in [0, 1], got shape {tuple(getattr(video, 'shape', ()))}")


def clip_motions(video: Any, threshold: float = 0.2, min_area: float = 0.002) -> list[Any]:
    """The :class:`~dagfusion.nodes.shapes.motion.Motion` read from each clip ``(B, F, 3, H, W)``."""
    from dagfusion.nodes.shapes.motion import motion_from_masks
    from dagfusion.nodes.structure.maps import segment_objects

    batch, frames = int(video.shape[0]), int(video.shape[1])
    masks, _ = segment_objects(video.flatten(0, 1).float(), threshold=threshold, min_area=min_area, max_objects=1)
    masks = masks.view(batch, frames, 1, *masks.shape[-2:])
    return [motion_from_masks(m) for m in masks]


def score_motion(video: Any, descriptions: list[str], threshold: float = 0.2) -> dict[str, float]:
    """Fractions of clips whose direction, speed, both (``motion``) are right, and in which an object
    was found in at least half the frames (``found``)."""
    _check_video(video)
    clips = _clips(descriptions, int(video.shape[0]))
    motions = clip_motions(video, threshold)
    n = len(clips)
    direction = sum(m.direction == c.direction for m, c in zip(motions, clips)) / n
    speed = sum(m.speed == c.speed for m, c in zip(motions, clips)) / n
    both = sum(m.direction == c.direction and m.speed == c.speed for m, c in zip(motions, clips)) / n
    found = sum(m.found for m in motions) / n
    return {"direction": direction, "speed": speed, "motion": both, "found": found}


def score_frames(evaluator: Any, video: Any, descriptions: list[str]) -> dict[str, float]:
    """Per-frame ShapeEval accuracy of colour, shape, size and background against each clip's own."""
    from dagfusion.nodes.metrics.evaluator import predict
    from dagfusion.nodes.metrics.frame_evaluator import FrameEvalNet, predict_frames

    _check_video(video)
    clips = _clips(descriptions, int(video.shape[0]))
    frames = int(video.shape[1])
    read = predict_frames if isinstance(evaluator, FrameEvalNet) else predict
    predicted = read(evaluator, video.flatten(0, 1).float())
    totals = dict.fromkeys(FRAME_ATTRIBUTES, 0)
    all_correct = 0
    for i, labels in enumerate(predicted):
        clip = clips[i // frames]
        right = {name: labels[name] == getattr(clip, name) for name in FRAME_ATTRIBUTES}
        for name, ok in right.items():
            totals[name] += ok
        all_correct += all(right.values())
    count = len(predicted)
    return {**{name: totals[name] / count for name in FRAME_ATTRIBUTES}, "all_correct": all_correct / count}


def clip_features(evaluator: Any, video: Any) -> Any:
    """Per-clip features ``(B, 2·D)``: mean ShapeEval feature over frames, and the mean absolute
    change of the features between consecutive frames."""
    import torch

    _check_video(video)
    batch, frames = int(video.shape[0]), int(video.shape[1])
    device = next(evaluator.parameters()).device
    with torch.no_grad():
        features = torch.cat([evaluator.embed(chunk.to(device)).cpu() for chunk in video.flatten(0, 1).float().split(256)])
    features = features.view(batch, frames, -1)
    change = (features[:, 1:] - features[:, :-1]).abs().mean(dim=1) if frames > 1 else torch.zeros_like(features[:, 0])
    return torch.cat([features.mean(dim=1), change], dim=1)


def fd_video(evaluator: Any, video: Any, reference: Any) -> float:
    """FD-shapes-video between two sets of clips (see the module docstring; not FVD)."""
    from dagfusion.nodes.metrics.frechet import frechet_distance

    return frechet_distance(clip_features(evaluator, video), clip_features(evaluator, reference))


# --- nodes -------------------------------------------------------------------------------------


@node(
    "dagfusion.metrics.LoadFrameEval",
    version="1.0.0",
    category="metrics",
    inputs=[Input("path", PATH, optional=True,
                  description="A ShapeEval-frames safetensors file; empty: the one shipped with dagfusion.")],
    outputs=[Output("evaluator", "SHAPE_EVALUATOR", "Reads colour, shape, size and background of video frames.")],
    examples=[{}],
)
def load_frame_eval(ctx: RunContext, path: str | None) -> Any:
    """Load ShapeEval-frames (the shipped one by default): per-frame attributes of shapes-video clips."""
    from dagfusion.nodes.metrics.frame_evaluator import SHIPPED, load_frame_evaluator
    from dagfusion.nodes.metrics.shipped import load_shipped_or_path

    return load_shipped_or_path(ctx, path, SHIPPED, load_frame_evaluator, "ShapeEval-frames")


def _real_clips(count: int = 4, split: str = "eval") -> tuple[Any, list[str]]:
    from dagfusion.nodes.shapes.motion import ShapesVideoDataset

    batch = ShapesVideoDataset(split, resolution=32, frames=4, seed=0).batch(0, count)
    return batch.video, list(batch.captions)


def _motion_example() -> dict[str, Any]:
    video, descriptions = _real_clips()
    return {"video": video, "descriptions": descriptions, "threshold": 0.2}


@node(
    "dagfusion.metrics.VideoMotion",
    version="1.0.0",
    category="metrics",
    inputs=[
        Input("video", "VIDEO", description="Generated shapes-video clips (B, F, 3, H, W)."),
        Input("descriptions", LIST, description="Each clip's description (what its first frame and motion bucket imply)."),
        Input("threshold", FLOAT, 0.2, min=0.01, max=1.0,
              description="Colour distance from the background above which a pixel belongs to the object."),
    ],
    outputs=[Output("scores", "DICT", "direction, speed, motion (both right) and found: fractions of clips."),
             Output("motion", FLOAT, "Fraction of clips moving in the right direction at the right speed.")],
    examples=[_motion_example],
)
def video_motion(ctx: RunContext, video: Any, descriptions: list[str], threshold: float) -> tuple[dict[str, float], float]:
    """Motion accuracy of shapes-video clips: the object's centroid track against the description."""
    scores = score_motion(video, list(descriptions), threshold)
    return scores, scores["motion"]


def _frames_example() -> dict[str, Any]:
    from dagfusion.nodes.metrics.evaluator import ShapeEvalNet

    video, descriptions = _real_clips()
    import torch

    torch.manual_seed(0)
    return {"video": video, "descriptions": descriptions, "evaluator": ShapeEvalNet().eval()}


@node(
    "dagfusion.metrics.VideoFrameEval",
    version="1.0.0",
    category="metrics",
    inputs=[
        Input("video", "VIDEO"),
        Input("descriptions", LIST),
        Input("evaluator", "SHAPE_EVALUATOR", link_only=True),
    ],
    outputs=[Output("scores", "DICT", "Per-frame accuracy of colour, shape, size, background, and all four."),
             Output("all_correct", FLOAT, "Fraction of frames with colour, shape, size and background right.")],
    examples=[_frames_example],
)
def video_frame_eval(ctx: RunContext, video: Any, descriptions: list[str], evaluator: Any) -> tuple[dict[str, float], float]:
    """ShapeEval on every frame: the clip's colour, shape, size and background must stay."""
    scores = score_frames(evaluator, video, list(descriptions))
    return scores, scores["all_correct"]


def _fd_example() -> dict[str, Any]:
    args = _frames_example()
    other, _ = _real_clips(4, "train")
    return {"video": args["video"], "reference": other, "evaluator": args["evaluator"]}


@node(
    "dagfusion.metrics.FDShapesVideo",
    version="1.0.0",
    category="metrics",
    inputs=[
        Input("video", "VIDEO", description="Generated clips."),
        Input("reference", "VIDEO", description="Real (rendered) clips, or a teacher's."),
        Input("evaluator", "SHAPE_EVALUATOR", link_only=True),
    ],
    outputs=[Output("fd", FLOAT, "Fréchet distance over per-clip ShapeEval features (FD-shapes-video; not FVD).")],
    examples=[_fd_example],
)
def fd_shapes_video(ctx: RunContext, video: Any, reference: Any, evaluator: Any) -> float:
    """FD-shapes-video between generated and reference clips (each set needs at least two clips)."""
    _check_video(video)
    _check_video(reference, "reference")
    for name, value in (("video", video), ("reference", reference)):
        if int(value.shape[0]) < 2:
            raise NodeInputError(name, f"expected at least 2 clips (a covariance needs two), got {int(value.shape[0])}")
    return fd_video(evaluator, video, reference)


NODES = (load_frame_eval, video_motion, video_frame_eval, fd_shapes_video)
"""The video metrics, in palette order."""
