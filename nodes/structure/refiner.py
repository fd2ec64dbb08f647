"""The structure-guided refiner's condition: depth, normals and a layout raster as one control map.

Latent structural diffusion's second stage generates the final image conditioned on the
structure the first stage predicted. The structure reaches the image model as a ControlNet
control map (``dagfusion.structure.ApplyControlNet``'s ``control`` input, a ControlNet with
``conditioning_channels = 4 + K``), built by ``dagfusion.structure.StructureCondition``:

====================  =========================================================================
channels              content
====================  =========================================================================
``0``                 depth (``DEPTH``, 1 = nearest), ``[0, 1]``
``1, 2, 3``           normal ``(n + 1) / 2`` (``NORMAL`` x, y, z shown as a picture)
``4 … 4 + K − 1``     layout raster: channel ``4 + k`` is object ``k`` — its ``OBJECT_MASK``
                      channel, or its ``LAYOUT`` box filled (objects beyond ``K`` share the last)
====================  =========================================================================

This is the order and value convention of the ControlNet nodes' own stacking (image, depth,
normal, mask), so the same maps give the same tensor either way. The layout is fixed: a
condition that is not given is **zeros in its channels** — exactly what a refiner trained with
random condition dropout (each condition zeroed independently with probability ``p``) sees for a
dropped condition, so one refiner serves any subset of conditions. :data:`GROUPS` names the
channel ranges the dropout acts on.
"""

from __future__ import annotations

from typing import Any

from dagfusion import DICT, INT, TENSOR, Input, NodeInputError, Output, RunContext, node
from dagfusion.nodes.structure.types import DEPTH, LAYOUT, NORMAL, OBJECT_MASK

GROUPS: tuple[tuple[str, int], ...] = (("depth", 1), ("normal", 3))
"""The fixed condition groups before the layout raster: ``(name, channels)`` in channel order."""


def channel_ranges(layout_channels: int) -> dict[str, tuple[int, int]]:
    """``{group: (first, end)}`` channel ranges of a control map with ``layout_channels`` layout channels."""
    ranges: dict[str, tuple[int, int]] = {}
    start = 0
    for name, width in (*GROUPS, ("layout", layout_channels)):
        ranges[name] = (start, start + width)
        start += width
    return ranges


def _check(name: str, value: Any, channels: int | None) -> Any:
    import torch

    if not isinstance(value, torch.Tensor) or value.ndim != 4:
        shape = tuple(getattr(value, "shape", ())) or type(value).__name__
        raise NodeInputError(name, f"expected a tensor (B, C, H, W), got {shape}")
    if channels is not None and value.shape[1] != channels:
        raise NodeInputError(name, f"expected {channels} channel(s), got {value.shape[1]} (shape {tuple(value.shape)})")
    if not value.is_floating_point():
        raise NodeInputError(name, f"expected a floating-point map, got dtype {value.dtype}")
    return value.detach().float().cpu()


