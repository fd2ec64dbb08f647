"""The colour of a generated object, read from its pixels (no classifier).

Each image's object is segmented against the plain background
(:func:`~dagfusion.nodes.structure.maps.segment_objects`: the border's median colour, a
colour-distance threshold, the largest connected component); its colour is the mean RGB of the
object's pixels — its interior (the mask eroded by one pixel, so anti-aliased edges blended with
the background do not count) when that keeps at least :data:`MIN_INTERIOR` pixels — classified
to the nearest colour of a palette (Euclidean RGB distance). The default palette is the shapes
world's six colours plus the concept colours (:data:`~dagfusion.nodes.shapes.concept.CONCEPT_COLOURS`:
pink), so it tells whether a model draws a colour it was taught, unlike ShapeEval, which knows
the six world colours only.

An image in which nothing stands out from the background reads as ``"none"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagfusion import (
    DICT,
    FLOAT,
    LIST,
    STRING,
    Input,
    NodeInputError,
    Output,
    RunContext,
    node,
    union,
)

NONE = "none"
"""The colour name of an image with no object found."""
MIN_INTERIOR = 4
"""The fewest interior pixels for the eroded mask to be used (else the whole mask)."""


def palette() -> dict[str, tuple[float, float, float]]:
    """The default palette: the world's colours and the concept colours."""
    from dagfusion.nodes.shapes.concept import CONCEPT_COLOURS
    from dagfusion.nodes.shapes.world import COLOURS

    return {**COLOURS, **CONCEPT_COLOURS}


def object_rgb(images: Any) -> tuple[Any, list[bool]]:
    """The mean RGB (B, 3) of each image's segmented object, and whether one was found (the RGB
    of an image without one is NaN)."""
    import torch
    from dagfusion.nodes.structure.maps import segment_objects
    from torch.nn import functional as F

    images = images[:, :3].float().clamp(0, 1)
    masks, counts = segment_objects(images, max_objects=1)
    mask = masks[:, :1]
    interior = -F.max_pool2d(-mask, 3, stride=1, padding=1)  # erosion by one pixel
    use = torch.where((interior.flatten(1).sum(dim=1) >= MIN_INTERIOR).view(-1, 1, 1, 1), interior, mask)
    area = use.flatten(1).sum(dim=1)
    total = (images * use).flatten(2).sum(dim=2)
    rgb = total / area.clamp(min=1).unsqueeze(1)
    found = [bool(c > 0 and a > 0) for c, a in zip(counts, area.tolist())]
    rgb[~torch.tensor(found, dtype=torch.bool)] = float("nan")
    return rgb, found


def nearest_colour(rgb: Any, colours: Mapping[str, tuple[float, float, float]] | None = None) -> list[str]:
    """The nearest palette colour's name for each row of ``rgb`` (B, 3); NaN rows read ``"none"``."""
    import torch

    colours = dict(colours or palette())
    names = list(colours)
    table = torch.tensor([colours[n] for n in names], dtype=torch.float32)
    distance = torch.cdist(rgb.float(), table)
    out = []
    for row, d in zip(rgb, distance):
        out.append(NONE if bool(torch.isnan(row).any()) else names[int(d.argmin())])
    return out


def object_colours(images: Any, colours: Mapping[str, tuple[float, float, float]] | None = None) -> tuple[list[str], Any]:
    """``(names, rgb)``: each image's object colour (nearest of ``colours``, default :func:`palette`)
    and its mean RGB (B, 3)."""
    rgb, _ = object_rgb(images)
    return nearest_colour(rgb, colours), rgb


def calibrated_palette(
    images: Any, colours: list[Any], base: Mapping[str, tuple[float, float, float]] | None = None
) -> dict[str, tuple[float, float, float]]:
    """``base`` (default :func:`palette`) with each colour that ``images`` show replaced by the mean
    object RGB of those images (e.g. VAE round trips of renders: the palette as the VAE draws it).
    ``colours`` gives each image's colour: a name or a label dict with a ``"colour"`` key.

    :raises ValueError: a count mismatch or an unknown colour.
    """
    import torch

    table = dict(base or palette())
    names = [str(c["colour"] if isinstance(c, Mapping) else c).strip().lower() for c in colours]
    if len(names) != images.shape[0]:
        raise ValueError(f"expected one colour per reference image ({images.shape[0]}), got {len(names)}")
    unknown = sorted({n for n in names if n not in table})
    if unknown:
        raise ValueError(f"unknown colour(s) {unknown}; the palette is {', '.join(table)}")
    rgb, found = object_rgb(images)
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name and found[i]]
        if rows:
            table[name] = tuple(float(v) for v in rgb[torch.tensor(rows)].mean(dim=0))  # type: ignore[assignment]
    return table


