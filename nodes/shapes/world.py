"""The vocabulary of the shapes world: attributes, captions and their parsing.

A single-object scene has five attributes — colour, shape, position, size, background — and
the caption ``"a {size} {colour} {shape} {position phrase} on a {background} background"``,
e.g. ``"a large red circle on the left on a black background"``. A two-object scene places two
objects in a relation: ``"a red circle above a blue square on a black background"``.

The evaluation split is a fixed set of held-out attribute combinations (about one in eight,
chosen by a stable hash, covering every attribute value), so models are measured on prompts
they never saw.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.16, 0.16),
    "green": (0.16, 0.78, 0.24),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.86, 0.16),
    "purple": (0.63, 0.24, 0.78),
    "orange": (0.98, 0.55, 0.12),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "gray": (0.5, 0.5, 0.5),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 0.14, "large": 0.27}
"""Object radius as a fraction of the image side."""
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
"""Object centre ``(x, y)`` as fractions of the image side."""
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATIONS: dict[str, tuple[str, str]] = {
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
    "left of": ("left", "right"),
    "right of": ("right", "left"),
}
"""Relation → (position of the first object, position of the second)."""

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": tuple(POSITIONS),
    "size": tuple(SIZES),
    "background": tuple(BACKGROUNDS),
}
"""Every single-object attribute and its values, in the order classifiers predict them."""


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    position: str
    size: str


@dataclass(frozen=True)
class Scene:
    """One or two objects on a background; ``relation`` is set for two-object scenes."""

    objects: tuple[ShapeObject, ...]
    background: str
    relation: str | None = None

    @property
    def caption(self) -> str:
        if len(self.objects) == 1:
            o = self.objects[0]
            return f"a {o.size} {o.colour} {o.shape} {POSITION_PHRASES[o.position]} on a {self.background} background"
        a, b = self.objects
        return f"a {a.colour} {a.shape} {self.relation} a {b.colour} {b.shape} on a {self.background} background"

    def labels(self) -> dict[str, str]:
        """Attribute labels of a single-object scene (``{"colour": "red", …}``)."""
        if len(self.objects) != 1:
            raise ValueError("attribute labels exist for single-object scenes only")
        o = self.objects[0]
        return {"colour": o.colour, "shape": o.shape, "position": o.position, "size": o.size, "background": self.background}


def _stable_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def single_object_scenes() -> list[Scene]:
    """Every single-object combination (6 colours × 4 shapes × 5 positions × 2 sizes × 3 backgrounds)."""
    return [
        Scene((ShapeObject(c, s, p, z),), b)
        for c, s, p, z, b in itertools.product(COLOURS, SHAPES, POSITIONS, SIZES, BACKGROUNDS)
    ]


def two_object_scenes() -> list[Scene]:
    """Every two-object combination with a relation (distinct colours)."""
    scenes = []
    for (c1, s1), (c2, s2) in itertools.permutations(itertools.product(COLOURS, SHAPES), 2):
        if c1 == c2:
            continue
        for relation, (p1, p2) in RELATIONS.items():
            for b in BACKGROUNDS:
                scenes.append(Scene((ShapeObject(c1, s1, p1, "small"), ShapeObject(c2, s2, p2, "small")), b, relation))
    return scenes


EVAL_FRACTION = 0.125


def is_held_out(scene: Scene) -> bool:
    """Whether a scene's combination belongs to the evaluation split (stable across versions)."""
    return _stable_fraction(scene.caption) < EVAL_FRACTION


def scenes(split: str, objects: int = 1) -> list[Scene]:
    """The scenes of ``split`` (``"train"`` or ``"eval"``) with 1 or 2 objects."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if objects not in (1, 2):
        raise ValueError(f"objects must be 1 or 2, got {objects!r}")
    pool = single_object_scenes() if objects == 1 else two_object_scenes()
    held = split == "eval"
    return [s for s in pool if is_held_out(s) == held]


_SINGLE = re.compile(
    r"^a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) (?P<phrase>on the left|on the right|at the top|at the bottom|in the center)"
    r" on an? (?P<background>\w+) background$"
)
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}


def parse_caption(caption: str) -> Scene | None:
    """The single-object scene a caption describes, or ``None`` if it is not one."""
    match = _SINGLE.match(caption.strip().lower())
    if match is None:
        return None
    g = match.groupdict()
    if g["size"] not in SIZES or g["colour"] not in COLOURS or g["shape"] not in SHAPES or g["background"] not in BACKGROUNDS:
        return None
    return Scene((ShapeObject(g["colour"], g["shape"], _PHRASE_TO_POSITION[g["phrase"]], g["size"]),), g["background"])


_PAIR = re.compile(
    r"^an? (?P<colour1>\w+) (?P<shape1>\w+) (?P<relation>above|below|left of|right of) an? (?P<colour2>\w+) (?P<shape2>\w+)"
    r" on an? (?P<background>\w+) background$"
)

SINGLE_GRAMMAR = "a {size} {colour} {shape} {on the left|on the right|at the top|at the bottom|in the center} on a {background} background"
PAIR_GRAMMAR = "a {colour} {shape} {above|below|left of|right of} a {colour} {shape} on a {background} background"
GRAMMAR = (
    f"'{SINGLE_GRAMMAR}' or '{PAIR_GRAMMAR}' with colour in {', '.join(COLOURS)}; shape in {', '.join(SHAPES)}; "
    f"size in {', '.join(SIZES)}; background in {', '.join(BACKGROUNDS)}"
)
"""The caption grammar of the shapes world, in words (for error messages)."""


def parse_pair_caption(caption: str) -> Scene | None:
    """The two-object scene a relation caption describes (both objects small, positioned by the
    relation as :data:`RELATIONS` says), or ``None`` if it is not one. Unlike the dataset's
    scenes, the two colours may be equal."""
    match = _PAIR.match(" ".join(caption.strip().lower().split()))
    if match is None:
        return None
    g = match.groupdict()
    if (
        g["colour1"] not in COLOURS or g["colour2"] not in COLOURS or g["shape1"] not in SHAPES
        or g["shape2"] not in SHAPES or g["background"] not in BACKGROUNDS
    ):
        return None
    p1, p2 = RELATIONS[g["relation"]]
    return Scene(
        (ShapeObject(g["colour1"], g["shape1"], p1, "small"), ShapeObject(g["colour2"], g["shape2"], p2, "small")),
        g["background"],
        g["relation"],
    )


def parse_any_caption(caption: str) -> Scene | None:
    """The scene of a single-object or a two-object caption, or ``None`` if it is neither."""
    return parse_caption(caption) or parse_pair_caption(caption)
