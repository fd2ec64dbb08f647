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

Modules: :mod:`~dagfusion.nodes.quant.sensitivity` (the sensitivity and the bit widths),
:mod:`~dagfusion.nodes.quant.calibration` (steps 1 and 2) and
:mod:`~dagfusion.nodes.quant.allocation` (step 3); this module gathers their public names.
"""

from __future__ import annotations

from dagfusion.nodes.quant.sensitivity import (
    DEFAULT_BITS,
    DEFAULT_BITS_TEXT,
    QuantSensitivity,
    RESOLUTION,
    SENSITIVITY_FORMAT,
    check_bits,
    load_sensitivity,
    parse_bits,
    save_sensitivity,
    spec_for_bits,
)
from dagfusion.nodes.quant.calibration import (
    RecordedCall,
    calibration_steps,
    measure_sensitivity,
    output_mse,
    record_calls,
    swapped_weight,
)
from dagfusion.nodes.quant.allocation import (
    Allocation,
    allocate,
    check_fits,
    choose_bits,
    quantize_allocation,
    storage_costs,
)

__all__ = [
    "Allocation",
    "DEFAULT_BITS",
    "DEFAULT_BITS_TEXT",
    "QuantSensitivity",
    "RESOLUTION",
    "RecordedCall",
    "SENSITIVITY_FORMAT",
    "allocate",
    "calibration_steps",
    "check_bits",
    "check_fits",
    "choose_bits",
    "load_sensitivity",
    "measure_sensitivity",
    "output_mse",
    "parse_bits",
    "quantize_allocation",
    "record_calls",
    "save_sensitivity",
    "spec_for_bits",
    "storage_costs",
    "swapped_weight",
]
