"""The search space of the tuner: one :class:`Point` per (step count, cache scheduler, weight format).

A point is written as a *setting*, a short text that a sweep can carry and a person can read::

    steps=25 cache=deepcache:5 quant=int8

``cache`` is ``none``, ``deepcache:N`` (UNets: a full step every N), ``blockcache:N``
(transformers: the blocks between the first and the last reused, a full step every N) or
``cachequant:N`` (CacheQuant's calibrated schedule with the full-step count of interval N);
``quant`` is ``none`` or a weight-only format of the quantization pack (``int8``, ``int4``,
``fp8_e4m3``). Parsing never imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CACHES: dict[str, tuple[str, ...]] = {
    "unet": ("none", "deepcache", "cachequant"),
    "transformer": ("none", "blockcache", "cachequant"),
}
"""The cache schedulers the tuner knows, by denoiser kind."""

QUANTS: tuple[str, ...] = ("none", "int8", "int4", "fp8_e4m3")
"""Weight formats: ``none`` keeps the model's own weights."""

MAX_POINTS = 512
"""The most points one search may measure (checked before anything runs)."""

DEFAULT_INTERVALS: dict[str, tuple[int, ...]] = {"deepcache": (2, 3, 4, 5), "blockcache": (2, 3), "cachequant": (3, 4, 5)}
"""Intervals searched per scheduler when none are given."""


class SettingError(ValueError):
    """A setting text, or a search-space option, that does not describe a point."""


@dataclass(frozen=True, order=True)
class Point:
    """One configuration to measure.

    Attributes:
        steps: Sampling steps.
        cache: One of the names in :data:`CACHES` (``"none"``: every step in full).
        interval: The scheduler's knob (a full step every ``interval`` steps); 0 with ``cache="none"``.
        quant: One of :data:`QUANTS`.
    """

    steps: int
    cache: str = "none"
    interval: int = 0
    quant: str = "none"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise SettingError(f"steps must be at least 1, got {self.steps}")
        if self.cache not in {name for names in CACHES.values() for name in names}:
            raise SettingError(f"unknown cache {self.cache!r}; expected one of none, deepcache, blockcache, cachequant")
        if (self.cache == "none") != (self.interval == 0):
            raise SettingError(f"cache {self.cache!r} needs an interval ≥ 2 (e.g. {self.cache}:3); 'none' takes none"
                               if self.cache != "none" else "cache 'none' takes no interval")
        if self.cache != "none" and self.interval < 2:
            raise SettingError(f"the {self.cache} interval must be at least 2, got {self.interval}")
        if self.quant not in QUANTS:
            raise SettingError(f"unknown quant {self.quant!r}; expected one of {', '.join(QUANTS)}")

    @property
    def setting(self) -> str:
        """The canonical setting text (parsed back by :func:`parse_setting`)."""
        cache = "none" if self.cache == "none" else f"{self.cache}:{self.interval}"
        return f"steps={self.steps} cache={cache} quant={self.quant}"

    @property
    def label(self) -> str:
        """A short human label, e.g. ``25 steps, DeepCache N=5, int8``."""
        names = {"deepcache": "DeepCache", "blockcache": "BlockCache", "cachequant": "CacheQuant"}
        parts = [f"{self.steps} steps"]
        if self.cache != "none":
            parts.append(f"{names[self.cache]} N={self.interval}")
        if self.quant != "none":
            parts.append(self.quant)
        return ", ".join(parts)


