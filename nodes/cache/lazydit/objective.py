"""The LazyDiT gate-training objective: learn where a module's previous-step output can stand in.

For each batch row (``ᾱ`` the noise schedule, ``Δ = T // sampling_steps`` the sampler's stride):

1. draw an integer ``t`` uniform in ``[0, T − Δ)`` and noise ``ε``; the previous sampling step is
   ``t + Δ`` with ``x_{t+Δ} = α_{t+Δ}·x0 + σ_{t+Δ}·ε``;
2. run the frozen model at ``t + Δ`` with the gated modules in ``"fill"`` mode (plain outputs,
   remembered as the "previous step"), and take one deterministic DDIM step with its prediction
   to ``x_t`` — the input the model really meets at the next sampling step;
3. run it at ``t`` plainly (the target, no gradient) and with the gates in ``"soft"`` mode, where
   every attention/MLP output is ``s·previous + (1 − s)·current`` (``s`` the gate's lazy score);
4. ``loss = MSE(lazy, full) + ρ · max(0, τ − mean(s))``: the outputs must stay the full model's
   while the penalty pushes the mean lazy score up to the target laziness ``τ``. With ``τ = 1``
   the penalty is ``ρ · (1 − mean(s))``, the paper's (up to its per-block sum): it always pushes,
   and ``ρ`` alone sets how lazy the gates become; with ``τ < 1`` it stops pushing once the
   gates are lazy enough on average, and the MSE decides *which* modules are lazy.

**Per-step gates** (gates made with ``sampling_steps = N``, one row of parameters per sampling
step, as in the reference code) are trained on the sampler's own timesteps instead: step 1 draws
a step index ``k`` uniform in ``[1, N)`` per row, ``t`` is the sampler's timestep of step ``k``
and the previous step is the timestep of step ``k − 1`` (``timestep_spacing`` gives the
sampler's grid: ``trailing``, ``leading`` or ``linspace``, as diffusers' schedulers); the soft
pass scores every row with the gate row of its step ``k``. The gates' step count must equal
``sampling_steps``.

The objective reaches the gates through :func:`~dagfusion.nodes.cache.lazydit.session.controller` of
``model_call.module`` (the loop applies the model's patches, so the :class:`LazyGates` patch is
applied) and switches modes with ``session.using(...)``. It trains the gates only: the Train node
must use ``trainable: patches`` (the loss refuses a model whose own weights would train). The
sampling scheduler of the model is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dagfusion.nodes.cache.checks import enforce
from dagfusion.nodes.cache.lazydit.checks import check_gate_loss
from dagfusion import FLOAT, INT, STRING, Input, Output, RunContext, node
from dagfusion.nodes.training.objectives import (
    MODEL_SCHEDULE_INPUTS,
    PREDICTIONS,
    NoiseScheduleObjective,
    mse,
)
from dagfusion.nodes.training.types import OBJECTIVE

SPACINGS = ("trailing", "leading", "linspace")
"""Timestep grids of the sampler per-step gates are trained for (diffusers' ``timestep_spacing``)."""



@dataclass(frozen=True)
class LazyGateObjective(NoiseScheduleObjective):
    """LazyDiT's lazy-learning loss (see the module docstring).

    Attributes:
        prediction: What the model predicts (``epsilon`` or ``v_prediction``), for the DDIM step.
        laziness_weight: ``ρ``, the weight of the laziness penalty.
        target_laziness: ``τ``, the mean lazy score the penalty pushes up to (1: always push).
        sampling_steps: The sampler's step count the gates are trained for (stride ``T // steps``).
        timestep_spacing: The sampler's timestep grid, for per-step gates (``trailing``,
            ``leading``, ``linspace``).
    """

    name = "lazy_gates"
    prediction: str = "epsilon"
    laziness_weight: float = 1.0
    target_laziness: float = 0.5
    sampling_steps: int = 20
    timestep_spacing: str = "trailing"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"expected a prediction in {list(PREDICTIONS)}, got {self.prediction!r}")
        if self.prediction == "epsilon" and self.zero_terminal_snr:
            raise ValueError("epsilon prediction is undefined at zero terminal SNR; use v_prediction")
        if self.laziness_weight < 0:
            raise ValueError(f"laziness_weight must be 0 or more, got {self.laziness_weight}")
        if not 0.0 <= self.target_laziness <= 1.0:
            raise ValueError(f"target_laziness must be in [0, 1], got {self.target_laziness}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {list(SPACINGS)}, got {self.timestep_spacing!r}")
        if not 2 <= self.sampling_steps <= self.train_timesteps // 2:
            raise ValueError(
                f"sampling_steps must be between 2 and {self.train_timesteps // 2} for {self.train_timesteps} "
                f"training timesteps, got {self.sampling_steps}"
            )

    @property
    def stride(self) -> int:
        """``Δ``: timesteps between two sampling steps."""
        return self.train_timesteps // self.sampling_steps

    def describe(self) -> dict[str, Any]:
        return {
            "objective": self.name,
            "prediction": self.prediction,
            "schedule": self.schedule_config(),
            "timesteps": f"t uniform integers in [0, {self.train_timesteps - self.stride}); previous step t + {self.stride}",
            "laziness_weight": self.laziness_weight,
            "target_laziness": self.target_laziness,
            "sampling_steps": self.sampling_steps,
            "timestep_spacing": self.timestep_spacing,
        }

    def grid(self) -> Any:
        """The sampler's timesteps, step 0 first (the noisiest): ``(sampling_steps,)`` int64, as
        diffusers' schedulers space them (``leading`` without a step offset)."""
        import torch

        T, n = self.train_timesteps, self.sampling_steps
        if self.timestep_spacing == "trailing":
            return torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)).long()[:n] - 1
        if self.timestep_spacing == "leading":
            return (torch.arange(0, n, dtype=torch.int64) * (T // n)).flip(0)
        return torch.round(torch.linspace(0, T - 1, n, dtype=torch.float64)).long().flip(0)

    def draw_steps(self, x0: Any, generator: Any) -> tuple[Any, Any, Any, Any]:
        """For per-step gates: ``(noise, k, t_k, t_{k−1})`` with one step index ``k`` uniform in
        ``[1, sampling_steps)`` per row and the sampler's timesteps of steps ``k`` and ``k − 1``."""
        import torch

        k = torch.randint(1, self.sampling_steps, (x0.shape[0],), generator=generator)
        noise = torch.randn(tuple(x0.shape), generator=generator, dtype=torch.float32)
        grid = self.grid()
        return noise.to(x0.device), k, grid[k], grid[k - 1]

    def draw(self, x0: Any, generator: Any) -> tuple[Any, Any]:
        """Noise like ``x0`` and one timestep ``t`` per row with room for the previous step ``t + Δ``."""
        import torch

        t = torch.randint(0, self.train_timesteps - self.stride, (x0.shape[0],), generator=generator)
        noise = torch.randn(tuple(x0.shape), generator=generator, dtype=torch.float32)
        return noise.to(x0.device), t

    def ddim_step(self, x: Any, prediction: Any, t_from: Any, t_to: Any) -> Any:
        """The deterministic DDIM update of ``x`` at ``t_from`` to ``t_to`` from the model's prediction."""
        alpha, sigma = self.coefficients(t_from, x)
        if self.prediction == "v_prediction":
            x0 = alpha * x - sigma * prediction
            eps = sigma * x + alpha * prediction
        else:
            eps = prediction
            x0 = (x - sigma * eps) / alpha.clamp_min(1e-6)
        alpha_to, sigma_to = self.coefficients(t_to, x)
        return alpha_to * x0 + sigma_to * eps

    def loss(self, model_call: Any, batch: Any, step: Any, generator: Any) -> tuple[Any, dict[str, float]]:
        import torch
        from dagfusion.nodes.cache.lazydit.session import controller

        module = model_call.module
        ctl = controller(module)
        if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            raise ValueError(
                "LazyGateLoss trains only the LazyDiT gates and keeps the transformer frozen: set the Train node's "
                "trainable input to 'patches'"
            )
        if getattr(module, "is_gradient_checkpointing", False):
            raise ValueError("LazyGateLoss does not work with gradient checkpointing (the gates' modes are per call); turn it off")
        x0 = batch.x0
        device = x0.device
        steps = ctl.patch.steps
        if steps > 1:
            if steps != self.sampling_steps:
                raise ValueError(
                    f"these LazyDiT gates have one row per step of a {steps}-step sampler; set LazyGateLoss's "
                    f"sampling_steps to {steps} (it is {self.sampling_steps})"
                )
            noise, k, t, before = self.draw_steps(x0, generator)
        else:
            noise, t = self.draw(x0, generator)
            k, before = None, t + self.stride
        x_before = self.noisy(x0, noise, before)
        with ctl.session() as session:
            session.gate_step = k
            with torch.no_grad(), session.using("fill"):
                previous = model_call(x_before, before.to(device))
            x_t = self.ddim_step(x_before, previous, before, t)
            with torch.no_grad():
                target = model_call(x_t, t.to(device))
            with session.using("soft"):
                lazy = model_call(x_t, t.to(device))
            scores = session.soft_scores()
        laziness = scores.mean()
        distance = mse(lazy, target)
        penalty = self.laziness_weight * torch.clamp(self.target_laziness - laziness, min=0.0)
        values = {"mse": float(distance.detach()), "laziness": float(laziness.detach()), "penalty": float(penalty.detach())}
        return distance + penalty, values

    def sampling_scheduler(self, base: Any) -> Any:
        """Training gates does not change how the model samples: ``base`` as it is."""
        return base


@node(
    "dagfusion.cache.LazyGateLoss",
    version="1.1.0",
    former_ids=["dagfusion.train.LazyGateLoss"],
    category="training/objectives",
    inputs=[
        Input("laziness_weight", FLOAT, 1.0, min=0.0, max=1e6,
              description="rho: weight of the laziness penalty rho * max(0, target - mean lazy score)."),
        Input("target_laziness", FLOAT, 0.5, min=0.0, max=1.0,
              description="The mean lazy score the penalty pushes up to (1 = always push, as in the paper)."),
        Input("sampling_steps", INT, 20, min=2, max=50_000,
              description="Sampling steps the gates are for: the previous step is t + train_timesteps // sampling_steps."),
        Input("timestep_spacing", STRING, "trailing", choices=SPACINGS,
              description="Per-step gates: the sampler's timestep grid (its scheduler's timestep_spacing); "
                          "step-independent gates train on uniform timesteps and ignore it."),
        Input("prediction", STRING, "epsilon", choices=PREDICTIONS,
              description="What the model predicts (its scheduler's prediction_type), for the DDIM step between the two timesteps."),
        *MODEL_SCHEDULE_INPUTS,
    ],
    outputs=[Output("objective", OBJECTIVE, "The LazyDiT gate loss (train with trainable: patches).")],
    examples=[{}, {"prediction": "v_prediction", "zero_terminal_snr": True, "target_laziness": 1.0, "laziness_weight": 0.01}],
    check=check_gate_loss,
)
def lazy_gate_loss(
    ctx: RunContext, laziness_weight: float, target_laziness: float, sampling_steps: int, prediction: str,
    beta_schedule: str, beta_start: float, beta_end: float, train_timesteps: int, zero_terminal_snr: bool,
    timestep_spacing: str = "trailing",
) -> LazyGateObjective:
    """LazyDiT's lazy-learning objective: gates learn to reuse previous-step outputs where it costs least.

    Per sample: the frozen model at the previous sampling step t + Δ fills the gates' cache and
    gives x_t by a DDIM step; the loss is the MSE between the model at t with soft gates
    (s·previous + (1 − s)·current per attention/MLP module) and without, plus a penalty pushing
    the mean lazy score up to the target. Use with dagfusion.train.Train, trainable: patches, on a
    model carrying dagfusion.cache.LazyDiTGates; give the model's noise schedule and prediction type.
    sampling_steps above train_timesteps // 2 and epsilon prediction on a zero-terminal-SNR schedule
    are refused (at validation for constants, as NodeInputError for linked values). Per-step gates
    (LazyDiTGates with sampling_steps N) train on the sampler's N timesteps, each with its own gate row.
    """
    enforce(check_gate_loss, {"sampling_steps": sampling_steps, "train_timesteps": train_timesteps,
                              "prediction": prediction, "zero_terminal_snr": zero_terminal_snr})
    return LazyGateObjective(
        train_timesteps=train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
        zero_terminal_snr=zero_terminal_snr, prediction=prediction, laziness_weight=laziness_weight,
        target_laziness=target_laziness, sampling_steps=sampling_steps, timestep_spacing=timestep_spacing,
    )


NODES = (lazy_gate_loss,)
