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

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dagfusion import FLOAT, INT, STRING, Input, Output, RunContext, node
from dagfusion.model import (
    CallCosts,
    DenoiserCall,
    Forward,
    ModelPatch,
    SamplingRun,
    StepHook,
    call_layout,
    unwrap_compiled,
)
from dagfusion.nodes.cache import schedules
from dagfusion.nodes.cache.stats import FeatureCacheStats, call_stats
from dagfusion.nodes.diffusion.types import MODEL

# --- the UNet ---------------------------------------------------------------------------------


def unet_of(module: Any) -> Any:
    """The ``UNet2DConditionModel`` behind ``module`` (looking through ``torch.compile``).

    :raises TypeError: naming the class, when ``module`` is not a ``UNet2DConditionModel``.
    """
    inner = unwrap_compiled(module)
    if "UNet2DConditionModel" not in {cls.__name__ for cls in type(inner).__mro__}:
        raise TypeError(
            f"DeepCache works on UNet denoisers (diffusers UNet2DConditionModel: SD 1.x/2.x, SDXL); this model's "
            f"denoiser is a {type(inner).__name__}. For transformer denoisers (DiT, PixArt) use the DiT cache "
            "nodes of the cache pack instead"
        )
    return inner


def max_branch(unet: Any) -> int:
    """The deepest valid ``branch`` of ``unet``: ``len(up_blocks) - 1`` (then only the mid-block is skipped)."""
    return len(unet.up_blocks) - 1


def check_branch(unet: Any, branch: int) -> None:
    """:raises ValueError: naming the maximum, when ``branch`` is not a valid branch of ``unet``."""
    top = max_branch(unet)
    if not 0 <= branch <= top:
        raise ValueError(
            f"branch {branch} is out of range for this UNet: it has {top + 1} up-blocks, so branch must be "
            f"between 0 (shallowest, fastest) and {top} (skips only the mid-block)"
        )


_KNOWN_KWARGS = frozenset({
    "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask", "cross_attention_kwargs",
    "added_cond_kwargs", "down_block_additional_residuals", "mid_block_additional_residual",
    "down_intrablock_additional_residuals", "encoder_attention_mask", "return_dict",
})


