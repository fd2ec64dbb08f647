"""Structure metrics: how well generated images follow the structure they were asked for.

``MaskIoU`` segments the objects of each generated image with the method of
``ObjectMaskFromImage`` (:func:`dagfusion.nodes.structure.maps.segment_objects`: border-median
background colour, colour-distance threshold, 8-connected components) and compares them with
the objects asked for:

- against an ``OBJECT_MASK`` (B, K, H, W): reference pixels above 0.5 (a mask of another size
  is resized, nearest) against the segmented masks;
- against a ``LAYOUT``: each layout box against the bounding box of a segmented object.

``mode="objects"``: the segmented objects are matched one-to-one to the reference objects (the
assignment with the largest total IoU; exhaustive up to 7 objects, greedy above) and an image
scores ``sum(matched IoU) / max(reference objects, segmented objects)`` — a missing object and
an extra object both cost. ``mode="union"``: the IoU of the union of all segmented objects
with the union of all reference objects (boxes filled, for a layout). An image where both are
empty scores 1. The node returns the score per image and their mean.
"""

from __future__ import annotations

import itertools
from typing import Any

from dagfusion import FLOAT, INT, LIST, STRING, Input, Output, RunContext, node, union
from dagfusion.errors import NodeInputError
from dagfusion.nodes.diffusion.types import IMAGE
from dagfusion.nodes.structure.maps import check_image, check_map, segment_objects
from dagfusion.nodes.structure.types import LAYOUT, OBJECT_MASK

EXHAUSTIVE_UP_TO = 7
"""Matchings with at most this many objects are found by trying every assignment."""


def _iou(a: Any, b: Any) -> float:
    inter = float((a & b).sum())
    union_ = float((a | b).sum())
    return 1.0 if union_ == 0 else inter / union_


def _box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return 1.0 if area <= 0 else inter / area


def best_matching(table: list[list[float]]) -> float:
    """The largest total of a one-to-one assignment of rows to columns of an IoU table."""
    rows = len(table)
    cols = len(table[0]) if rows else 0
    if rows == 0 or cols == 0:
        return 0.0
    if max(rows, cols) <= EXHAUSTIVE_UP_TO:
        if rows <= cols:
            return max(sum(table[r][c] for r, c in zip(range(rows), perm)) for perm in itertools.permutations(range(cols), rows))
        return max(sum(table[r][c] for c, r in zip(range(cols), perm)) for perm in itertools.permutations(range(rows), cols))
    pairs = sorted(((table[r][c], r, c) for r in range(rows) for c in range(cols)), reverse=True)
    used_r: set[int] = set()
    used_c: set[int] = set()
    total = 0.0
    for value, r, c in pairs:
        if r not in used_r and c not in used_c:
            used_r.add(r)
            used_c.add(c)
            total += value
    return total


def _mask_box(mask: Any) -> tuple[float, float, float, float]:
    h, w = mask.shape
    ys, xs = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    return (float(xs[0]) / w, float(ys[0]) / h, float(xs[-1] + 1) / w, float(ys[-1] + 1) / h)


def mask_iou(images: Any, reference: Any, mode: str = "objects", threshold: float = 0.2, min_area: float = 0.002) -> list[float]:
    """Per-image IoU of the objects segmented in ``images`` with ``reference`` (an OBJECT_MASK
    tensor or a :class:`~dagfusion.nodes.structure.data.Layout`), see the module docstring."""
    from torch.nn import functional as F

    from dagfusion.nodes.structure.data import Layout
    from dagfusion.nodes.structure.layout import rasterise

    b, _, h, w = images.shape
    if isinstance(reference, Layout):
        boxes = [[o.box for o in row] for row in reference.rows]
        wanted = max(1, max((len(r) for r in boxes), default=1))
        ref_masks = rasterise(reference, h, w)[0] > 0.5
    else:
        ref = reference.float()
        if ref.shape[-2:] != (h, w):
            ref = F.interpolate(ref, size=(h, w), mode="nearest-exact")
        ref_masks = ref > 0.5
        boxes = None
        wanted = ref_masks.shape[1]
    found, _ = segment_objects(images, threshold, min_area, max_objects=max(wanted + 2, 2))
    found = found > 0.5
    scores = []
    for i in range(b):
        if mode == "union":
            scores.append(_iou(found[i].any(dim=0), ref_masks[i].any(dim=0)))
            continue
        seg = [found[i, k] for k in range(found.shape[1]) if bool(found[i, k].any())]
        if boxes is not None:
            refs_box = boxes[i]
            seg_boxes = [_mask_box(m) for m in seg]
            table = [[_box_iou(r, s) for s in seg_boxes] for r in refs_box]
            count = max(len(refs_box), len(seg_boxes))
        else:
            refs = [ref_masks[i, k] for k in range(ref_masks.shape[1]) if bool(ref_masks[i, k].any())]
            table = [[_iou(r, s) for s in seg] for r in refs]
            count = max(len(refs), len(seg))
        scores.append(1.0 if count == 0 else best_matching(table) / count)
    return scores


def _example() -> dict[str, Any]:
    from dagfusion.nodes.structure.layout import render_structure

    r = render_structure(["a red circle above a blue square on a black background",
                          "a large green triangle on the left on a white background"], 32, "solid")
    return {"images": r["image"], "reference": r["object_mask"]}


def _layout_example() -> dict[str, Any]:
    from dagfusion.nodes.structure.layout import render_structure

    r = render_structure(["a yellow cross left of a purple circle on a gray background"], 32, "flat")
    return {"images": r["image"], "reference": r["layout"], "mode": "union"}


@node(
    "dagfusion.structure.MaskIoU",
    version="1.0.0",
    category="structure",
    inputs=[
        Input("images", IMAGE, description="Generated images (B, 3, H, W) of objects on a plain background."),
        Input("reference", union(OBJECT_MASK, LAYOUT), description="What was asked for: object masks or a layout (one row per image)."),
        Input("mode", STRING, "objects", choices=("objects", "union"),
              description="'objects': objects matched one-to-one (missing and extra objects cost); 'union': all objects together."),
        Input("threshold", FLOAT, 0.2, min=0.0, max=2.0, description="Segmentation: RGB distance to the background colour above which a pixel is an object."),
        Input("min_area", FLOAT, 0.002, min=0.0, max=1.0, description="Segmentation: smallest object kept, as a fraction of the image."),
    ],
    outputs=[
        Output("per_image", LIST, "IoU per image, in [0, 1]."),
        Output("mean", FLOAT, "Mean IoU over the images."),
        Output("count", INT, "Number of images scored."),
    ],
    examples=[_example, _layout_example],
)
def mask_iou_node(ctx: RunContext, images: Any, reference: Any, mode: str, threshold: float, min_area: float) -> dict[str, Any]:
    """IoU between the objects segmented in generated images and the object masks or layout asked for."""
    from dagfusion.nodes.structure.data import Layout

    check_image(images, "images")
    if isinstance(reference, Layout):
        rows = len(reference)
    else:
        check_map(reference, "reference", "OBJECT_MASK")
        rows = int(reference.shape[0])
    if rows != int(images.shape[0]):
        raise NodeInputError("reference", f"expected one reference per image ({images.shape[0]}), got {rows}")
    scores = mask_iou(images, reference, mode, threshold, min_area)
    return {"per_image": scores, "mean": sum(scores) / len(scores), "count": len(scores)}


NODES = (mask_iou_node,)
