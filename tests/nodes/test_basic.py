from __future__ import annotations

import pytest

from dagfusion import NodeInputError
from dagfusion.nodes import basic


def test_arithmetic_keeps_integers() -> None:
    assert basic.add.fn(None, a=2, b=3) == 5 and isinstance(basic.add.fn(None, a=2, b=3), int)
    assert basic.multiply.fn(None, a=1.5, b=2) == 3.0


def test_clamp_rejects_inverted_bounds() -> None:
    assert basic.clamp.fn(None, value=5, low=0, high=1) == 1
    with pytest.raises(ValueError, match="greater than high"):
        basic.clamp.fn(None, value=5, low=2, high=1)


def test_format_fills_fields_and_rejects_unknown_ones() -> None:
    assert basic.format_text.fn(None, template="{a}-{b:.1f}", a="x", b=2.25, c=None, d=None) == "x-2.2"
    with pytest.raises(NodeInputError, match=r"field \{e\} is not one of") as info:
        basic.format_text.fn(None, template="{e}", a=1, b=None, c=None, d=None)
    assert info.value.input == "template"


def test_format_check_reports_every_bad_field_at_validation() -> None:
    problems = basic.format_text.check({"template": "{a.real} {b:{c}} {x}"})
    assert [p.input for p in problems] == ["template"] * 3
    assert basic.format_text.check({"template": "{a:>8.3f} {d!r}"}) == []
