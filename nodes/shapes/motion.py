"""The shapes-video world: short clips of one shape moving over a plain background.

A clip is determined by what an image-to-video model is given, so that its output can be scored:

- the **direction** of motion follows from the first frame — from the shape's kind
  (:data:`DIRECTIONS`: circles move right, squares left, triangles up, crosses down);
- the **speed** follows from the motion bucket id the sampler is given (:data:`SPEEDS`: "slow"
  and "fast", each with its bucket id and distance per frame, as a fraction of the image side);
- colour, size and background stay constant; the shape travels along one of three **lanes**
  (across the middle or a third of the way in, perpendicular to its motion), centred on the
  image's middle so that every clip stays inside the frame.

Clips are rendered like the still shapes world (signed distances on a 4x supersampled grid,
anti-aliased), with per-clip jitter (start offset, radius, rotation) seeded by ``(seed, index)``.
The evaluation split is a fixed set of held-out combinations (about one in eight, by a stable
hash of the clip's description), so models are measured on clips they never saw.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from dagfusion.nodes.shapes.render import SUPERSAMPLE, _sample_seed, _signed_distance
from dagfusion.nodes.shapes.world import BACKGROUNDS, COLOURS, SHAPES, SIZES

DIRECTIONS: dict[str, tuple[float, float]] = {
    "circle": (1.0, 0.0),
    "square": (-1.0, 0.0),
    "triangle": (0.0, -1.0),
    "cross": (0.0, 1.0),
}
"""Shape → unit direction of motion ``(dx, dy)`` (``y`` grows downwards: ``(0, -1)`` is up)."""
DIRECTION_NAMES: dict[tuple[float, float], str] = {(1.0, 0.0): "right", (-1.0, 0.0): "left", (0.0, -1.0): "up", (0.0, 1.0): "down"}

SPEEDS: dict[str, tuple[int, float]] = {"slow": (64, 0.02), "fast": (192, 0.045)}
"""Speed → (motion bucket id, distance per frame as a fraction of the image side)."""
LANES: dict[str, float] = {"near": 0.34, "middle": 0.5, "far": 0.66}
"""Lane → offset across the motion (fraction of the image side)."""
FRAMES = 8
"""Frames per clip."""
STILL_BELOW = 0.01
"""A clip whose object moves less than this per frame (fraction of the side) reads as still."""
EVAL_FRACTION = 0.125


@dataclass(frozen=True)
class MotionClip:
    """One clip's combination of attributes."""

    colour: str
    shape: str
    size: str
    background: str
    lane: str
    speed: str

    @property
    def direction(self) -> str:
        return DIRECTION_NAMES[DIRECTIONS[self.shape]]

    @property
    def motion_bucket_id(self) -> int:
        return SPEEDS[self.speed][0]

    @property
    def description(self) -> str:
        """``"a small red circle moving right fast along the near lane on a black background"``."""
        return (f"a {self.size} {self.colour} {self.shape} moving {self.direction} {self.speed} along the {self.lane} "
                f"lane on a {self.background} background")

    def centres(self, frames: int, offset: tuple[float, float] = (0.0, 0.0)) -> list[tuple[float, float]]:
        """The object's centre ``(x, y)`` in each frame (fractions of the image side)."""
        dx, dy = DIRECTIONS[self.shape]
        step = SPEEDS[self.speed][1]
        across = LANES[self.lane]
        start = 0.5 - step * (frames - 1) / 2
        points = []
        for f in range(frames):
            along = start + step * f
            x, y = (along, across) if dx else (across, along)
            if dx < 0:
                x = 1.0 - x
            if dy < 0:
                y = 1.0 - y
            points.append((x + offset[0], y + offset[1]))
        return points


_DESCRIPTION = re.compile(
    r"^a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) moving (?P<direction>\w+) (?P<speed>\w+) along the "
    r"(?P<lane>\w+) lane on an? (?P<background>\w+) background$"
)


def parse_description(text: str) -> MotionClip | None:
    """The clip a :attr:`MotionClip.description` describes, or ``None`` when it is not one (or its
    direction does not fit its shape)."""
    match = _DESCRIPTION.match(text.strip().lower())
    if match is None:
        return None
    g = match.groupdict()
    if (g["colour"] not in COLOURS or g["shape"] not in SHAPES or g["size"] not in SIZES or g["background"] not in BACKGROUNDS
            or g["lane"] not in LANES or g["speed"] not in SPEEDS):
        return None
    clip = MotionClip(g["colour"], g["shape"], g["size"], g["background"], g["lane"], g["speed"])
    return clip if clip.direction == g["direction"] else None


