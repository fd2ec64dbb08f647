"""CacheQuant's cache schedule: calibrated full steps chosen by dynamic programming, with error correction.

CacheQuant (Liu et al., "CacheQuant: Comprehensively Accelerated Diffusion Models", CVPR 2025)
makes two changes to feature caching (DeepCache on UNets, block caching on transformers):

1. **Dynamic-programming schedule (DPS).** Instead of a full step every N steps, it runs full
   sampling once on calibration prompts, records the cached feature ``f_t`` of every step and
   chooses which ``K`` steps compute in full so that the summed distance between each reused
   step's feature and the feature cached at the start of its segment is smallest::

       minimise  Σ_segments Σ_{t in (s, e)} d(f_s, f_t)     over 0 = s_0 < s_1 < … < s_{K-1} < T
       with      e - s <= max_segment for every segment [s, e)

   solved exactly by dynamic programming over (segments used, steps covered).
2. **Decoupled error correction (DEC).** The error of a reused feature is reduced with a
   per-channel linear map fitted on the calibration run by least squares, one per reused step:
   ``f̂_t = a_t ⊙ f_s + b_t`` where ``f_s`` is the feature cached at its segment's start.

What "the cached feature" is: on a UNet, the input of up-block ``len(up_blocks) - 1 - branch``
(DeepCache's deep feature, channel dimension 1); on a DiT/PixArt, the change ``Δ`` a span of
transformer blocks makes to the residual stream (block caching, channel dimension -1). The
distance is the relative squared error ``‖f_t - f_s‖² / ‖f_t‖²`` over the whole calibration
batch (``objective="feature"``, as in the paper) or the same error left *after* the correction
(``objective="corrected"``).

The calibration keeps only per-channel sums (count, Σx, Σy, Σx², Σxy, Σy²) for each pair of
steps at most ``max_segment - 1`` apart and the last ``max_segment`` features, so its memory does
not grow with the number of steps.

The joint cache + quantization workflow (calibrating on a quantized model, correcting both
errors) is built from these nodes and the quantizer pack's.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagfusion import BOOLEAN, FLOAT, INT, SEED, STRING, Input, Output, RunContext, SocketType, node
from dagfusion.nodes.cache import blockcache
from dagfusion.nodes.cache.deepcache import (
    DeepCacheConfig,
    DeepCacheHook,
    DeepCachePatch,
    capture_deep_feature,
    check_branch,
    unet_of,
)
from dagfusion.model import DenoiserCall, Forward, ModelPatch, SamplingRun, StepHook, unwrap_compiled
from dagfusion.nodes.diffusion.schedulers import SAMPLER_CHOICES
from dagfusion.nodes.diffusion.types import CONDITIONING, LATENT, MODEL

OBJECTIVES = ("feature", "corrected")
"""What the schedule minimises: the raw feature distance (the paper) or the distance left after correction."""

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
    """

    def __init__(self, window: int, channel_dim: int) -> None:
        self.window = int(window)
        self.channel_dim = int(channel_dim)
        self.recent: list[tuple[int, Any]] = []
        self.sums: dict[tuple[int, int], Any] = {}
        self.energy: dict[int, float] = {}  # Σy² over all channels of step t
        self.channels: int | None = None
        self.shape: tuple[int, ...] | None = None

    def _flat(self, feature: Any) -> Any:
        import torch

        f = feature.detach().to(torch.float64)
        return f.movedim(self.channel_dim, -1).reshape(-1, f.shape[self.channel_dim])

    @staticmethod
    def _sums(fx: Any, fy: Any) -> Any:
        """``n, Σx, Σy, Σx², Σxy, Σy²`` per channel of flattened ``(elements, channels)`` features, on the CPU."""
        import torch

        n = torch.full((fy.shape[1],), float(fy.shape[0]), dtype=torch.float64, device=fy.device)
        return torch.stack([n, fx.sum(0), fy.sum(0), (fx * fx).sum(0), (fx * fy).sum(0), (fy * fy).sum(0)]).cpu()

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
        self.channels = int(y.shape[1])
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