def unet_partial_forward(unet: Any, sample: Any, timestep: Any, kwargs: dict[str, Any], branch: int, deep: Any) -> Any:
    """The UNet's output computed from the shallow branch ``branch`` and the cached ``deep`` feature.

    ``deep`` is the input hidden state of up-block ``len(up_blocks) - 1 - branch`` from a full
    forward. Given the ``deep`` feature of the *same* inputs, the result equals
    ``unet(sample, timestep, **kwargs).sample``. Follows the structure of diffusers'
    ``UNet2DConditionModel.forward``: the same embeddings (time, class, added SDXL text/time
    conditions, image hints), attention masks, GLIGEN, ControlNet and T2I-Adapter residuals
    (those of the shallow blocks) and upsample sizes for odd latent sizes.

    :param kwargs: The keyword inputs of the UNet call (``encoder_hidden_states`` …).
    :returns: The output tensor (not a ``UNet2DConditionOutput``).
    """
    import torch

    unet = unwrap_compiled(unet)
    unknown = sorted(set(kwargs) - _KNOWN_KWARGS)
    if unknown:
        raise TypeError(f"DeepCache's partial UNet forward does not know the input(s) {unknown}")
    encoder_hidden_states = kwargs.get("encoder_hidden_states")
    timestep_cond = kwargs.get("timestep_cond")
    attention_mask = kwargs.get("attention_mask")
    encoder_attention_mask = kwargs.get("encoder_attention_mask")
    cross_attention_kwargs = kwargs.get("cross_attention_kwargs")
    added_cond_kwargs = kwargs.get("added_cond_kwargs")
    down_residuals = kwargs.get("down_block_additional_residuals")
    mid_residual = kwargs.get("mid_block_additional_residual")
    intrablock = kwargs.get("down_intrablock_additional_residuals")

    up_blocks = unet.up_blocks
    first_up = len(up_blocks) - 1 - branch
    # Odd latent sizes: the upsamplers are told the size of the skip they meet (as in diffusers).
    factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % factor != 0 for dim in sample.shape[-2:])

    if attention_mask is not None:
        attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if encoder_attention_mask is not None:
        encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0

    # 1. embeddings, with the model's own helpers
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=kwargs.get("class_labels"))
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    if unet.config.addition_embed_type == "image_hint":
        aug_emb, hint = aug_emb
        sample = torch.cat([sample, hint], dim=1)
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )

    # 2. conv_in and the shallow down-blocks, keeping the skips the shallow up-blocks consume
    sample = unet.conv_in(sample)
    if cross_attention_kwargs is not None and cross_attention_kwargs.get("gligen") is not None:
        cross_attention_kwargs = dict(cross_attention_kwargs)
        gligen = cross_attention_kwargs.pop("gligen")
        cross_attention_kwargs["gligen"] = {"objs": unet.position_net(**gligen)}
    is_controlnet = mid_residual is not None and down_residuals is not None
    if intrablock is None and mid_residual is None and down_residuals is not None:
        intrablock = down_residuals  # diffusers' deprecated T2I-Adapter spelling
    adapter = list(intrablock) if intrablock is not None else None  # never pop the caller's list

    needed = sum(len(block.resnets) for block in up_blocks[first_up:])
    skips: tuple[Any, ...] = (sample,)
    for block in unet.down_blocks:
        if len(skips) >= needed:
            break
        if getattr(block, "has_cross_attention", False):
            extra = {"additional_residuals": adapter.pop(0)} if adapter else {}
            sample, res = block(
                hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs,
                encoder_attention_mask=encoder_attention_mask, **extra,
            )
        else:
            sample, res = block(hidden_states=sample, temb=emb)
            if adapter:
                sample += adapter.pop(0)
        skips += res
    if len(skips) < needed:  # pragma: no cover - not a UNet2DConditionModel layout
        raise ValueError(f"the down path gives {len(skips)} skip features, the up-blocks from {first_up} need {needed}")
    if is_controlnet:
        skips = tuple(s + r for s, r in zip(skips, down_residuals))
    skips = skips[:needed]

    # 3. the cached deep feature through the shallow up-blocks
    sample = deep
    upsample_size = skips[-1].shape[2:] if forward_upsample_size and first_up > 0 else None
    for index in range(first_up, len(up_blocks)):
        block = up_blocks[index]
        res = skips[-len(block.resnets):]
        skips = skips[: -len(block.resnets)]
        if index != len(up_blocks) - 1 and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(
                hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                upsample_size=upsample_size, attention_mask=attention_mask,
                encoder_attention_mask=encoder_attention_mask,
            )
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)

    # 4. output
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


def capture_deep_feature(unet: Any, branch: int, run: Any, transform: Any = None) -> tuple[Any, Any]:
    """``run()`` with the input of up-block ``len(up_blocks) - 1 - branch`` captured.

    Registers a forward pre-hook for the duration of ``run()`` only (removed on exit, also after
    an error) that records the block's ``hidden_states`` when called from this thread.

    :param transform: Optional ``transform(feature) -> feature`` the block computes with instead
        (CacheQuant's correction of the quantization error); the *untransformed* feature is returned.
    :returns: ``(what run() returned, the last captured feature or None)``.
    """
    unet = unwrap_compiled(unet)
    block = unet.up_blocks[len(unet.up_blocks) - 1 - branch]
    owner = threading.get_ident()
    captured: list[Any] = []

    def hook(module: Any, args: Any, kwargs: Any) -> Any:
        if threading.get_ident() == owner:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is not None:
                captured.append(hidden)
                if transform is not None:
                    if "hidden_states" in kwargs:
                        return args, {**kwargs, "hidden_states": transform(hidden)}
                    return (transform(hidden), *args[1:]), kwargs
        return None

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    return out, (captured[-1] if captured else None)


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
        self._cache = (layout, deep.clone()) if deep is not None and deep.shape[0] == call.sample.shape[0] else None
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
    explicit: tuple[int, ...] = ()
    if schedule == "explicit":
        explicit = tuple(schedules.parse_steps(full_steps, "full_steps"))
        if not explicit:
            raise ValueError("full_steps is required when schedule is 'explicit': give step indices like '0,3,5'")
    if end_step is not None and end_step <= start_step:
        raise ValueError(f"end_step ({end_step}) must be greater than start_step ({start_step})")
    unet = unet_of(model.denoiser)
    check_branch(unet, branch)
    config = DeepCacheConfig(
        interval=interval, branch=branch, schedule=schedule, full_steps=explicit, pow=pow, center=center,
        start_step=start_step, end_step=end_step,
    )
    return model.with_patch(DeepCachePatch(config))


NODES = (deep_cache,)
"""The nodes of this module."""
