"""Which sampling steps run the whole denoiser ("full" steps) in feature-caching schedulers.

Pure functions on plain numbers (no torch), shared by the cache nodes:

- :func:`full_steps` — the schedule of one run as a list of booleans, one per step;
- :func:`power_center_steps` — DeepCache's non-uniform schedule (full steps packed around a
  chosen step, sparser away from it);
- :func:`parse_steps` — an explicit ``"0,3,5"`` list, as typed into a node or produced by a
  calibration node.

Step 0 is always full: the cache is empty before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

SCHEDULES = ("uniform", "non-uniform", "explicit")
"""Schedule kinds understood by :func:`full_steps`."""


def full_steps(
    kind: str,
    steps: int,
    interval: int = 1,
    *,
    pow: float = 1.4,
    center: int = 15,
    explicit: Iterable[int] = (),
    start_step: int = 0,
    end_step: int | None = None,
) -> list[bool]:
    """For each of ``steps`` steps, whether it runs the whole denoiser (``True``) or reuses the cache.

    :param kind: ``"uniform"`` — every ``interval``-th step (0, N, 2N …) is full;
        ``"non-uniform"`` — ``ceil(steps / interval)`` full steps placed by
        :func:`power_center_steps` (``pow``, ``center``); ``"explicit"`` — the step indices in
        ``explicit``.
    :param start_step, end_step: Steps before ``start_step`` and from ``end_step`` on are
        always full (``end_step=None``: up to the last step).
    :raises ValueError: unknown kind, ``steps`` or ``interval`` below 1, an explicit index
        outside ``0..steps-1``, or a non-uniform schedule that cannot be built (see
        :func:`power_center_steps`).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown cache schedule {kind!r}; expected one of {list(SCHEDULES)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if interval < 1:
        raise ValueError(f"interval must be at least 1, got {interval}")
    if kind == "uniform":
        full = [i % interval == 0 for i in range(steps)]
    elif kind == "non-uniform":
        count = math.ceil(steps / interval)
        chosen = set(power_center_steps(steps, count, center, pow))
        full = [i in chosen for i in range(steps)]
    else:
        indices = sorted({int(i) for i in explicit})
        outside = [i for i in indices if not 0 <= i < steps]
        if outside:
            raise ValueError(
                f"full_steps lists step(s) {outside} but the run has {steps} steps (indices 0..{steps - 1}); "
                "make the list for this number of steps"
            )
        full = [i in indices for i in range(steps)]
    end = steps if end_step is None else end_step
    full = [f or i < start_step or i >= end for i, f in enumerate(full)]
    full[0] = True
    return full


def power_center_steps(steps: int, count: int, center: int, pow: float = 1.4) -> list[int]:
    """DeepCache's non-uniform 1:N schedule: ``count`` full-step indices out of ``steps``, densest near ``center``.

    From the paper (Ma et al., CVPR 2024, Sec. 3.3) and its reference code: ``count + 1``
    points ``l`` are spaced linearly between ``(-center)^(1/p)`` and ``(steps - center)^(1/p)``
    and mapped back by ``i = l^p + center``; the distinct integer indices strictly inside are
    the full steps, after step 0. Because ``(-center)^(1/p)`` is not real for a fractional
    ``p``, the reference evaluates it with principal complex powers and keeps the integer part
    (truncated towards zero) of the real part — this function does exactly that, so the same
    settings give the same steps as the published implementation (e.g. 50 steps, 10 full,
    ``center=15``, ``p=1.4`` → 0, 5, 9, 13, 17, 21, 26, 31, 37, 43). When rounding merges
    indices, ``p`` is lowered by 0.02 until there are exactly ``count`` (as the reference does).

    :raises ValueError: ``center`` outside ``0..steps-1``, ``pow`` not above 1, or no ``p``
        above 1 gives ``count`` distinct steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if count >= steps:
        return list(range(steps))
    if count <= 1:
        return [0]
    if not 0 <= center < steps:
        raise ValueError(
            f"center must be a step index below the number of steps ({steps}), got {center}; "
            "the non-uniform schedule packs full steps around it"
        )
    if not pow > 1.0:
        raise ValueError(f"pow must be greater than 1 for the non-uniform schedule, got {pow}")
    import numpy as np

    p = float(pow)
    while p > 1.0:
        # The same arithmetic as the reference (Python's complex power for the negative end, numpy's
        # for the points): the last bits decide where values on integers are truncated.
        start = (-center) ** (1.0 / p)
        stop = (steps - center) ** (1.0 / p)
        points = np.linspace(start, stop, count + 1)
        values = np.unique(np.trunc((points**p).real).astype(np.int64))
        indices = [0] + [int(v) + center for v in values[1:-1]]
        if len(indices) == count:
            return indices
        p -= 0.02
    raise ValueError(
        f"the non-uniform schedule cannot place {count} full steps among {steps} around step {center} "
        f"with pow <= {pow}; lower the interval, move center or use the uniform schedule"
    )


def parse_steps(text: str, what: str = "full_steps") -> list[int]:
    """Step indices from ``"0, 3, 5"`` (commas and/or spaces; duplicates kept once, sorted).

    :raises ValueError: naming ``what`` when a token is not a non-negative integer.
    """
    tokens = [t for t in text.replace(",", " ").split() if t]
    indices: set[int] = set()
    for token in tokens:
        try:
            value = int(token)
        except ValueError:
            raise ValueError(
                f"{what}: expected comma-separated step indices like '0,3,5', got {token!r} in {text!r}"
            ) from None
        if value < 0:
            raise ValueError(f"{what}: step indices start at 0, got {value} in {text!r}")
        indices.add(value)
    return sorted(indices)
