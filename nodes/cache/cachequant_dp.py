"""CacheQuant's dynamic programme and its calibration statistics.

:func:`optimal_full_steps` chooses the full steps minimising the summed feature distance of the
reused steps; :class:`PairStatistics` keeps the per-channel sums the distances and the
least-squares corrections come from. See :mod:`~dagfusion.nodes.cache.cachequant`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any


# --- the dynamic programme -----------------------------------------------------------------------


def segment_cost(distance: Callable[[int, int], float], start: int, end: int) -> float:
    """``Σ_{t = start+1}^{end-1} distance(start, t)``: the error of reusing step ``start``'s feature until ``end``."""
    return sum(distance(start, t) for t in range(start + 1, end))


def optimal_full_steps(distance: Callable[[int, int], float], steps: int, full: int, max_segment: int) -> list[int]:
    """The ``full`` step indices (step 0 included) minimising the summed segment cost (see the module docstring).

    :param distance: ``distance(s, t)`` for ``0 <= s < t < steps`` with ``t - s < max_segment``.
    :param max_segment: The longest segment (a full step and the steps reusing it).
    :raises ValueError: when ``full`` is not in ``1 … steps`` or ``full * max_segment < steps``.
    """
    if not 1 <= full <= steps:
        raise ValueError(f"the number of full steps must be between 1 and the step count {steps}, got {full}")
    if max_segment < 1 or full * max_segment < steps:
        raise ValueError(
            f"{full} full steps with segments of at most {max_segment} steps cannot cover {steps} steps: "
            f"raise max_segment to at least {math.ceil(steps / full)} or use more full steps"
        )
    inf = float("inf")
    cost: dict[tuple[int, int], float] = {}
    for s in range(steps):
        running = 0.0
        for e in range(s + 1, min(steps, s + max_segment) + 1):
            if e - 1 > s:
                running += distance(s, e - 1)
            cost[(s, e)] = running
    # best[k][e]: least cost of covering steps [0, e) with k segments; back[k][e]: start of the last one.
    best = [[inf] * (steps + 1) for _ in range(full + 1)]
    back = [[-1] * (steps + 1) for _ in range(full + 1)]
    best[0][0] = 0.0
    for k in range(1, full + 1):
        for e in range(k, steps + 1):
            for s in range(max(k - 1, e - max_segment), e):
                if best[k - 1][s] == inf:
                    continue
                value = best[k - 1][s] + cost[(s, e)]
                if value < best[k][e]:
                    best[k][e], back[k][e] = value, s
    starts = []
    e = steps
    for k in range(full, 0, -1):
        s = back[k][e]
        starts.append(s)
        e = s
    return sorted(starts)


def schedule_cost(distance: Callable[[int, int], float], steps: int, full_steps: Sequence[int]) -> float:
    """The summed segment cost of a given set of full steps (step 0 is always full)."""
    starts = sorted({0, *full_steps})
    ends = [*starts[1:], steps]
    return sum(segment_cost(distance, s, e) for s, e in zip(starts, ends))


# --- the calibration statistics ------------------------------------------------------------------


