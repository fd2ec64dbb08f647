"""A denoiser's per-layer quantization sensitivity (:class:`QuantSensitivity`), its file format,
and the candidate bit widths (:func:`parse_bits`, :func:`spec_for_bits`).

See :mod:`~dagfusion.nodes.quant.mixed` for how it is measured and used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from dagfusion.errors import Problem
from dagfusion.nodes.quant.formats import QuantSpec

DEFAULT_BITS: tuple[int, ...] = (1, 2, 3, 4, 8)

"""Candidate bit widths of the Sensitivity node."""

DEFAULT_BITS_TEXT = ",".join(str(b) for b in DEFAULT_BITS)

RESOLUTION = 1 << 18
"""Budget cells of the allocation's dynamic programme (see :func:`~dagfusion.nodes.quant.allocation.choose_bits`)."""

SENSITIVITY_FORMAT = "dagfusion.quant.sensitivity"


def spec_for_bits(bits: int, group_size: int) -> QuantSpec:
    """The format of a layer quantized to ``bits``: ``intN`` with groups of ``group_size`` (and a
    zero-point) for N ≤ 4, symmetric per output channel for 5–8 bits."""
    return QuantSpec.parse(f"int{int(bits)}", group_size=group_size if bits <= 4 else None)


def parse_bits(text: str | Iterable[int], where: str = "bits") -> tuple[int, ...]:
    """``"1,2,3,4,8"`` → ``(1, 2, 3, 4, 8)`` (sorted, without repeats).

    :raises ValueError: naming ``where`` when a width is not an integer in 1..8 or none is given.
    """
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(p) for p in text]
    values: set[int] = set()
    for part in parts:
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            value = 0
        if not 1 <= value <= 8 or str(value) != part.lstrip("+"):
            raise ValueError(f"{where}: expected comma-separated bit widths between 1 and 8, got {part!r} in {text!r}")
        values.add(value)
    if not values:
        raise ValueError(f"{where}: expected at least one bit width between 1 and 8, got {text!r}")
    return tuple(sorted(values))


def check_bits(values: Mapping[str, Any]) -> Iterator[Problem]:
    """A node check: the ``bits`` input lists bit widths between 1 and 8 (silent when linked)."""
    text = values.get("bits")
    if isinstance(text, str):
        try:
            parse_bits(text)
        except ValueError as exc:
            yield Problem("bad-bits", str(exc), input="bits")


