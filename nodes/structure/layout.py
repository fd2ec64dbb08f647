"""Layouts: the structure a shapes-world caption implies, rasterised layouts and layouts read
from object masks.

- ``LayoutFromPrompt`` parses shapes-world captions — single objects ("a large red circle on
  the left on a black background") and two objects in a relation ("a red circle above a blue
  square on a black background"; both small, the first object at the relation's first position,
  see :data:`dagfusion.nodes.shapes.world.RELATIONS`) — and renders the scene without jitter:
  a :class:`~dagfusion.nodes.structure.data.Layout` plus ``OBJECT_MASK``, ``DEPTH`` and
  ``NORMAL`` maps, in the flat or solid style (:mod:`dagfusion.nodes.shapes.render`). A caption
  outside the grammar is a :class:`~dagfusion.errors.NodeInputError` quoting the grammar.
- ``RasteriseLayout`` fills each object's box into its own mask channel and draws the boxes.
- ``LayoutFromMask`` puts a box around each non-empty mask channel.
"""

from __future__ import annotations

from typing import Any

from dagfusion import FLOAT, INT, LIST, STRING, Input, Output, RunContext, node, union
from dagfusion.errors import NodeInputError
from dagfusion.nodes.diffusion.types import IMAGE
from dagfusion.nodes.structure.maps import check_map
from dagfusion.nodes.structure.types import DEPTH, LAYOUT, NORMAL, OBJECT_MASK

STYLES = ("flat", "solid")
MAX_SIDE = 1024
"""The largest side rendered or rasterised by these nodes."""

_PALETTE = ((0.95, 0.26, 0.21), (0.13, 0.59, 0.95), (0.30, 0.69, 0.31), (1.0, 0.76, 0.03), (0.61, 0.15, 0.69), (1.0, 0.6, 0.0))


def captions_of(prompts: Any, input: str = "prompt") -> list[str]:
    """One caption or a list of captions as a non-empty list of strings.

    :raises NodeInputError: empty, or an element is not a string.
    """
    captions = [prompts] if isinstance(prompts, str) else list(prompts)
    if not captions:
        raise NodeInputError(input, "expected at least one caption, got an empty list")
    for caption in captions:
        if not isinstance(caption, str):
            raise NodeInputError(input, f"expected captions as strings, got {type(caption).__name__}")
    return captions


def scenes_of(captions: list[str], input: str = "prompt") -> list[Any]:
    """The shapes-world scenes of captions.

    :raises NodeInputError: a caption is not in the grammar (the message quotes the grammar).
    """
    from dagfusion.nodes.shapes.world import GRAMMAR, parse_any_caption

    scenes = []
    for caption in captions:
        scene = parse_any_caption(caption)
        if scene is None:
            raise NodeInputError(input, f"{caption!r} is not a shapes-world caption; expected {GRAMMAR}")
        scenes.append(scene)
    return scenes


def render_structure(
    captions: list[str], resolution: int = 64, style: str = "solid", jitter: bool = False, seed: int = 0, input: str = "prompt"
) -> dict[str, Any]:
    """Render captions with their structure: ``image`` (IMAGE), ``depth`` (``DEPTH``, 1 =
    nearest), ``normal``, ``object_mask`` (B, K, H, W; K the most objects of a caption) and
    ``layout``. Sample ``i`` is jittered (if ``jitter``) by the generator of ``(seed, i)``."""
    from dagfusion.nodes.shapes.render import render_batch
    from dagfusion.nodes.shapes.solid import SOLID_NEAR
    from dagfusion.nodes.structure.maps import depth_from_distance

    if style not in STYLES:
        raise NodeInputError("style", f"expected one of {STYLES}, got {style!r}")
    scenes = scenes_of(captions, input)
    r = render_batch(scenes, resolution, seed, 0, jitter, style)
    near = SOLID_NEAR if style == "solid" else 0.0
    return {
        "image": r.image,
        "depth": depth_from_distance(r.depth, near, 1.0),
        "normal": r.normal,
        "object_mask": r.mask,
        "layout": r.layout,
    }


def rasterise(layout: Any, height: int, width: int) -> tuple[Any, Any]:
    """``(masks, drawing)``: masks (B, K, H, W) with object ``k``'s box filled in channel ``k``
    (``K`` the most objects of a row, at least 1; pixels whose centre lies in the box), and an
    IMAGE (B, 3, H, W) of the box outlines on black, each in its object's ``colour`` attribute
    when that is a shapes-world colour, else in a fixed palette."""
    import torch

    from dagfusion.nodes.shapes.world import COLOURS

    k = max(1, max((len(row) for row in layout.rows), default=1))
    b = len(layout.rows)
    masks = torch.zeros(b, k, height, width)
    drawing = torch.zeros(b, 3, height, width)
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    for i, row in enumerate(layout.rows):
        for j, obj in enumerate(row):
            x0, y0, x1, y1 = obj.box
            inside_y = (ys >= y0) & (ys <= y1)
            inside_x = (xs >= x0) & (xs <= x1)
            box = (inside_y.view(-1, 1) & inside_x.view(1, -1)).float()
            masks[i, j] = box
            if box.sum() == 0:
                continue
            eroded = -torch.nn.functional.max_pool2d(-box.view(1, 1, height, width), 3, stride=1, padding=1)
            # outline: box pixels with a neighbour outside the box (image borders count as inside)
            outline = (box > 0) & (eroded.view(height, width) < 1)
            edge = torch.zeros(height, width, dtype=torch.bool)
            rows_in, cols_in = inside_y.nonzero(), inside_x.nonzero()
            top, bottom, left, right = int(rows_in[0]), int(rows_in[-1]), int(cols_in[0]), int(cols_in[-1])
            edge[top, left : right + 1] = True
            edge[bottom, left : right + 1] = True
            edge[top : bottom + 1, left] = True
            edge[top : bottom + 1, right] = True
            outline = outline | edge
            colour = COLOURS.get(obj.attribute("colour") or "", _PALETTE[j % len(_PALETTE)])
            drawing[i][:, outline] = torch.tensor(colour).view(3, 1)
    return masks, drawing


