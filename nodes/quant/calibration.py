"""Calibration calls for mixed precision: recording the denoiser's inputs during one sampling run,
replaying them, and measuring each layer's sensitivity (:func:`measure_sensitivity`) and a
patch's output error (:func:`output_mse`) on them.

See :mod:`~dagfusion.nodes.quant.mixed` for the method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
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
from dagfusion.nodes.quant.formats import quantize
from dagfusion.nodes.quant.patch import DEFAULT_KEEP, DEFAULT_MIN_PARAMS, WeightQuantPatch, plan_layers
from dagfusion.nodes.quant.sensitivity import DEFAULT_BITS, QuantSensitivity, parse_bits, spec_for_bits


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


def weight_error_sensitivity(module: Any, bits: Iterable[int], min_params: int = DEFAULT_MIN_PARAMS,
                             group_size: int = 64) -> QuantSensitivity:
    """A stand-in sensitivity without calibration calls: each selected layer's summed squared
    weight error at each width (for examples and tests; the measured one is :func:`measure_sensitivity`)."""
    import torch

    widths = tuple(bits)
    params = parameter_places(module)
    errors: dict[str, dict[int, float]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in plan_layers(module, DEFAULT_KEEP, min_params).quantize:
        weight = params[f"{name}.weight"].value.detach()
        shapes[name] = tuple(weight.shape)
        errors[name] = {
            b: float(torch.sum((quantize(weight, spec_for_bits(b, group_size)).dequantize(dtype=torch.float32) - weight.float()) ** 2))
            for b in widths
        }
    return QuantSensitivity(errors, shapes, widths, group_size, DEFAULT_KEEP, min_params, type(module).__name__)
