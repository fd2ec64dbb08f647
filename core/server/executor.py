"""The interface between the job server's scheduler and whatever runs its jobs.

The scheduler (:mod:`dagfusion.server.scheduler`) decides *which* job runs *where*: it claims
the best queued job for a free :class:`Slot` and hands it to an :class:`Executor` with
:meth:`Executor.start`, which must return at once. The executor reports back through the
:class:`JobSink` it was given: every run event with :meth:`JobSink.event`, then exactly one
:meth:`JobSink.finished` with the job's :class:`Outcome` — also when the thing running the job
dies (then ``failed``, with the reason). :mod:`dagfusion.server.processes` is the executor
that runs jobs in local worker processes; another (a cluster) plugs in behind the same three
methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

CPU, GPU = "cpu", "gpu"


@dataclass(frozen=True)
class Slot:
    """A place one job runs at a time: ``name`` (``cpu-0``, ``cuda:0``), ``kind`` (``cpu`` or
    ``gpu``) and ``device``, the torch device string its jobs compute on."""

    name: str
    kind: str
    device: str


@dataclass(frozen=True)
class JobSpec:
    """Everything needed to run one job: the workflow file's bytes (YAML or PNG), its
    ``name`` (what problems name), ``node.input=value`` overrides and the output folder."""

    id: str
    source: bytes
    name: str
    overrides: tuple[str, ...]
    output_dir: Path


@dataclass(frozen=True)
class Outcome:
    """How a job ended: ``status`` is ``done``, ``failed`` or ``cancelled``; ``error`` says
    why it failed; ``result`` lists its runs (one per sweep point)."""

    status: str
    error: str | None = None
    result: list[dict[str, Any]] = field(default_factory=list)


class JobSink(Protocol):
    """Receives what an executor reports (from any thread)."""

    def event(self, job_id: str, event: dict[str, Any]) -> None: ...

    def finished(self, job_id: str, outcome: Outcome) -> None: ...


class Executor(Protocol):
    """Runs jobs; one at a time per slot (the scheduler never starts two on one slot)."""

    def start(self, slot: Slot, job: JobSpec, sink: JobSink) -> None:
        """Begin running ``job`` on ``slot`` and return at once."""
        ...

    def cancel(self, job_id: str) -> None:
        """Ask a running job to stop (it still ends with one :meth:`JobSink.finished`)."""
        ...

    def close(self) -> None:
        """Stop everything it runs, without reporting outcomes (the store re-queues them)."""
        ...


def detect_slots(device: str, cpu_jobs: int) -> list[Slot]:
    """The slots of this machine for the ``device`` setting: one per visible GPU (``auto`` or
    ``cuda``: all of them; ``cuda:N``: that one), else ``cpu_jobs`` CPU slots (``mps``: one)."""
    if device == "cpu":
        return [Slot(f"cpu-{i}", CPU, "cpu") for i in range(cpu_jobs)]
    if device == "mps":
        return [Slot("mps", GPU, "mps")]
    if device.startswith("cuda:"):
        return [Slot(device, GPU, device)]
    import torch  # deferred: only the server process counts GPUs

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        return [Slot(f"cuda:{i}", GPU, f"cuda:{i}") for i in range(count)]
    if device == "auto":
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return [Slot("mps", GPU, "mps")]
    return [Slot(f"cpu-{i}", CPU, "cpu") for i in range(cpu_jobs)]


__all__ = ["CPU", "GPU", "Executor", "JobSink", "JobSpec", "Outcome", "Slot", "detect_slots"]