def fraction_read_as(names: list[str], expected: list[str]) -> float:
    """The fraction of images whose object colour is the expected one."""
    if len(names) != len(expected):
        raise ValueError(f"{len(names)} colours but {len(expected)} expected colours")
    return sum(n == e for n, e in zip(names, expected)) / max(1, len(names))


def _example() -> dict[str, Any]:
    from dagfusion.nodes.shapes.concept import concept_dataset

    data = concept_dataset("pink", split="eval", resolution=32, mix=0.5)
    return {"images": data.batch(0, 4).images, "expected": "pink"}


def _calibrated_example() -> dict[str, Any]:
    from dagfusion.nodes.shapes.concept import concept_dataset

    batch = concept_dataset("pink", split="eval", resolution=32, mix=0.5).batch(0, 8)
    labels = [s.labels() for s in batch.scenes]
    return {"images": batch.images[:4], "expected": [lab["colour"] for lab in labels[:4]],
            "reference_images": batch.images, "reference_colours": labels}


@node(
    "dagfusion.metrics.ObjectColour",
    version="1.0.0",
    category="metrics",
    inputs=[
        Input("images", "IMAGE", link_only=True, description="Images of one object on a plain background, (B, 3, H, W) in [0, 1]."),
        Input("expected", union(STRING, LIST), "",
              description="The colour each object should have: one name for all, or one per image (empty: no fraction)."),
        Input("reference_images", "IMAGE", optional=True, link_only=True,
              description="Optional images of known colours (e.g. VAE round trips of renders): each colour they show is "
                          "read against their mean object colour instead of its true RGB."),
        Input("reference_colours", LIST, optional=True, link_only=True,
              description="The reference images' colours: names, or label dicts with 'colour' (dagfusion.shapes.Render's labels)."),
    ],
    outputs=[
        Output("colours", LIST, "Per image: the nearest of the world's six colours and pink ('none': no object found)."),
        Output("palette", DICT, "The palette read against: colour → RGB."),
        Output("rgb", LIST, "Per image: the object's mean RGB (NaN where none was found)."),
        Output("fraction", FLOAT, "Fraction of images whose object has the expected colour (0 without 'expected')."),
        Output("found", FLOAT, "Fraction of images in which an object was found."),
    ],
    examples=[_example, _calibrated_example],
)
def object_colour(
    ctx: RunContext, images: Any, expected: Any, reference_images: Any = None, reference_colours: Any = None
) -> dict[str, Any]:
    """The colour of each image's object: the mean RGB of its segmented pixels, classified to the
    nearest of the shapes world's six colours and pink (which ShapeEval cannot read), optionally
    as reference images show those colours."""
    known = palette()
    if (reference_images is None) != (reference_colours is None):
        missing = "reference_colours" if reference_colours is None else "reference_images"
        raise NodeInputError(missing, "give reference_images and reference_colours together")
    if reference_images is not None:
        try:
            known = calibrated_palette(reference_images, list(reference_colours), known)
        except ValueError as error:
            raise NodeInputError("reference_colours", str(error)) from None
    names, rgb = object_colours(images, known)
    wanted: list[str] = []
    if isinstance(expected, str):
        wanted = [expected.strip().lower()] * len(names) if expected.strip() else []
    else:
        wanted = [str(e).strip().lower() for e in expected]
        if len(wanted) != len(names):
            raise NodeInputError("expected", f"expected one colour per image ({len(names)}), got {len(wanted)}")
    unknown = sorted({w for w in wanted if w not in known})
    if unknown:
        raise NodeInputError("expected", f"unknown colour(s) {unknown}; the palette is {', '.join(known)}")
    found = sum(n != NONE for n in names) / max(1, len(names))
    return {
        "colours": names,
        "rgb": [[round(float(v), 4) for v in row] for row in rgb],
        "palette": {k: [round(float(v), 4) for v in rgb_] for k, rgb_ in known.items()},
        "fraction": fraction_read_as(names, wanted) if wanted else 0.0,
        "found": found,
    }


NODES = (object_colour,)
"""The colour metric's nodes."""
