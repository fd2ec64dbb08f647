"""Mixed-precision weight quantization: per-layer sensitivity and a bit allocation under a budget.

After BitsFusion (Sui et al., "BitsFusion: 1.99 bits Weight Quantization of Diffusion Model",
2024): layers differ widely in how much quantizing them hurts the denoiser's output, so a model
quantized to an *average* of b bits is better when sensitive layers get more bits and robust
(often large) layers fewer. Three steps:

1. **Calibration calls** (:func:`record_calls`): one sampling run of the plain denoiser (no
   patches) records the denoiser's inputs at a few evenly spaced steps (both guidance halves,
   every prompt of the conditioning batch); they are replayed unchanged afterwards.
2. **Sensitivity** (:func:`measure_sensitivity`): for every layer that
   :func:`~dagfusion.nodes.quant.patch.plan_layers` selects and every candidate bit width,
   quantize **only that layer** — its weight is swapped for the dequantized one as a new
   ``Parameter`` and the original object is put back afterwards, also on errors
   (:func:`swapped_weight`); the shared weights are never written — and measure the mean squared
   error of the denoiser output against the full-precision output over all recorded calls.
   The result is a :class:`QuantSensitivity` ``{layer: {bits: error}}``.
3. **Allocation** (:func:`allocate`): choose one bit width per layer to minimise the summed
   errors (BitsFusion's additivity assumption: layers' errors add up) subject to the storage
   budget ``target_bits × parameters``, counted exactly as
   :func:`~dagfusion.nodes.quant.patch.average_bits` counts it: every quantized layer's packed
   codes, fp16 scales and packed zero-points (:func:`~dagfusion.nodes.quant.formats.expected_nbytes`)
   plus every other parameter in its 16-bit storage dtype. Because the cost of a choice is its
   exact size in bits, the size of a layer enters the trade-off directly (a large layer's bits
   cost more budget); the errors need no extra size weighting.

   The optimisation is a multiple-choice knapsack, solved by dynamic programming over the
   budget (:func:`choose_bits`): exact when the free budget (above every layer at its cheapest
   width) is at most ``resolution`` (2¹⁸) of the costs' greatest common divisor; beyond that
   the costs are rounded **up** to a coarser unit (so the budget still holds), and a greedy pass
   then spends what the rounding left over. The result never exceeds the budget.

Formats per bit width (:func:`spec_for_bits`): up to 4 bits asymmetric with a scale and
zero-point per ``group_size`` inputs (as WeightOnly's int4); 5–8 bits symmetric with one scale
per output channel (as int8).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from dagfusion.model import (
    DenoiserCall,
    Forward,
    ModelPatch,
    SamplingRun,
    StepHook,
    parameter_places,
    swap_parameters,
    unwrap_compiled,
)
from dagfusion.nodes.quant.formats import QuantSpec, expected_nbytes, quantize
from dagfusion.nodes.quant.patch import (
    DEFAULT_KEEP,
    DEFAULT_MIN_PARAMS,
    WeightQuantPatch,
    plan_layers,
    quantize_module,
    storage_dtype,
    stored_bits,
)

DEFAULT_BITS: tuple[int, ...] = (1, 2, 3, 4, 8)
"""Candidate bit widths of the Sensitivity node."""

DEFAULT_BITS_TEXT = ",".join(str(b) for b in DEFAULT_BITS)

RESOLUTION = 1 << 18
"""Budget cells of the allocation's dynamic programme (see :func:`choose_bits`)."""

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


# --- calibration calls ------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedCall:
    """One denoiser call of a sampling run, as the sampler made it: ``module(sample, timestep, **kwargs)``.

    Attributes:
        step: The step index.
        timestep_value: The timestep as a float.
        sample: The model input (both guidance halves).
        timestep: The timestep argument as passed.
        kwargs: The other inputs (text embeddings …).
    """

    step: int
    timestep_value: float
    sample: Any
    timestep: Any
    kwargs: Mapping[str, Any]

    @property
    def rows(self) -> int:
        return int(self.sample.shape[0])