def parse_setting(text: str) -> Point:
    """The point a setting text describes (see the module docstring).

    :raises SettingError: naming the part that is wrong and what was expected.
    """
    fields: dict[str, str] = {}
    for part in str(text).split():
        key, sep, value = part.partition("=")
        if not sep or key not in ("steps", "cache", "quant"):
            raise SettingError(f"setting {text!r}: expected 'steps=N cache=NAME[:N] quant=NAME', got the part {part!r}")
        if key in fields:
            raise SettingError(f"setting {text!r}: {key!r} is given twice")
        fields[key] = value
    if "steps" not in fields:
        raise SettingError(f"setting {text!r}: 'steps=N' is missing")
    try:
        steps = int(fields["steps"])
    except ValueError:
        raise SettingError(f"setting {text!r}: steps must be an integer, got {fields['steps']!r}") from None
    cache, _, interval_text = fields.get("cache", "none").partition(":")
    try:
        interval = int(interval_text) if interval_text else 0
    except ValueError:
        raise SettingError(f"setting {text!r}: the cache interval must be an integer, got {interval_text!r}") from None
    try:
        return Point(steps, cache, interval, fields.get("quant", "none"))
    except SettingError as exc:
        raise SettingError(f"setting {text!r}: {exc}") from None


def search_space(
    kind: str,
    step_counts: Sequence[int],
    *,
    caches: Iterable[str] | None = None,
    quants: Iterable[str] = ("none", "int8"),
    intervals: dict[str, Sequence[int]] | None = None,
) -> list[Point]:
    """Every point of (step counts × cache settings × weight formats) that suits a ``kind`` denoiser.

    Points whose scheduler would leave fewer than two full steps are left out, and so are
    CacheQuant intervals that give the same full-step count as a smaller one (the same schedule).
    Within each step count the uncached points come first.

    :param kind: ``"unet"`` or ``"transformer"``.
    :param caches: Scheduler names (default: every one of :data:`CACHES` for the kind).
    :param intervals: ``{scheduler: intervals}`` (default :data:`DEFAULT_INTERVALS`).
    :raises SettingError: an unknown kind, scheduler or format, or a scheduler that does not suit the kind.
    """
    if kind not in CACHES:
        raise SettingError(f"unknown denoiser kind {kind!r}; expected one of {sorted(CACHES)}")
    chosen = tuple(CACHES[kind] if caches is None else caches)
    for name in chosen:
        if name not in CACHES[kind]:
            raise SettingError(f"cache {name!r} does not suit a {kind} denoiser; expected some of {', '.join(CACHES[kind])}")
    formats = check_quants(quants)
    knobs = {**DEFAULT_INTERVALS, **(intervals or {})}
    points: list[Point] = []
    for steps in step_counts:
        for cache in chosen:
            full_counts: set[int] = set()
            for interval in ((0,) if cache == "none" else knobs[cache]):
                full = -(-steps // interval) if interval else steps
                if cache != "none" and full < 2:
                    continue
                if cache == "cachequant" and full in full_counts:
                    continue  # CacheQuant's knob is the full-step count: an interval giving the same count is the same point
                full_counts.add(full)
                points.extend(Point(int(steps), cache, int(interval), quant) for quant in formats)
    return list(dict.fromkeys(points))


def parse_list(text: str | Sequence[str], what: str) -> list[str]:
    """Comma- or space-separated names (``"none, int8"``) → ``["none", "int8"]``; empty items dropped."""
    items = text.replace(",", " ").split() if isinstance(text, str) else [str(t) for t in text]
    if not items:
        raise SettingError(f"{what}: expected at least one value")
    return items


def parse_ints(text: str | Sequence[int], what: str) -> list[int]:
    """``"25, 20, 15"`` → ``[25, 20, 15]`` (each ≥ 1)."""
    values: list[int] = []
    for item in parse_list([str(t) for t in text] if not isinstance(text, str) else text, what):
        try:
            value = int(item)
        except ValueError:
            raise SettingError(f"{what}: expected integers, got {item!r}") from None
        if value < 1:
            raise SettingError(f"{what}: expected integers ≥ 1, got {value}")
        values.append(value)
    return values


def check_quants(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` as a tuple, each one of :data:`QUANTS`.

    :raises SettingError: naming the first unknown format.
    """
    formats = tuple(names)
    for name in formats:
        if name not in QUANTS:
            raise SettingError(f"unknown quant {name!r}; expected some of {', '.join(QUANTS)}")
    return formats


def parse_quants(text: str | Sequence[str], what: str) -> list[str]:
    """``"none, int8"`` → ``["none", "int8"]``, each one of :data:`QUANTS`."""
    return list(check_quants(parse_list(text, what)))
