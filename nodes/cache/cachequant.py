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
   ``f̂_t = a_t ⊙ f_s + b_t`` where ``f_s`` is the feature cached at its segment's start (the
   paper's fit: per channel, over every element of the whole calibration batch, both halves of
   the guidance batch together, on the uncached run). Variants: one fit per guidance half
   (``per_condition``) and a fit on the cached run itself (``trajectory="cached"``).

   A smaller feature error need not mean a better image: the correction is applied at a
   strength ``λ`` (``(1 + λ(a_t − 1)) ⊙ f_s + λb_t``, 0 = off) that calibration chooses on
   held-out calibration rows (``validate``) by the PSNR of the finished run against the uncached
   one; without validation it is on for transformers and off for UNets, as measured on held-out
   prompts of the embedded shapes models (:data:`UNVALIDATED_STRENGTH`).

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

Modules: :mod:`~dagfusion.nodes.cache.cachequant_dp` (the dynamic programme and the calibration
statistics), this module (the schedule, calibration and the patches) and
:mod:`~dagfusion.nodes.cache.cachequant_nodes` (the nodes and the ``CACHE_SCHEDULE`` type).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from dagfusion import RunContext
from dagfusion.nodes.cache import blockcache
from dagfusion.nodes.cache.cachequant_dp import PairStatistics, optimal_full_steps, schedule_cost
from dagfusion.nodes.cache.deepcache import (
    DeepCacheConfig,
    DeepCacheHook,
    DeepCachePatch,
    capture_deep_feature,
    check_branch,
    unet_of,
)
from dagfusion.model import DenoiserCall, Forward, ModelPatch, SamplingRun, StepHook, unwrap_compiled

OBJECTIVES = ("feature", "corrected")
"""What the schedule minimises: the raw feature distance (the paper) or the distance left after correction."""

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
        strength: How much of the cache correction is applied, ``λ`` in ``[0, 1]``: reused features
            become ``(1 + λ(a − 1)) ⊙ f + λb`` (1: the fit as calibrated; 0: off). Calibration
            with validation prompts chooses it; otherwise it is the one asked for or the denoiser
            kind's default, :data:`UNVALIDATED_STRENGTH` (see :func:`calibrate`).
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
    strength: float = 1.0

    def digest(self) -> str:
        """A content hash of the schedule and its correction (the patch key and the fingerprint)."""
        h = hashlib.blake2b(digest_size=16)
        head = {"kind": self.kind, "steps": self.steps, "strength": self.strength, "calls": self.calls,
                "full": list(self.full_steps), "branch": self.branch, "span": list(self.span) if self.span else None,
                "architecture": dict(self.architecture)}
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
        """``correct(step, feature) -> a ⊙ feature + b`` with the ``"cache"`` fits (scaled by
        :attr:`strength`) or the ``"quant"`` fits (unchanged for steps without a fit); ``None``
        when there are none, or for ``"cache"`` at strength 0."""
        table = self.correction if which == "cache" else self.quant_correction
        strength = float(self.strength) if which == "cache" else 1.0
        if not table or strength == 0.0:
            return None
        prepared: dict[Any, Any] = {}

        def correct(index: int, feature: Any) -> Any:
            pair = table.get(index)
            if pair is None:
                return feature
            key = (index, str(feature.device), str(feature.dtype))
            if key not in prepared:
                a, b = pair
                if strength != 1.0:
                    a, b = 1 + strength * (a - 1), strength * b
                prepared[key] = (a.to(feature.device, feature.dtype), b.to(feature.device, feature.dtype))
            return apply_fit(feature, *prepared[key], self.channel_dim)

        return correct


