"""What travels between the driver and a Ray worker for one sweep point, and back.

The driver ships a :class:`PointTask`: the YAML text of the point's already validated
workflow (constants replaced, no sweep), its index and sweep assignment, and the run options.
The worker returns a :class:`PointReply`: the run's summary, the outputs that are plain data
(tensors, arrays, pictures, numbers, text — never models), and every file the run wrote,
as ``(relative path, bytes)``, which the driver writes under its own output folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagfusion.outdir import LOCK_FILE as LOCK_NAME  # the driver takes its own lock; the worker's stays

#: Largest total size of the files one point may send back (bytes); more fails the point.
MAX_RETURN_BYTES = 1024**3


@dataclass(frozen=True)
class PointTask:
    """One sweep point to run on a worker.

    Attributes:
        index: The point's position in the sweep.
        assignment: ``{"node.input": value}`` the sweep sets for it.
        workflow_text: YAML of the point's validated workflow (``validated.workflow.dump()``).
        source: The workflow's name (what problems and records name).
        use_cache, targets, record: As :meth:`dagfusion.Engine.run_point`.
        stream: Names the sweep the point belongs to: its events carry it.
    """

    index: int
    assignment: Mapping[str, Any]
    workflow_text: str
    source: str | None = None
    use_cache: bool = True
    targets: tuple[str, ...] | None = None
    record: bool = True
    stream: str = ""


@dataclass
class PointReply:
    """What a worker sends back for one :class:`PointTask` (see the module docstring).

    ``errors`` maps node ids to the failure's message; ``events`` is how many events the run
    emitted (the driver waits for that many before reporting the point); ``loads`` the
    worker's model-cache loads so far; ``worker`` the worker's name.
    """

    index: int
    run_id: str
    status: str
    seconds: float
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[tuple[str, bytes]] = field(default_factory=list)
    events: int = 0
    loads: int = 0
    worker: str = ""


def portable(value: Any) -> tuple[bool, Any]:
    """``(True, value)`` when ``value`` is plain data worth sending back (a tensor — moved to the
    CPU —, an array, a picture, a number, text, or a list/tuple/dict of those), else ``(False, None)``."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return True, value
    module = type(value).__module__.split(".")[0]
    if module == "torch" and type(value).__name__ in ("Tensor", "Parameter"):
        return True, value.detach().cpu()
    if module == "numpy" or (module == "PIL" and hasattr(value, "getpixel")):
        return True, value
    if isinstance(value, (list, tuple)):
        items = [portable(v) for v in value]
        if all(ok for ok, _ in items):
            return True, type(value)(v for _, v in items)
        return False, None
    if isinstance(value, dict):
        pairs = {k: portable(v) for k, v in value.items()}
        if all(isinstance(k, str) and ok for k, (ok, _) in pairs.items()):
            return True, {k: v for k, (_, v) in pairs.items()}
    return False, None


def portable_outputs(outputs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The plain-data outputs of a run (see :func:`portable`); models and handles are left out."""
    kept: dict[str, dict[str, Any]] = {}
    for node_id, values in outputs.items():
        for name, value in values.items():
            ok, plain = portable(value)
            if ok:
                kept.setdefault(node_id, {})[name] = plain
    return kept


def collect_files(folder: Path, limit: int = MAX_RETURN_BYTES) -> list[tuple[str, bytes]]:
    """Every file under ``folder`` as ``(POSIX relative path, bytes)``, sorted by path.

    :raises ValueError: the files weigh more than ``limit`` bytes together.
    """
    found: list[tuple[str, bytes]] = []
    total = 0
    if not folder.is_dir():
        return found
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != LOCK_NAME):
        data = path.read_bytes()
        total += len(data)
        if total > limit:
            raise ValueError(f"the run wrote more than {limit} bytes of files; too much to send back")
        found.append((path.relative_to(folder).as_posix(), data))
    return found


def write_files(folder: Path, files: list[tuple[str, bytes]]) -> None:
    """Write ``(relative path, bytes)`` pairs under ``folder``, refusing paths that leave it."""
    from dagfusion.context import confine

    folder.mkdir(parents=True, exist_ok=True)
    for relative, data in files:
        target = confine(folder, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)


__all__ = ["MAX_RETURN_BYTES", "PointReply", "PointTask", "collect_files", "portable", "portable_outputs", "write_files"]
