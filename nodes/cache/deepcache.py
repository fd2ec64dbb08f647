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

Each run measures the MACs of one full and one partial call per batch shape
(:func:`~dagfusion.model.count_macs`; MACs depend on shapes only) and leaves its
statistics in ``patch.last_stats`` (read-only reporting: the patch is shared by every handle
and run that uses it, so this is the *last* run's numbers).
"""

from __future__ import annotations

import json
import threading
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


class DeepCachePatch(ModelPatch):
    """DeepCache settings, attached to a model handle by the node (see the module docstring).

    Attributes:
        interval, branch, schedule, explicit, pow, center, start_step, end_step: The settings
            (``explicit``: the full-step indices of the explicit schedule).
        measure: Count MACs (one full and one partial call per batch shape and run).
        last_stats: Statistics of the last run that finished with this patch (``None`` before
            the first); read-only reporting, see :meth:`DeepCacheHook.stats`.
    """

    def __init__(
        self,
        *,
        interval: int = 3,
        branch: int = 0,
        schedule: str = "uniform",
        explicit: tuple[int, ...] = (),
        pow: float = 1.4,
        center: int = 15,
        start_step: int = 0,
        end_step: int | None = None,
        measure: bool = True,
    ) -> None:
        if schedule not in schedules.SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {list(schedules.SCHEDULES)}")
        if interval < 1:
            raise ValueError(f"interval must be at least 1, got {interval}")
        if branch < 0:
            raise ValueError(f"branch must be 0 or more, got {branch}")
        self.interval = int(interval)
        self.branch = int(branch)
        self.schedule = schedule
        self.explicit = tuple(sorted({int(i) for i in explicit}))
        self.pow = float(pow)
        self.center = int(center)
        self.start_step = int(start_step)
        self.end_step = None if end_step is None else int(end_step)
        self.measure = bool(measure)
        self.last_stats: dict[str, Any] | None = None
        settings: dict[str, Any] = {"branch": self.branch, "schedule": schedule}
        if schedule in ("uniform", "non-uniform"):
            settings["interval"] = self.interval
        if schedule == "non-uniform":
            settings.update(pow=self.pow, center=self.center)
        if schedule == "explicit":
            settings["full_steps"] = list(self.explicit)
        if self.start_step:
            settings["start_step"] = self.start_step
        if self.end_step is not None:
            settings["end_step"] = self.end_step
        self.key = "dagfusion.cache.DeepCache:" + json.dumps(settings, sort_keys=True)

    def plan(self, steps: int) -> list[bool]:
        """Which of ``steps`` steps are full (see :func:`~dagfusion.nodes.cache.schedules.full_steps`)."""
        return schedules.full_steps(
            self.schedule, steps, self.interval, pow=self.pow, center=self.center, explicit=self.explicit,
            start_step=self.start_step, end_step=self.end_step,
        )

    def begin(self, run: SamplingRun) -> DeepCacheHook:
        unet = unet_of(run.module)
        check_branch(unet, self.branch)
        return DeepCacheHook(self, unet, self.plan(run.steps), compiled=unet is not run.module)


class DeepCacheHook(StepHook):
    """The per-run state of :class:`DeepCachePatch`: the cached feature and the run's statistics."""

    def __init__(self, patch: DeepCachePatch, unet: Any, plan: list[bool], *, compiled: bool = False) -> None:
        self.patch = patch
        self.unet = unet
        # Forward hooks on the submodules of a torch.compile'd module would force recompiles: no MACs then.
        self.costs = CallCosts(unet, patch.measure and not compiled)
        self.branch = patch.branch
        self.plan = plan
        self.cache: tuple[Any, Any] | None = None  # (batch layout, deep feature)
        self.calls: list[tuple[int, str, Any]] = []  # (step index, "full" | "partial", batch layout)
        # correct(step index, cached feature) -> the feature to reuse (CacheQuant's cache-error correction);
        # correct_full(step index, feature) -> the feature the up path computes with, on every step
        # (CacheQuant's quantization-error correction; applied after ``correct`` on reused steps)
        self.correct: Any = None
        self.correct_full: Any = None

    layout = staticmethod(call_layout)

    def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
        index = call.step.index
        full = self.plan[index] if 0 <= index < len(self.plan) else True
        layout = self.layout(call)
        if not full and self.cache is not None and self.cache[0] == layout:
            deep = self.cache[1] if self.correct is None else self.correct(index, self.cache[1])
            if self.correct_full is not None:
                deep = self.correct_full(index, deep)
            out = self.costs.run(
                "partial", layout,
                lambda: unet_partial_forward(self.unet, call.sample, call.timestep, call.kwargs, self.branch, deep),
            )
            self.calls.append((index, "partial", layout))
            return out
        out, deep = self.costs.run(
            "full", layout, lambda: capture_deep_feature(
                self.unet, self.branch, lambda: forward(call),
                None if self.correct_full is None else (lambda f: self.correct_full(index, f)),
            ),
        )
        # A feature of another batch (an inner hook changed the call) cannot be reused.
        self.cache = (layout, deep.clone()) if deep is not None and deep.shape[0] == call.sample.shape[0] else None
        self.calls.append((index, "full", layout))
        return out

    def stats(self) -> dict[str, Any]:
        """This run so far: calls, full/partial counts and fractions, MACs computed against MACs uncached.

        Keys: ``calls``, ``full_calls``, ``partial_calls``, ``full_fraction``, ``plan`` (the
        schedule, one bool per step), ``modes`` (``[step, "full"|"partial"]`` per call),
        ``branch``, and when measured: ``macs`` (computed), ``macs_uncached`` (had every call
        run in full), ``mac_fraction`` (``macs / macs_uncached``), ``macs_full_call`` and
        ``macs_partial_call`` (one call of the first batch layout).
        """
        total = len(self.calls)
        full = sum(1 for _, mode, _ in self.calls if mode == "full")
        stats: dict[str, Any] = {
            "calls": total,
            "full_calls": full,
            "partial_calls": total - full,
            "full_fraction": full / total if total else 0.0,
            "plan": list(self.plan),
            "modes": [[index, mode] for index, mode, _ in self.calls],
            "branch": self.branch,
        }
        measured = self.costs.summary(self.calls)
        if measured:
            first = self.calls[0][2]
            stats.update(
                measured,
                macs_full_call=self.costs.measured.get(("full", first)),
                macs_partial_call=self.costs.measured.get(("partial", first)),
            )
        return stats

    def end(self) -> None:
        self.patch.last_stats = self.stats()
        self.cache = None


# --- the node ---------------------------------------------------------------------------------


def _example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.sd_handles()["model"], "interval": 2, "branch": 0}