def _stable_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def all_clips() -> list[MotionClip]:
    """Every combination (6 colours × 4 shapes × 2 sizes × 3 backgrounds × 3 lanes × 2 speeds)."""
    return [MotionClip(*values) for values in itertools.product(COLOURS, SHAPES, SIZES, BACKGROUNDS, LANES, SPEEDS)]


def is_held_out(clip: MotionClip) -> bool:
    """Whether a combination belongs to the evaluation split (stable across versions)."""
    return _stable_fraction("video:" + clip.description) < EVAL_FRACTION


def clips(split: str) -> list[MotionClip]:
    """The combinations of ``split`` (``"train"`` or ``"eval"``)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    held = split == "eval"
    return [c for c in all_clips() if is_held_out(c) == held]


@dataclass(frozen=True)
class RenderedClips:
    """A batch of clips: ``video`` (B, F, 3, H, W) in [0, 1], ``mask`` (B, F, 1, H, W) and the
    true ``centres`` (B, F, 2) as fractions of the image side."""

    video: torch.Tensor
    mask: torch.Tensor
    centres: torch.Tensor


def render_clip(clip: MotionClip, resolution: int, frames: int, generator: torch.Generator, jitter: bool = True) -> RenderedClips:
    """Render one clip (batch of one)."""
    n = resolution * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    radius = SIZES[clip.size]
    angle, offset = 0.0, (0.0, 0.0)
    if jitter:
        u = torch.rand(4, generator=generator)
        offset = (float(u[0] - 0.5) * 0.04, float(u[1] - 0.5) * 0.04)
        radius *= 1.0 + float(u[2] - 0.5) * 0.2
        angle = float(u[3] - 0.5) * math.radians(16)
    background = torch.tensor(BACKGROUNDS[clip.background]).view(3, 1, 1)
    colour = torch.tensor(COLOURS[clip.colour]).view(3, 1, 1)
    c, s = math.cos(angle), math.sin(angle)
    images, masks = [], []
    centres = clip.centres(frames, offset)
    for cx, cy in centres:
        dx, dy = xs - cx, ys - cy
        rx, ry = c * dx + s * dy, -s * dx + c * dy
        cover = (_signed_distance(clip.shape, rx, ry, radius) <= 0).float().unsqueeze(0)
        images.append(background * (1 - cover) + colour * cover)
        masks.append(cover)
    pool = torch.nn.functional.avg_pool2d
    video = pool(torch.stack(images), SUPERSAMPLE).clamp(0, 1)
    mask = pool(torch.stack(masks), SUPERSAMPLE).clamp(0, 1)
    return RenderedClips(video.unsqueeze(0), mask.unsqueeze(0), torch.tensor([centres], dtype=torch.float32))


@dataclass(frozen=True)
class VideoBatch:
    """Rendered clips with their combinations and motion bucket ids."""

    rendered: RenderedClips
    clips: tuple[MotionClip, ...]

    @property
    def video(self) -> torch.Tensor:
        return self.rendered.video

    @property
    def images(self) -> torch.Tensor:
        """The clips ``(B, F, 3, H, W)`` (what training data sources read)."""
        return self.rendered.video

    @property
    def captions(self) -> tuple[str, ...]:
        """Each clip's description (the SVD layout takes no text; kept for reports)."""
        return tuple(c.description for c in self.clips)

    @property
    def first_frames(self) -> torch.Tensor:
        """(B, 3, H, W): what an image-to-video model is given."""
        return self.rendered.video[:, 0]

    @property
    def motion_bucket_ids(self) -> list[int]:
        return [c.motion_bucket_id for c in self.clips]