# --- the sensitivity --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QuantSensitivity:
    """How much a denoiser's output changes when one layer at a time is quantized.

    Attributes:
        errors: ``{layer: {bits: error}}`` in module order: the mean squared difference between
            the denoiser's output with only that layer quantized to ``bits`` and its
            full-precision output, over every element of every recorded calibration call.
        shapes: ``{layer: weight shape}``.
        bits: The candidate bit widths, ascending.
        group_size: Inputs per scale for widths up to 4 bits (see :func:`spec_for_bits`).
        keep: The keep patterns the layers were selected with.
        min_params: The minimum layer size the layers were selected with.
        architecture: Class name of the denoiser.
        reference_power: Mean square of the full-precision outputs (to read errors relative to).
        calibration: Plain data on the calibration run (steps, recorded steps, timesteps, rows,
            sampler, guidance scale, seed, the weights' fingerprint).
    """

    errors: Mapping[str, Mapping[int, float]]
    shapes: Mapping[str, tuple[int, ...]]
    bits: tuple[int, ...]
    group_size: int
    keep: tuple[str, ...]
    min_params: int
    architecture: str = ""
    reference_power: float = 0.0
    calibration: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [name for name, row in self.errors.items() if set(row) != set(self.bits)]
        if missing:
            raise ValueError(f"sensitivity rows must give an error for each of the bits {list(self.bits)}; {missing[:3]} do not")
        if set(self.shapes) != set(self.errors):
            raise ValueError("sensitivity shapes and errors must name the same layers")

    @property
    def layers(self) -> tuple[str, ...]:
        """The measured layers, in module order."""
        return tuple(self.errors)

    @property
    def sizes(self) -> dict[str, int]:
        """``{layer: weight elements}``."""
        return {name: math.prod(shape) for name, shape in self.shapes.items()}

    def spec(self, bits: int) -> QuantSpec:
        """The format of ``bits`` with this sensitivity's group size (:func:`spec_for_bits`)."""
        return spec_for_bits(bits, self.group_size)

    def total_error(self, bit_map: Mapping[str, int]) -> float:
        """The summed errors of ``bit_map`` ``{layer: bits}`` (the allocation's objective)."""
        return float(sum(self.errors[name][int(b)] for name, b in bit_map.items()))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (bit widths as string keys); :meth:`from_dict` reads it back exactly."""
        return {
            "format": SENSITIVITY_FORMAT,
            "format_version": 1,
            "architecture": self.architecture,
            "bits": list(self.bits),
            "group_size": int(self.group_size),
            "keep": list(self.keep),
            "min_params": int(self.min_params),
            "reference_power": float(self.reference_power),
            "calibration": json.loads(json.dumps(dict(self.calibration), default=str)),
            "layers": [
                {"name": name, "shape": list(self.shapes[name]), "errors": {str(b): float(e) for b, e in sorted(row.items())}}
                for name, row in self.errors.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSensitivity:
        """The sensitivity :meth:`to_dict` wrote.

        :raises ValueError: when ``data`` is not such a mapping.
        """
        if data.get("format") != SENSITIVITY_FORMAT:
            raise ValueError(f"not a quantization sensitivity (format {data.get('format')!r}, expected {SENSITIVITY_FORMAT!r})")
        layers = data["layers"]
        return cls(
            errors={row["name"]: {int(b): float(e) for b, e in row["errors"].items()} for row in layers},
            shapes={row["name"]: tuple(int(d) for d in row["shape"]) for row in layers},
            bits=tuple(int(b) for b in data["bits"]),
            group_size=int(data["group_size"]),
            keep=tuple(data["keep"]),
            min_params=int(data["min_params"]),
            architecture=str(data.get("architecture", "")),
            reference_power=float(data.get("reference_power", 0.0)),
            calibration=dict(data.get("calibration", {})),
        )

    def __dagfusion_fingerprint__(self) -> str:
        from dagfusion.fingerprint import new_hasher

        h = new_hasher()
        h.update(json.dumps(self.to_dict(), sort_keys=True).encode())
        return h.hexdigest()

    def report(self) -> dict[str, Any]:
        """Plain data for people: per bit width the summed error over layers, and per layer its
        size and errors (also relative to ``reference_power``)."""
        power = self.reference_power
        totals = {str(b): float(sum(row[b] for row in self.errors.values())) for b in self.bits}
        layers = {
            name: {
                "params": math.prod(self.shapes[name]),
                "mse": {str(b): e for b, e in sorted(row.items())},
                "relative_mse": {str(b): (e / power if power > 0 else None) for b, e in sorted(row.items())},
            }
            for name, row in self.errors.items()
        }
        return {
            "architecture": self.architecture,
            "bits": list(self.bits),
            "group_size": self.group_size,
            "keep": list(self.keep),
            "min_params": self.min_params,
            "layers_measured": len(self.errors),
            "reference_mean_square": power,
            "calibration": dict(self.calibration),
            "summed_mse_by_bits": totals,
            "layers": layers,
        }

    def __repr__(self) -> str:
        return f"QuantSensitivity({self.architecture or '?'}, {len(self.errors)} layers, bits={list(self.bits)})"


def save_sensitivity(sensitivity: QuantSensitivity, path: str) -> None:
    """Write ``sensitivity`` as JSON to ``path``."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(sensitivity.to_dict(), fh)


def load_sensitivity(path: str) -> QuantSensitivity:
    """Read a sensitivity :func:`save_sensitivity` wrote."""
    with open(path, encoding="utf-8") as fh:
        return QuantSensitivity.from_dict(json.load(fh))
