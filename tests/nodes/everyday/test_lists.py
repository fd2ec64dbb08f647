"""Text lists and FormatMany (plain template fields from any number of named values)."""

from __future__ import annotations

from typing import Any

import pytest

from dagfusion import NodeInputError
from dagfusion.nodes.everyday import lists


def test_list_splits_strips_and_drops_empty_items() -> None:
    assert lists.text_list.fn(None, text=" a red fox \n\nthe cat\n", separator="", keep_empty=False) == ["a red fox", "the cat"]
    assert lists.text_list.fn(None, text="a|b||", separator="|", keep_empty=True) == ["a", "b", "", ""]


def test_join_writes_every_item() -> None:
    assert lists.join_text.fn(None, items=["a", 1, 2.5], separator=", ") == "a, 1, 2.5"


def test_format_many_fills_any_number_of_fields() -> None:
    values = {f"v{i}": i for i in range(8)}
    template = " ".join("{v%d}" % i for i in range(8)) + " {v7:03d} {v1!r}"
    assert lists.format_many.fn(None, template=template, values=values) == "0 1 2 3 4 5 6 7 007 1"


@pytest.mark.parametrize(
    "template, why",
    [("{x.__class__}", "accesses an attribute"), ("{x[0]}", "accesses an attribute or item"),
     ("{x:{y}}", "inside its format spec"), ("{0}", "positional"), ("{z}", "is not one of")],
)
def test_format_many_refuses_everything_but_plain_fields(template: str, why: str) -> None:
    values: dict[str, Any] = {"x": "a", "y": 1}
    problems = lists.format_many.check({"template": template, "values": values})
    assert problems and problems[0].input == "template" and why in problems[0].message
    with pytest.raises(NodeInputError, match=why) as info:  # linked values: checked when it runs
        lists.format_many.fn(None, template=template, values=values)
    assert info.value.input == "template"


def test_format_many_checks_value_names() -> None:
    problems = lists.format_many.check({"template": "{a}", "values": {"a": 1, "not ok": 2}})
    assert [p.input for p in problems] == ["values"] and "'not ok'" in problems[0].message
    with pytest.raises(NodeInputError, match="identifiers"):
        lists.format_many.fn(None, template="{a}", values={"a": 1, 3: 2})
    assert lists.format_many.check({"template": "{a}"}) == []  # values linked: nothing to check yet


def test_format_many_validation_through_the_engine(tmp_path: Any) -> None:
    from dagfusion import Engine, Settings
    from dagfusion.errors import ValidationError
    from dagfusion.registry import Registry
    from dagfusion.workflow import load_workflow

    engine = Engine(Registry.from_plugins(load_entrypoints=False, environ={}), Settings(output_dir=tmp_path, cache_dir=tmp_path / "c"))
    text = "format_version: 1\nnodes:\n  f: {type: dagfusion.text.FormatMany, inputs: {template: '{a.real}', values: {a: 1}}}\n"
    with pytest.raises(ValidationError, match="accesses an attribute"):
        engine.validate(load_workflow(text, text=True))
