"""Text templates filled from named values, with nothing evaluated from the template's text.

Python's ``str.format`` resolves ``{a.attr}`` and ``{a[key]}`` against its arguments and
expands fields nested in a format spec (``{a:{b.__init__.__globals__...}}``), so a template
taken from a workflow file could read any object reachable from a value. A dagfusion template
allows only plain replacement fields ``{name}``, ``{name!r}`` and ``{name:spec}`` whose name is
one of the declared fields and whose spec is literal text. :func:`template_problems` says what
is wrong with a template (used at validation), :func:`render_template` fills a checked one.
"""

from __future__ import annotations

import string
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from dagfusion.errors import WorkflowError

_FORMATTER = string.Formatter()
_CONVERSIONS = {None: lambda v: v, "s": str, "r": repr, "a": ascii}


class TemplateError(WorkflowError):
    """A template uses something other than plain fields from its declared names."""


def _pieces(template: str) -> Iterator[tuple[str, str | None, str | None, str | None]]:
    try:
        yield from _FORMATTER.parse(template)
    except ValueError as exc:  # unbalanced braces, a bad conversion
        raise TemplateError(f"malformed template: {exc}") from None


def template_problems(template: str, fields: Collection[str]) -> list[str]:
    """Every reason ``template`` is not a plain template over ``fields`` (empty when it is)."""
    fields = frozenset(fields)
    problems: list[str] = []
    allowed = ", ".join("{" + f + "}" for f in sorted(fields))
    try:
        pieces = list(_pieces(template))
    except TemplateError as exc:
        return [str(exc)]
    for _, name, spec, conversion in pieces:
        if name is None:
            continue
        if name not in fields:
            if name == "" or name.isdigit():
                problems.append(f"field {{{name}}} is positional; name one of {allowed}")
            elif any(c in name for c in ".["):
                problems.append(f"field {{{name}}} accesses an attribute or item; only {allowed} are allowed")
            else:
                problems.append(f"field {{{name}}} is not one of {allowed}")
        if conversion not in _CONVERSIONS:
            problems.append(f"field {{{name}!{conversion}}} has an unknown conversion")
        if spec:
            try:
                nested = [n for _, n, _, _ in _pieces(spec) if n is not None]
            except TemplateError as exc:
                problems.append(f"field {{{name}:{spec}}}: {exc}")
                continue
            if nested or "{" in spec or "}" in spec:
                problems.append(f"field {{{name}:{spec}}} has a replacement field inside its format spec; specs must be literal")
    return problems


def render_template(template: str, values: Mapping[str, Any]) -> str:
    """``template`` filled from ``values``; raises :class:`TemplateError` listing every problem.

    Only names, conversions and literal specs are used: no attribute or item access happens.
    """
    problems = template_problems(template, values.keys())
    if problems:
        raise TemplateError("; ".join(problems))
    out: list[str] = []
    for literal, name, spec, conversion in _pieces(template):
        out.append(literal)
        if name is None:
            continue
        value = _CONVERSIONS[conversion](values[name])
        try:
            out.append(format(value, spec or ""))
        except (TypeError, ValueError) as exc:
            raise TemplateError(f"field {{{name}:{spec}}} cannot format {type(value).__name__}: {exc}") from None
    return "".join(out)
