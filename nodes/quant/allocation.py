"""The bit allocation of mixed precision: one bit width per layer minimising the summed
sensitivity under an average-bits budget counted exactly as stored (:func:`allocate`), and the
patch quantizing a model with it (:func:`quantize_allocation`).

See :mod:`~dagfusion.nodes.quant.mixed` for the method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from dagfusion.model import parameter_places, unwrap_compiled
from dagfusion.nodes.quant.formats import expected_nbytes
from dagfusion.nodes.quant.patch import WeightQuantPatch, plan_layers, quantize_module, storage_dtype, stored_bits
from dagfusion.nodes.quant.sensitivity import RESOLUTION, QuantSensitivity


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