# --- the schedule ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSchedule:
    """A calibrated CacheQuant schedule.

    Attributes:
        kind: ``"unet"`` (DeepCache-style) or ``"dit"`` (block caching).
        steps: The step count it was calibrated for (sampling must use it).
        calls: Denoiser steps per run at that step count, as the step hook counts them
            (``steps``, or ``steps + 1`` for PLMS's warm-up); full steps index these.
        full_steps: The full-step indices (step 0 first).
        branch: The DeepCache branch (UNets) or ``None``.
        span: The cached block span ``(start, end)`` (transformers) or ``None``.
        correction: ``{reused step: (a, b)}`` per-channel float32 tensors (``f̂ = a ⊙ f + b``): the
            cache error, from the feature cached at the segment's start to the step's own.
        quant_correction: ``{step: (a, b)}`` for every step when calibrated against a
            full-precision reference (a quantized model): the quantization error, from the
            model's feature to the reference's; applied after ``correction`` on reused steps and
            to the computed feature on full steps. Empty otherwise.
        channel_dim: Where the channels are in the cached feature (1: UNet, -1: transformer).
        architecture: The denoiser's class name and channel count it was calibrated on.
        report: Plain data: the calibration settings, the chosen schedule's cost, the uniform
            schedule's cost at the same number of full steps, the distances.
    """

    kind: str
    steps: int
    calls: int
    full_steps: tuple[int, ...]
    branch: int | None
    span: tuple[int, int] | None
    correction: Mapping[int, tuple[Any, Any]]
    channel_dim: int
    architecture: Mapping[str, Any]
    report: Mapping[str, Any] = field(default_factory=dict)
    quant_correction: Mapping[int, tuple[Any, Any]] = field(default_factory=dict)

    def digest(self) -> str:
        """A content hash of the schedule and its correction (the patch key and the fingerprint)."""
        h = hashlib.blake2b(digest_size=16)
        head = {"kind": self.kind, "steps": self.steps, "calls": self.calls, "full": list(self.full_steps), "branch": self.branch,
                "span": list(self.span) if self.span else None, "architecture": dict(self.architecture)}
        h.update(json.dumps(head, sort_keys=True).encode())
        for tag, table in (("c", self.correction), ("q", self.quant_correction)):
            for index in sorted(table):
                a, b = table[index]
                h.update(f"{tag}{index}".encode())
                h.update(a.contiguous().numpy().tobytes())
                h.update(b.contiguous().numpy().tobytes())
        return h.hexdigest()

    def __dagfusion_fingerprint__(self) -> str:
        return self.digest()

    def plan(self) -> list[bool]:
        """One bool per step: full or reused."""
        chosen = set(self.full_steps)
        return [index in chosen for index in range(self.calls)]

    def corrector(self, which: str = "cache") -> Callable[[int, Any], Any] | None:
        """``correct(step, feature) -> a ⊙ feature + b`` with the ``"cache"`` or ``"quant"`` fits
        (unchanged for steps without a fit); ``None`` when there are none."""
        table = self.correction if which == "cache" else self.quant_correction
        if not table:
            return None
        shapes: dict[Any, Any] = {}

        def correct(index: int, feature: Any) -> Any:
            pair = table.get(index)
            if pair is None:
                return feature
            dim = self.channel_dim % feature.dim()
            view = [1] * feature.dim()
            view[dim] = -1
            key = (index, str(feature.device), str(feature.dtype))
            if key not in shapes:
                a, b = pair
                shapes[key] = (a.to(feature.device, feature.dtype).view(view), b.to(feature.device, feature.dtype).view(view))
            a, b = shapes[key]
            return feature * a + b

        return correct


# --- calibration ----------------------------------------------------------------------------------