class _Finished(Exception):
    """Raised inside the sampler once the last wanted call is recorded (ends the run early)."""


class _RecordingHook(StepHook):
    def __init__(self, wanted: frozenset[int], calls: list[RecordedCall]) -> None:
        self.wanted = wanted
        self.last = max(wanted)
        self.calls = calls

    def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
        index = call.step.index
        if index in self.wanted:
            self.calls.append(RecordedCall(index, call.step.timestep_value, call.sample.detach().clone(),
                                           call.timestep, dict(call.kwargs)))
        if index >= self.last:
            raise _Finished
        return forward(call)


class _Recorder(ModelPatch):
    def __init__(self, wanted: frozenset[int]) -> None:
        self.wanted = wanted
        self.calls: list[RecordedCall] = []
        self.key = f"dagfusion.quant.Sensitivity:record:{sorted(wanted)}"

    def begin(self, run: SamplingRun) -> StepHook:
        return _RecordingHook(self.wanted, self.calls)


def calibration_steps(steps: int, count: int) -> tuple[int, ...]:
    """``count`` step indices spread evenly from the first to the last of ``steps`` (all if fewer)."""
    if count >= steps:
        return tuple(range(steps))
    if count == 1:
        return (steps // 2,)
    return tuple(sorted({round(i * (steps - 1) / (count - 1)) for i in range(count)}))


def record_calls(
    model: Any,
    conditioning: Any,
    latent: Any,
    *,
    steps: int = 20,
    count: int = 4,
    sampler: str = "default",
    guidance_scale: float = 7.5,
    seed: int = 0,
) -> list[RecordedCall]:
    """The denoiser calls of one sampling run of ``model`` without its patches, at
    :func:`calibration_steps` ``(steps, count)`` (the run stops after the last of them)."""
    from dagfusion.nodes.diffusion.sampling import sample

    recorder = _Recorder(frozenset(calibration_steps(steps, count)))
    try:
        sample(model.without_patches().with_patch(recorder), conditioning, latent, sampler=sampler, steps=steps,
               guidance_scale=guidance_scale, seed=seed)
    except _Finished:
        pass
    return list(recorder.calls)


# --- replaying them ---------------------------------------------------------------------------


class _Unmergeable(Exception):
    pass


def _merge(values: list[Any], rows: list[int]) -> Any:
    """Values of several calls as one batch: row-wise tensors concatenated, equal values kept."""
    import torch

    first = values[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise _Unmergeable
        if first.ndim >= 1 and all(
            v.ndim == first.ndim and v.shape[0] == r and v.shape[1:] == first.shape[1:] and v.dtype == first.dtype
            for v, r in zip(values, rows)
        ):
            return torch.cat(values)
        if all(v.shape == first.shape and torch.equal(v, first) for v in values):
            return first
        raise _Unmergeable
    if isinstance(first, dict):
        if not all(isinstance(v, dict) and v.keys() == first.keys() for v in values):
            raise _Unmergeable
        return {k: _merge([v[k] for v in values], rows) for k in first}
    if all(v is first for v in values) or all(type(v) is type(first) and v == first for v in values):
        return first
    raise _Unmergeable


def _merged(calls: Sequence[RecordedCall]) -> tuple[Any, Any, dict[str, Any]]:
    """One call batching ``calls`` (scalar timesteps become one per row)."""
    import torch

    rows = [c.rows for c in calls]
    sample = _merge([c.sample for c in calls], rows)
    timesteps = []
    for call in calls:
        t = call.timestep
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, device=call.sample.device)
        timesteps.append(t.reshape(1).expand(call.rows) if t.ndim == 0 else t)
    timestep = _merge(timesteps, rows)
    kwargs = _merge([dict(c.kwargs) for c in calls], rows)
    return sample, timestep, kwargs


@dataclass
class _Replay:
    """Runs the recorded calls through the denoiser: batched where that gives the same outputs."""

    module: Any
    family: Any
    batches: list[tuple[Any, Any, dict[str, Any]]]

    @classmethod
    def of(cls, module: Any, calls: Sequence[RecordedCall], max_rows: int) -> _Replay:
        import torch

        from dagfusion.model import family_for

        family = family_for(module)
        single = [(c.sample, c.timestep, dict(c.kwargs)) for c in calls]
        replay = cls(module, family, single)
        chunks: list[list[RecordedCall]] = []
        for call in calls:
            if chunks and sum(c.rows for c in chunks[-1]) + call.rows <= max_rows:
                chunks[-1].append(call)
            else:
                chunks.append([call])
        if len(chunks) == len(calls):
            return replay
        try:
            batched = cls(module, family, [_merged(chunk) for chunk in chunks])
            with torch.no_grad():
                got, expected = torch.cat(batched.run()), torch.cat(replay.run())
        except (_Unmergeable, RuntimeError, ValueError, TypeError):
            return replay
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * max(scale, 1e-6)):
            return batched
        return replay

    def run(self) -> list[Any]:
        import torch

        return [self.family.call(self.module, s, t, kw).to(torch.float32) for s, t, kw in self.batches]


