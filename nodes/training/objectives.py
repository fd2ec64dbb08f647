"""Training objectives: what the training loop minimises, as pluggable objects.

The loop (:mod:`~dagfusion.nodes.training.loop`) knows nothing about diffusion maths. Each
step it builds a :class:`TrainBatch` and asks the objective for a loss::

    loss, logs = objective.loss(model_call, batch, step, generator)

- ``model_call(sample, timesteps, **inputs) -> prediction`` (a :class:`ModelCall`) runs the
  denoiser being trained — conditioning on the batch's captions already bound, the model's
  patches applied, under the run's autocast — and returns its output in float32 (learned
  variance channels dropped). ``model_call.module`` is the module itself, ``model_call.inputs``
  the bound keyword inputs, ``model_call.family`` the sampler family (``"unet"``, ``"pixart"`` …).
  Call it as often as needed (distillation calls a teacher too; a gate loss may call it twice).
- ``batch`` (:class:`TrainBatch`): ``x0``, the clean samples in the denoiser's space (VAE
  latents times the scaling factor, or pixels in [-1, 1] without a VAE), float32 on the training
  device; the captions after caption dropout; and the data source's raw examples.
- ``step`` (:class:`TrainStep`): the 0-based optimizer step and the total.
- ``generator``: a seeded CPU ``torch.Generator``; draw *all* randomness from it (then move to
  ``x0.device``) so training is deterministic and resumes bit-exactly.
- Return a scalar loss tensor (the loop calls ``backward`` on it) and a dict of extra float
  values to report with progress events.

An objective also says how a model trained with it must be *sampled*:
``sampling_scheduler(base)`` returns the scheduler spec for the trained model (prediction type,
noise schedule, timestep spacing; the loop puts it on the output handle and the export node
writes it into the diffusers folder). ``describe()`` is plain data naming the schedule and the
timestep sampling; ``key()`` (derived from it by default) identifies the objective *and its
settings* in cache keys and checkpoints — two objectives with equal keys must train equally.

Objectives are immutable: build one in a node and never change it (the engine caches and
shares node outputs). A new objective is a subclass of :class:`Objective` plus a node that
returns it on an ``OBJECTIVE`` output; the loop needs no change (the tests define one).

The built-in objectives (with the standard definitions, ``ᾱ_t`` the cumulative product of the
noise schedule, ``α_t = √ᾱ_t``, ``σ_t = √(1 − ᾱ_t)``, ``ε`` standard normal noise):

- :class:`EpsilonObjective`: ``x_t = α_t·x0 + σ_t·ε``, target ``ε``, integer ``t`` uniform in [0, T).
- :class:`VPredictionObjective`: same ``x_t``, target ``v = α_t·ε − σ_t·x0``; optionally with the
  schedule rescaled to zero terminal SNR (Lin et al. 2024), ``ᾱ_{T-1} = 0``.
- :class:`RectifiedFlowObjective`: ``x_σ = (1 − σ)·x0 + σ·ε``, target ``ε − x0``, timestep ``σ·T``
  (diffusers' flow-matching convention, sampled by ``FlowMatchEulerDiscreteScheduler``), with ``σ``
  uniform or logit-normal and optionally shifted like the sampler's ``shift``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dagfusion import BOOLEAN, FLOAT, INT, STRING, Input, Output, RunContext, node
from dagfusion.nodes.training.types import OBJECTIVE

# --- the interface --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainStep:
    """Where in the run a loss is computed.

    Attributes:
        index: 0-based optimizer step.
        total: Number of optimizer steps of the run.
    """

    index: int
    total: int

    @property
    def fraction(self) -> float:
        """``index / total`` (0 at the first step)."""
        return self.index / self.total if self.total else 0.0


@dataclass(frozen=True)
class TrainBatch:
    """One training batch, as an objective sees it.

    Attributes:
        x0: Clean samples in the denoiser's space, float32 ``(B, C, h, w)`` on the training device.
        captions: The batch's captions after caption dropout (``""`` where dropped).
        examples: What the data source returned (:class:`~dagfusion.nodes.training.data.Examples`:
            images in [0, 1], captions before dropout, the source's raw batch).
    """

    x0: Any
    captions: tuple[str, ...]
    examples: Any = None

    @property
    def size(self) -> int:
        return int(self.x0.shape[0])


class ModelCall:
    """The denoiser being trained, bound to a batch's conditioning (see the module docstring).

    Attributes:
        module: The trainable module (with module patches applied).
        family: The sampler family adapter (:mod:`~dagfusion.model.families`).
        inputs: Keyword inputs bound for this batch (``encoder_hidden_states`` …).
        autocast: A callable returning the run's autocast context (or a null context).
        unconditional: A callable returning the keyword inputs of the *empty* caption for the
            batch (classifier-free guidance's unconditional half), or ``None`` when the caller
            cannot make them; use :meth:`unconditional_inputs`.
    """

    def __init__(self, module: Any, family: Any, inputs: Mapping[str, Any], autocast: Any,
                 unconditional: Any = None, *, concat: Any = None) -> None:
        self.module = module
        self.family = family
        self.inputs = dict(inputs)
        self.autocast = autocast
        self.concat = concat
        self._unconditional = unconditional
        self._unconditional_inputs: dict[str, Any] | None = None

    def unconditional_inputs(self) -> dict[str, Any]:
        """The keyword inputs of the empty caption for this batch (made once per batch), to pass as
        ``model_call(sample, t, **model_call.unconditional_inputs())``.

        :raises ValueError: when this call was made without a way to build them.
        """
        if self._unconditional_inputs is None:
            if self._unconditional is None:
                raise ValueError("this objective needs the unconditional (empty-caption) inputs, which this training "
                                 "loop does not provide")
            self._unconditional_inputs = dict(self._unconditional())
        return self._unconditional_inputs

    def __call__(self, sample: Any, timesteps: Any, **inputs: Any) -> Any:
        """The module's prediction for ``sample`` at ``timesteps`` (one per row), in float32.

        ``inputs`` replace bound inputs of the same name for this call. With ``concat`` (a family
        whose conditioning is partly concatenated to the noisy latents, such as SVD's image
        latents), it is appended to ``sample`` along the family's channel dimension first.
        """
        if self.concat is not None:
            import torch

            sample = torch.cat([sample, self.concat.to(device=sample.device, dtype=sample.dtype)], dim=self.family.channel_dim)
        kwargs = {**self.inputs, **inputs} if inputs else self.inputs
        with self.autocast():
            out = self.family.call(self.module, sample, timesteps, kwargs)
        return self.family.drop_variance(out, self.module).float()


@dataclass(frozen=True)
class BatchInputs:
    """A batch an objective prepared itself (:meth:`Objective.batch_inputs`): the clean samples
    ``x0`` in the denoiser's space (float32 on the training device) and the conditioning (a
    :class:`~dagfusion.nodes.diffusion.data.Conditioning` of a kind the model's family takes)."""

    x0: Any
    conditioning: Any


class Objective:
    """Base class of training objectives (the ``OBJECTIVE`` socket type); see the module docstring.

    Subclasses set ``name`` and implement :meth:`loss`, and usually :meth:`describe` and
    :meth:`sampling_scheduler`.
    """

    name: str = "objective"

    def loss(self, model_call: ModelCall, batch: TrainBatch, step: TrainStep, generator: Any) -> tuple[Any, dict[str, float]]:
        """A scalar loss tensor for ``batch`` and extra values to report."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss(model_call, batch, step, generator)")

    def batch_inputs(self, examples: Any, *, vae: Any, encoder: Any, device: Any, generator: Any) -> BatchInputs | None:
        """Prepare a batch yourself, or ``None`` (the default) to let the loop do it.

        The loop's own preparation drops captions, encodes images with the VAE and captions with
        the text encoder. An objective whose model is conditioned otherwise (a video UNet on its
        first frame) returns :class:`BatchInputs` here; the loop then binds that conditioning
        through the model family (concatenated latents included) and skips its own. ``encoder``
        is whatever the training was given as its encoder (a text bundle or an image encoder);
        draw all randomness from ``generator``.
        """
        return None

    def describe(self) -> dict[str, Any]:
        """Plain data: the objective's name, what it predicts, its schedule and timestep sampling."""
        return {"objective": self.name}

    def sampling_scheduler(self, base: Any) -> Any:
        """The scheduler spec a model trained with this objective samples with (``base``: the
        model's current one, or ``None``). The default keeps ``base``."""
        return base

    def key(self) -> str:
        """Identity and settings, for cache keys and checkpoints (from :meth:`describe`)."""
        cls = type(self)
        return f"{cls.__module__}.{cls.__qualname__}:" + json.dumps(self.describe(), sort_keys=True, default=str)

    def __dagfusion_fingerprint__(self) -> str:
        return self.key()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def mse(prediction: Any, target: Any) -> Any:
    """Mean squared error in float32."""
    import torch.nn.functional as F  # noqa: N812

    return F.mse_loss(prediction.float(), target.float())


def _rows(values: Any, like: Any) -> Any:
    """``values`` (B,) reshaped to broadcast over ``like`` (B, ...)."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=like.dtype)


# --- noise-schedule (DDPM) objectives ---------------------------------------------------------

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")


@functools.lru_cache(maxsize=16)
def _alphas_cumprod(timesteps: int, beta_schedule: str, beta_start: float, beta_end: float, zero_snr: bool) -> Any:
    """ᾱ of the schedule, exactly as diffusers' schedulers compute it (float32, CPU)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=timesteps, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
        rescale_betas_zero_snr=zero_snr,
    )
    return scheduler.alphas_cumprod.clone()


@dataclass(frozen=True)
class NoiseScheduleObjective(Objective):
    """Common part of the DDPM-style objectives: a discrete noise schedule ``ᾱ_t``.

    Attributes:
        train_timesteps: ``T``, the number of discrete timesteps.
        beta_schedule, beta_start, beta_end: The schedule, as diffusers names them.
        zero_terminal_snr: Rescale the schedule so that ``ᾱ_{T-1} = 0`` (pure noise at the last step).
    """

    train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False
    prediction: str = field(default="epsilon", init=False)

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"expected a beta schedule in {list(BETA_SCHEDULES)}, got {self.beta_schedule!r}")
        if self.train_timesteps < 2:
            raise ValueError(f"train_timesteps must be at least 2, got {self.train_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"expected 0 < beta_start < beta_end < 1, got {self.beta_start} and {self.beta_end}")

    @property
    def alphas_cumprod(self) -> Any:
        """``ᾱ_t`` for ``t = 0 … T-1`` (float32, CPU; do not modify)."""
        return _alphas_cumprod(
            self.train_timesteps, self.beta_schedule, float(self.beta_start), float(self.beta_end),
            bool(self.zero_terminal_snr),
        )

    def schedule_config(self) -> dict[str, Any]:
        """The schedule as diffusers scheduler config keys."""
        config: dict[str, Any] = {
            "num_train_timesteps": self.train_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": self.prediction,
        }
        if self.zero_terminal_snr:
            config["rescale_betas_zero_snr"] = True
        return config

    def describe(self) -> dict[str, Any]:
        return {
            "objective": self.name,
            "prediction": self.prediction,
            "schedule": self.schedule_config(),
            "timesteps": f"uniform integers in [0, {self.train_timesteps})",
        }

    def draw(self, x0: Any, generator: Any) -> tuple[Any, Any]:
        """Noise like ``x0`` and one integer timestep per row, from ``generator`` (CPU)."""
        import torch

        t = torch.randint(0, self.train_timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(tuple(x0.shape), generator=generator, dtype=torch.float32)
        return noise.to(x0.device), t

    def coefficients(self, t: Any, like: Any) -> tuple[Any, Any]:
        """``(α_t, σ_t)`` per row, shaped to broadcast over ``like``."""
        abar = self.alphas_cumprod[t.cpu()]
        return _rows(abar.sqrt(), like), _rows((1 - abar).sqrt(), like)

    def noisy(self, x0: Any, noise: Any, t: Any) -> Any:
        """``x_t = α_t·x0 + σ_t·ε``."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: Any, noise: Any, t: Any) -> Any:
        raise NotImplementedError

    def loss(self, model_call: ModelCall, batch: TrainBatch, step: TrainStep, generator: Any) -> tuple[Any, dict[str, float]]:
        x0 = batch.x0
        noise, t = self.draw(x0, generator)
        prediction = model_call(self.noisy(x0, noise, t), t.to(x0.device))
        return mse(prediction, self.target(x0, noise, t)), {}

    def sampling_scheduler(self, base: Any) -> Any:
        """``base`` (its class kept when it can take this schedule, else DDIM) with this schedule and
        prediction type; zero terminal SNR also sets trailing timestep spacing."""
        from dagfusion.nodes.diffusion.schedulers import accepted_keys, spec_for

        overrides = self.schedule_config()
        if self.zero_terminal_snr:
            overrides["timestep_spacing"] = "trailing"
        sampler = "default"
        if base is None or "FlowMatch" in base.class_name or not set(overrides) <= accepted_keys(base.class_name):
            sampler = "ddim"
        class_name = "DDIMScheduler" if sampler == "ddim" else base.class_name
        keys = accepted_keys(class_name)
        if "clip_sample" in keys:
            overrides["clip_sample"] = False
        if "trained_betas" in keys:
            overrides["trained_betas"] = None
        return spec_for(base, sampler, overrides)


@dataclass(frozen=True)
class EpsilonObjective(NoiseScheduleObjective):
    """Predict the noise: target ``ε`` (DDPM; Stable Diffusion 1.x)."""

    name = "epsilon"
    prediction: str = field(default="epsilon", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.zero_terminal_snr:
            raise ValueError("epsilon prediction is undefined at zero terminal SNR; use v-prediction")

    def target(self, x0: Any, noise: Any, t: Any) -> Any:
        return noise


@dataclass(frozen=True)
class VPredictionObjective(NoiseScheduleObjective):
    """Predict the velocity: target ``v = α_t·ε − σ_t·x0`` (Salimans & Ho 2022; SD 2.x 768)."""

    name = "v_prediction"
    prediction: str = field(default="v_prediction", init=False)

    def target(self, x0: Any, noise: Any, t: Any) -> Any:
        alpha, sigma = self.coefficients(t, x0)
        return alpha * noise - sigma * x0


# --- rectified flow ----------------------------------------------------------------------------

TIMESTEP_SAMPLING = ("uniform", "logit_normal")


@dataclass(frozen=True)
class RectifiedFlowObjective(Objective):
    """Rectified flow (flow matching): ``x_σ = (1 − σ)·x0 + σ·ε``, target ``ε − x0``.

    Attributes:
        train_timesteps: ``T``; the model sees timestep ``σ·T`` (diffusers' convention).
        shift: Timestep shift ``σ ← shift·σ / (1 + (shift − 1)·σ)``, as the flow sampler applies it.
        timestep_sampling: ``"uniform"`` σ in [0, 1), or ``"logit_normal"`` (σ = sigmoid(N(0, 1)), SD3).
    """

    name = "rectified_flow"
    train_timesteps: int = 1000
    shift: float = 1.0
    timestep_sampling: str = "uniform"

    def __post_init__(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"expected timestep_sampling in {list(TIMESTEP_SAMPLING)}, got {self.timestep_sampling!r}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")

    def describe(self) -> dict[str, Any]:
        return {
            "objective": self.name,
            "prediction": "flow (noise - x0)",
            "schedule": {"num_train_timesteps": self.train_timesteps, "shift": self.shift},
            "timesteps": f"sigma {self.timestep_sampling}, shifted by {self.shift}; model timestep = sigma * {self.train_timesteps}",
        }

    def draw(self, x0: Any, generator: Any) -> tuple[Any, Any]:
        """Noise like ``x0`` and one ``σ`` per row (float32), from ``generator`` (CPU)."""
        import torch

        rows = x0.shape[0]
        if self.timestep_sampling == "uniform":
            u = torch.rand((rows,), generator=generator)
        else:
            u = torch.sigmoid(torch.randn((rows,), generator=generator))
        sigma = self.shift * u / (1 + (self.shift - 1) * u)
        noise = torch.randn(tuple(x0.shape), generator=generator, dtype=torch.float32)
        return noise.to(x0.device), sigma

    def noisy(self, x0: Any, noise: Any, sigma: Any) -> Any:
        """``x_σ = (1 − σ)·x0 + σ·ε``."""
        s = _rows(sigma, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: Any, noise: Any, sigma: Any) -> Any:
        """The velocity ``ε − x0``."""
        return noise - x0

    def loss(self, model_call: ModelCall, batch: TrainBatch, step: TrainStep, generator: Any) -> tuple[Any, dict[str, float]]:
        x0 = batch.x0
        noise, sigma = self.draw(x0, generator)
        prediction = model_call(self.noisy(x0, noise, sigma), (sigma * self.train_timesteps).to(x0.device))
        return mse(prediction, self.target(x0, noise, sigma)), {}

    def sampling_scheduler(self, base: Any) -> Any:
        from dagfusion.nodes.diffusion.data import SchedulerSpec

        return SchedulerSpec(
            "FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": self.train_timesteps, "shift": self.shift},
            "flow_euler",
        )


# --- nodes ---------------------------------------------------------------------------------------

_SCHEDULE_INPUTS = [
    Input("beta_schedule", STRING, "scaled_linear", choices=BETA_SCHEDULES,
          description="Noise schedule (diffusers names): 'scaled_linear' (Stable Diffusion), 'linear' (DDPM), 'squaredcos_cap_v2' (cosine)."),
    Input("beta_start", FLOAT, 0.00085, min=1e-8, max=0.5, description="First beta of the schedule (SD: 0.00085; DDPM: 0.0001)."),
    Input("beta_end", FLOAT, 0.012, min=1e-6, max=0.999, description="Last beta of the schedule (SD: 0.012; DDPM: 0.02)."),
    Input("train_timesteps", INT, 1000, min=2, max=100_000, description="Number of discrete training timesteps T."),
]

PREDICTIONS = ("epsilon", "v_prediction")
"""Prediction types of the objectives that work on a given model's noise schedule."""

MODEL_SCHEDULE_INPUTS = [
    Input("beta_schedule", STRING, "scaled_linear", choices=BETA_SCHEDULES, description="The model's noise schedule (diffusers names)."),
    Input("beta_start", FLOAT, 0.00085, min=1e-8, max=0.5, description="First beta of the model's schedule."),
    Input("beta_end", FLOAT, 0.012, min=1e-6, max=0.999, description="Last beta of the model's schedule."),
    Input("train_timesteps", INT, 1000, min=4, max=100_000, description="Number of discrete timesteps T of the model's schedule."),
    Input("zero_terminal_snr", BOOLEAN, False, description="The model's schedule is rescaled to zero terminal SNR."),
]
"""The inputs naming an existing model's noise schedule, for objectives that train something on a
given model (gates, quantization) rather than choose a schedule to train a model for."""


@node(
    "dagfusion.train.Epsilon",
    version="1.0.0",
    category="training/objectives",
    inputs=_SCHEDULE_INPUTS,
    outputs=[Output("objective", OBJECTIVE, "Epsilon-prediction loss on the chosen noise schedule.")],
    examples=[{}, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}],
)
def epsilon_node(ctx: RunContext, beta_schedule: str, beta_start: float, beta_end: float, train_timesteps: int) -> Objective:
    """Epsilon prediction: the model predicts the added noise ε of x_t = α_t·x0 + σ_t·ε (MSE).

    Timesteps are uniform integers in [0, T). The trained model samples with its scheduler set to
    this schedule and prediction_type 'epsilon'.
    """
    return EpsilonObjective(train_timesteps=train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end)


@node(
    "dagfusion.train.VPrediction",
    version="1.0.0",
    category="training/objectives",
    inputs=[
        *_SCHEDULE_INPUTS,
        Input("zero_terminal_snr", BOOLEAN, False,
              description="Rescale the schedule to zero terminal SNR (the last timestep is pure noise); sampling then uses trailing timesteps."),
    ],
    outputs=[Output("objective", OBJECTIVE, "V-prediction loss on the chosen noise schedule.")],
    examples=[{"zero_terminal_snr": True}],
)
def v_prediction_node(
    ctx: RunContext, beta_schedule: str, beta_start: float, beta_end: float, train_timesteps: int, zero_terminal_snr: bool
) -> Objective:
    """V-prediction: the model predicts v = α_t·ε − σ_t·x0 (MSE), optionally on a zero-terminal-SNR schedule.

    Zero terminal SNR with trailing timesteps is the standard cure for the colour shift of
    epsilon-trained models (Lin et al. 2024); the trained model's scheduler is set to match
    (DDIM with trailing spacing when the model's own scheduler cannot take the rescale).
    """
    return VPredictionObjective(
        train_timesteps=train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
        zero_terminal_snr=zero_terminal_snr,
    )


@node(
    "dagfusion.train.RectifiedFlow",
    version="1.0.0",
    category="training/objectives",
    inputs=[
        Input("timestep_sampling", STRING, "uniform", choices=TIMESTEP_SAMPLING,
              description="How noise levels are drawn: 'uniform' in [0, 1) or 'logit_normal' (more weight mid-way, as SD3)."),
        Input("shift", FLOAT, 1.0, min=0.01, max=100.0,
              description="Timestep shift towards noise (> 1) as flow samplers apply it; 1 = none."),
        Input("train_timesteps", INT, 1000, min=2, max=100_000, description="T: the model sees timestep sigma·T."),
    ],
    outputs=[Output("objective", OBJECTIVE, "Flow-matching loss.")],
    examples=[{}, {"timestep_sampling": "logit_normal", "shift": 3.0}],
)
def rectified_flow_node(ctx: RunContext, timestep_sampling: str, shift: float, train_timesteps: int) -> Objective:
    """Rectified flow (flow matching): x_σ = (1 − σ)·x0 + σ·ε, the model predicts the velocity ε − x0 (MSE).

    The trained model samples with FlowMatchEulerDiscreteScheduler (same shift). Note that
    diffusers' StableDiffusionPipeline cannot sample a flow-matching scheduler; dagfusion's
    Sample node can.
    """
    return RectifiedFlowObjective(train_timesteps=train_timesteps, shift=shift, timestep_sampling=timestep_sampling)


NODES = (epsilon_node, v_prediction_node, rectified_flow_node)
