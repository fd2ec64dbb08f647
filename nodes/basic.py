"""Basic nodes: constants, arithmetic and text formatting."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagfusion import FLOAT, INT, STRING, Input, Output, RunContext, hookimpl, node
from dagfusion.errors import NodeInputError, Problem
from dagfusion.templates import TemplateError, render_template, template_problems


@node(
    "dagfusion.util.Number",
    version="1.0.0",
    category="utility",
    inputs=[Input("value", FLOAT, 0.0, description="The number to emit.")],
    outputs=[Output("value", FLOAT)],
    examples=[{"value": 2.5}],
)
def number(ctx: RunContext, value: float) -> float:
    """Emit a constant number (to share one value between several nodes)."""
    return value


@node(
    "dagfusion.util.Integer",
    version="1.0.0",
    category="utility",
    inputs=[Input("value", INT, 0, description="The integer to emit.")],
    outputs=[Output("value", INT)],
    examples=[{"value": 7}],
)
def integer(ctx: RunContext, value: int) -> int:
    """Emit a constant integer."""
    return value


@node(
    "dagfusion.util.Text",
    version="1.0.0",
    category="utility",
    inputs=[Input("text", STRING, "", description="The text to emit.", ui={"multiline": True})],
    outputs=[Output("text", STRING)],
    examples=[{"text": "a red circle"}],
)
def text(ctx: RunContext, text: str) -> str:
    """Emit a constant text (a prompt shared by several nodes)."""
    return text


@node(
    "dagfusion.math.Add",
    version="1.0.0",
    category="math",
    inputs=[Input("a", FLOAT, 0.0), Input("b", FLOAT, 0.0)],
    outputs=[Output("sum", FLOAT)],
    examples=[{"a": 1.5, "b": 2}],
)
def add(ctx: RunContext, a: float, b: float) -> float:
    """Add two numbers; the sum of two integers is an integer."""
    return a + b


@node(
    "dagfusion.math.Multiply",
    version="1.0.0",
    category="math",
    inputs=[Input("a", FLOAT, 1.0), Input("b", FLOAT, 1.0)],
    outputs=[Output("product", FLOAT)],
    examples=[{"a": 3, "b": 0.5}],
)
def multiply(ctx: RunContext, a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


@node(
    "dagfusion.math.Clamp",
    version="1.0.0",
    category="math",
    inputs=[Input("value", FLOAT), Input("low", FLOAT, 0.0), Input("high", FLOAT, 1.0)],
    outputs=[Output("value", FLOAT)],
    examples=[{"value": 1.7, "low": 0.0, "high": 1.0}],
)
def clamp(ctx: RunContext, value: float, low: float, high: float) -> float:
    """Limit ``value`` to ``[low, high]``; fails if ``low > high``."""
    if low > high:
        raise ValueError(f"low ({low}) is greater than high ({high})")
    return min(max(value, low), high)


_FORMAT_FIELDS = ("a", "b", "c", "d")


def _check_format(values: Mapping[str, Any]) -> list[Problem]:
    template = values.get("template")
    if not isinstance(template, str):
        return []
    return [Problem("bad-template", why, input="template") for why in template_problems(template, _FORMAT_FIELDS)]


@node(
    "dagfusion.text.Format",
    version="1.1.0",
    category="text",
    inputs=[
        Input(
            "template",
            STRING,
            description="Template with fields {a} {b} {c} {d}, each optionally with !r/!s and a literal "
            "format spec, e.g. 'mean={a:.3f}'. Attribute and item access are refused.",
        ),
        Input("a", "ANY", optional=True),
        Input("b", "ANY", optional=True),
        Input("c", "ANY", optional=True),
        Input("d", "ANY", optional=True),
    ],
    outputs=[Output("text", STRING)],
    examples=[{"template": "{a} and {b:.2f}", "a": "x", "b": 1.0}],
    check=_check_format,
)
def format_text(ctx: RunContext, template: str, a: Any, b: Any, c: Any, d: Any) -> str:
    """Fill a template with up to four values (fields ``{a}``…``{d}``, literal format specs only)."""
    try:
        return render_template(template, {"a": a, "b": b, "c": c, "d": d})
    except TemplateError as exc:
        raise NodeInputError("template", str(exc)) from None


NODES = (number, integer, text, add, multiply, clamp, format_text)


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)
