"""Typed run events and the one handler protocol the CLI, the canvas and tests share.

The executor emits events in order: :class:`RunStarted`, then per planned node either
:class:`NodeCached` or :class:`NodeStarted` → any :class:`NodeProgress`/:class:`NodePreview`
→ :class:`NodeFinished` or :class:`NodeFailed`; nodes downstream of a failure get
:class:`NodeSkipped`; finally :class:`RunFinished` or :class:`RunCancelled`. A
:class:`RunWarning` may come at any point after :class:`RunStarted`. Events are frozen;
``to_dict`` gives their JSON form (the run record's ``events.jsonl``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Event:
    """Base of all events; ``time`` is a ``time.time()`` stamp."""

    run_id: str
    time: float = field(default_factory=time.time, kw_only=True)

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "preview":
                continue  # binary previews do not go to the JSON log
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True, slots=True)
class RunStarted(Event):
    """A run began; ``nodes`` lists the planned node ids in execution order."""

    nodes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeStarted(Event):
    node_id: str = ""
    node_type: str = ""


@dataclass(frozen=True, slots=True)
class NodeCached(Event):
    """A node's outputs came from the cache; it did not run."""

    node_id: str = ""
    node_type: str = ""


@dataclass(frozen=True, slots=True)
class NodeProgress(Event):
    """A long node reports ``step`` of ``total`` (e.g. sampling steps), with an optional message."""

    node_id: str = ""
    step: int = 0
    total: int | None = None
    message: str = ""
    values: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NodePreview(Event):
    """A node shows an intermediate or final picture; ``preview`` is a PIL image or tensor."""

    node_id: str = ""
    label: str = ""
    preview: Any = None


@dataclass(frozen=True, slots=True)
class NodeFinished(Event):
    node_id: str = ""
    node_type: str = ""
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class NodeFailed(Event):
    """A node raised; ``error`` is the message, ``traceback`` the formatted original traceback."""

    node_id: str = ""
    node_type: str = ""
    error: str = ""
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class NodeSkipped(Event):
    """A node did not run because ``because`` (an upstream node) failed."""

    node_id: str = ""
    because: str = ""


@dataclass(frozen=True, slots=True)
class RunWarning(Event):
    """Something went wrong that did not stop the run (a damaged cache entry that is being
    recomputed, a cache write that failed); ``node_id`` names the node concerned, if any."""

    node_id: str | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class RunFinished(Event):
    """The run ended (possibly with failures, listed in ``failed``)."""

    seconds: float = 0.0
    executed: int = 0
    cached: int = 0
    failed: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RunCancelledEvent(Event):
    """The run stopped because its cancel token was set; ``node_id`` is where it stopped."""

    node_id: str | None = None

    @property
    def kind(self) -> str:
        return "RunCancelled"


@runtime_checkable
class ProgressHandler(Protocol):
    """Receives every event of a run, in order, on the thread running the workflow."""

    def handle(self, event: Event) -> None: ...


class EventCollector:
    """A handler that keeps every event (handy in tests and notebooks)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def handle(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class FanOut:
    """Forwards each event to several handlers."""

    def __init__(self, *handlers: ProgressHandler) -> None:
        self.handlers = [h for h in handlers if h is not None]

    def handle(self, event: Event) -> None:
        for h in self.handlers:
            h.handle(event)
