"""Input checks shared by the cache nodes: one rule, used twice.

A check is a :data:`~dagfusion.node.NodeCheck`: it receives the inputs it can see and returns
:class:`~dagfusion.errors.Problem`\\ s. Declared with ``@node(check=...)`` it runs at validation
time on the constant inputs (linked inputs absent); the node function runs the same check with
every value at run time through :func:`enforce`, which raises
:class:`~dagfusion.errors.NodeInputError` for a linked value the validator could not see.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from dagfusion.errors import NodeInputError, Problem
from dagfusion.node import NodeCheck


def enforce(check: NodeCheck, values: Mapping[str, Any]) -> None:
    """Run ``check`` on ``values`` (every input of a running node); raise the first problem.

    :raises NodeInputError: naming the problem's input (the node's first input when it names none).
    """
    for problem in check(values):
        raise NodeInputError(problem.input or next(iter(values), "?"), problem.message)


def all_of(*checks: NodeCheck) -> NodeCheck:
    """One check running ``checks`` in order and reporting every problem they find."""

    def check(values: Mapping[str, Any]) -> Iterator[Problem]:
        for one in checks:
            yield from one(values)

    return check


def ordered(low: str, high: str, *, code: str = "bad-range") -> NodeCheck:
    """A check that input ``high`` is greater than input ``low`` (silent when either is linked or
    unset). The problem names ``high``: "end_step (3) must be greater than start_step (5)"."""

    def check(values: Mapping[str, Any]) -> Iterable[Problem]:
        a, b = values.get(low), values.get(high)
        if not _number(a) or not _number(b) or b > a:
            return []
        return [Problem(code, f"{high} ({b}) must be greater than {low} ({a})", input=high)]

    return check


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
