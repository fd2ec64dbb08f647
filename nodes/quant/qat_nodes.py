"""Nodes of quantization-aware distillation: Trainable, Freeze and ErrorProfile.

A distillation workflow reads::

    WeightOnly / MixedPrecision ──► Trainable ──► Train (QuantDistillLoss stage I) ──► Train (stage II) ──► Freeze ──► Save
                                └─► ErrorProfile ─(timestep_weights)─┘
"""

from __future__ import annotations

import json
from typing import Any

from dagfusion import BOOLEAN, FLOAT, INT, SEED, STRING, Input, NodeInputError, Output, RunContext, node
from dagfusion.model import DenoiserCall, Forward, ModelPatch, SamplingRun, StepHook, patches_of
from dagfusion.nodes.diffusion.schedulers import SAMPLER_CHOICES
from dagfusion.nodes.diffusion.types import CONDITIONING, LATENT, MODEL
from dagfusion.nodes.cache.checks import enforce
from dagfusion.nodes.quant.checks import check_error_profile
from dagfusion.nodes.quant.nodes import quant_patches, without_quantization


def _qat_patches(model: Any) -> list[Any]:
    from dagfusion.nodes.quant.qat import QATPatch

    return patches_of(model, QATPatch)


def _quantized_example(bits: str = "int4") -> Any:
    from dagfusion.testing import models as tiny
    from dagfusion.nodes.quant.patch import quantize_module

    model = tiny.sd_handles()["model"]
    return model.with_patch(quantize_module(model.denoiser, bits, min_params=64))


@node(
    "dagfusion.quant.Trainable",
    version="1.0.0",
    category="quantization",
    inputs=[
        Input("model", MODEL, link_only=True, description="A weight-quantized model (WeightOnly, MixedPrecision or Load)."),
        Input("train_weights", BOOLEAN, True,
              description="Train the latent weights as well as the scales (off: scales only)."),
    ],
    outputs=[Output("model", MODEL, "The model with trainable latent weights and scales (fake-quantized while it runs).")],
    examples=[lambda: {"model": _quantized_example()}, lambda: {"model": _quantized_example(), "train_weights": False}],
    ui={"color": "#7e57c2"},
)
def trainable(ctx: RunContext, model: Any, train_weights: bool) -> Any:
    """Make a weight-quantized model trainable for quantization-aware distillation.

    Each integer-format layer gets a latent weight (the full-precision weight) and its scales as
    trainable parameters; while the model runs it computes with the fake-quantized weight
    (straight-through rounding), and the full-precision weights act as the teacher. Train it with
    dagfusion.train.Train (trainable: patches) and dagfusion.quant.DistillLoss, then pack it
    again with dagfusion.quant.Freeze.
    """
    from dagfusion.nodes.quant.qat import QATPatch

    found = quant_patches(model)
    if len(found) != 1:
        raise NodeInputError(
            "model",
            "expected a model quantized by the torch backend (one weight-quantization patch, from "
            f"dagfusion.quant.WeightOnly, MixedPrecision or Load), got one with {len(found)}",
        )
    patch = QATPatch(found[0], model.denoiser, train_weights=train_weights)
    return without_quantization(model).with_patch(patch)


def _freeze_example() -> dict[str, Any]:
    from dagfusion.nodes.quant.qat import QATPatch

    model = _quantized_example()
    patch = QATPatch(quant_patches(model)[0], model.denoiser)
    return {"model": without_quantization(model).with_patch(patch)}


@node(
    "dagfusion.quant.Freeze",
    version="1.1.0",
    category="quantization",
    inputs=[Input("model", MODEL, link_only=True, description="A model from dagfusion.quant.Trainable, usually trained.")],
    outputs=[
        Output("model", MODEL, "The packed weight-quantized model (saves with dagfusion.quant.Save)."),
        Output("average_bits", FLOAT, "Nominal bits per parameter of the denoiser: codes, scales, zero-points and 16-bit layers."),
        Output("file_bits", FLOAT, "Bits per denoiser parameter of the file dagfusion.quant.Save writes: every byte, "
                                   "header and index included."),
    ],
    examples=[_freeze_example],
    ui={"color": "#7e57c2"},
)
def freeze_node(ctx: RunContext, model: Any) -> tuple[Any, float, float]:
    """Pack a quantization-aware-trained model into low-bit codes again (the trained scales rounded up to fp16)."""
    from dagfusion.nodes.quant.patch import average_bits
    from dagfusion.nodes.quant.qat import freeze
    from dagfusion.nodes.quant.storage import file_bits

    found = _qat_patches(model)
    if len(found) != 1:
        raise NodeInputError(
            "model", f"expected a model from dagfusion.quant.Trainable (one quantization-aware patch), got one with {len(found)}"
        )
    packed = freeze(found[0])
    return (without_quantization(model).with_patch(packed), float(average_bits(model.denoiser, packed)),
            float(file_bits(model.denoiser, packed)))


# --- the error profile ----------------------------------------------------------------------------


class _Recorder(ModelPatch):
    """Records ``(timestep value, output)`` of every denoiser call of a run."""

    def __init__(self, tag: str) -> None:
        self.key = f"dagfusion.quant.ErrorProfile:record:{tag}"
        self.calls: list[tuple[float, Any]] = []

    def begin(self, run: SamplingRun) -> StepHook:
        recorder = self
        recorder.calls = []

        class _Hook(StepHook):
            def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
                out = forward(call)
                recorder.calls.append((call.step.timestep_value, out.detach().float().clone()))
                return out

        return _Hook()


