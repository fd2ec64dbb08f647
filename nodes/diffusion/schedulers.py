"""Scheduler specs: the sampler names dagfusion knows and how they map to diffusers classes.

A :class:`~dagfusion.nodes.diffusion.data.SchedulerSpec` is a class name plus a config; the
sampler builds a fresh scheduler from it for every run. Only diffusers' own scheduler classes
can be named (a model folder cannot make dagfusion instantiate arbitrary classes).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from dagfusion import BOOLEAN, FLOAT, STRING, Input, Output, RunContext, node
from dagfusion.nodes.diffusion.data import SchedulerSpec
from dagfusion.nodes.diffusion.types import SCHEDULER

#: dagfusion sampler name -> (diffusers class, config overrides).
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
"""The samplers of the Sample and Scheduler nodes (``"default"`` keeps the model's own)."""

SAMPLER_CHOICES = ("default", *SAMPLERS)

#: Used when neither a model nor a SCHEDULER input gives a config (SD-style defaults).
FALLBACK_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def scheduler_class(class_name: str) -> type:
    """The diffusers scheduler class called ``class_name``.

    :raises ValueError: it is not a diffusers scheduler class.
    """
    import diffusers

    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(
            f"expected the name of a diffusers scheduler class (for example 'EulerDiscreteScheduler'), "
            f"got {class_name!r}"
        )
    return cls


def accepted_keys(class_name: str) -> set[str]:
    """Config keys the scheduler class's constructor takes."""
    return set(inspect.signature(scheduler_class(class_name).__init__).parameters) - {"self", "kwargs"}


def spec_for(
    base: SchedulerSpec | None,
    sampler: str = "default",
    overrides: Mapping[str, Any] | None = None,
) -> SchedulerSpec:
    """A spec for ``sampler`` built on ``base``'s config (training schedule, prediction type).

    ``sampler="default"`` keeps ``base``'s class. Overrides the class does not take raise
    ``ValueError`` (a Karras schedule on DDIM, say) instead of being silently dropped.
    """
    if base is None:
        base = SchedulerSpec("DDIMScheduler", FALLBACK_CONFIG, "default")
    if sampler == "default":
        class_name, preset, name = base.class_name, {}, base.name
    else:
        if sampler not in SAMPLERS:
            raise ValueError(f"expected a sampler in {list(SAMPLER_CHOICES)}, got {sampler!r}")
        class_name, preset = SAMPLERS[sampler]
        name = sampler
    config = {**base.config, **preset}
    keys = accepted_keys(class_name)
    if class_name != base.class_name:  # keep the training schedule, drop what the new class does not take
        config = {k: v for k, v in config.items() if k in keys}
    if overrides:
        refused = sorted(k for k in overrides if k not in keys)
        if refused:
            raise ValueError(f"{class_name} has no option(s) {refused}; it takes {sorted(keys)}")
        config.update(overrides)
    return SchedulerSpec(class_name, config, name)


def is_flow_matching(scheduler: Any) -> bool:
    """Whether ``scheduler`` samples a flow-matching ODE (velocity prediction, ``scale_noise``)."""
    return hasattr(scheduler, "scale_noise") and not hasattr(scheduler, "add_noise")


@node(
    "dagfusion.sampling.Scheduler",
    version="1.0.0",
    category="sampling",
    inputs=[
        Input("base", SCHEDULER, optional=True, link_only=True,
              description="Scheduler whose training schedule to keep (a loader's scheduler output); SD defaults if absent."),
        Input("sampler", STRING, "euler", choices=SAMPLER_CHOICES,
              description="Which sampler; 'default' keeps the base scheduler's class."),
        Input("karras", BOOLEAN, False, description="Use Karras sigmas (Euler, DPM++ and UniPC only)."),
        Input("prediction_type", STRING, "default", choices=("default", "epsilon", "v_prediction", "sample"),
              description="Override what the model predicts (SD 2.x 768 models: v_prediction)."),
        Input("timestep_spacing", STRING, "default", choices=("default", "leading", "trailing", "linspace"),
              description="How inference timesteps are spread over the training schedule."),
        Input("shift", FLOAT, 0.0, min=0.0, max=100.0,
              description="Flow-matching timestep shift (flow_euler only); 0 keeps the base value."),
    ],
    outputs=[Output("scheduler", SCHEDULER, "The configured scheduler, for a Sample node's scheduler input.")],
    examples=[{"sampler": "dpmpp_2m", "karras": True}, {"sampler": "ddim", "timestep_spacing": "trailing"}],
)
def scheduler_node(
    ctx: RunContext,
    base: SchedulerSpec | None,
    sampler: str,
    karras: bool,
    prediction_type: str,
    timestep_spacing: str,
    shift: float,
) -> SchedulerSpec:
    """Choose a sampler and its options on top of a model's training schedule."""
    overrides: dict[str, Any] = {}
    if karras:
        overrides["use_karras_sigmas"] = True
    if prediction_type != "default":
        overrides["prediction_type"] = prediction_type
    if timestep_spacing != "default":
        overrides["timestep_spacing"] = timestep_spacing
    if shift:
        overrides["shift"] = float(shift)
    return spec_for(base, sampler, overrides)


NODES = (scheduler_node,)
