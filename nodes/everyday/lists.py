"""Text lists: split a text into a list of strings, join a list into one text, and fill a template
from any number of named values.

``dagfusion.text.FormatMany`` follows the rule of every dagfusion template
(:mod:`dagfusion.templates`): only plain fields ``{name}``, ``{name!r}``, ``{name:spec}`` naming a
key of ``values``, with literal specs; attribute and item access are refused. A constant
``values`` is checked at validation, a linked one when the node runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagfusion import BOOLEAN, DICT, LIST, STRING, Input, Output, RunContext, node
from dagfusion.errors import NodeInputError, Problem
from dagfusion.templates import TemplateError, render_template, template_problems


def split_text(text: str, separator: str = "", keep_empty: bool = False) -> list[str]:
    """``text`` split at ``separator`` (empty: at line breaks), each item stripped; empty items are
    dropped unless ``keep_empty``."""
    pieces = text.splitlines() if not separator else text.split(separator)
    items = [piece.strip() for piece in pieces]
    return items if keep_empty else [item for item in items if item]


@node(
    "dagfusion.text.List",
    version="1.0.0",
    category="text",
    inputs=[
        Input("text", STRING, "", ui={"multiline": True}, description="The items, one per line (or split at separator)."),
        Input("separator", STRING, "", description="Where to split (empty: at line breaks), e.g. ',' or '|'."),
        Input("keep_empty", BOOLEAN, False, description="Keep empty items instead of dropping them."),
    ],
    outputs=[Output("items", LIST, "The stripped items, as a list of strings.")],
    examples=[{"text": "a red circle\n\na blue square\n", "separator": "", "keep_empty": False},
              {"text": "cat | dog |", "separator": "|", "keep_empty": True}],
)
def text_list(ctx: RunContext, text: str, separator: str, keep_empty: bool) -> list[str]:
    """Make a list of strings (prompts, labels) from a text with one item per line."""
    return split_text(text, separator, keep_empty)


@node(
    "dagfusion.text.Join",
    version="1.0.0",
    category="text",
    inputs=[
        Input("items", LIST, description="Values to join; each is written with str()."),
        Input("separator", STRING, ", ", description="Text put between items ('\\n' is a line break in YAML double quotes)."),
    ],
    outputs=[Output("text", STRING)],
    examples=[{"items": ["a", 1, 2.5], "separator": " / "}],
)
def join_text(ctx: RunContext, items: list[Any], separator: str) -> str:
    """Join a list into one text."""
    return separator.join(str(item) for item in items)


def _bad_keys(values: Mapping[Any, Any]) -> list[str]:
    return [repr(k) for k in values if not isinstance(k, str) or not k.isidentifier()]


def _check_format_many(inputs: Mapping[str, Any]) -> list[Problem]:
    values, template = inputs.get("values"), inputs.get("template")
    if not isinstance(values, Mapping):
        return []
    bad = _bad_keys(values)
    if bad:
        return [Problem("bad-value", f"value names must be identifiers; got {', '.join(bad)}", input="values")]
    if not isinstance(template, str):
        return []
    return [Problem("bad-template", why, input="template") for why in template_problems(template, values.keys())]


@node(
    "dagfusion.text.FormatMany",
    version="1.0.0",
    category="text",
    inputs=[
        Input("template", STRING, ui={"multiline": True},
              description="Template whose fields name keys of values, e.g. '{shape} at {score:.2f}'; "
              "!r/!s and literal format specs allowed, attribute and item access refused."),
        Input("values", DICT, description="Field name -> value (names are identifiers)."),
    ],
    outputs=[Output("text", STRING)],
    examples=[{"template": "{shape} scored {score:.2f} ({note!r})",
               "values": {"shape": "circle", "score": 0.875, "note": "ok"}}],
    check=_check_format_many,
)
def format_many(ctx: RunContext, template: str, values: dict[str, Any]) -> str:
    """Fill a template with any number of named values (plain fields only, as ``dagfusion.text.Format``)."""
    bad = _bad_keys(values)
    if bad:
        raise NodeInputError("values", f"value names must be identifiers; got {', '.join(bad)}")
    try:
        return render_template(template, values)
    except TemplateError as exc:
        raise NodeInputError("template", str(exc)) from None


NODES = (text_list, join_text, format_many)