def error_profile(per_step: list[tuple[float, float]], bins: int, train_timesteps: int) -> list[float]:
    """Per-bin mean of the relative errors ``(timestep, error)``, bins over ``[0, train_timesteps)``;
    empty bins take the value of the nearest measured bin; normalised to mean 1."""
    sums = [0.0] * bins
    counts = [0] * bins
    for timestep, error in per_step:
        index = min(bins - 1, max(0, int(timestep / train_timesteps * bins)))
        sums[index] += error
        counts[index] += 1
    measured = [i for i in range(bins) if counts[i]]
    if not measured:
        raise ValueError("no denoiser calls were recorded")
    values = []
    for i in range(bins):
        nearest = min(measured, key=lambda j: (abs(j - i), j))
        values.append(sums[nearest] / counts[nearest])
    mean = sum(values) / bins
    return [v / mean if mean > 0 else 1.0 for v in values]


def measure_error_profile(
    model: Any, conditioning: Any, latent: Any, *, bins: int, train_timesteps: int = 1000, ctx: RunContext | None = None,
    **sample_options: Any,
) -> tuple[list[float], list[tuple[float, float]]]:
    """Sample with ``model`` (quantized) and with its full-precision self with the same options and
    compare the denoiser outputs step by step.

    :param sample_options: ``steps``, ``sampler``, ``guidance_scale``, ``seed`` … as for
        :func:`~dagfusion.nodes.diffusion.sampling.sample`.
    :returns: ``(weights per timestep bin (see error_profile), [(timestep, relative L2 error)] per step)``.
    """
    import torch

    from dagfusion.nodes.diffusion.sampling import sample

    reference, quantized = _Recorder("reference"), _Recorder("quantized")
    with torch.no_grad():
        sample(without_quantization(model).with_patch(reference), conditioning, latent, ctx=ctx, **sample_options)
        sample(model.with_patch(quantized), conditioning, latent, ctx=ctx, **sample_options)
    per_step = []
    for (timestep, ref), (_, out) in zip(reference.calls, quantized.calls):
        norm = float(torch.linalg.vector_norm(ref))
        per_step.append((timestep, float(torch.linalg.vector_norm(out - ref)) / norm if norm > 0 else 0.0))
    return error_profile(per_step, bins, train_timesteps), per_step


def _profile_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    handles = tiny.sd_handles()
    return {"model": _quantized_example("int3"), "conditioning": handles["conditioning"], "latent": handles["latent"],
            "steps": 4, "bins": 5, "guidance_scale": 4.0}


@node(
    "dagfusion.quant.ErrorProfile",
    version="1.0.0",
    category="quantization",
    inputs=[
        Input("model", MODEL, link_only=True, description="A quantized model (its full-precision self is the reference)."),
        Input("conditioning", CONDITIONING, link_only=True, description="Calibration prompt(s)."),
        Input("latent", LATENT, link_only=True, description="A latent of the size to measure at; its batch is the calibration batch."),
        Input("steps", INT, 25, min=1, max=1000, description="Sampling steps of the two runs."),
        Input("bins", INT, 10, min=1, max=1000, description="Equal timestep bins over [0, train_timesteps)."),
        Input("train_timesteps", INT, 1000, min=1, max=100_000, description="The model's number of training timesteps T."),
        Input("sampler", STRING, "default", choices=SAMPLER_CHOICES, description="Sampler of the two runs."),
        Input("guidance_scale", FLOAT, 7.5, min=0.0, max=100.0, description="Guidance scale of the two runs."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed of the two runs' noise."),
    ],
    outputs=[
        Output("timestep_weights", STRING, "Relative error per timestep bin (mean 1), for QuantDistillLoss's timestep_weights."),
        Output("report", STRING, "JSON: the relative error of the denoiser output at every step."),
    ],
    examples=[_profile_example],
    ui={"color": "#7e57c2"},
    check=check_error_profile,
)
def error_profile_node(
    ctx: RunContext, model: Any, conditioning: Any, latent: Any, steps: int, bins: int, train_timesteps: int,
    sampler: str, guidance_scale: float, seed: int,
) -> tuple[str, str]:
    """Measure where in the noise schedule a quantized model departs from its full-precision self.

    Samples twice with the same seed — the full-precision model and the quantized one — and
    compares the denoiser outputs step by step (relative L2 error, which includes the drift the
    error has caused so far); the per-bin means weight stage II's timestep sampling
    (dagfusion.quant.DistillLoss).
    """
    if without_quantization(model) is model:
        raise NodeInputError("model", "expected a quantized model, got one without weight quantization")
    enforce(check_error_profile, {"bins": bins, "train_timesteps": train_timesteps})
    weights, per_step = measure_error_profile(
        model, conditioning, latent, bins=bins, train_timesteps=train_timesteps, ctx=ctx,
        steps=steps, sampler=sampler, guidance_scale=guidance_scale, seed=seed,
    )
    report = {"per_step": [{"timestep": t, "relative_error": e} for t, e in per_step], "weights": weights}
    return ", ".join(f"{w:.4f}" for w in weights), json.dumps(report)


NODES = (trainable, freeze_node, error_profile_node)
"""The nodes of this module."""
