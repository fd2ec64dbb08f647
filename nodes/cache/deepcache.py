"""DeepCache for UNets: reuse the deep features of the up path between steps.

DeepCache (Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024)
observes that in a UNet the high-level features entering the last up-blocks change slowly from
one denoising step to the next, while the shallow skip branch is cheap. So:

- on a **full** step the whole UNet runs and the feature entering up-block
  ``len(up_blocks) - 1 - branch`` (the output of the deeper up path) is cached;
- on a **partial** step only the shallow branch runs: the time/text embeddings, ``conv_in``,
  down-blocks ``0..branch`` (for their skip residuals), then the cached deep feature goes
  through up-blocks ``len(up_blocks) - 1 - branch`` … last, and ``conv_norm_out``/``conv_out``.

``branch`` 0 is the shallowest branch (``conv_in``, the first down-block, the last up-block,
``conv_out``) and skips the most; ``branch = len(up_blocks) - 1`` only skips the mid-block.

Which steps are full is a schedule (:func:`~dagfusion.nodes.cache.schedules.full_steps`):
every ``interval``-th step, DeepCache's non-uniform schedule concentrated around ``center``,
or an explicit list of step indices (as produced by a calibration node). Steps are the
sampler's step indices (``call.step.index``; second-order samplers count each evaluation).

Mechanics: :class:`DeepCachePatch` changes nothing on the module. Its ``begin`` returns a
fresh :class:`DeepCacheHook` per sampling run (so a run never sees another run's cache). On
full steps the hook runs the rest of the chain (inner hooks, then the real denoiser) with a
forward pre-hook on the up-block that captures its input, removed right after; on partial steps
it calls :func:`unet_partial_forward`, a function following ``UNet2DConditionModel.forward``
for the shallow blocks only. Inner step hooks do not run on partial steps (the denoiser does
not fully run); module patches (``apply``) do, as the same submodules compute. The cache holds
the whole batch (both classifier-free-guidance halves, which the sampler sends in one call);
a call whose batch layout differs from the cached one runs in full.

The settings are one frozen :class:`DeepCacheConfig` (its fields form the patch's key). Each
run measures the MACs of one full and one partial call per batch shape
(:func:`~dagfusion.model.count_macs`; MACs depend on shapes only) and its hook's ``end()``
returns the run's statistics (:class:`DeepCacheStats`), which the sampler puts into the run's
report under the patch's key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from collections.abc import Iterator, Mapping
from typing import Any

from dagfusion import FLOAT, INT, STRING, Input, NodeInputError, Output, Problem, RunContext, node
from dagfusion.model import (
    CallCosts,
    DenoiserCall,
    Forward,
    ModelPatch,
    SamplingRun,
    StepHook,
    call_layout,
)
from dagfusion.nodes.cache import schedules
from dagfusion.nodes.cache.checks import all_of, enforce, ordered
from dagfusion.nodes.cache.stats import FeatureCacheStats, call_stats
from dagfusion.nodes.cache.unet_branch import (  # re-exported: the UNet side is part of DeepCache's interface
    capture_deep_feature,
    check_branch,
    is_video_unet,
    unet_of,
    unet_partial_forward,
)
from dagfusion.nodes.diffusion.types import MODEL

# --- the patch and its per-run hook -----------------------------------------------------------

Correction = Callable[[int, Any], Any]
"""``correct(step index, feature) -> feature``: CacheQuant's per-step correction of the deep feature."""


@dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache's settings (see the module docstring); the fields form the patch's key.

    Attributes:
        interval: Uniform: a full step every ``interval`` steps; non-uniform:
            ``ceil(steps / interval)`` full steps.
        branch: The cache branch (0: shallowest, skips the most).
        schedule: One of :data:`~dagfusion.nodes.cache.schedules.SCHEDULES`.
        full_steps: The explicit schedule's full-step indices (sorted, no duplicates).
        pow, center: The non-uniform schedule's exponent and densest step.
        start_step: Steps before this one always run in full.
        end_step: Steps from this one on always run in full (``None``: up to the last step).

    Fields the schedule does not use (``pow`` and ``center`` outside the non-uniform schedule,
    ``interval`` in the explicit one, ``full_steps`` outside it) are reset to their defaults, so
    they do not change the key.

    :raises ValueError: on settings that cannot work (explained in the message).
    """

    interval: int = 3
    branch: int = 0
    schedule: str = "uniform"
    full_steps: tuple[int, ...] = ()
    pow: float = 1.4
    center: int = 15
    start_step: int = 0
    end_step: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in schedules.SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {list(schedules.SCHEDULES)}")
        if self.interval < 1:
            raise ValueError(f"interval must be at least 1, got {self.interval}")
        if self.branch < 0:
            raise ValueError(f"branch must be 0 or more, got {self.branch}")
        if self.schedule == "explicit" and not self.full_steps:
            raise ValueError("full_steps is required when schedule is 'explicit': give step indices like (0, 3, 5)")
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be greater than start_step ({self.start_step})")
        object.__setattr__(self, "full_steps", tuple(sorted({int(i) for i in self.full_steps})))
        # Settings the schedule does not use go back to their defaults, so they do not split the key.
        defaults = DeepCacheConfig.__dataclass_fields__
        unused = []
        if self.schedule != "non-uniform":
            unused += ["pow", "center"]
        if self.schedule == "explicit":
            unused.append("interval")
        else:
            unused.append("full_steps")
        for name in unused:
            object.__setattr__(self, name, defaults[name].default)

    def plan(self, steps: int) -> list[bool]:
        """Which of ``steps`` steps are full (see :func:`~dagfusion.nodes.cache.schedules.full_steps`)."""
        return schedules.full_steps(
            self.schedule, steps, self.interval, pow=self.pow, center=self.center, explicit=self.full_steps,
            start_step=self.start_step, end_step=self.end_step,
        )


class DeepCacheStats(FeatureCacheStats, total=False):
    """What a DeepCache run reports (:meth:`DeepCacheHook.end`): :class:`FeatureCacheStats`,
    ``branch``, and when measured ``macs_full_call`` and ``macs_partial_call`` (one call of the
    first batch layout)."""

    branch: int
    macs_full_call: int | None
    macs_partial_call: int | None


class DeepCachePatch(ModelPatch):
    """DeepCache, attached to a model handle by the node (see the module docstring).

    Attributes:
        config: The settings (:class:`DeepCacheConfig`; the key is made of its fields).
        measure: Count MACs (one full and one partial call per batch shape and run); reporting
            only, not part of the key.
    """

    def __init__(self, config: DeepCacheConfig, *, measure: bool = True) -> None:
        if not isinstance(config, DeepCacheConfig):
            raise TypeError(f"DeepCachePatch takes a DeepCacheConfig, got {type(config).__name__}")
        self.config = config
        self.measure = bool(measure)

    @property
    def branch(self) -> int:
        return self.config.branch

    def plan(self, steps: int) -> list[bool]:
        """Which of ``steps`` steps are full."""
        return self.config.plan(steps)

    def corrections(self, run: SamplingRun) -> tuple[Correction | None, Correction | None]:
        """``(correct, correct_full)`` for :class:`DeepCacheHook` (none here; CacheQuant's patch gives its own)."""
        return None, None

    def begin(self, run: SamplingRun) -> DeepCacheHook:
        unet = unet_of(run.module)
        check_branch(unet, self.branch)
        correct, correct_full = self.corrections(run)
        compiled = unet is not run.module
        return DeepCacheHook(
            unet, self.branch, self.plan(run.steps),
            # Forward hooks on the submodules of a torch.compile'd module would force recompiles: no MACs then.
            CallCosts(unet, self.measure and not compiled), correct=correct, correct_full=correct_full,
        )


class DeepCacheHook(StepHook):
    """The per-run state of :class:`DeepCachePatch`: the cached feature and the run's statistics.

    :param correct: ``correct(step, cached feature) -> feature to reuse`` (CacheQuant's cache-error
        correction) or ``None``.
    :param correct_full: ``correct_full(step, feature) -> the feature the up path computes with``,
        on every step (CacheQuant's quantization-error correction; after ``correct`` on reused
        steps) or ``None``.
    """

    def __init__(self, unet: Any, branch: int, plan: list[bool], costs: CallCosts, *,
                 correct: Correction | None = None, correct_full: Correction | None = None) -> None:
        self._unet = unet
        self._branch = branch
        self._plan = plan
        self._costs = costs
        self._correct = correct
        self._correct_full = correct_full
        self._cache: tuple[Any, Any] | None = None  # (batch layout, deep feature)
        self._video = is_video_unet(unet)
        self._calls: list[tuple[int, str, Any]] = []  # (step index, "full" | "partial", batch layout)

    def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
        index = call.step.index
        full = self._plan[index] if 0 <= index < len(self._plan) else True
        layout = call_layout(call)
        fix, fix_full = self._correct, self._correct_full
        if not full and self._cache is not None and self._cache[0] == layout:
            deep = self._cache[1] if fix is None else fix(index, self._cache[1])
            if fix_full is not None:
                deep = fix_full(index, deep)
            out = self._costs.run(
                "partial", layout,
                lambda: unet_partial_forward(self._unet, call.sample, call.timestep, call.kwargs, self._branch, deep),
            )
            self._calls.append((index, "partial", layout))
            return out
        out, deep = self._costs.run(
            "full", layout, lambda: capture_deep_feature(
                self._unet, self._branch, lambda: forward(call),
                None if fix_full is None else (lambda f: fix_full(index, f)),
            ),
        )
        # A feature of another batch (an inner hook changed the call) cannot be reused.
        rows = call.sample.shape[0] * (call.sample.shape[1] if self._video else 1)  # video UNets fold frames into rows
        self._cache = (layout, deep.clone()) if deep is not None and deep.shape[0] == rows else None
        self._calls.append((index, "full", layout))
        return out

    def end(self) -> DeepCacheStats:
        """This run's :class:`DeepCacheStats`; frees the cached feature."""
        self._cache = None
        stats: dict[str, Any] = {**call_stats(self._calls, self._plan, self._costs), "branch": self._branch}
        if "macs" in stats:
            first = self._calls[0][2]
            stats.update(macs_full_call=self._costs.measured.get(("full", first)),
                         macs_partial_call=self._costs.measured.get(("partial", first)))
        return stats  # type: ignore[return-value]


# --- the node ---------------------------------------------------------------------------------


def _example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.sd_handles()["model"], "interval": 2, "branch": 0}


