"""A new colour for the shapes world: renders and captions of a colour the world (and the
embedded models) do not know, for teaching it to a model (a LoRA) and measuring what it learnt.

The world's six colours (:data:`~dagfusion.nodes.shapes.world.COLOURS`) stay as they are (the
shipped ShapeEval reads exactly those). A :class:`ConceptDataset` renders single-object scenes
whose object has the new colour — every shape, position, size and background — with captions
in the world's grammar, e.g. ``"a large pink circle on the left on a black background"``.

The new colour's 4 × 5 × 2 × 3 = 120 combinations of shape, position, size and background are
split by a stable hash of their caption: about :data:`CONCEPT_EVAL_FRACTION` of them (every
attribute value among them) form the ``"eval"`` split, never trained on; the rest form
``"train"``. A fraction ``mix`` of a dataset's samples are ordinary world scenes of the same
split (prior preservation: training on them keeps what the model already knows).

Objects are drawn by the world's renderer in a stand-in colour and recoloured through their
coverage mask: the flat style paints ``background * (1 - cover) + colour * cover``, so adding
``(new - stand-in) * cover`` gives exactly the render in the new colour.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import TYPE_CHECKING, Any

from dagfusion import (
    FLOAT,
    INT,
    LIST,
    SEED,
    STRING,
    Input,
    NodeInputError,
    Output,
    RunContext,
    node,
    union,
)
from dagfusion.nodes.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    _stable_fraction,
    parse_caption,
)

if TYPE_CHECKING:
    from dagfusion.nodes.shapes.dataset import ShapesBatch, ShapesDataset

CONCEPT_COLOURS: dict[str, tuple[float, float, float]] = {"pink": (0.98, 0.45, 0.75)}
"""Colours outside the world that need no ``rgb``: pink is at least 0.41 (RGB distance) from every
world colour (purple 0.41, orange 0.64, red 0.66) and 0.60 from the white background."""
CONCEPT_EVAL_FRACTION = 0.4
"""About this fraction of a new colour's combinations is held out (the ``"eval"`` split)."""
MIN_DISTANCE = 0.25
"""A new colour must be at least this far (Euclidean RGB distance) from every world colour and
background (segmentation separates objects from the background at 0.2)."""
STAND_IN = "red"
"""The world colour the renderer paints new-colour objects in before they are recoloured."""
_RESERVED = set(COLOURS) | set(BACKGROUNDS) | set(SHAPES) | set(SIZES) | set(POSITIONS)


class ConceptInputError(ValueError):
    """An unacceptable colour, rgb, split or mix; ``input`` names the input."""

    def __init__(self, input: str, message: str) -> None:
        self.input = input
        self.message = message
        super().__init__(f"input '{input}': {message}")


def parse_rgb(rgb: Any) -> tuple[float, float, float] | None:
    """``rgb`` given as three numbers or ``"r,g,b"`` (``None``/``""``: not given), in [0, 1].

    :raises ConceptInputError: not three numbers in [0, 1].
    """
    if rgb is None or (isinstance(rgb, str) and not rgb.strip()):
        return None
    if isinstance(rgb, str):
        parts: list[Any] = [p for p in rgb.replace(" ", ",").split(",") if p]
    elif isinstance(rgb, (list, tuple)):
        parts = list(rgb)
    else:
        raise ConceptInputError("rgb", f"expected three numbers in [0, 1] or 'r,g,b', got {rgb!r}")
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ConceptInputError("rgb", f"expected three numbers in [0, 1] or 'r,g,b', got {rgb!r}") from None
    if len(values) != 3:
        raise ConceptInputError("rgb", f"expected three numbers (r, g, b), got {len(values)}: {rgb!r}")
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise ConceptInputError("rgb", f"expected each of r, g, b in [0, 1], got {values}")
    return values  # type: ignore[return-value]


def resolve_colour(colour: str, rgb: Any = None) -> tuple[str, tuple[float, float, float]]:
    """The new colour's name and RGB: ``rgb`` if given, else the known :data:`CONCEPT_COLOURS`.

    :raises ConceptInputError: ``colour`` is not one lowercase word, is a word of the world's
        vocabulary, or is unknown without ``rgb``; ``rgb`` is malformed, outside [0, 1], or within
        :data:`MIN_DISTANCE` of a world colour or background.
    """
    name = str(colour).strip()
    if not name.isalpha() or not name.islower():
        raise ConceptInputError("colour", f"expected one lowercase word such as 'pink', got {colour!r}")
    if name in _RESERVED:
        what = "world colour" if name in COLOURS else "word of the shapes world"
        raise ConceptInputError("colour", f"{name!r} is already a {what}; give a new colour name (e.g. 'pink')")
    value = parse_rgb(rgb)
    if value is None:
        if name not in CONCEPT_COLOURS:
            raise ConceptInputError(
                "rgb", f"the colour {name!r} is unknown (known without rgb: {', '.join(CONCEPT_COLOURS)}); give its rgb, e.g. '0.1,0.6,0.6'"
            )
        value = CONCEPT_COLOURS[name]
    for other, ref in {**COLOURS, **{f"{k} background": v for k, v in BACKGROUNDS.items()}}.items():
        distance = math.dist(value, ref)
        if distance < MIN_DISTANCE:
            raise ConceptInputError(
                "rgb", f"{value} is {distance:.2f} from {other} {ref}; a new colour must be at least {MIN_DISTANCE} away from "
                       f"every world colour and background"
            )
    return name, value


