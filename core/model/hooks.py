"""The step hook: how patches see and change every denoiser call of a sampling run.

This is the seam accelerators plug into (cache schedulers, quantizers, structure guidance).
A **patch** (:class:`~dagfusion.model.ModelPatch`) is an immutable description attached to a
:class:`~dagfusion.model.ModelHandle` with ``model.with_patch(patch)``. It may do two things,
both undone when sampling ends:

1. ``apply(module)`` — a context manager that changes the denoiser *module* for the run
   (register forward hooks, wrap submodules, swap weights) and restores it on exit. Because
   weights are shared between handles, a patch must never leave a change behind.
2. ``begin(run)`` — return a fresh :class:`StepHook` holding the per-run state (or ``None``).
   It is called at the start of **every** sampling run, so state never leaks between runs,
   clones or cached handles.

A :class:`StepHook` sees each denoiser call and may replace it::

    class SkipOddSteps(StepHook):
        def __init__(self):
            self.last = None

        def denoise(self, call, forward):
            if call.step.index % 2 == 1 and self.last is not None:
                return self.last                 # reuse: the denoiser does not run
            self.last = forward(call)            # run it (and every inner hook)
            return self.last

    class SkipOddStepsPatch(ModelPatch):
        key = "example.skip-odd"
        def begin(self, run):
            return SkipOddSteps()

Calling order: the first patch of ``model.patches`` is the outermost wrapper; ``forward``
calls the next hook, and finally the denoiser. ``call`` is a :class:`DenoiserCall`:

- ``call.step`` — :class:`StepInfo`: ``index`` (0-based), ``total``, ``timestep`` (the
  scheduler's tensor), ``timestep_value`` (float), ``sigma`` (float or ``None``).
- ``call.module`` — the denoiser (after module patches);
- ``call.sample``, ``call.timestep``, ``call.kwargs`` — its inputs exactly as they will be
  passed: ``module(sample, timestep, **kwargs)``. ``call.batches`` names the batch halves
  (``("uncond", "cond")`` under classifier-free guidance, ``("cond",)`` without);
- ``call.replace(sample=..., kwargs=...)`` — a modified copy to pass to ``forward``.

``forward(call)`` returns the raw model output tensor (before guidance is combined); a hook
returns a tensor of the same shape. After the scheduler step, ``after_step(step, latents)``
is called, and ``end()`` when the run finishes (also after a failure or cancel).

:class:`SamplingRun` (the argument of ``begin``) describes the run: the handle, the module,
the model family, the scheduler instance, all timesteps, guidance scale, seed, latent shape,
device and dtype.

Family authors and samplers use :func:`chain` to run the hooks of a run around the denoiser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepInfo:
    """Where in the run a denoiser call happens.

    Attributes:
        index: 0-based step index.
        total: Number of steps in this run (after img2img strength trimming).
        timestep: The scheduler's timestep (a tensor on the scheduler's device).
        timestep_value: The same as a Python float (no device sync needed).
        sigma: The noise level at this step for sigma-based schedulers, else ``None``.
    """

    index: int
    total: int
    timestep: Any
    timestep_value: float
    sigma: float | None = None

    @property
    def fraction(self) -> float:
        """``index / total`` — how far the run has progressed (0 at the first step)."""
        return self.index / self.total if self.total else 0.0

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.total - 1


@dataclass(frozen=True)
class DenoiserCall:
    """One call of the denoiser: ``module(sample, timestep, **kwargs)``.

    Attributes:
        step: :class:`StepInfo` of this call.
        module: The denoiser module (with module patches applied).
        sample: The model input (scaled by the scheduler; both CFG halves batched).
        timestep: The timestep argument as passed to the module.
        kwargs: The other keyword inputs (``encoder_hidden_states``, ``class_labels`` …).
        batches: Names of the batch parts, in order (``("uncond", "cond")``, ``("cond",)``).
        family: Name of the model family adapter (``"unet"``, ``"dit"``, ``"pixart"``, ``"svd"``).
    """

    step: StepInfo
    module: Any
    sample: Any
    timestep: Any
    kwargs: dict[str, Any]
    batches: tuple[str, ...]
    family: str

    def replace(self, **changes: Any) -> DenoiserCall:
        """A copy with ``changes`` (``call.replace(sample=x)``)."""
        return dataclasses.replace(self, **changes)


Forward = Callable[[DenoiserCall], Any]
"""Runs the rest of the chain (inner hooks, then the denoiser) and returns its output."""


@dataclass(frozen=True)
class SamplingRun:
    """What a patch's ``begin`` learns about the run it joins."""

    handle: Any
    module: Any
    family: str
    scheduler: Any
    timesteps: tuple[float, ...]
    steps: int
    guidance_scale: float
    cfg: bool
    seed: int
    shape: tuple[int, ...]
    device: Any
    dtype: Any


class StepHook:
    """Per-run state of a patch; override the methods you need (defaults do nothing)."""

    def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
        """Return the model output for ``call``; call ``forward`` to run the real denoiser."""
        return forward(call)

    def after_step(self, step: StepInfo, latents: Any) -> None:
        """Called after the scheduler step with the new latents (read them; do not modify)."""

    def end(self) -> None:
        """Called once when the run ends, successfully or not."""


def chain(hooks: Sequence[StepHook], innermost: Forward) -> Forward:
    """The forward function that runs ``hooks`` (first = outermost) around ``innermost``."""
    forward = innermost
    for hook in reversed(hooks):
        forward = _wrap(hook, forward)
    return forward


def _wrap(hook: StepHook, inner: Forward) -> Forward:
    def forward(call: DenoiserCall) -> Any:
        return hook.denoise(call, inner)

    return forward