def structure_condition(
    depth: Any = None, normal: Any = None, mask: Any = None, layout: Any = None, *, layout_channels: int = 2
) -> tuple[Any, dict[str, Any]]:
    """The control map ``(B, 4 + layout_channels, H, W)`` of the given conditions and a report
    (channel ranges, which groups were given); see the module docstring.

    :raises NodeInputError: no map, both ``mask`` and ``layout``, a map of the wrong channels, or
        maps (and layout rows) of different batch or pixel sizes — naming the mismatching input.
    """
    import torch
    from dagfusion.nodes.structure.structural_data import box_raster, fit_channels

    if layout_channels < 1:
        raise NodeInputError("layout_channels", f"expected at least 1, got {layout_channels}")
    if mask is not None and layout is not None:
        raise NodeInputError("layout", "give the object masks or a layout, not both (they fill the same channels)")
    maps: list[tuple[str, Any]] = []
    if depth is not None:
        maps.append(("depth", _check("depth", depth, 1)))
    if normal is not None:
        maps.append(("normal", _check("normal", normal, 3)))
    if mask is not None:
        maps.append(("mask", _check("mask", mask, None)))
    if not maps:
        raise NodeInputError("depth", "expected at least one map: depth, normal or mask (a layout alone has no pixel size)")
    first_name, first = maps[0]
    for name, value in maps[1:]:
        if tuple(value.shape[-2:]) != tuple(first.shape[-2:]):
            raise NodeInputError(
                name, f"{name} is {tuple(value.shape[-2:])} (H, W) but {first_name} is {tuple(first.shape[-2:])}; "
                      "the maps must have one size"
            )
        if value.shape[0] != first.shape[0]:
            raise NodeInputError(name, f"{name} has {value.shape[0]} rows but {first_name} has {first.shape[0]}; "
                                       "the maps must have one batch size")
    rows, (height, width) = int(first.shape[0]), tuple(int(v) for v in first.shape[-2:])
    given = dict(maps)
    ranges = channel_ranges(layout_channels)
    out = torch.zeros(rows, ranges["layout"][1], height, width)
    if "depth" in given:
        out[:, 0:1] = given["depth"].clamp(0, 1)
    if "normal" in given:
        out[:, 1:4] = (given["normal"].clamp(-1, 1) + 1) / 2
    if "mask" in given:
        out[:, 4:] = fit_channels(given["mask"].clamp(0, 1), layout_channels)
    if layout is not None:
        if len(layout.rows) != rows:
            raise NodeInputError("layout", f"the layout has {len(layout.rows)} rows but {first_name} has {rows}; "
                                           "give one layout row per map")
        out[:, 4:] = box_raster(layout, (height, width), layout_channels)
    report = {
        "channels": int(out.shape[1]),
        "ranges": {name: list(span) for name, span in ranges.items()},
        "given": [name for name in ("depth", "normal") if name in given]
                 + (["layout"] if mask is not None or layout is not None else []),
        "layout_from": "mask" if mask is not None else ("boxes" if layout is not None else None),
        "size": [height, width],
        "rows": rows,
    }
    return out.contiguous(), report


def _example(parts: str) -> Any:
    def build() -> dict[str, Any]:
        import torch
        from dagfusion.nodes.structure.data import Layout, LayoutObject
        from dagfusion.nodes.structure.structural_data import normals_from_depth

        generator = torch.Generator().manual_seed(0)
        depth = torch.rand(1, 1, 16, 16, generator=generator)
        inputs: dict[str, Any] = {"layout_channels": 2}
        if "d" in parts:
            inputs["depth"] = depth
        if "n" in parts:
            inputs["normal"] = normals_from_depth(depth)
        if "m" in parts:
            inputs["mask"] = (torch.rand(1, 2, 16, 16, generator=generator) > 0.5).float()
        if "l" in parts:
            inputs["layout"] = Layout(((LayoutObject((0.1, 0.2, 0.6, 0.7), "red circle"),),), size=(16, 16))
        return inputs

    return build


@node(
    "dagfusion.structure.StructureCondition",
    version="1.0.0",
    category="structure/refiner",
    inputs=[
        Input("depth", DEPTH, optional=True, link_only=True, description="Depth maps (B, 1, H, W), 1 = nearest (channel 0)."),
        Input("normal", NORMAL, optional=True, link_only=True, description="Surface normals (B, 3, H, W) (channels 1–3, as (n + 1) / 2)."),
        Input("mask", OBJECT_MASK, optional=True, link_only=True, description="Object masks (B, K, H, W) as the layout raster (channels 4…)."),
        Input("layout", LAYOUT, optional=True, link_only=True,
              description="A layout rasterised by boxes at the maps' size as the layout raster (instead of masks)."),
        Input("layout_channels", INT, 2, min=1, max=64,
              description="Channels of the layout raster (one per object; extra objects share the last)."),
    ],
    outputs=[
        Output("control", TENSOR, "The control map (B, 4 + layout_channels, H, W) in [0, 1]; absent conditions are zeros."),
        Output("report", DICT, "Channel ranges of each condition and which were given."),
    ],
    examples=[_example("dnm"), _example("dl"), _example("n")],
    ui={"color": "#9575cd"},
)
def structure_condition_node(
    ctx: RunContext, depth: Any, normal: Any, mask: Any, layout: Any, layout_channels: int
) -> dict[str, Any]:
    """Stack depth, normals and a layout raster (object masks or layout boxes) into one control map
    for a structure-guided refiner ControlNet: channel 0 depth, 1–3 normals, 4… layout; a missing
    condition stays zero, as condition dropout trains it. The maps must share batch and size.
    """
    control, report = structure_condition(depth, normal, mask, layout, layout_channels=layout_channels)
    return {"control": control, "report": report}


NODES = (structure_condition_node,)
"""The refiner's nodes."""