class PairStatistics:
    """Per-channel sums of the features of every pair of steps at most ``window - 1`` apart.

    ``add(t, f)`` is called with each step's feature in order; the sums for ``(s, t)`` hold
    ``n, Σx, Σy, Σx², Σxy, Σy²`` over every element of channel ``c`` (x = f_s, y = f_t), in float64.

    With ``groups = G > 1`` the batch (dimension 0) is split into ``G`` equal consecutive parts —
    the unconditional and the conditional half of a classifier-free-guidance batch for ``G = 2`` —
    and every part keeps its own sums: the sums are ``(6, G, channels)`` and the fits
    ``(G, channels)``. With ``G = 1`` they are ``(6, channels)`` and ``(channels,)``.
    """

    def __init__(self, window: int, channel_dim: int, groups: int = 1) -> None:
        if groups < 1:
            raise ValueError(f"groups must be at least 1, got {groups}")
        self.window = int(window)
        self.channel_dim = int(channel_dim)
        self.groups = int(groups)
        self.recent: list[tuple[int, Any]] = []
        self.sums: dict[tuple[int, int], Any] = {}
        self.energy: dict[int, float] = {}  # Σy² over all channels of step t
        self.channels: int | None = None
        self.shape: tuple[int, ...] | None = None

    def _flat(self, feature: Any) -> Any:
        """``(elements, channels)`` float64 (one group) or ``(groups, elements, channels)``."""
        import torch

        f = feature.detach().to(torch.float64)
        channels = f.shape[self.channel_dim]
        f = f.movedim(self.channel_dim, -1)
        if self.groups == 1:
            return f.reshape(-1, channels)
        if f.shape[0] % self.groups:
            raise ValueError(f"a batch of {f.shape[0]} rows cannot be split into {self.groups} equal groups")
        return f.reshape(self.groups, -1, channels)

    @staticmethod
    def _sums(fx: Any, fy: Any) -> Any:
        """``n, Σx, Σy, Σx², Σxy, Σy²`` per channel of flattened ``(…, elements, channels)`` features, on the CPU."""
        import torch

        n = torch.full(fy.shape[:-2] + fy.shape[-1:], float(fy.shape[-2]), dtype=torch.float64, device=fy.device)
        return torch.stack([n, fx.sum(-2), fy.sum(-2), (fx * fx).sum(-2), (fx * fy).sum(-2), (fy * fy).sum(-2)]).cpu()

    def cross(self, x: Any, y: Any) -> Any:
        """The per-channel sums of the pair ``(x, y)`` (two features of one shape), as :meth:`fit_sums` takes them."""
        return self._sums(self._flat(x), self._flat(y))

    def add(self, index: int, feature: Any) -> None:
        """Record step ``index``'s feature (any shape with the channel at ``channel_dim``)."""
        if self.shape is not None and tuple(feature.shape) != self.shape:
            raise ValueError(
                f"the cached feature changed shape during calibration ({self.shape} at an earlier step, "
                f"{tuple(feature.shape)} at step {index}): calibrate with one batch layout"
            )
        self.shape = tuple(feature.shape)
        y = self._flat(feature)
        self.channels = int(y.shape[-1])
        self.energy[index] = float((y * y).sum())
        for s, x in self.recent:
            if index - s < self.window:
                self.sums[(s, index)] = self._sums(x, y)
        self.recent.append((index, y))
        self.recent = [(s, x) for s, x in self.recent if index + 1 - s < self.window]

    def distance(self, s: int, t: int) -> float:
        """``‖f_t - f_s‖² / ‖f_t‖²``."""
        n, sx, sy, sxx, sxy, syy = self.sums[(s, t)]
        return float((sxx - 2 * sxy + syy).sum()) / max(self.energy[t], 1e-30)

    def fit(self, s: int, t: int) -> tuple[Any, Any]:
        """Per-channel least squares ``(a, b)`` with ``a ⊙ f_s + b ≈ f_t`` (float32 tensors, CPU)."""
        return self.fit_sums(self.sums[(s, t)])

    @staticmethod
    def fit_sums(sums: Any) -> tuple[Any, Any]:
        """Per-channel least squares ``(a, b)`` with ``a ⊙ x + b ≈ y`` from the sums of ``(x, y)``."""
        import torch

        n, sx, sy, sxx, sxy, syy = sums
        mx, my = sx / n, sy / n
        var_x = sxx / n - mx * mx
        cov = sxy / n - mx * my
        ridge = 1e-6 * float(var_x.clamp(min=0).mean()) + 1e-12  # pulls a towards 1 where f_s is constant
        a = (cov + ridge) / (var_x.clamp(min=0) + ridge)
        b = my - a * mx
        return a.to(torch.float32), b.to(torch.float32)

    def corrected_distance(self, s: int, t: int) -> float:
        """The relative squared error left after :meth:`fit`'s correction."""
        n, sx, sy, sxx, sxy, syy = self.sums[(s, t)]
        a, b = (v.to(sx.dtype) for v in self.fit(s, t))
        residual = syy - 2 * a * sxy - 2 * b * sy + a * a * sxx + 2 * a * b * sx + n * b * b
        return float(residual.clamp(min=0).sum()) / max(self.energy[t], 1e-30)