class _RecordingPatch(ModelPatch):
    """Runs every step in full and hands each step's cached feature to ``sink(index, feature)``."""

    def __init__(self, kind: str, branch: int, span: tuple[int, int], sink: Callable[[int, Any], None]) -> None:
        self.kind, self.branch, self.span, self.sink = kind, branch, span, sink
        self.calls: int | None = None
        self.key = f"dagfusion.cache.CacheQuantCalibrate:recording:{kind}:{branch}:{list(span)}:{id(sink)}"

    def begin(self, run: SamplingRun) -> StepHook:
        patch = self
        self.calls = run.steps

        class _Hook(StepHook):
            def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
                if patch.kind == "unet":
                    out, feature = capture_deep_feature(unet_of(call.module), patch.branch, lambda: forward(call))
                else:
                    out, feature = blockcache.capture_delta(blockcache.blocks_of(call.module), patch.span,
                                                            lambda: forward(call))
                if feature is None:
                    raise RuntimeError("CacheQuant calibration: the cached feature was not computed by this denoiser call")
                patch.sink(call.step.index, feature)
                return out

        return _Hook()


def denoiser_kind(module: Any) -> str:
    """``"unet"`` or ``"dit"``; :raises TypeError: for other denoisers."""
    inner = unwrap_compiled(module)
    if "UNet2DConditionModel" in {cls.__name__ for cls in type(inner).__mro__}:
        return "unet"
    blockcache.blocks_of(module)
    return "dit"


def default_span(count: int) -> tuple[int, int]:
    """All blocks but the first and the last (two blocks: the second)."""
    return (1, count - 1) if count > 2 else (1, 2)


def calibrate(
    model: Any,
    conditioning: Any,
    latent: Any,
    *,
    steps: int,
    full: int = 0,
    interval: int = 0,
    max_segment: int = 0,
    branch: int = 0,
    span: tuple[int, int] | None = None,
    objective: str = "feature",
    reference: Any = None,
    ctx: RunContext | None = None,
    **sample_options: Any,
) -> CacheSchedule:
    """Run full sampling once and build the CacheQuant schedule for ``model`` (see the module docstring).

    :param full: Number of full steps ``K``; or
    :param interval: ``K = ceil(denoiser steps / interval)``, the full steps of a uniform schedule
        with this interval (the same speedup).
    :param max_segment: Longest segment; 0: twice the uniform interval ``ceil(steps / full)``.
    :param reference: The full-precision model when ``model`` is a quantized one (CacheQuant's
        joint setting): it samples once with the same seed and options, its feature at every
        step is kept (on the CPU), and the quantization-error correction of every step is fitted
        from the model's feature to the reference's.
    :param sample_options: ``sampler``, ``guidance_scale``, ``seed`` … as for
        :func:`~dagfusion.nodes.diffusion.sampling.sample`.
    """
    from dagfusion.nodes.diffusion.sampling import sample

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    kind = denoiser_kind(model.denoiser)
    inner = unwrap_compiled(model.denoiser)
    if kind == "unet":
        check_branch(unet_of(model.denoiser), branch)
        used_span = None
    else:
        count = len(blockcache.blocks_of(model.denoiser))
        used_span = span or default_span(count)
        blockcache.check_span(used_span, count)
    if (full > 0) == (interval > 0):
        raise ValueError("give either the number of full steps or the interval of the uniform schedule to match")
    if full and not 1 <= full <= steps:
        raise ValueError(f"full steps must be between 1 and steps ({steps}), got {full}")
    # The run may make one call more than ``steps`` (PLMS's warm-up); the statistics keep pairs up to
    # the widest segment that call count can need, so memory does not grow with the step count.
    most = full or math.ceil(steps / interval)
    stats = PairStatistics(max_segment or min(steps + 1, 2 * math.ceil((steps + 1) / most)), 1 if kind == "unet" else -1)
    reference_features: dict[int, Any] = {}
    quant_sums: dict[int, Any] = {}
    if reference is not None:
        if denoiser_kind(reference.denoiser) != kind:
            raise ValueError("the reference model must be the same kind of denoiser as the calibrated one")

        def keep(index: int, feature: Any) -> None:
            reference_features[index] = feature.detach().float().cpu()

        sample(reference.with_patch(_RecordingPatch(kind, branch, used_span or (0, 1), keep)), conditioning, latent,
               steps=steps, ctx=ctx, **sample_options)

    def record(index: int, feature: Any) -> None:
        stats.add(index, feature)
        if index in reference_features:
            quant_sums[index] = stats.cross(feature, reference_features.pop(index).to(feature.device))

    recorder = _RecordingPatch(kind, branch, used_span or (0, 1), record)
    sample(model.with_patch(recorder), conditioning, latent, steps=steps, ctx=ctx, **sample_options)
    calls = recorder.calls or 0
    recorded = len(stats.energy)
    if recorded != calls or calls < 1:
        raise RuntimeError(
            f"CacheQuant calibration recorded {recorded} denoiser steps of {calls}: use a sampler with one denoiser "
            "call per step"
        )
    full = min(full, calls) if full else math.ceil(calls / interval)
    window = max_segment or min(calls, 2 * math.ceil(calls / full))
    steps_requested, steps = steps, calls
    distance = stats.distance if objective == "feature" else stats.corrected_distance
    chosen = optimal_full_steps(distance, steps, full, window)
    uniform_interval = math.ceil(steps / full)
    uniform = list(range(0, steps, uniform_interval))
    correction: dict[int, tuple[Any, Any]] = {}
    starts = [*chosen, steps]
    for s, e in zip(starts, starts[1:]):
        for t in range(s + 1, e):
            correction[t] = stats.fit(s, t)
    quant_correction = {index: PairStatistics.fit_sums(sums) for index, sums in quant_sums.items()}
    report = {
        "objective": objective,
        "quantization_correction": bool(quant_correction),
        "steps": steps,
        "full_steps": chosen,
        "max_segment": window,
        "cost": schedule_cost(distance, steps, chosen),
        "uniform_full_steps": uniform,
        "uniform_cost": schedule_cost(distance, steps, uniform) if uniform_interval <= window else None,
        "feature_shape": list(stats.shape or ()),
        "step_distance": [stats.distance(t - 1, t) for t in range(1, steps)],
        "sampling": {k: v for k, v in sample_options.items() if isinstance(v, (int, float, str))},
    }
    return CacheSchedule(
        kind=kind, steps=steps_requested, calls=calls, full_steps=tuple(chosen), branch=branch if kind == "unet" else None, span=used_span,
        correction=correction, channel_dim=1 if kind == "unet" else -1,
        architecture={"class": type(inner).__name__, "channels": stats.channels}, report=report,
        quant_correction=quant_correction,
    )


