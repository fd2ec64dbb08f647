"""The quality floor, the Pareto set of measured points, and the point the tuner chooses.

A measured point is a plain dict (see :func:`dagfusion.nodes.tune.measure.measure_point`) with
at least ``setting``, ``mac_speedup``, ``weight_bits``, ``psnr`` and — when ShapeEval could
score the prompts — ``shapeeval_drop`` (points of all-correct lost against the full run).

Three objectives: more MAC speedup, fewer weight bits, more quality (PSNR against the full run,
or the negative ShapeEval drop when the floor is a ShapeEval one). The chosen point meets the
floor and is the fastest; among equally fast ones, the smallest, then the best.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dagfusion.nodes.tune.space import SettingError

FLOOR_KINDS = ("psnr", "shapeeval")


@dataclass(frozen=True)
class Floor:
    """The least quality a chosen point must keep.

    Attributes:
        kind: ``"psnr"`` (dB against the full run, at least ``value``) or ``"shapeeval"``
            (ShapeEval all-correct may drop by at most ``value`` points, i.e. ``value / 100``).
        value: The bound.
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in FLOOR_KINDS:
            raise SettingError(f"unknown floor {self.kind!r}; expected psnr=DB or shapeeval=POINTS")
        if not math.isfinite(self.value) or self.value < 0:
            raise SettingError(f"the {self.kind} floor must be a finite number ≥ 0, got {self.value}")

    def __str__(self) -> str:
        return f"PSNR ≥ {self.value:g} dB" if self.kind == "psnr" else f"ShapeEval drop ≤ {self.value:g} points"

    def quality(self, result: Mapping[str, Any]) -> float:
        """The quality this floor reads from a result (higher is better; ``-inf`` when unmeasured)."""
        if self.kind == "psnr":
            value = result.get("psnr")
            return float(value) if value is not None else -math.inf
        drop = result.get("shapeeval_drop")
        return -float(drop) if drop is not None else -math.inf

    def bound(self) -> float:
        """The floor on :meth:`quality`'s scale."""
        return self.value if self.kind == "psnr" else -self.value

    def met(self, result: Mapping[str, Any]) -> bool:
        return self.quality(result) >= self.bound() - 1e-9


def parse_floor(text: str) -> Floor:
    """``psnr=35`` (or ``psnr:35``) or ``shapeeval=2`` (a drop of at most 2 points).

    :raises SettingError: naming what was expected.
    """
    for sep in ("=", ":"):
        kind, found, value = str(text).partition(sep)
        if found:
            try:
                return Floor(kind.strip().lower(), float(value))
            except ValueError:
                raise SettingError(f"floor {text!r}: the bound must be a number, got {value!r}") from None
    raise SettingError(f"floor {text!r}: expected psnr=DB (e.g. psnr=35) or shapeeval=POINTS (e.g. shapeeval=2)")


def _objectives(result: Mapping[str, Any], floor: Floor) -> tuple[float, float, float]:
    return float(result["mac_speedup"]), -float(result["weight_bits"]), floor.quality(result)


def pareto_front(results: Sequence[Mapping[str, Any]], floor: Floor) -> list[Mapping[str, Any]]:
    """The results no other result beats in every objective (ties kept), fastest first."""
    scored = [(r, _objectives(r, floor)) for r in results]
    front = []
    for result, mine in scored:
        dominated = any(all(o >= m for o, m in zip(other, mine)) and any(o > m for o, m in zip(other, mine))
                        for _, other in scored)
        if not dominated:
            front.append(result)
    return sorted(front, key=lambda r: (-float(r["mac_speedup"]), float(r["weight_bits"])))


def choose(results: Sequence[Mapping[str, Any]], floor: Floor) -> Mapping[str, Any] | None:
    """The fastest result that meets the floor (then the smallest, then the best); ``None`` if none does."""
    meeting = [r for r in results if floor.met(r)]
    if not meeting:
        return None
    return max(meeting, key=lambda r: (float(r["mac_speedup"]), -float(r["weight_bits"]), floor.quality(r)))
