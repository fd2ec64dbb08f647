"""Run reports: what a sampling run did, step by step and patch by patch, as plain data.

The sampler builds one :class:`RunReport` per run and hands it on as a node output (the Sample
node's ``report``, socket type ``RUN_REPORT``), so statistics travel with the run's result —
cached with it, persisted with it — instead of being left on shared patch objects:

- per step (:class:`StepRecord`): whether the real denoiser ran (``computed``) and how often
  (``denoiser_calls``), the multiply-accumulates its layers computed (``macs``, counted with
  :func:`~dagfusion.model.count_macs`; ``None`` when not counted) and the step's wall-clock
  ``seconds``;
- per patch: what its :class:`~dagfusion.model.StepHook`'s ``end()`` returned, under the
  patch's key (:func:`~dagfusion.model.patch_key`).

A hook's report must be plain data — ``None``, booleans, numbers, strings, lists/tuples and
mappings with string keys, or a dataclass of those — so it can be written as JSON;
:func:`plain_report` converts it (tuples become lists, dataclasses dicts) and refuses anything
else, naming the hook. Everything here is importable without torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

REPORT_FORMAT = 1
"""Version of :meth:`RunReport.to_dict`'s layout (written into it as ``format``)."""


@dataclass(frozen=True)
class StepRecord:
    """One sampling step of a run.

    Attributes:
        index: 0-based step index (:attr:`~dagfusion.model.StepInfo.index`).
        timestep: The scheduler's timestep as a float.
        denoiser_calls: How often the real denoiser (the innermost function of the hook chain)
            ran in this step: 0 when a hook answered from a cache, 2 when a hook ran the
            guidance halves separately.
        macs: Multiply-accumulates the denoiser's layers computed in this step (whether through
            the denoiser or through a hook calling its submodules), or ``None`` when not counted.
        seconds: Host wall-clock seconds of the step (the denoiser call and the scheduler step;
            on an asynchronous device, queued work counts at the step that waits for it).
    """

    index: int
    timestep: float
    denoiser_calls: int
    macs: int | None
    seconds: float

    @property
    def computed(self) -> bool:
        """Whether the real denoiser ran at least once in this step."""
        return self.denoiser_calls > 0


@dataclass(frozen=True)
class RunReport:
    """What one sampling run did (see the module docstring).

    Attributes:
        steps: One :class:`StepRecord` per step, in order.
        patches: ``{patch key: report}``: what each patch's step hook returned from ``end()``
            (plain data; patches whose hook returned ``None`` or had no hook are absent).
        info: Plain data about the run: ``family``, ``sampler``, ``steps``, ``cfg`` …
    """

    steps: tuple[StepRecord, ...] = ()
    patches: Mapping[str, Any] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def computed_steps(self) -> int:
        """Steps in which the real denoiser ran."""
        return sum(1 for s in self.steps if s.computed)

    @property
    def skipped_steps(self) -> int:
        """Steps answered without running the real denoiser."""
        return len(self.steps) - self.computed_steps

    @property
    def macs(self) -> int | None:
        """All MACs of the run, or ``None`` when any step was not counted."""
        if not self.steps or any(s.macs is None for s in self.steps):
            return None
        return sum(int(s.macs) for s in self.steps)  # type: ignore[arg-type]

    @property
    def seconds(self) -> float:
        """Wall-clock seconds of all steps."""
        return sum(s.seconds for s in self.steps)

    def patch(self, key: str) -> Any:
        """The report of the patch with ``key``.

        :raises KeyError: naming the keys present, when no patch with ``key`` reported.
        """
        try:
            return self.patches[key]
        except KeyError:
            raise KeyError(
                f"no patch with key {key!r} reported in this run; reports present: {sorted(self.patches) or 'none'}"
            ) from None

    def summary(self) -> dict[str, Any]:
        """Totals as plain data: ``steps``, ``computed_steps``, ``skipped_steps``, ``macs``, ``seconds``."""
        return {
            "steps": len(self.steps),
            "computed_steps": self.computed_steps,
            "skipped_steps": self.skipped_steps,
            "macs": self.macs,
            "seconds": self.seconds,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready); :meth:`from_dict` reads it back into an equal report."""
        return {
            "format": REPORT_FORMAT,
            "info": _plain(self.info, "info"),
            "summary": self.summary(),
            "steps": [
                {"index": s.index, "timestep": s.timestep, "computed": s.computed, "denoiser_calls": s.denoiser_calls,
                 "macs": s.macs, "seconds": s.seconds}
                for s in self.steps
            ],
            "patches": {k: _plain(v, k) for k, v in self.patches.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunReport:
        """The report :meth:`to_dict` wrote.

        :raises ValueError: ``data`` is not a run report of a known format.
        """
        if not isinstance(data, Mapping) or data.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a dagfusion run report of format {REPORT_FORMAT}")
        steps = tuple(
            StepRecord(int(s["index"]), float(s["timestep"]), int(s["denoiser_calls"]),
                       None if s.get("macs") is None else int(s["macs"]), float(s["seconds"]))
            for s in data.get("steps", ())
        )
        return cls(steps=steps, patches=dict(data.get("patches", {})), info=dict(data.get("info", {})))

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text (keys sorted)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def __dagfusion_fingerprint__(self) -> str:
        """What the run computed: every field but the timings (two runs doing the same work match)."""
        from dagfusion.fingerprint import fingerprint

        data = self.to_dict()
        data.pop("summary")
        for step in data["steps"]:
            step.pop("seconds")
        return fingerprint(data) or ""


def plain_report(value: Any, owner: str) -> Any:
    """``value`` as plain data (see the module docstring); ``owner`` names the hook in the error.

    :raises TypeError: ``value`` holds something that is not plain data.
    """
    return _plain(value, owner)


def _plain(value: Any, owner: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), owner) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{owner}: a run report's keys must be strings, got {k!r}")
            out[k] = _plain(v, owner)
        return out
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [_plain(v, owner) for v in value]
    raise TypeError(
        f"{owner}: a run report must be plain data (None, bool, int, float, str, lists, dicts or a dataclass of "
        f"those), got {type(value).__name__}"
    )


def save_report(report: RunReport, path: str) -> None:
    """Write ``report`` as JSON at ``path`` (the ``RUN_REPORT`` socket type's serializer)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(report.to_json())


def load_report(path: str) -> RunReport:
    """The report :func:`save_report` wrote."""
    with open(path, encoding="utf-8") as fh:
        return RunReport.from_dict(json.load(fh))