def layout_from_masks(masks: Any, threshold: float = 0.5, labels: list[str] | None = None) -> Any:
    """A layout with one object per non-empty mask channel: the box of the pixels above
    ``threshold`` (pixel edges, fractions of the image), labelled ``labels[k]`` when given."""
    from dagfusion.nodes.structure.data import Layout, LayoutObject

    b, k, h, w = masks.shape
    rows = []
    for i in range(b):
        row = []
        for j in range(k):
            hit = masks[i, j] > threshold
            if not bool(hit.any()):
                continue
            ys, xs = hit.any(dim=1).nonzero(), hit.any(dim=0).nonzero()
            box = (float(xs[0]) / w, float(ys[0]) / h, float(xs[-1] + 1) / w, float(ys[-1] + 1) / h)
            row.append(LayoutObject(box=box, label=labels[j] if labels and j < len(labels) else ""))
        rows.append(tuple(row))
    return Layout(tuple(rows), (h, w))


# --------------------------------------------------------------------------------------------
# nodes


def _layout_example() -> dict[str, Any]:
    return {"layout": render_structure(["a red circle above a blue square on a black background",
                                        "a large green triangle on the left on a white background"], 32)["layout"]}


@node(
    "dagfusion.structure.LayoutFromPrompt",
    version="1.0.0",
    category="structure",
    inputs=[
        Input("prompt", union(STRING, LIST), description="A shapes-world caption, or a list of them (one image each)."),
        Input("resolution", INT, 64, min=8, max=MAX_SIDE, description="Side in pixels of the maps."),
        Input("style", STRING, "solid", choices=STYLES, description="'solid' (3-D solids) or 'flat' (2-D shapes) depth and normals."),
    ],
    outputs=[
        Output("layout", LAYOUT, "Boxes, labels, attributes and depth order of each caption's objects."),
        Output("object_mask", OBJECT_MASK, "(B, K, H, W): each object's visible pixels, in caption order."),
        Output("depth", DEPTH, "(B, 1, H, W), 1 = nearest."),
        Output("normal", NORMAL, "(B, 3, H, W) camera-space unit normals."),
    ],
    examples=[
        {"prompt": "a red circle above a blue square on a black background", "resolution": 32},
        {"prompt": ["a large green triangle on the left on a white background"], "resolution": 32, "style": "flat"},
    ],
)
def layout_from_prompt(ctx: RunContext, prompt: Any, resolution: int, style: str) -> dict[str, Any]:
    """The structure a shapes-world caption implies: layout, object masks, depth and normals
    (rendered without jitter)."""
    r = render_structure(captions_of(prompt), resolution, style)
    return {"layout": r["layout"], "object_mask": r["object_mask"], "depth": r["depth"], "normal": r["normal"]}


@node(
    "dagfusion.structure.RasteriseLayout",
    version="1.0.0",
    category="structure",
    inputs=[
        Input("layout", LAYOUT, link_only=True),
        Input("width", INT, 0, min=0, max=MAX_SIDE, description="Width in pixels (0: the layout's own size)."),
        Input("height", INT, 0, min=0, max=MAX_SIDE, description="Height in pixels (0: the layout's own size)."),
    ],
    outputs=[
        Output("object_mask", OBJECT_MASK, "(B, K, H, W): object k's box filled in channel k."),
        Output("image", IMAGE, "The boxes drawn as outlines on black, in each object's colour."),
    ],
    examples=[_layout_example],
)
def rasterise_layout(ctx: RunContext, layout: Any, width: int, height: int) -> tuple[Any, Any]:
    """Rasterise a layout's boxes into object masks and a box drawing."""
    from dagfusion.nodes.structure.data import Layout

    if not isinstance(layout, Layout):
        raise NodeInputError("layout", f"expected a Layout, got {type(layout).__name__}")
    if len(layout) == 0:
        raise NodeInputError("layout", "expected a layout with at least one image, got none")
    h = height or layout.size[0]
    w = width or layout.size[1]
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise NodeInputError("layout", f"expected a layout size within 1..{MAX_SIDE} pixels, got {layout.size}")
    return rasterise(layout, h, w)


@node(
    "dagfusion.structure.LayoutFromMask",
    version="1.0.0",
    category="structure",
    inputs=[
        Input("object_mask", OBJECT_MASK, description="(B, K, H, W): one channel per object."),
        Input("threshold", FLOAT, 0.5, min=0.0, exclusive_max=1.0, description="Pixels above it belong to the object."),
        Input("labels", LIST, optional=True, description="A label per channel (optional)."),
    ],
    outputs=[Output("layout", LAYOUT, "One object per non-empty channel, boxed; empty channels are skipped.")],
    examples=[lambda: {"object_mask": render_structure(["a red circle left of a blue square on a black background"], 32)["object_mask"],
                       "labels": ["red circle", "blue square"]}],
)
def layout_from_mask(ctx: RunContext, object_mask: Any, threshold: float, labels: list[Any] | None) -> Any:
    """Boxes around each object mask channel, as a layout."""
    check_map(object_mask, "object_mask", "OBJECT_MASK")
    if labels is not None and not all(isinstance(label, str) for label in labels):
        raise NodeInputError("labels", "expected a list of strings")
    return layout_from_masks(object_mask, threshold, list(labels) if labels is not None else None)


NODES = (layout_from_prompt, rasterise_layout, layout_from_mask)
