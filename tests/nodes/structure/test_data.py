"""Layouts: validation, JSON round trip and fingerprints."""

from __future__ import annotations

import pytest

from dagfusion.nodes.structure.data import MAX_OBJECTS_PER_IMAGE, Layout, LayoutObject


def _layout() -> Layout:
    a = LayoutObject((0.1, 0.2, 0.4, 0.5), "red circle", (("shape", "circle"), ("colour", "red")), ((0.2, 0.3, 1.0),), 0.0)
    b = LayoutObject((0.5, 0.5, 0.9, 0.9), "blue square", depth=1.0)
    return Layout(rows=((a, b), (b,)), size=(64, 64), background=("black", "white"))


def test_json_round_trip_is_equal() -> None:
    layout = _layout()
    assert Layout.from_json(layout.to_json()) == layout


def test_attributes_are_sorted_and_readable() -> None:
    obj = _layout().rows[0][0]
    assert obj.attributes == (("colour", "red"), ("shape", "circle"))
    assert obj.attribute("colour") == "red" and obj.attribute("size") is None
    assert obj.centre == pytest.approx((0.25, 0.35))


def test_fingerprint_follows_content() -> None:
    a, b = _layout(), _layout()
    assert a.__dagfusion_fingerprint__() == b.__dagfusion_fingerprint__()
    moved = Layout(rows=((LayoutObject((0.1, 0.2, 0.4, 0.6)),),))
    assert moved.__dagfusion_fingerprint__() != a.__dagfusion_fingerprint__()


@pytest.mark.parametrize("box", [(0.5, 0.1, 0.4, 0.2), (0.1, 0.5, 0.2, 0.4), (0.1, 0.2, 0.3)])
def test_bad_boxes_are_refused(box: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="box"):
        LayoutObject(box)  # type: ignore[arg-type]


def test_object_count_and_background_count_are_checked() -> None:
    too_many = tuple(LayoutObject((0, 0, 0.1, 0.1)) for _ in range(MAX_OBJECTS_PER_IMAGE + 1))
    with pytest.raises(ValueError, match="at most"):
        Layout(rows=(too_many,))
    with pytest.raises(ValueError, match="backgrounds"):
        Layout(rows=((), ()), background=("black",))
    assert Layout(rows=((), ())).background == ("", "")
