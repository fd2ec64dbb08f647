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
            self.reused = 0

        def denoise(self, call, forward):
            if call.step.index % 2 == 1 and self.last is not None:
                self.reused += 1
                return self.last                 # reuse: the denoiser does not run
            self.last = forward(call)            # run it (and every inner hook)
            return self.last

        def end(self):
            return {"reused": self.reused}       # this run's statistics, in the run report

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

Guidance halves. Under classifier-free guidance the sampler sends both halves in one batch of
``len(call.batches) * call.rows`` rows, half after half in ``call.batches`` order. What is
*batched* is decided by one rule (:meth:`DenoiserCall.batched`): ``sample``, and every tensor in
``timestep`` and ``kwargs`` — at any depth of dicts, lists and tuples — whose leading dimension
is the batch size; everything else (a scalar timestep, ``cross_attention_kwargs`` scales) is
shared by the halves. ``call.select("cond")`` is the call for one half (those tensors sliced,
``batches == ("cond",)``); inner hooks and the denoiser then see that smaller call exactly as if
the sampler had sent it. ``call.split(output)`` cuts a full-batch output into ``{half: rows}``
and ``call.merge({"uncond": u, "cond": c})`` joins halves back into the full-batch output the
outer hooks and the sampler expect.

``forward(call)`` returns the raw model output tensor (before guidance is combined); a hook
returns a tensor of the same shape as the output for the call it was given. After the
scheduler step, ``after_step(step, latents)`` is called (it may return new latents of the same
shape, which replace them for the rest of the run, as latent-mask inpainting does), and
``end()`` when the run finishes (also after a failure or cancel). ``end()`` returns the hook's **report** — this run's
statistics as plain data (a dict or a dataclass of numbers, strings, lists and dicts) or
``None``; the sampler collects it into the run's :class:`~dagfusion.model.RunReport` under the
patch's key. A hook never stores statistics on its patch: patches are shared by every handle,
run and cached result that uses them.

A hook gets everything it needs when it is made (``begin(run)`` passes it to the hook's
constructor); nothing sets its attributes from outside. A subclass may define only the hook
methods ``denoise``, ``after_step`` and ``end`` publicly: any other public method is refused
when the class is defined (a misspelt ``denoize`` would otherwise silently never run), so helpers
take a leading ``_``.

:class:`SamplingRun` (the argument of ``begin``) describes the run: the handle, the module,
the model family, the scheduler instance, all timesteps, guidance scale, seed, latent shape,
device and dtype.

Family authors and samplers use :func:`chain` to run the hooks of a run around the denoiser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dagfusion.errors import NodeDefinitionError, did_you_mean


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
        sample: The model input (scaled by the scheduler; the guidance halves batched, half
            after half in ``batches`` order).
        timestep: The timestep argument as passed to the module.
        kwargs: The other keyword inputs (``encoder_hidden_states``, ``class_labels`` …).
        batches: Names of the batch halves, in order (``("uncond", "cond")``, ``("cond",)``).
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

    @property
    def rows(self) -> int:
        """Rows per batch half (the sample's batch size divided by the number of halves)."""
        return int(self.sample.shape[0]) // max(len(self.batches), 1)

    def batched(self, value: Any) -> bool:
        """Whether ``value`` (a tensor) is split by :meth:`select`: its leading dimension is the
        call's batch size (``sample.shape[0]``)."""
        shape = getattr(value, "shape", None)
        return shape is not None and len(shape) > 0 and int(shape[0]) == int(self.sample.shape[0])

    def select(self, half: str) -> DenoiserCall:
        """The call for one guidance half: ``sample``, and every batched tensor of ``timestep``
        and ``kwargs`` (at any depth of dicts, lists and tuples), sliced to that half's rows;
        ``batches == (half,)``. Values that are not batched are passed on unchanged.

        :raises ValueError: ``half`` is not one of ``batches`` (naming them).
        """
        if half not in self.batches:
            raise ValueError(f"this call's batch halves are {list(self.batches)}; there is no {half!r} half")
        if len(self.batches) == 1:
            return self
        rows = self.rows
        start = self.batches.index(half) * rows
        piece = slice(start, start + rows)
        return dataclasses.replace(
            self,
            sample=self.sample[piece],
            timestep=self._slice(self.timestep, piece),
            kwargs={k: self._slice(v, piece) for k, v in self.kwargs.items()},
            batches=(half,),
        )

    def split(self, output: Any) -> dict[str, Any]:
        """``{half: rows}`` of a full-batch ``output`` of this call (a tensor with the sample's batch size).

        :raises ValueError: ``output``'s leading dimension is not the call's batch size.
        """
        if not self.batched(output):
            raise ValueError(
                f"expected an output with {int(self.sample.shape[0])} rows (the call's batch), got shape "
                f"{tuple(getattr(output, 'shape', ()))}"
            )
        rows = self.rows
        return {half: output[i * rows:(i + 1) * rows] for i, half in enumerate(self.batches)}

    def merge(self, halves: Mapping[str, Any]) -> Any:
        """The full-batch output from one output per half (``{"uncond": u, "cond": c}``), joined in
        ``batches`` order: what a hook returns for this call after computing the halves apart.

        :raises ValueError: ``halves`` does not name exactly this call's halves.
        """
        if set(halves) != set(self.batches):
            raise ValueError(f"merge needs one output for each of {list(self.batches)}, got {sorted(halves)}")
        if len(self.batches) == 1:
            return halves[self.batches[0]]
        import torch

        return torch.cat([halves[half] for half in self.batches], dim=0)

    def _slice(self, value: Any, piece: slice) -> Any:
        if self.batched(value):
            return value[piece]
        if isinstance(value, Mapping):
            return {k: self._slice(v, piece) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._slice(v, piece) for v in value)
        return value


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


HOOK_METHODS = ("denoise", "after_step", "end")
"""The public methods a :class:`StepHook` subclass may define (helpers start with ``_``)."""


class StepHook:
    """Per-run state of a patch; override the methods you need (defaults do nothing).

    Subclasses may define only :data:`HOOK_METHODS` publicly; any other public method raises
    :class:`~dagfusion.errors.NodeDefinitionError` when the class is defined (naming the closest
    hook method), so a misspelt ``denoize`` cannot silently never run.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in vars(cls).items():
            if name.startswith("_") or name in HOOK_METHODS or isinstance(value, type):
                continue
            if isinstance(value, (staticmethod, classmethod)) or callable(value):
                raise NodeDefinitionError(
                    f"step hook {cls.__qualname__} defines {name!r}, which is not a step hook method "
                    f"({', '.join(HOOK_METHODS)}){did_you_mean(name, HOOK_METHODS)}; the sampler never calls "
                    f"it — name helpers with a leading '_'"
                )

    def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
        """Return the model output for ``call``; call ``forward`` to run the real denoiser."""
        return forward(call)

    def after_step(self, step: StepInfo, latents: Any) -> Any:
        """Called after the scheduler step with the new latents (do not modify them in place).

        Returns ``None`` (keep them) or a tensor of the same shape that replaces them; with
        several hooks, each sees the latents the previous one returned."""

    def end(self) -> Any:
        """Called once when the run ends, successfully or not; returns this run's report.

        The report is plain data (a dict or dataclass of numbers, strings, lists and dicts) or
        ``None``; the sampler puts it in the run's :class:`~dagfusion.model.RunReport` under the
        patch's key.
        """
        return None


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