@dataclass(frozen=True)
class ShapesVideoDataset:
    """A split of the shapes-video world: an endless, seeded stream of clips.

    Sample ``i`` is the combination at position ``i mod N`` of a seeded permutation of the split
    (a new permutation each pass), rendered with jitter seeded by ``(seed, i)``.

    Attributes:
        split: ``"train"`` or ``"eval"`` (held-out combinations).
        resolution: Frame side in pixels (64 for models, 32 for tests).
        frames: Frames per clip.
        seed: Seeds the order and every clip's jitter.
        jitter: Vary start, size and rotation slightly per clip.
    """

    split: str = "train"
    resolution: int = 64
    frames: int = FRAMES
    seed: int = 0
    jitter: bool = True
    _clips: tuple[MotionClip, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 2 <= self.frames <= 64:
            raise ValueError(f"frames must be in 2..64, got {self.frames}")
        if self.resolution not in (32, 64):
            raise ValueError(f"resolution must be 32 or 64, got {self.resolution}")
        object.__setattr__(self, "_clips", tuple(clips(self.split)))

    @property
    def combinations(self) -> tuple[MotionClip, ...]:
        return self._clips

    def __len__(self) -> int:
        return len(self._clips)

    def clip_at(self, index: int) -> MotionClip:
        n = len(self._clips)
        epoch, position = divmod(index, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 10_007 + epoch + 71))
        return self._clips[int(order[position])]

    def batch(self, first_index: int, count: int) -> VideoBatch:
        """Clips ``first_index … first_index + count - 1`` of the stream."""
        chosen = [self.clip_at(first_index + i) for i in range(count)]
        parts = [
            render_clip(c, self.resolution, self.frames, torch.Generator().manual_seed(_sample_seed(self.seed, first_index + i)), self.jitter)
            for i, c in enumerate(chosen)
        ]
        rendered = RenderedClips(
            torch.cat([p.video for p in parts]), torch.cat([p.mask for p in parts]), torch.cat([p.centres for p in parts])
        )
        return VideoBatch(rendered, tuple(chosen))

    def __dagfusion_fingerprint__(self) -> str:
        return f"shapes-video:{self.split}:{self.resolution}:{self.frames}:{self.seed}:{self.jitter}"

    def describe(self) -> dict[str, Any]:
        return {"split": self.split, "resolution": self.resolution, "frames": self.frames, "combinations": len(self)}


# --- scoring motion ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Motion:
    """The motion read from a clip: ``velocity`` (dx, dy per frame, fractions of the side), the
    named ``direction`` and ``speed`` nearest to it, and whether an object was found in enough frames."""

    velocity: tuple[float, float]
    direction: str
    speed: str
    found: bool


def centroids(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids ``(F, 2)`` (x, y as fractions of the side) of per-frame object masks ``(F, 1, H, W)``
    and which frames hold an object (``(F,)`` bool: at least 4 pixels' worth of mask)."""
    frames, _, height, width = masks.shape
    weight = masks[:, 0].clamp(0, 1)
    total = weight.sum(dim=(1, 2))
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    cx = (weight * xs.view(1, 1, -1)).sum(dim=(1, 2)) / total.clamp_min(1e-6)
    cy = (weight * ys.view(1, -1, 1)).sum(dim=(1, 2)) / total.clamp_min(1e-6)
    return torch.stack([cx, cy], dim=1), total >= 4.0


def motion_from_masks(masks: torch.Tensor) -> Motion:
    """The motion of one clip from its per-frame object masks ``(F, 1, H, W)``: a least-squares
    line through the centroids of the frames with an object gives the velocity; the direction is
    the velocity's dominant axis and sign, the speed the nearest of :data:`SPEEDS` — or
    ``"still"`` (direction ``"none"``) below :data:`STILL_BELOW` per frame. Fewer than half the
    frames with an object: ``found`` is false (direction and speed ``"none"``)."""
    points, present = centroids(masks)
    index = torch.arange(points.shape[0], dtype=torch.float32)[present]
    points = points[present]
    if points.shape[0] < max(2, masks.shape[0] // 2):
        return Motion((0.0, 0.0), "none", "none", False)
    t = index - index.mean()
    denominator = float((t * t).sum())
    vx = float((t * (points[:, 0] - points[:, 0].mean())).sum()) / denominator
    vy = float((t * (points[:, 1] - points[:, 1].mean())).sum()) / denominator
    if abs(vx) >= abs(vy):
        direction = "right" if vx > 0 else "left"
    else:
        direction = "down" if vy > 0 else "up"
    magnitude = math.hypot(vx, vy)
    if magnitude < STILL_BELOW:
        return Motion((vx, vy), "none", "still", True)
    speed = min(SPEEDS, key=lambda name: abs(SPEEDS[name][1] - magnitude))
    return Motion((vx, vy), direction, speed, True)
