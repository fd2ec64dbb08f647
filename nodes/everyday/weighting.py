"""Prompt-weighting syntax (Automatic1111's): a pure parser from a prompt to weighted text spans.

Syntax:

- ``(text)`` multiplies the weight of ``text`` by 1.1; ``[text]`` divides it by 1.1;
- ``(text:1.3)`` multiplies it by 1.3 (any decimal number, negative allowed);
- brackets nest and multiply: ``((a))`` is 1.21, ``[(a)]`` is 1.0, ``((a:2))`` is 2.2;
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters; any other backslash is kept;
- a colon that is not ``:number)`` is plain text (``(a:b)`` is ``a:b`` at 1.1);
- the word ``BREAK`` (upper case, on its own) ends a section: the encoder starts a new window there.

Unlike Automatic1111, which closes open brackets silently, unbalanced brackets are an error
(:class:`PromptSyntaxError`) naming the position (0-based character offset) of the offending one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND = 1.1
"""Multiplier of one pair of round brackets (and divisor of one pair of square brackets)."""

_TOKEN = re.compile(
    r"""
    (?P<escape>\\[\\()\[\]])
    | (?P<weight>:\s*(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\))
    | (?P<open>[(\[])
    | (?P<close>[)\]])
    | (?P<brk>\s*\bBREAK\b\s*)
    | (?P<text>[^\\()\[\]:B]+|.)
    """,
    re.VERBOSE | re.DOTALL,
)


class PromptSyntaxError(ValueError):
    """A prompt's brackets do not balance; ``position`` is the offending character's offset."""

    def __init__(self, position: int, message: str):
        self.position = position
        super().__init__(message)


@dataclass(frozen=True)
class Span:
    """A run of prompt text and its weight (1.0: unweighted)."""

    text: str
    weight: float = 1.0


def parse_weights(prompt: str) -> list[list[Span]]:
    """``prompt`` as sections (split at ``BREAK``), each a list of :class:`Span`.

    Adjacent spans of equal weight are merged, empty ones dropped; a prompt without brackets is one
    section with one span at 1.0 (or no span if it is empty). :raises PromptSyntaxError: a closing
    bracket that closes nothing or the other kind, or a bracket left open.
    """
    sections: list[list[list]] = [[]]  # [text, weight] pairs, made Spans at the end
    stack: list[tuple[str, int, int, int]] = []  # (bracket, position, section index, span index)

    def scale(start: tuple[int, int], factor: float) -> None:
        section, index = start
        for s in range(section, len(sections)):
            for pair in sections[s][index if s == section else 0 :]:
                pair[1] *= factor

    for match in _TOKEN.finditer(prompt):
        kind, at = match.lastgroup, match.start()
        if kind == "escape":
            sections[-1].append([match.group()[1], 1.0])
        elif kind == "text":
            sections[-1].append([match.group(), 1.0])
        elif kind == "brk":
            if sections[-1]:
                sections[-1][-1][0] = sections[-1][-1][0].rstrip()
            sections.append([])
        elif kind == "open":
            stack.append((match.group(), at, len(sections) - 1, len(sections[-1])))
        elif kind == "weight":
            closing_at = match.end() - 1
            if not stack:
                raise PromptSyntaxError(closing_at, f"')' at position {closing_at} closes no '('")
            bracket, opened, section, index = stack.pop()
            if bracket != "(":
                raise PromptSyntaxError(
                    closing_at, f"')' at position {closing_at} closes the '[' at position {opened}; expected ']'"
                )
            scale((section, index), float(match.group("number")))
        else:  # close
            closing = match.group()
            wanted = "(" if closing == ")" else "["
            if not stack:
                raise PromptSyntaxError(at, f"{closing!r} at position {at} closes no {wanted!r}")
            bracket, opened, section, index = stack.pop()
            if bracket != wanted:
                expected = ")" if bracket == "(" else "]"
                raise PromptSyntaxError(
                    at, f"{closing!r} at position {at} closes the {bracket!r} at position {opened}; expected {expected!r}"
                )
            scale((section, index), ROUND if bracket == "(" else 1.0 / ROUND)
    if stack:
        bracket, opened, _, _ = stack[-1]
        expected = ")" if bracket == "(" else "]"
        raise PromptSyntaxError(opened, f"{bracket!r} at position {opened} is never closed; expected a {expected!r}")
    return [_merge(section) for section in sections]


def _merge(pairs: list[list]) -> list[Span]:
    spans: list[Span] = []
    for text, weight in pairs:
        if not text:
            continue
        if spans and spans[-1].weight == weight:
            spans[-1] = Span(spans[-1].text + text, weight)
        else:
            spans.append(Span(text, weight))
    return spans


def has_weights(sections: list[list[Span]]) -> bool:
    """Whether any span weighs other than 1.0 or the prompt has more than one section."""
    return len(sections) > 1 or any(span.weight != 1.0 for section in sections for span in section)