# --- applying it ------------------------------------------------------------------------------------


def _check_run(schedule: CacheSchedule, run: SamplingRun) -> None:
    if run.steps != schedule.calls:
        raise ValueError(
            f"this CacheQuant schedule was calibrated for {schedule.steps} sampling steps ({schedule.calls} denoiser "
            f"steps), but this run has {run.steps} denoiser steps: sample with {schedule.steps} steps and the "
            "calibration's sampler, or calibrate again"
        )


class CacheQuantUNetPatch(DeepCachePatch):
    """DeepCache with a calibrated full-step list and per-step correction of the deep feature.

    The key is the schedule's content hash and ``correct``.
    """

    def __init__(self, schedule: CacheSchedule, *, correct: bool = True, measure: bool = True) -> None:
        super().__init__(DeepCacheConfig(branch=schedule.branch or 0, schedule="explicit", full_steps=schedule.full_steps),
                         measure=measure)
        self.calibrated = schedule
        self.correct = bool(correct)
        self.key = f"dagfusion.cache.CacheQuant:{schedule.digest()}:correct={self.correct}"

    def plan(self, steps: int) -> list[bool]:
        return self.calibrated.plan()

    def corrections(self, run: SamplingRun) -> tuple[Any, Any]:
        if not self.correct:
            return None, None
        return self.calibrated.corrector("cache"), self.calibrated.corrector("quant")

    def begin(self, run: SamplingRun) -> DeepCacheHook:
        _check_run(self.calibrated, run)
        return super().begin(run)


