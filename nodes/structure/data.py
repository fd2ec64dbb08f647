"""Layouts: where the objects of an image are, as boxes, keypoints and labels.

A :class:`Layout` describes a batch: ``rows[i]`` is the tuple of :class:`LayoutObject` of
image ``i``. Coordinates are fractions of the image side (``x`` to the right, ``y`` downwards,
both in ``[0, 1]``), so one layout fits any resolution; ``size`` records the ``(height, width)``
in pixels the layout was made for (rasterising nodes take it as their default).

Layouts are plain, immutable data: they serialise to JSON (:meth:`Layout.to_json`) and their
fingerprint is that JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_OBJECTS_PER_IMAGE = 64
"""The most objects one image of a layout may hold (checked when a layout is built)."""


@dataclass(frozen=True)
class LayoutObject:
    """One object of a layout.

    Attributes:
        box: ``(x0, y0, x1, y1)`` as fractions of the image width/height, ``x0 <= x1``, ``y0 <= y1``.
        label: What the object is (``"red circle"``); free text.
        attributes: Named attributes (``(("colour", "red"), ("shape", "circle"))``), sorted by name.
        keypoints: ``(x, y, visibility)`` triples (fractions; visibility in ``[0, 1]``), e.g. a pose
            skeleton's joints; empty when the object has none.
        depth: Relative depth order, ``0`` = nearest; ``None`` when unknown.
    """

    box: tuple[float, float, float, float]
    label: str = ""
    attributes: tuple[tuple[str, str], ...] = ()
    keypoints: tuple[tuple[float, float, float], ...] = ()
    depth: float | None = None

    def __post_init__(self) -> None:
        if len(self.box) != 4:
            raise ValueError(f"a layout box is (x0, y0, x1, y1), got {self.box!r}")
        x0, y0, x1, y1 = (float(v) for v in self.box)
        if not (x0 <= x1 and y0 <= y1):
            raise ValueError(f"a layout box needs x0 <= x1 and y0 <= y1, got {self.box!r}")
        object.__setattr__(self, "box", (x0, y0, x1, y1))
        object.__setattr__(self, "attributes", tuple(sorted((str(k), str(v)) for k, v in self.attributes)))
        object.__setattr__(self, "keypoints", tuple((float(x), float(y), float(v)) for x, y, v in self.keypoints))

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    def attribute(self, name: str, default: str | None = None) -> str | None:
        return dict(self.attributes).get(name, default)

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": list(self.box),
            "label": self.label,
            "attributes": dict(self.attributes),
            "keypoints": [list(k) for k in self.keypoints],
            "depth": self.depth,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayoutObject:
        return cls(
            box=tuple(data["box"]),  # type: ignore[arg-type]
            label=str(data.get("label", "")),
            attributes=tuple((data.get("attributes") or {}).items()),
            keypoints=tuple(tuple(k) for k in data.get("keypoints") or ()),  # type: ignore[misc]
            depth=data.get("depth"),
        )


@dataclass(frozen=True)
class Layout:
    """The objects of each image of a batch.

    Attributes:
        rows: One tuple of objects per image.
        size: ``(height, width)`` in pixels the layout was made for.
        background: What lies behind the objects (``"black"``), or ``""`` when unknown.
    """

    rows: tuple[tuple[LayoutObject, ...], ...]
    size: tuple[int, int] = (64, 64)
    background: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        rows = tuple(tuple(r) for r in self.rows)
        for i, row in enumerate(rows):
            if len(row) > MAX_OBJECTS_PER_IMAGE:
                raise ValueError(f"layout row {i} has {len(row)} objects; at most {MAX_OBJECTS_PER_IMAGE} are allowed")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        background = tuple(self.background) or ("",) * len(rows)
        if len(background) != len(rows):
            raise ValueError(f"layout has {len(rows)} rows but {len(background)} backgrounds")
        object.__setattr__(self, "background", background)

    def __len__(self) -> int:
        return len(self.rows)

    def to_json(self) -> str:
        return json.dumps(
            {
                "size": list(self.size),
                "background": list(self.background),
                "rows": [[o.to_dict() for o in row] for row in self.rows],
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Layout:
        data = json.loads(text)
        return cls(
            rows=tuple(tuple(LayoutObject.from_dict(o) for o in row) for row in data["rows"]),
            size=tuple(data.get("size", (64, 64))),  # type: ignore[arg-type]
            background=tuple(data.get("background") or ()),
        )

    def __dagfusion_fingerprint__(self) -> str:
        return "layout:" + self.to_json()