def swapped_weight(module: Any, layer: str, value: Any) -> contextlib.AbstractContextManager[Any]:
    """Use ``value`` as the weight of ``module``'s ``layer`` inside the ``with`` block.

    The weight is replaced by a new ``Parameter`` in every place that holds it (tied weights
    included); on exit — also after an error — the original ``Parameter`` objects are put back,
    so the module is the same objects with the same values. The original weight is never written.
    Like a patch's ``apply``, the swap is visible to anything else running the same module at
    that moment (the engine runs one node at a time).

    :raises KeyError: when the module has no parameter ``f"{layer}.weight"``.
    """
    params = parameter_places(module)
    name = f"{layer}.weight"
    if name not in params:
        raise KeyError(f"the model has no parameter {name!r}")
    return swap_parameters(module, {name: value}, places=params)


def measure_sensitivity(
    module: Any,
    calls: Sequence[RecordedCall],
    *,
    bits: Iterable[int] = DEFAULT_BITS,
    group_size: int = 64,
    keep: Iterable[str] = DEFAULT_KEEP,
    min_params: int = DEFAULT_MIN_PARAMS,
    calibration: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_rows: int = 64,
) -> QuantSensitivity:
    """Quantize each selected layer of ``module`` alone to each of ``bits`` and measure the
    denoiser-output MSE against full precision over ``calls`` (see the module docstring).

    ``module``'s parameters are only swapped for the duration of each measurement and always
    restored (:func:`swapped_weight`). ``calls`` are replayed batched (up to ``max_rows`` rows a
    forward pass) when that gives the same outputs as one call at a time.

    :raises ValueError: no calls, or no layer selected by ``keep``/``min_params``.
    """
    import torch

    if not calls:
        raise ValueError("no calibration calls to measure with")
    widths = parse_bits(list(bits))
    patterns = tuple(keep)
    plan = plan_layers(module, patterns, min_params)
    if not plan.quantize:
        raise ValueError(f"no layer of the {type(unwrap_compiled(module)).__name__} is quantized with keep={list(patterns)} "
                         f"and min_params={min_params}")
    params = parameter_places(module)
    errors: dict[str, dict[int, float]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    with torch.no_grad():
        replay = _Replay.of(module, calls, max_rows)
        reference = replay.run()
        elements = sum(r.numel() for r in reference)
        power = float(sum(float(r.double().square().sum()) for r in reference) / elements)
        for index, name in enumerate(plan.quantize):
            param = params[f"{name}.weight"]
            weight = param.value
            shapes[name] = tuple(int(d) for d in weight.shape)
            row: dict[int, float] = {}
            for width in widths:
                value = quantize(weight, spec_for_bits(width, group_size)).dequantize(dtype=weight.dtype, device=weight.device)
                with swap_parameters(module, {f"{name}.weight": value}, places=params):
                    outputs = replay.run()
                squared = sum(float((o.double() - r.double()).square().sum()) for o, r in zip(outputs, reference))
                row[width] = squared / elements
            errors[name] = row
            if progress is not None:
                progress(index + 1, len(plan.quantize))
    info = dict(calibration or {})
    info.update(calls=len(calls), rows=sum(c.rows for c in calls), forward_batches=len(replay.batches))
    return QuantSensitivity(
        errors=errors, shapes=shapes, bits=widths, group_size=int(group_size), keep=patterns, min_params=int(min_params),
        architecture=type(unwrap_compiled(module)).__name__, reference_power=power, calibration=info,
    )


# --- allocation -------------------------------------------------------------------------------


def check_fits(sensitivity: QuantSensitivity, module: Any, where: str = "sensitivity") -> None:
    """:raises ValueError: (prefixed by ``where``) when ``module``'s selected layers or their shapes
    differ from those the sensitivity was measured on."""
    plan = plan_layers(module, sensitivity.keep, sensitivity.min_params)
    params = parameter_places(module)
    problems: list[str] = []
    if set(plan.quantize) != set(sensitivity.layers):
        missing = sorted(set(sensitivity.layers) - set(plan.quantize))
        extra = sorted(set(plan.quantize) - set(sensitivity.layers))
        if missing:
            problems.append(f"{len(missing)} measured layer(s) are not quantizable layers of the model, e.g. {missing[:3]}")
        if extra:
            problems.append(f"{len(extra)} quantizable layer(s) of the model were not measured, e.g. {extra[:3]}")
    for name in sensitivity.layers:
        param = params.get(f"{name}.weight")
        if param is not None and tuple(param.value.shape) != tuple(sensitivity.shapes[name]):
            problems.append(f"{name!r} is {tuple(param.value.shape)} in the model, {tuple(sensitivity.shapes[name])} when measured")
    if problems:
        raise ValueError(
            f"{where}: expected a sensitivity measured on this model's architecture "
            f"({type(unwrap_compiled(module)).__name__}, {len(plan.quantize)} quantizable layers), got one measured on a "
            f"{sensitivity.architecture or 'model'} with {len(sensitivity.layers)} layers: " + "; ".join(problems[:4])
        )


def storage_costs(module: Any, sensitivity: QuantSensitivity) -> tuple[int, int, dict[str, dict[int, int]]]:
    """``(fixed_bits, parameters, {layer: {bits: cost in bits}})`` of ``module`` quantized with the
    sensitivity's settings, as :func:`~dagfusion.nodes.quant.patch.average_bits` counts it: every
    parameter that is not a measured layer's weight costs its 16-bit storage size (fixed), a
    layer at ``bits`` its codes, scales and zero-points."""
    import torch

    params = parameter_places(module)
    quantized = {f"{name}.weight" for name in sensitivity.layers}
    fixed = 0
    count = 0
    for name, param in params.items():
        numel = int(param.value.numel())
        count += numel
        if name not in quantized:
            fixed += numel * torch.empty(0, dtype=storage_dtype(param.value)).element_size() * 8
    costs = {
        name: {b: expected_nbytes(sensitivity.shapes[name], sensitivity.spec(b)) * 8 for b in sensitivity.bits}
        for name in sensitivity.layers
    }
    return fixed, count, costs


def choose_bits(
    errors: Mapping[str, Mapping[int, float]],
    costs: Mapping[str, Mapping[int, int]],
    budget: int,
    *,
    resolution: int = RESOLUTION,
) -> tuple[dict[str, int], bool]:
    """Pick one option per layer minimising the summed ``errors`` with summed ``costs`` ≤ ``budget``.

    A multiple-choice knapsack solved by dynamic programming over the budget left above every
    layer's cheapest option, in cells of ``unit`` = the costs' greatest common divisor (exact),
    or coarser when that would need more than ``resolution`` cells: then each option's cost is
    rounded **up** to whole cells (the budget still holds) and a greedy pass afterwards makes
    the single-layer upgrade with the largest error reduction that fits what is left, until
    none fits. Non-finite errors count as larger than every finite one.

    :returns: ``({layer: option}, exact)`` — ``exact`` when no rounding was needed.
    :raises ValueError: when even the cheapest options exceed ``budget``.
    """
    import numpy as np

    names = list(errors)
    options = [sorted(costs[name], key=lambda b, n=name: (costs[n][b], b)) for name in names]
    finite = [float(e) for row in errors.values() for e in row.values() if math.isfinite(float(e))]
    worst = (max(finite) if finite else 1.0) * 1e3 + 1.0

    def error(name: str, option: int) -> float:
        value = float(errors[name][option])
        return value if math.isfinite(value) else worst

    base = [costs[name][opts[0]] for name, opts in zip(names, options)]
    free = budget - sum(base)
    if free < 0:
        raise ValueError(f"the budget of {budget} bits is below the {sum(base)} bits of the cheapest choice")
    extras = [[costs[name][o] - b0 for o in opts] for name, opts, b0 in zip(names, options, base)]
    step = 0
    for row in extras:
        for extra in row:
            step = math.gcd(step, extra)
    step = step or 1
    cells = free // step
    factor = max(1, -(-cells // resolution))
    unit = step * factor
    exact = factor == 1
    capacity = free // unit
    weights = [[-(-extra // unit) for extra in row] for row in extras]

    best = np.zeros(capacity + 1)
    choice = np.zeros((len(names), capacity + 1), dtype=np.int8)
    for i, (name, opts) in enumerate(zip(names, options)):
        new = np.full(capacity + 1, np.inf)
        arg = np.zeros(capacity + 1, dtype=np.int8)
        for j, option in enumerate(opts):
            w = weights[i][j]
            if w > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[w:] = best[: capacity + 1 - w] + error(name, option)
            better = candidate < new
            new[better] = candidate[better]
            arg[better] = j
        best = new
        choice[i] = arg
    picked = [0] * len(names)
    cell = capacity
    for i in range(len(names) - 1, -1, -1):
        j = int(choice[i, cell])
        picked[i] = j
        cell -= weights[i][j]

    left = free - sum(extras[i][j] for i, j in enumerate(picked))
    while True:  # spend what rounding left over on the best single-layer upgrades
        move = None
        gain_best = 0.0
        for i, (name, opts) in enumerate(zip(names, options)):
            current = error(name, opts[picked[i]])
            for j, option in enumerate(opts):
                more = extras[i][j] - extras[i][picked[i]]
                gain = current - error(name, option)
                if more <= left and gain > gain_best:
                    move, gain_best = (i, j), gain
        if move is None:
            break
        i, j = move
        left -= extras[i][j] - extras[i][picked[i]]
        picked[i] = j
    return {name: opts[j] for name, opts, j in zip(names, options, picked)}, exact


@dataclass(frozen=True)
class Allocation:
    """Bits per layer chosen for a budget, and what they cost.

    Attributes:
        bits: ``{layer: bits}`` in module order.
        target_bits: The requested average bits per parameter.
        average_bits: The average the allocation stores (``total_bits / params``; ≤ ``target_bits``).
        total_bits: Bits of the whole quantized denoiser.
        params: Parameters of the denoiser.
        predicted_error: The summed sensitivities of the choice.
        minimum_average_bits: Every layer at its cheapest width.
        maximum_average_bits: Every layer at its most expensive width.
        exact: Whether the knapsack was solved without rounding (:func:`choose_bits`).
    """

    bits: Mapping[str, int]
    target_bits: float
    average_bits: float
    total_bits: int
    params: int
    predicted_error: float
    minimum_average_bits: float
    maximum_average_bits: float
    exact: bool

    def histogram(self, sizes: Mapping[str, int]) -> dict[str, dict[str, int]]:
        """``{bits: {"layers": n, "params": p}}`` over the chosen widths."""
        out: dict[str, dict[str, int]] = {}
        for name, b in self.bits.items():
            entry = out.setdefault(str(b), {"layers": 0, "params": 0})
            entry["layers"] += 1
            entry["params"] += int(sizes[name])
        return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def allocate(
    module: Any,
    sensitivity: QuantSensitivity,
    target_bits: float,
    *,
    node: str | None = None,
    resolution: int = RESOLUTION,
) -> Allocation:
    """Bits per layer of ``module`` minimising the summed sensitivity with an average of at most
    ``target_bits`` bits per parameter (counted as :func:`~dagfusion.nodes.quant.patch.average_bits`
    counts it).

    :param node: The node id the error messages name (``"<node> input 'target_bits': …"``).
    :raises ValueError: when ``target_bits`` is below what the kept layers and the cheapest
        widths allow (naming the least feasible value and the one received), or the
        sensitivity does not fit ``module``.
    """
    prefix = f"{node} input " if node else "input "
    check_fits(sensitivity, module, where=f"{prefix}'sensitivity'")
    fixed, count, costs = storage_costs(module, sensitivity)
    lowest = fixed + sum(min(row.values()) for row in costs.values())
    highest = fixed + sum(max(row.values()) for row in costs.values())
    budget = math.floor(Fraction(float(target_bits)) * count)  # exactly: total ≤ target · count
    if budget < lowest:
        cheapest = min(sensitivity.bits)
        raise ValueError(
            f"{prefix}'target_bits': expected at least {math.ceil(lowest / count * 10000) / 10000:.4f} bits per parameter for this "
            f"{sensitivity.architecture or 'model'} (every one of its {len(costs)} measured layers at {cheapest} "
            f"bit{'s' if cheapest > 1 else ''} "
            f"with scales and zero-points, and {count - sum(sensitivity.sizes.values())} parameters kept in 16 bits), "
            f"got {target_bits}"
        )
    chosen, exact = choose_bits(sensitivity.errors, costs, budget - fixed, resolution=resolution)
    bits = {name: chosen[name] for name in sensitivity.layers}
    total = fixed + sum(costs[name][b] for name, b in bits.items())
    return Allocation(
        bits=bits, target_bits=float(target_bits), average_bits=total / count, total_bits=total, params=count,
        predicted_error=sensitivity.total_error(bits), minimum_average_bits=lowest / count,
        maximum_average_bits=highest / count, exact=exact,
    )


def quantize_allocation(
    module: Any,
    sensitivity: QuantSensitivity,
    allocation: Allocation,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> WeightQuantPatch:
    """The :class:`~dagfusion.nodes.quant.patch.WeightQuantPatch` of ``module`` with the allocation's
    bits per layer (format ``"mixed"``; every other parameter in 16 bits).

    :raises RuntimeError: if the patch's size differs from the allocation's (a bug, never expected).
    """
    specs = {name: sensitivity.spec(b) for name, b in allocation.bits.items()}
    base = sensitivity.spec(min(sensitivity.bits))
    patch = quantize_module(
        module, base, keep=sensitivity.keep, min_params=sensitivity.min_params, progress=progress, layer_specs=specs,
    )
    total, count = stored_bits(module, patch)
    if total != allocation.total_bits or count != allocation.params:
        raise RuntimeError(
            f"the mixed-precision patch stores {total} bits for {count} parameters, the allocation counted "
            f"{allocation.total_bits} for {allocation.params}"
        )
    return patch


def output_mse(module: Any, calls: Sequence[RecordedCall], patch: WeightQuantPatch | None = None, *, max_rows: int = 64) -> float:
    """Mean squared difference of ``module``'s outputs on ``calls`` with ``patch`` applied against
    the plain module (0 without a patch): how the allocation is judged."""
    import torch

    with torch.no_grad():
        replay = _Replay.of(module, calls, max_rows)
        reference = replay.run()
        if patch is None:
            return 0.0
        with patch.apply(module):
            outputs = replay.run()
    elements = sum(r.numel() for r in reference)
    return sum(float((o.double() - r.double()).square().sum()) for o, r in zip(outputs, reference)) / elements