def concept_scenes(colour: str, split: str) -> list[Scene]:
    """The single-object scenes of ``colour`` in ``split`` (``"train"`` or ``"eval"``), canonical order."""
    if split not in ("train", "eval"):
        raise ConceptInputError("split", f"expected 'train' or 'eval', got {split!r}")
    held = split == "eval"
    pool = [
        Scene((ShapeObject(colour, s, p, z),), b) for s, p, z, b in itertools.product(SHAPES, POSITIONS, SIZES, BACKGROUNDS)
    ]
    return [s for s in pool if is_concept_held_out(s) == held]


def is_concept_held_out(scene: Scene) -> bool:
    """Whether a new-colour scene's combination belongs to the held-out (``"eval"``) split."""
    return _stable_fraction("concept:" + scene.caption) < CONCEPT_EVAL_FRACTION


def parse_concept_caption(caption: str, colour: str) -> Scene | None:
    """The single-object scene of a caption in the world's grammar whose colour is ``colour`` (or a
    world colour), or ``None`` if it is not one."""
    words = caption.strip().lower().split()
    if len(words) < 3 or words[2] != colour:
        return parse_caption(caption)
    scene = parse_caption(" ".join([*words[:2], STAND_IN, *words[3:]]))
    if scene is None:
        return None
    return dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], colour=colour),))


def _define_dataset() -> type:
    """Build :class:`ConceptDataset` (it subclasses the torch-backed world dataset, so it is defined
    on first use: registering the pack imports no torch)."""
    from dataclasses import dataclass, field

    import torch
    from dagfusion.nodes.shapes.dataset import ShapesBatch, ShapesDataset
    from dagfusion.nodes.shapes.render import layout_row, render_batch

    @dataclass(frozen=True)
    class ConceptDataset(ShapesDataset):
        """Single-object scenes of a new colour (see the module docstring), optionally mixed with
        ordinary world scenes of the same split; flat style only.

        Attributes (beyond :class:`~dagfusion.nodes.shapes.dataset.ShapesDataset`'s):
            colour: The new colour's name (one lowercase word outside the world's vocabulary).
            rgb: Its RGB in [0, 1].
            mix: Fraction of samples that are ordinary world scenes (0 ≤ mix < 1): sample ``i`` is
                one when ``floor((i + 1) · mix) > floor(i · mix)``.
        """

        colour: str = "pink"
        rgb: tuple[float, float, float] = CONCEPT_COLOURS["pink"]
        mix: float = 0.0
        _prior: ShapesDataset | None = field(default=None, init=False, repr=False, compare=False)

        def __post_init__(self) -> None:
            name, value = resolve_colour(self.colour, self.rgb)
            object.__setattr__(self, "rgb", value)
            if self.objects != 1:
                raise ConceptInputError("objects", f"a concept dataset has single-object scenes, got objects={self.objects}")
            if self.style != "flat":
                raise ConceptInputError("style", f"a concept dataset renders the flat style only, got {self.style!r}")
            if not 0.0 <= float(self.mix) < 1.0:
                raise ConceptInputError("mix", f"expected a fraction in [0, 1), got {self.mix!r}")
            object.__setattr__(self, "_scenes", tuple(concept_scenes(name, self.split)))
            if self.mix > 0:
                prior = ShapesDataset(self.split, 1, self.resolution, self.seed, self.jitter, "flat")
                object.__setattr__(self, "_prior", prior)

        def _source(self, index: int) -> tuple[bool, int]:
            """``(is_prior, index in that stream)`` of sample ``index``."""
            before = math.floor(index * self.mix)
            if self._prior is not None and math.floor((index + 1) * self.mix) > before:
                return True, before
            return False, index - before

        def scene_at(self, index: int) -> Scene:
            prior, sub = self._source(index)
            if prior:
                assert self._prior is not None
                return self._prior.scene_at(sub)
            return super().scene_at(sub)

        def batch(self, first_index: int, count: int) -> ShapesBatch:
            """Samples ``first_index … first_index + count - 1``; sample ``i``'s jitter is seeded by
            ``(seed, i)`` as in the world's dataset."""
            chosen = [self.scene_at(first_index + i) for i in range(count)]
            stand_in = [self._stand_in(s) for s in chosen]
            rendered = render_batch(stand_in, self.resolution, self.seed, first_index, self.jitter, "flat")
            image = rendered.image.clone()
            shift = (torch.tensor(self.rgb) - torch.tensor(COLOURS[STAND_IN])).view(3, 1, 1)
            for i, scene in enumerate(chosen):
                if scene.objects[0].colour == self.colour:
                    image[i] = image[i] + shift * rendered.mask[i, :1]
            layout = rendered.layout
            if layout is not None:
                rows = tuple(
                    layout_row(scene, [o.box for o in row], [int(o.depth) for o in row]) for scene, row in zip(chosen, layout.rows)
                )
                layout = dataclasses.replace(layout, rows=rows)
            rendered = dataclasses.replace(rendered, image=image.clamp(0, 1), layout=layout)
            return ShapesBatch(rendered, tuple(s.caption for s in chosen), tuple(chosen))

        def _stand_in(self, scene: Scene) -> Scene:
            obj = scene.objects[0]
            if obj.colour != self.colour:
                return scene
            return dataclasses.replace(scene, objects=(dataclasses.replace(obj, colour=STAND_IN),))

        def prompts(self) -> list[str]:
            """The captions of the new colour's distinct scenes in the split (no world scenes)."""
            return [s.caption for s in self._scenes]

        def __dagfusion_fingerprint__(self) -> str:
            r, g, b = self.rgb
            return (
                f"concept:{self.colour}:{r!r},{g!r},{b!r}:{self.split}:{self.resolution}:{self.seed}:{self.jitter}:{float(self.mix)!r}"
            )

        def describe(self) -> dict[str, Any]:
            return {
                "split": self.split, "colour": self.colour, "rgb": list(self.rgb), "mix": float(self.mix),
                "resolution": self.resolution, "scenes": len(self),
            }

    ConceptDataset.__module__ = __name__
    ConceptDataset.__qualname__ = "ConceptDataset"
    return ConceptDataset


