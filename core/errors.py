"""The exceptions dagfusion raises, as one small hierarchy.

Everything a user can cause derives from :class:`WorkflowError`, so callers (the CLI, the
canvas, a notebook) can catch one class and show its message. Framework bugs stay ordinary
Python exceptions and are never wrapped in these classes.

- :class:`WorkflowError` — base class of every user-facing error.
  - :class:`ValidationError` — a workflow file or object has problems; carries every
    :class:`Problem` found, each naming node, input and YAML line where known.
  - :class:`PluginError` — a plugin could not be loaded or registered something invalid
    (for example two packages registering the same node type).
  - :class:`NodeDefinitionError` — a node or socket type declaration is malformed.
  - :class:`NodeExecutionError` — a node raised while running; keeps the original exception
    as ``__cause__`` and ``original``.
  - :class:`NodeInputError` — raised by a node for an input it can only judge while running
    (a linked value); names the input, and the executor adds the node.
  - :class:`RunCancelled` — the run's cancel token was set.
  - :class:`UnsafeOperationError` — an operation needs a security opt-in (pickle, reading
    outside the allowed folders, writing outside the output directory).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or ``""`` if none is close."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a workflow.

    ``code`` is a stable, machine-readable identifier (e.g. ``"unknown-node-type"``),
    ``message`` the human sentence. ``node``/``input``/``line`` locate it where known
    (``line`` is 1-based in the YAML source).
    """

    code: str
    message: str
    node: str | None = None
    input: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.node is not None:
            where.append(f"node '{self.node}'")
        if self.input is not None:
            where.append(f"input '{self.input}'")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message

    def to_dict(self) -> dict[str, object]:
        return {
            "code": self.code,
            "message": self.message,
            "node": self.node,
            "input": self.input,
            "line": self.line,
        }


class WorkflowError(Exception):
    """Base class of every error a user of dagfusion can cause."""


class ValidationError(WorkflowError):
    """A workflow has one or more problems; all of them are in :attr:`problems`."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...], source: str | None = None):
        if not problems:
            raise ValueError("ValidationError needs at least one problem")
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.source = source
        head = f"{source}: " if source else ""
        count = len(self.problems)
        lines = [f"{head}{count} problem{'s' if count != 1 else ''} in workflow:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class PluginError(WorkflowError):
    """A plugin failed to load or registered something invalid."""


class NodeDefinitionError(WorkflowError):
    """A node or socket-type declaration is malformed (raised at declaration/registration)."""


class NodeExecutionError(WorkflowError):
    """A node raised while running.

    ``original`` is the exception the node raised (also chained as ``__cause__``).
    """

    def __init__(self, node_id: str, node_type: str, original: BaseException):
        self.node_id = node_id
        self.node_type = node_type
        self.original = original
        super().__init__(
            f"node '{node_id}' ({node_type}) failed: {type(original).__name__}: {original}"
        )


class NodeInputError(WorkflowError):
    """A node found one of its inputs unacceptable while running (a value that came by link,
    so validation could not see it). ``input`` names the input; the executor names the node."""

    def __init__(self, input: str, message: str):
        self.input = input
        self.message = message
        super().__init__(f"input '{input}': {message}")


class RunCancelled(WorkflowError):
    """The run was cancelled through its cancel token."""


class UnsafeOperationError(WorkflowError):
    """An operation needs a security opt-in that is not enabled, or escapes its allowed folder."""