def _explicit_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.sd_handles()["model"], "schedule": "explicit", "full_steps": "0, 2, 3", "branch": 1}


def check_full_steps(values: Mapping[str, Any]) -> Iterator[Problem]:
    """With the explicit schedule, ``full_steps`` lists at least one step index."""
    text = values.get("full_steps")
    if values.get("schedule") != "explicit" or not isinstance(text, str):
        return
    try:
        steps = schedules.parse_steps(text, "full_steps")
    except ValueError as exc:
        yield Problem("bad-steps", str(exc), input="full_steps")
        return
    if not steps:
        yield Problem(
            "missing-full-steps", "full_steps is required when schedule is 'explicit': give step indices like '0,3,5'",
            input="full_steps",
        )


check_inputs = all_of(check_full_steps, ordered("start_step", "end_step"))
"""The DeepCache node's input check: the explicit schedule's steps, and ``start_step < end_step``."""


def _upgrade_1(inputs: dict[str, Any]) -> dict[str, Any]:
    """1.x -> 2.0: ``end_step: 10000`` meant "no end"; now the input is left out for that."""
    end_step = inputs.get("end_step")
    if isinstance(end_step, int) and not isinstance(end_step, bool) and end_step >= 10000:
        inputs.pop("end_step")
    return inputs


@node(
    "dagfusion.cache.DeepCache",
    version="2.0.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="A UNet model (SD 1.x/2.x, SDXL)."),
        Input("interval", INT, 3, min=1, max=1000,
              description="Uniform: a full step every N steps; non-uniform: ceil(steps / N) full steps."),
        Input("branch", INT, 0, min=0, max=64,
              description="Cache branch: 0 = shallowest (fastest); at most the number of up-blocks - 1."),
        Input("schedule", STRING, "uniform", choices=schedules.SCHEDULES,
              description="Which steps run in full: every interval-th, DeepCache's non-uniform "
                          "schedule around 'center', or the explicit 'full_steps' list."),
        Input("full_steps", STRING, "",
              description="Explicit schedule: comma-separated full-step indices, e.g. '0,3,5' (step 0 is always full)."),
        Input("pow", FLOAT, 1.4, min=1.02, max=4.0,
              description="Non-uniform schedule: exponent; higher packs full steps closer to 'center'."),
        Input("center", INT, 15, min=0, max=10000,
              description="Non-uniform schedule: the step where full steps are densest (15 of 50 in the paper)."),
        Input("start_step", INT, 0, min=0, max=10000, description="Steps before this one always run in full."),
        Input("end_step", INT, optional=True, min=1, max=10000,
              description="Steps from this one on always run in full (not set: caching continues to the last step)."),
    ],
    outputs=[Output("model", MODEL, "The model with DeepCache applied while sampling.")],
    examples=[_example, _explicit_example],
    migrations={1: _upgrade_1},
    ui={"color": "#26a69a"},
    check=check_inputs,
)
def deep_cache(
    ctx: RunContext,
    model: Any,
    interval: int,
    branch: int,
    schedule: str,
    full_steps: str,
    pow: float,
    center: int,
    start_step: int,
    end_step: int | None,
) -> Any:
    """Speed up a UNet by caching its deep features across steps (DeepCache, Ma et al., CVPR 2024).

    On full steps the whole UNet runs and the feature entering the last up-block(s) is cached;
    in between, only the shallow branch (conv_in, the first down-block(s), the last up-block(s))
    runs on the cached feature. Branch 0 skips the most. Quality drops as the interval grows;
    compare against the plain model with the same seed (dagfusion.metrics.Fidelity). The Sample
    node's report holds each run's statistics under this patch's key.
    """
    enforce(check_inputs, {"schedule": schedule, "full_steps": full_steps, "start_step": start_step, "end_step": end_step})
    explicit = tuple(schedules.parse_steps(full_steps, "full_steps")) if schedule == "explicit" else ()
    try:
        unet = unet_of(model.denoiser)
    except TypeError as exc:
        raise NodeInputError("model", str(exc)) from None
    try:
        check_branch(unet, branch)
    except ValueError as exc:
        raise NodeInputError("branch", str(exc)) from None
    config = DeepCacheConfig(
        interval=interval, branch=branch, schedule=schedule, full_steps=explicit, pow=pow, center=center,
        start_step=start_step, end_step=end_step,
    )
    return model.with_patch(DeepCachePatch(config))


NODES = (deep_cache,)
"""The nodes of this module."""