def apply_fit(feature: Any, a: Any, b: Any, channel_dim: int) -> Any:
    """``a ⊙ feature + b`` per channel (at ``channel_dim``).

    ``a``, ``b`` are ``(channels,)``, or ``(groups, channels)`` for one fit per equal consecutive
    part of the batch (dimension 0; see :class:`PairStatistics`).
    """
    dim = channel_dim % feature.dim()
    if a.dim() == 1:
        view = [1] * feature.dim()
        view[dim] = -1
        return feature * a.view(view) + b.view(view)
    groups = a.shape[0]
    parts = feature.reshape(groups, feature.shape[0] // groups, *feature.shape[1:])
    view = [1] * parts.dim()
    view[0], view[dim + 1] = groups, -1
    return (parts * a.view(view) + b.view(view)).reshape(feature.shape)


# --- calibration ----------------------------------------------------------------------------------


class _RecordingPatch(ModelPatch):
    """Runs every step in full and hands each step's cached feature to ``sink(index, feature)``."""

    def __init__(self, kind: str, branch: int, span: tuple[int, int], sink: Callable[[int, Any], None]) -> None:
        self.kind, self.branch, self.span, self.sink = kind, branch, span, sink
        self.calls: int | None = None
        self.cfg = False
        self.key = f"dagfusion.cache.CacheQuantCalibrate:recording:{kind}:{branch}:{list(span)}:{id(sink)}"

    def begin(self, run: SamplingRun) -> StepHook:
        patch = self
        self.calls = run.steps
        self.cfg = bool(run.cfg)

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


TRAJECTORIES = ("full", "cached")
"""Where the cache correction is fitted: on the uncached run (the paper) or on the cached run itself."""

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""The correction strengths validation chooses from (0: no correction)."""

UNVALIDATED_STRENGTH = {"unet": 0.0, "dit": 1.0}
"""The correction strength of a schedule calibrated without validation, per denoiser kind.

Measured on held-out prompts of the embedded shapes models (``benchmarks/cache_correction.py``):
on the transformer the correction raises PSNR by about 1 dB at K = 9 and 13 of 25 steps; on
the UNet it lowers it at K = 5 (the fit reduces the latent error but not the decoded image's),
so it is off there unless validation on the model at hand turns it on.
"""


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
    per_condition: bool = False,
    trajectory: str = "full",
    validate: int = 0,
    strengths: tuple[float, ...] = STRENGTHS,
    vae: Any = None,
    strength: float | None = None,
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
    :param per_condition: Fit the corrections separately for the unconditional and the
        conditional half of a classifier-free-guidance batch (one fit when there is no guidance).
    :param trajectory: ``"full"``: fit the cache correction on the uncached calibration run, from
        the feature of the segment's full step to the reused step's (the paper); ``"cached"``: run
        the calibration prompts once more with the chosen schedule, computing the real feature on
        every reused step too, and fit from the cached feature to it step by step, each step's fit
        applied before the next (the features the sampler will see). Costs one more full run.
    :param validate: Hold out the last ``validate`` rows of the calibration batch (the
        conditioning has one row or one per latent): the schedule and the fits come from the
        others; on the held-out rows the uncached run (of ``reference`` when given) is compared
        with the cached run at every correction strength in ``strengths``, and the strength with
        the highest mean PSNR against it (of the images ``vae`` decodes, or of the latents
        without one; the smaller strength on a tie) is kept in the schedule — 0 turns the
        correction off where it does not help. 0: no validation. Few rows are noisy: on the
        shapes transformer, 4 training-split rows chose 0.25–0.5 where 1 was best on held-out
        prompts (``benchmarks/cache_correction.py``).
    :param vae: Decodes the validation runs (recommended: the latent error the correction
        removes need not be the image's).
    :param strength: The correction strength without validation; ``None``: per denoiser kind,
        :data:`UNVALIDATED_STRENGTH`.
    :param sample_options: ``sampler``, ``guidance_scale``, ``seed`` … as for
        :func:`~dagfusion.nodes.diffusion.sampling.sample`.
    """
    from dagfusion.nodes.diffusion.sampling import sample

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"trajectory must be one of {list(TRAJECTORIES)}, got {trajectory!r}")
    if strength is not None and not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"the correction strength must be in [0, 1], got {strength}")
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
    held_out: tuple[Any, Any] | None = None
    if validate:
        conditioning, latent, *rest = split_rows(conditioning, latent, validate)
        held_out = (rest[0], rest[1])
    # The run may make one call more than ``steps`` (PLMS's warm-up); the statistics keep pairs up to
    # the widest segment that call count can need, so memory does not grow with the step count.
    most = full or math.ceil(steps / interval)
    channel_dim = 1 if kind == "unet" else -1
    stats_window = max_segment or min(steps + 1, 2 * math.ceil((steps + 1) / most))
    holder: dict[str, PairStatistics] = {}
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
        if "stats" not in holder:
            groups = 2 if per_condition and recorder.cfg else 1
            holder["stats"] = PairStatistics(stats_window, channel_dim, groups)
        stats = holder["stats"]
        stats.add(index, feature)
        if index in reference_features:
            quant_sums[index] = stats.cross(feature, reference_features.pop(index).to(feature.device))

    recorder = _RecordingPatch(kind, branch, used_span or (0, 1), record)
    sample(model.with_patch(recorder), conditioning, latent, steps=steps, ctx=ctx, **sample_options)
    calls = recorder.calls or 0
    stats = holder.get("stats") or PairStatistics(stats_window, channel_dim)
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
    report: dict[str, Any] = {
        "objective": objective,
        "quantization_correction": bool(quant_correction),
        "per_condition": stats.groups > 1,
        "trajectory": trajectory,
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
    schedule = CacheSchedule(
        kind=kind, steps=steps_requested, calls=calls, full_steps=tuple(chosen), branch=branch if kind == "unet" else None, span=used_span,
        correction=correction, channel_dim=channel_dim,
        architecture={"class": type(inner).__name__, "channels": stats.channels}, report=report,
        quant_correction=quant_correction,
    )
    if trajectory == "cached" and correction:
        fitter = _CachedTrajectoryPatch(schedule, stats.groups)
        sample(model.with_patch(fitter), conditioning, latent, steps=steps_requested, ctx=ctx, **sample_options)
        schedule = replace(schedule, correction=dict(fitter.fits))
    if held_out is not None:
        scores = validation_scores(model if reference is None else reference, model, schedule, *held_out,
                                   strengths=strengths, steps=steps_requested, vae=vae, ctx=ctx, **sample_options)
        chosen_strength = max(scores, key=lambda value: (scores[value], -value))
        report["validation"] = {"rows": validate, "decoded": vae is not None,
                                "psnr_by_strength": {str(k): v for k, v in scores.items()}, "strength": chosen_strength}
    else:
        chosen_strength = UNVALIDATED_STRENGTH[kind] if strength is None else float(strength)
    report["strength"] = chosen_strength
    return replace(schedule, strength=chosen_strength, report=report)


def split_rows(conditioning: Any, latent: Any, count: int) -> tuple[Any, Any, Any, Any]:
    """``(conditioning, latent)`` of all rows but the last ``count``, then of the last ``count``.

    :raises ValueError: when ``count`` leaves no row on either side, or the conditioning has
        neither one row nor one per latent.
    """
    from dagfusion.nodes.diffusion.data import Conditioning, Latent

    rows = int(latent.samples.shape[0])
    if not 1 <= count < rows:
        raise ValueError(f"validation needs 1 to {rows - 1} of the {rows} calibration rows, got {count}")
    shared = conditioning.batch_size
    if shared not in (1, rows):
        raise ValueError(f"the conditioning has {shared} rows and the latent {rows}: give one row or one per latent")

    def part(selection: slice) -> tuple[Any, Any]:
        def take(table: Mapping[str, Any] | None) -> dict[str, Any] | None:
            if table is None:
                return None
            return {k: v[selection] if shared > 1 and getattr(v, "shape", None) and v.shape[0] == rows else v
                    for k, v in table.items()}

        cond = Conditioning(conditioning.kind, take(conditioning.positive) or {}, take(conditioning.negative),
                            conditioning.meta)
        return cond, Latent(latent.samples[selection], latent.lineage)

    return (*part(slice(0, rows - count)), *part(slice(rows - count, rows)))


def mean_row_psnr(x: Any, y: Any) -> float:
    """Mean over batch rows of ``-10 log10(mean squared difference)`` (PSNR with peak 1; rows
    that agree exactly count as 200 dB)."""
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    return float((-10 * mse.clamp(min=1e-20).log10()).mean())


def validation_scores(target: Any, model: Any, schedule: CacheSchedule, conditioning: Any, latent: Any, *,
                      strengths: tuple[float, ...], steps: int, vae: Any = None, ctx: RunContext | None = None,
                      **sample_options: Any) -> dict[float, float]:
    """``{strength: mean PSNR (dB)}`` of ``model`` sampling with ``schedule`` at each correction
    strength against ``target``'s uncached run (same prompts, seed and options): of the images
    ``vae`` decodes, or of the final latents without one."""
    from dagfusion.nodes.diffusion.sampling import sample
    from dagfusion.nodes.diffusion.vae import decode

    if not strengths or any(not 0.0 <= float(v) <= 1.0 for v in strengths):
        raise ValueError(f"correction strengths must be in [0, 1], got {list(strengths)}")

    def final(handle: Any) -> Any:
        out = sample(handle, conditioning, latent, steps=steps, ctx=ctx, **sample_options)
        return out.samples if vae is None else decode(vae, out)

    truth = final(target)
    return {strength: mean_row_psnr(final(model.with_patch(schedule_patch(replace(schedule, strength=strength)))), truth)
            for strength in sorted({float(v) for v in strengths})}


class _CachedTrajectoryPatch(ModelPatch):
    """Samples with ``schedule``'s full steps and fits each reused step's cache correction on the way.

    On a reused step the whole denoiser runs once more to get the real feature; the correction
    maps the feature cached at the segment's full step to it (per channel, per group of batch
    rows), and the corrected feature is what the step then computes with. The fits land in
    :attr:`fits` (``{step: (a, b)}``).
    """

    def __init__(self, schedule: CacheSchedule, groups: int) -> None:
        self.schedule, self.groups = schedule, groups
        self.fits: dict[int, tuple[Any, Any]] = {}
        self.key = f"dagfusion.cache.CacheQuantCalibrate:cached-trajectory:{schedule.digest()}:{id(self)}"

    def begin(self, run: SamplingRun) -> StepHook:
        schedule, fits = self.schedule, self.fits
        _check_run(schedule, run)
        pairs = PairStatistics(1, schedule.channel_dim, self.groups)
        truth: dict[int, Any] = {}

        def fit_and_correct(index: int, cached: Any) -> Any:
            a, b = PairStatistics.fit_sums(pairs.cross(cached, truth.pop(index)))
            fits[index] = (a, b)
            return apply_fit(cached, a.to(cached.device, cached.dtype), b.to(cached.device, cached.dtype),
                             schedule.channel_dim)

        caching = schedule_patch(replace(schedule, correction={}))
        caching.corrections = lambda _run: (fit_and_correct, schedule.corrector("quant"))  # type: ignore[method-assign]
        inner = caching.begin(run)
        plan = schedule.plan()

        class _Hook(StepHook):
            def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
                index = call.step.index
                if 0 <= index < len(plan) and not plan[index]:
                    if schedule.kind == "unet":
                        _, feature = capture_deep_feature(unet_of(call.module), schedule.branch or 0, lambda: forward(call))
                    else:
                        assert schedule.span is not None
                        _, feature = blockcache.capture_delta(blockcache.blocks_of(call.module), schedule.span,
                                                              lambda: forward(call))
                    truth[index] = feature
                return inner.denoise(call, forward)

            def after_step(self, step: Any, latents: Any) -> Any:
                return inner.after_step(step, latents)

            def end(self) -> Any:
                return inner.end()

        return _Hook()


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