class CacheQuantDiTPatch(blockcache.BlockCachePatch):
    """Block caching with a calibrated full-step list and per-step correction of the cached Δ.

    The key is the schedule's content hash and ``correct``.
    """

    def __init__(self, schedule: CacheSchedule, *, correct: bool = True, measure: bool = True) -> None:
        if schedule.span is None:
            raise ValueError("a transformer CacheQuant schedule needs its cached span")
        super().__init__(blockcache.BlockCacheConfig(span=schedule.span, full_steps=schedule.full_steps), measure=measure)
        self.calibrated = schedule
        self.correct = bool(correct)
        self.key = f"dagfusion.cache.CacheQuant:{schedule.digest()}:correct={self.correct}"

    def plan(self, steps: int) -> list[bool]:
        return self.calibrated.plan()

    def corrections(self, run: SamplingRun) -> tuple[Any, Any]:
        if not self.correct:
            return None, None
        return self.calibrated.corrector("cache"), self.calibrated.corrector("quant")

    def begin(self, run: SamplingRun) -> blockcache.BlockCacheHook:
        _check_run(self.calibrated, run)
        return super().begin(run)


def schedule_patch(schedule: CacheSchedule, *, correct: bool = True) -> ModelPatch:
    """The patch that samples with ``schedule`` (UNet or transformer)."""
    if schedule.kind == "unet":
        return CacheQuantUNetPatch(schedule, correct=correct)
    return CacheQuantDiTPatch(schedule, correct=correct)


def check_fits(schedule: CacheSchedule, module: Any) -> None:
    """:raises ValueError: when ``module`` is not the kind of denoiser ``schedule`` was calibrated on."""
    kind = denoiser_kind(module)
    inner = unwrap_compiled(module)
    expected = schedule.architecture.get("class")
    if kind != schedule.kind or type(inner).__name__ != expected:
        raise ValueError(
            f"this CacheQuant schedule was calibrated on a {expected}, but the model's denoiser is a "
            f"{type(inner).__name__}: calibrate on this model"
        )
    if kind == "unet":
        check_branch(unet_of(module), schedule.branch or 0)
    else:
        assert schedule.span is not None
        blockcache.check_span(schedule.span, len(blockcache.blocks_of(module)))


# --- nodes ----------------------------------------------------------------------------------------

_PKG = "dagfusion.nodes.cache.cachequant"

CACHE_SCHEDULE = SocketType(
    "CACHE_SCHEDULE",
    python_types=(f"{_PKG}.CacheSchedule",),
    description="A calibrated cache schedule: which steps compute in full, and the per-step correction of reused features.",
    color="#4db6ac",
)


def _calibrate_example_unet() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    handles = tiny.sd_handles()
    return {"model": handles["model"], "conditioning": handles["conditioning"], "latent": handles["latent"],
            "steps": 6, "interval": 3, "guidance_scale": 4.0}


def _calibrate_example_dit() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    handles = tiny.pixart_handles()
    return {"model": handles["model"], "conditioning": handles["conditioning"], "latent": handles["latent"],
            "steps": 5, "interval": 2, "span": "0-1", "objective": "corrected", "guidance_scale": 4.0}


