"""The prompt-weighting parser (Automatic1111 syntax)."""

from __future__ import annotations

import re

import pytest
from dagfusion.nodes.everyday.weighting import (
    PromptSyntaxError,
    Span,
    has_weights,
    parse_weights,
)


def flat(prompt: str) -> list[tuple[str, float]]:
    return [(s.text, round(s.weight, 6)) for section in parse_weights(prompt) for s in section]


def test_plain_prompt_is_one_unweighted_span() -> None:
    assert parse_weights("a red fox") == [[Span("a red fox", 1.0)]]
    assert parse_weights("") == [[]]
    assert not has_weights(parse_weights("a red fox, 4k: sharp"))


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("(red)", [("red", 1.1)]),
        ("[red]", [("red", round(1 / 1.1, 6))]),
        ("(red:1.3)", [("red", 1.3)]),
        ("( red : 0.5 )", [(" red ", 0.5)]),
        ("(red:-1)", [("red", -1.0)]),
        ("(red:.5)", [("red", 0.5)]),
        ("((red))", [("red", 1.21)]),
        ("[(red)]", [("red", 1.0)]),
        ("((red:2))", [("red", 2.2)]),
        ("(a (b:2) c)", [("a ", 1.1), ("b", 2.2), (" c", 1.1)]),
        ("a (red:1.5) fox", [("a ", 1.0), ("red", 1.5), (" fox", 1.0)]),
        ("(a:b)", [("a:b", 1.1)]),
        ("a: b", [("a: b", 1.0)]),
        ("[a:1.2]", [("a:1.2", round(1 / 1.1, 6))]),
        ("()", []),
    ],
)
def test_weights_nest_and_multiply(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert flat(prompt) == expected


def test_escapes_are_literal_characters() -> None:
    assert flat(r"\(a\) \[b\] c\\d") == [(r"(a) [b] c\d", 1.0)]
    assert flat(r"(\(x\):2)") == [("(x)", 2.0)]
    assert flat(r"a\b") == [(r"a\b", 1.0)]  # any other backslash is kept


def test_break_splits_sections_only_as_a_word() -> None:
    sections = parse_weights("a fox BREAK (snow:1.2) BREAKFAST")
    assert len(sections) == 2
    assert [s.text for s in sections[0]] == ["a fox"]
    assert sections[1] == [Span("snow", 1.2), Span(" BREAKFAST", 1.0)]
    assert len(parse_weights("(a BREAK b)")) == 2 and flat("(a BREAK b)") == [("a", 1.1), ("b", 1.1)]
    assert len(parse_weights("break")) == 1


@pytest.mark.parametrize(
    "prompt, position, words",
    [
        ("(a", 0, "never closed"),
        ("a [b (c)", 2, "never closed"),
        ("a)", 1, "closes no '('"),
        ("a]", 1, "closes no '['"),
        ("(a]", 2, "closes the '(' at position 0"),
        ("[a)", 2, "closes the '[' at position 0"),
        ("[a:1.2)", 6, "closes the '[' at position 0"),
        ("a:1.2)", 5, "closes no '('"),
    ],
)
def test_unbalanced_brackets_name_the_position(prompt: str, position: int, words: str) -> None:
    with pytest.raises(PromptSyntaxError, match=re.escape(words)) as info:
        parse_weights(prompt)
    assert info.value.position == position
    assert f"position {position}" in str(info.value)
