"""The procedural shapes dataset: an endless, seeded stream of rendered scenes.

Sample ``i`` of a dataset is the scene at position ``i mod N`` of a seeded permutation of the
split's N scenes (a new permutation each pass), rendered with jitter seeded by ``(seed, i)`` —
so any batch can be rebuilt exactly from ``(dataset, first index, count)`` without storing
images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dagfusion.nodes.shapes.render import STYLES, Rendered, render_batch
from dagfusion.nodes.shapes.world import Scene, scenes


@dataclass(frozen=True)
class ShapesBatch:
    """Rendered samples with their captions and (single-object) attribute labels."""

    rendered: Rendered
    captions: tuple[str, ...]
    scenes: tuple[Scene, ...]

    @property
    def images(self) -> torch.Tensor:
        return self.rendered.image


@dataclass(frozen=True)
class ShapesDataset:
    """A split of the shapes world at one resolution.

    Attributes:
        split: ``"train"`` or ``"eval"`` (held-out attribute combinations).
        objects: 1 (attribute scenes) or 2 (two objects in a relation).
        resolution: Image side in pixels (64 for models, 32 for tests).
        seed: Seeds the order of scenes and every sample's jitter.
        jitter: Randomise position, size and rotation slightly per sample.
        style: ``"flat"`` (default: 2-D shapes, what the embedded models were trained on) or
            ``"solid"`` (shaded 3-D solids with depth, normals and occlusion; see
            :mod:`dagfusion.nodes.shapes.solid`).
    """

    split: str = "train"
    objects: int = 1
    resolution: int = 64
    seed: int = 0
    jitter: bool = True
    style: str = "flat"
    _scenes: tuple[Scene, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        object.__setattr__(self, "_scenes", tuple(scenes(self.split, self.objects)))

    @property
    def scenes(self) -> tuple[Scene, ...]:
        """The distinct scenes of the split, in canonical order."""
        return self._scenes

    def __len__(self) -> int:
        """The number of distinct scenes (the stream itself is endless)."""
        return len(self._scenes)

    def scene_at(self, index: int) -> Scene:
        n = len(self._scenes)
        epoch, position = divmod(index, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 10_007 + epoch))
        return self._scenes[int(order[position])]

    def batch(self, first_index: int, count: int) -> ShapesBatch:
        """Samples ``first_index … first_index + count - 1`` of the stream."""
        chosen = [self.scene_at(first_index + i) for i in range(count)]
        rendered = render_batch(chosen, self.resolution, self.seed, first_index, self.jitter, self.style)
        return ShapesBatch(rendered, tuple(s.caption for s in chosen), tuple(chosen))

    def prompts(self) -> list[str]:
        """The captions of every distinct scene of the split."""
        return [s.caption for s in self._scenes]

    def __dagfusion_fingerprint__(self) -> str:
        flat = f"shapes:{self.split}:{self.objects}:{self.resolution}:{self.seed}:{self.jitter}"
        return flat if self.style == "flat" else f"{flat}:{self.style}"

    def describe(self) -> dict[str, Any]:
        described = {"split": self.split, "objects": self.objects, "resolution": self.resolution, "scenes": len(self)}
        return described if self.style == "flat" else {**described, "style": self.style}