def __getattr__(name: str) -> Any:
    if name == "ConceptDataset":
        cls = globals().get("_ConceptDataset")
        if cls is None:
            cls = globals()["_ConceptDataset"] = _define_dataset()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def concept_dataset(
    colour: str = "pink", rgb: Any = None, split: str = "train", resolution: int = 64, seed: int = 0, mix: float = 0.0,
    jitter: bool = True,
) -> Any:
    """A :class:`ConceptDataset` with ``rgb`` as three numbers, ``"r,g,b"`` or nothing (a known colour)."""
    name, value = resolve_colour(colour, rgb)
    cls = __getattr__("ConceptDataset")
    return cls(split=split, objects=1, resolution=resolution, seed=seed, jitter=jitter, style="flat",
                          colour=name, rgb=value, mix=mix)


def _example(**kwargs: Any) -> dict[str, Any]:
    return {"colour": "pink", "rgb": "", "split": "train", "resolution": 32, "seed": 0, "mix": 0.0, **kwargs}


@node(
    "dagfusion.shapes.ConceptDataset",
    version="1.0.0",
    category="shapes",
    inputs=[
        Input("colour", STRING, "pink",
              description="The new colour's name: one lowercase word outside the world's vocabulary ('pink' needs no rgb)."),
        Input("rgb", union(STRING, LIST), "",
              description="Its RGB in [0, 1]: three numbers or 'r,g,b' (empty: the known colour of that name); at least "
                          f"{MIN_DISTANCE} from every world colour and background."),
        Input("split", STRING, "train", choices=("train", "eval"),
              description=f"'eval': about {CONCEPT_EVAL_FRACTION:.0%} of the colour's shape x position x size x background "
                          "combinations, held out; 'train': the rest."),
        Input("resolution", INT, 64, choices=(32, 64), description="Image side in pixels (64 for models, 32 for tests)."),
        Input("seed", SEED, 0, min=0, description="Seeds the scene order and every sample's jitter."),
        Input("mix", FLOAT, 0.25, min=0.0, max=0.9,
              description="Fraction of samples that are ordinary world scenes of the same split (prior preservation)."),
    ],
    outputs=[
        Output("dataset", "SHAPES_DATASET", "Renders of the new colour (and the mixed-in world scenes) with captions."),
        Output("scenes", INT, "Number of distinct new-colour scenes in the split."),
    ],
    examples=[
        _example(),
        _example(colour="teal", rgb="0.1, 0.6, 0.6", split="eval", mix=0.5, seed=3),
    ],
)
def concept_dataset_node(ctx: RunContext, colour: str, rgb: Any, split: str, resolution: int, seed: int, mix: float) -> tuple[Any, int]:
    """A colour the shapes world lacks, as a training dataset: single-object scenes of the new colour
    with every shape, position, size and background, captioned like "a large pink circle on the left
    on a black background", mixed with ordinary world scenes; 'eval' holds out combinations."""
    try:
        data = concept_dataset(colour, rgb, split, resolution, seed, mix)
    except ConceptInputError as error:
        raise NodeInputError(error.input, error.message) from None
    return data, len(data)


NODES = (concept_dataset_node,)
