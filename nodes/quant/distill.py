"""Distillation objectives for quantization-aware training (BitsFusion's two stages).

Both train a model carrying a :class:`~dagfusion.nodes.quant.qat.QATPatch` through the ordinary
training loop (``dagfusion.train.Train`` with ``trainable: patches``); the teacher is the same
module with its full-precision weights (:meth:`QATPatch.teacher`). With ``ᾱ`` the model's noise
schedule, ``x_t = α_t·x0 + σ_t·ε``:

- **Stage I — CFG-aware output distillation** (``stage="output"``): for each row a guidance scale
  ``w`` is drawn uniformly from ``[guidance_min, guidance_max]``; the student's guided output
  ``S_u + w·(S_c − S_u)`` is matched to the teacher's ``T_u + w·(T_c − T_u)`` (``c``: the batch's
  captions, ``u``: the empty caption) by mean squared error. Matching the guided combination, not
  only the conditional output, is what keeps the quantized model's behaviour under guidance, the
  way it is sampled.
- **Stage II — noise-prediction loss** (``stage="noise"``): the usual diffusion loss against the
  true target (``ε`` or ``v``), with the timestep drawn from bins of ``[0, T)`` weighted by the
  quantization error measured in each (``timestep_weights``, from
  ``dagfusion.quant.ErrorProfile``; empty: uniform), so training spends its steps where the
  quantized model is furthest from the full-precision one.

Timesteps in stage I are uniform in ``[0, T)`` (or weighted the same way when weights are given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dagfusion import FLOAT, STRING, Input, Output, RunContext, node
from dagfusion.nodes.cache.checks import enforce
from dagfusion.nodes.quant.checks import check_distill
from dagfusion.nodes.training.objectives import MODEL_SCHEDULE_INPUTS, PREDICTIONS, NoiseScheduleObjective, mse
from dagfusion.nodes.training.types import OBJECTIVE

STAGES = ("output", "noise")


def parse_weights(text: str, what: str = "timestep_weights") -> tuple[float, ...]:
    """``"1, 2.5, 0.3"`` -> ``(1.0, 2.5, 0.3)`` (brackets ignored); empty -> ``()``.

    :raises ValueError: naming ``what``, on non-numbers, negative values or an all-zero list.
    """
    values = []
    for part in text.replace("[", " ").replace("]", " ").replace(",", " ").split():
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(f"{what}: expected numbers separated by commas, got {part!r}") from None
    if any(v < 0 for v in values) or (values and sum(values) <= 0):
        raise ValueError(f"{what}: weights must be 0 or more and not all 0, got {text!r}")
    return tuple(values)


@dataclass(frozen=True)
class QuantDistillObjective(NoiseScheduleObjective):
    """BitsFusion's distillation loss, stage I or II (see the module docstring).

    Attributes:
        stage: ``"output"`` (stage I) or ``"noise"`` (stage II).
        prediction: The model's prediction type (stage II's target).
        guidance_min, guidance_max: Stage I's range of guidance scales.
        timestep_weights: Relative weights of equal-width timestep bins over ``[0, T)`` (empty: uniform).
    """

    name = "quant_distill"
    stage: str = "output"
    prediction: str = "epsilon"
    guidance_min: float = 1.0
    guidance_max: float = 7.5
    timestep_weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {self.stage!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {self.prediction!r}")
        if self.prediction == "epsilon" and self.zero_terminal_snr:
            raise ValueError("epsilon prediction is undefined at zero terminal SNR; use v_prediction")
        if not 0.0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"need 0 <= guidance_min <= guidance_max, got {self.guidance_min} and {self.guidance_max}")
        if len(self.timestep_weights) > self.train_timesteps:
            raise ValueError(f"{len(self.timestep_weights)} timestep bins for {self.train_timesteps} timesteps")

    def describe(self) -> dict[str, Any]:
        return {
            "objective": self.name,
            "stage": self.stage,
            "prediction": self.prediction,
            "schedule": self.schedule_config(),
            "guidance": [self.guidance_min, self.guidance_max] if self.stage == "output" else None,
            "timestep_weights": list(self.timestep_weights),
        }

    def draw(self, x0: Any, generator: Any) -> tuple[Any, Any]:
        """Noise like ``x0`` and a timestep per row: uniform, or from the weighted bins."""
        import torch

        rows = x0.shape[0]
        if self.timestep_weights:
            bins = len(self.timestep_weights)
            weights = torch.tensor(self.timestep_weights, dtype=torch.float64)
            chosen = torch.multinomial(weights, rows, replacement=True, generator=generator)
            edges = torch.linspace(0, self.train_timesteps, bins + 1, dtype=torch.float64)
            low, high = edges[chosen], edges[chosen + 1]
            t = (low + torch.rand(rows, generator=generator, dtype=torch.float64) * (high - low)).floor().long()
            t = t.clamp(0, self.train_timesteps - 1)
        else:
            t = torch.randint(0, self.train_timesteps, (rows,), generator=generator)
        noise = torch.randn(tuple(x0.shape), generator=generator, dtype=torch.float32)
        return noise.to(x0.device), t

    def target(self, x0: Any, noise: Any, t: Any) -> Any:
        if self.prediction == "epsilon":
            return noise
        alpha, sigma = self.coefficients(t, x0)
        return alpha * noise - sigma * x0

    def loss(self, model_call: Any, batch: Any, step: Any, generator: Any) -> tuple[Any, dict[str, float]]:
        import torch

        from dagfusion.nodes.quant.qat import active

        patch = active(model_call.module)
        x0 = batch.x0
        device = x0.device
        noise, t = self.draw(x0, generator)
        x_t = self.noisy(x0, noise, t)
        timesteps = t.to(device)
        if self.stage == "noise":
            prediction = model_call(x_t, timesteps)
            with torch.no_grad(), patch.teacher():
                teacher = model_call(x_t, timesteps)
            target = self.target(x0, noise, t.to(device))
            loss = mse(prediction, target)
            return loss, {"teacher_mse": float(mse(teacher, target)), "to_teacher": float(mse(prediction.detach(), teacher))}
        w = self.guidance_min + (self.guidance_max - self.guidance_min) * torch.rand(
            (x0.shape[0],), generator=generator, dtype=torch.float32)
        w = w.to(device).view(-1, *([1] * (x0.dim() - 1)))
        unconditional = model_call.unconditional_inputs()
        with torch.no_grad(), patch.teacher():
            t_c = model_call(x_t, timesteps)
            t_u = model_call(x_t, timesteps, **unconditional)
        s_c = model_call(x_t, timesteps)
        s_u = model_call(x_t, timesteps, **unconditional)
        guided = mse(s_u + w * (s_c - s_u), t_u + w * (t_c - t_u))
        return guided, {"conditional_mse": float(mse(s_c.detach(), t_c))}

    def sampling_scheduler(self, base: Any) -> Any:
        """Distillation does not change how the model samples: ``base`` as it is."""
        return base


@node(
    "dagfusion.quant.DistillLoss",
    former_ids=["dagfusion.train.QuantDistillLoss"],
    version="1.0.0",
    category="training/objectives",
    inputs=[
        Input("stage", STRING, "output", choices=STAGES,
              description="'output': stage I, CFG-aware distillation of the guided output; 'noise': stage II, the "
                          "noise-prediction loss with error-weighted timesteps."),
        Input("guidance_min", FLOAT, 1.0, min=0.0, max=100.0, description="Stage I: smallest guidance scale drawn."),
        Input("guidance_max", FLOAT, 7.5, min=0.0, max=100.0, description="Stage I: largest guidance scale drawn."),
        Input("timestep_weights", STRING, "",
              description="Weights of equal timestep bins over [0, T) (from dagfusion.quant.ErrorProfile); empty: uniform."),
        Input("prediction", STRING, "epsilon", choices=PREDICTIONS, description="The model's prediction type (its scheduler's)."),
        *MODEL_SCHEDULE_INPUTS,
    ],
    outputs=[Output("objective", OBJECTIVE, "The distillation loss (train with trainable: patches).")],
    examples=[{}, {"stage": "noise", "prediction": "v_prediction", "zero_terminal_snr": True, "timestep_weights": "1, 3, 2"}],
    check=check_distill,
)
def quant_distill_loss(
    ctx: RunContext, stage: str, guidance_min: float, guidance_max: float, timestep_weights: str, prediction: str,
    beta_schedule: str, beta_start: float, beta_end: float, train_timesteps: int, zero_terminal_snr: bool,
) -> QuantDistillObjective:
    """BitsFusion's quantization-aware distillation loss: the quantized model learns from its full-precision self.

    Stage I ('output') matches the student's classifier-free-guided output to the teacher's for
    guidance scales drawn from a range; stage II ('noise') is the noise-prediction loss with
    timesteps drawn where the quantization error is largest. Use with dagfusion.train.Train,
    trainable: patches, on a model from dagfusion.quant.Trainable; give the model's noise schedule.
    A guidance range with guidance_min above guidance_max, unreadable timestep_weights or more
    bins than timesteps, and epsilon prediction on a zero-terminal-SNR schedule are refused
    (at validation for constants, as NodeInputError for linked values).
    """
    enforce(check_distill, {"guidance_min": guidance_min, "guidance_max": guidance_max,
                            "timestep_weights": timestep_weights, "train_timesteps": train_timesteps,
                            "prediction": prediction, "zero_terminal_snr": zero_terminal_snr})
    return QuantDistillObjective(
        train_timesteps=train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
        zero_terminal_snr=zero_terminal_snr, stage=stage, prediction=prediction, guidance_min=guidance_min,
        guidance_max=guidance_max, timestep_weights=parse_weights(timestep_weights),
    )


NODES = (quant_distill_loss,)
"""The nodes of this module."""