@node(
    "dagfusion.cache.CacheQuantCalibrate",
    version="1.0.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="The UNet or DiT/PixArt model to calibrate (as you will sample it)."),
        Input("conditioning", CONDITIONING, link_only=True, description="Calibration prompt(s)."),
        Input("latent", LATENT, link_only=True, description="A latent of the size you will sample; its batch is the calibration batch."),
        Input("reference", MODEL, link_only=True, optional=True,
              description="CacheQuant's joint setting: the full-precision model when 'model' is quantized; the "
                          "quantization error of the cached feature is then corrected too."),
        Input("steps", INT, 25, min=2, max=1000, description="The step count you will sample with."),
        Input("interval", INT, 3, min=1, max=1000,
              description="Speedup target: as many full steps as a uniform schedule with this interval (ceil(steps / interval))."),
        Input("full_count", INT, 0, min=0, max=1000, description="Number of full steps; 0: from 'interval'."),
        Input("max_segment", INT, 0, min=0, max=1000,
              description="Longest run of steps reusing one full step's feature; 0: twice the uniform interval."),
        Input("objective", STRING, "feature", choices=OBJECTIVES,
              description="What the schedule minimises: the feature distance (the paper), or the distance left after correction."),
        Input("branch", INT, 0, min=0, max=64, description="UNets: the DeepCache branch (0 = shallowest, fastest)."),
        Input("span", STRING, "", description="Transformers: cached blocks 'start-end' (end exclusive); empty: all but the first and last."),
        Input("sampler", STRING, "default", choices=SAMPLER_CHOICES, description="The sampler you will use (first-order)."),
        Input("guidance_scale", FLOAT, 7.5, min=0.0, max=100.0, description="Guidance scale, as you will sample."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed of the calibration run's noise."),
    ],
    outputs=[
        Output("schedule", CACHE_SCHEDULE, "The calibrated schedule with its error correction."),
        Output("full_steps", STRING, "The chosen full steps, comma-separated (usable as DeepCache's explicit schedule)."),
        Output("report", STRING, "JSON: the chosen and the uniform schedule's calibration cost, distances, settings."),
    ],
    examples=[_calibrate_example_unet, _calibrate_example_dit],
    ui={"color": "#26a69a"},
)
def cachequant_calibrate(
    ctx: RunContext, model: Any, conditioning: Any, latent: Any, reference: Any, steps: int, interval: int,
    full_count: int, max_segment: int, objective: str, branch: int, span: str, sampler: str, guidance_scale: float,
    seed: int,
) -> tuple[CacheSchedule, str, str]:
    """Calibrate CacheQuant's cache schedule: one full sampling run, a dynamic-programming choice of
    full steps and a per-channel linear correction of every reused step's feature.

    The full steps minimise the summed distance between each reused feature and the one cached
    at its segment's start; the correction ``a ⊙ f + b`` is fitted by least squares per step.
    UNets cache DeepCache's deep feature (``branch``); DiT/PixArt cache the residual of a span of
    transformer blocks. Apply it with dagfusion.cache.CacheQuant, sampling with the same step count.

    With a quantized model and its full-precision 'reference' (CacheQuant's joint cache +
    quantization setting), a second per-channel correction maps every step's feature to the
    reference's: on reused steps the cache error is corrected first, then the quantization error.
    """
    if full_count > steps:
        raise ValueError(f"full_count ({full_count}) is more than steps ({steps})")
    kind = denoiser_kind(model.denoiser)
    used_span = None
    if kind == "dit" and span.strip():
        used_span = blockcache.parse_span(span, len(blockcache.blocks_of(model.denoiser)), "span")
    schedule = calibrate(
        model, conditioning, latent, steps=steps, full=full_count, interval=0 if full_count else interval,
        max_segment=max_segment, branch=branch, span=used_span,
        objective=objective, reference=reference, ctx=ctx, sampler=sampler, guidance_scale=guidance_scale, seed=seed,
    )
    return schedule, ", ".join(str(i) for i in schedule.full_steps), json.dumps(schedule.report, default=float)


def _apply_example(*, correct: bool = True) -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    handles = tiny.sd_handles()
    schedule = calibrate(handles["model"], handles["conditioning"], handles["latent"], steps=6, full=2, guidance_scale=4.0)
    return {"model": handles["model"], "schedule": schedule, "correct": correct}


def _apply_example_raw() -> dict[str, Any]:
    return _apply_example(correct=False)


@node(
    "dagfusion.cache.CacheQuant",
    version="1.1.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="The model the schedule was calibrated on."),
        Input("schedule", CACHE_SCHEDULE, link_only=True, description="From dagfusion.cache.CacheQuantCalibrate."),
        Input("correct", BOOLEAN, True, description="Apply the decoupled error correction to reused features."),
    ],
    outputs=[Output("model", MODEL, "The model sampling with the calibrated cache schedule.")],
    examples=[_apply_example, _apply_example_raw],
    ui={"color": "#26a69a"},
)
def cachequant(ctx: RunContext, model: Any, schedule: CacheSchedule, correct: bool) -> Any:
    """Sample with a calibrated CacheQuant schedule: DeepCache-style on UNets, block caching on DiT/PixArt.

    Full steps run the whole denoiser and cache the feature; every other step reuses it,
    corrected per channel (``a ⊙ f + b``) when ``correct`` is on. Sampling must use the step
    count the schedule was calibrated for.
    """
    check_fits(schedule, model.denoiser)
    return model.with_patch(schedule_patch(schedule, correct=correct))


TYPES = (CACHE_SCHEDULE,)
NODES = (cachequant_calibrate, cachequant)
"""The nodes of this module."""
