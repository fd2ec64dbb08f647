"""Confidence intervals for paired comparisons of per-image scores.

Benchmarks compare two variants on the same images (same prompts, same seeds); the difference of
their means is read with a paired bootstrap: images are resampled with replacement, each draw
keeping an image's two scores together, and the 2.5th and 97.5th percentiles of the resampled
mean differences bound the 95 % interval.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from typing import NamedTuple


class PairedDifference(NamedTuple):
    """Mean of ``after − before`` over paired items and its 95 % percentile-bootstrap interval."""

    mean: float
    low: float
    high: float


def paired_difference(after: Sequence[float], before: Sequence[float], rounds: int = 2000,
                      seed: int = 0) -> PairedDifference:
    """The mean of ``after[i] − before[i]`` and its paired-bootstrap 95 % interval (``rounds``
    resamples drawn with ``random.Random(seed)``, so the interval is reproducible).

    Raises ``ValueError`` when the sequences are empty or of different lengths, or ``rounds`` < 40.
    """
    if len(after) != len(before):
        raise ValueError(f"paired scores must have equal lengths, got {len(after)} and {len(before)}")
    if not after:
        raise ValueError("paired scores are empty")
    if rounds < 40:
        raise ValueError(f"rounds must be at least 40 for a 95 % interval, got {rounds}")
    diffs = [a - b for a, b in zip(after, before)]
    n = len(diffs)
    rng = random.Random(seed)
    draws = sorted(statistics.fmean(diffs[rng.randrange(n)] for _ in range(n)) for _ in range(rounds))
    return PairedDifference(statistics.fmean(diffs), draws[int(0.025 * rounds)], draws[int(0.975 * rounds) - 1])
