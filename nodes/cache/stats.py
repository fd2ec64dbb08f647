"""What the feature caches (DeepCache, BlockCache, CacheQuant) report for a sampling run.

Each cache's step hook returns these statistics from ``end()``; the sampler puts them into the
run's report (:class:`~dagfusion.model.RunReport`) under the patch's key.
"""

from __future__ import annotations

from typing import Any, TypedDict

from dagfusion.model import CallCosts


class FeatureCacheStats(TypedDict, total=False):
    """A feature cache's statistics of one run.

    ``calls``, ``full_calls``, ``partial_calls``, ``full_fraction``, ``plan`` (the schedule, one
    bool per step), ``modes`` (``[step, "full"|"partial"]`` per call), and when measured:
    ``macs`` (computed), ``macs_uncached`` (had every call run in full) and ``mac_fraction``
    (``macs / macs_uncached``).
    """

    calls: int
    full_calls: int
    partial_calls: int
    full_fraction: float
    plan: list[bool]
    modes: list[list[Any]]
    macs: int
    macs_uncached: int
    mac_fraction: float


def call_stats(calls: list[tuple[int, str, Any]], plan: list[bool], costs: CallCosts) -> FeatureCacheStats:
    """The :class:`FeatureCacheStats` of ``calls`` (``(step, "full"|"partial", batch layout)``):
    counts, fractions, the plan, the mode of every call and, when measured, the MACs
    (:meth:`~dagfusion.model.CallCosts.summary`)."""
    total = len(calls)
    full = sum(1 for _, mode, _ in calls if mode == "full")
    stats: dict[str, Any] = {
        "calls": total,
        "full_calls": full,
        "partial_calls": total - full,
        "full_fraction": full / total if total else 0.0,
        "plan": list(plan),
        "modes": [[index, mode] for index, mode, _ in calls],
    }
    stats.update(costs.summary(calls))
    return stats  # type: ignore[return-value]