def _explicit_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.sd_handles()["model"], "schedule": "explicit", "full_steps": "0, 2, 3", "branch": 1}


@node(
    "dagfusion.cache.DeepCache",
    version="1.0.0",
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
        Input("end_step", INT, 10000, min=1, max=10000,
              description="Steps from this one on always run in full (10000: no limit)."),
    ],
    outputs=[Output("model", MODEL, "The model with DeepCache applied while sampling.")],
    examples=[_example, _explicit_example],
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
    end_step: int,
) -> Any:
    """Speed up a UNet by caching its deep features across steps (DeepCache, Ma et al., CVPR 2024).

    On full steps the whole UNet runs and the feature entering the last up-block(s) is cached;
    in between, only the shallow branch (conv_in, the first down-block(s), the last up-block(s))
    runs on the cached feature. Branch 0 skips the most. Quality drops as the interval grows;
    compare against the plain model with the same seed (dagfusion.metrics.Fidelity).
    """
    explicit: tuple[int, ...] = ()
    if schedule == "explicit":
        explicit = tuple(schedules.parse_steps(full_steps, "full_steps"))
        if not explicit:
            raise ValueError("full_steps is required when schedule is 'explicit': give step indices like '0,3,5'")
    if end_step <= start_step:
        raise ValueError(f"end_step ({end_step}) must be greater than start_step ({start_step})")
    unet = unet_of(model.denoiser)
    check_branch(unet, branch)
    patch = DeepCachePatch(
        interval=interval, branch=branch, schedule=schedule, explicit=explicit, pow=pow, center=center,
        start_step=start_step, end_step=None if end_step >= 10000 else end_step,
    )
    return model.with_patch(patch)


NODES = (deep_cache,)
"""The nodes of this module."""
