"""The activation-quantization node: ``dagfusion.quant.ActivationQuant`` (DGQ; W8A8 / W4A8).

See :mod:`~dagfusion.nodes.quant.activation` for the method. The node calibrates and returns the
model with an :class:`~dagfusion.nodes.quant.activation.ActivationQuantPatch` (torch backend), or
with torchao's int8 dynamic-activation + int8-weight kernels on a copy (torchao backend, CUDA).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from dagfusion import (
    DICT,
    FLOAT,
    INT,
    SEED,
    STRING,
    Input,
    NodeInputError,
    Output,
    RunContext,
    node,
)
from dagfusion.errors import Problem
from dagfusion.nodes.cache.checks import enforce
from dagfusion.nodes.diffusion.schedulers import SAMPLER_CHOICES
from dagfusion.nodes.diffusion.types import CONDITIONING, LATENT, MODEL
from dagfusion.nodes.quant.activation import METHODS, START_TOKEN_CHOICES
from dagfusion.nodes.quant.backend import BACKENDS, INSTALL_HINT
from dagfusion.nodes.quant.patch import DEFAULT_KEEP_TEXT, DEFAULT_MIN_PARAMS

ATTENTION_INPUT = ("auto", "log", "uniform", "off")
TORCHAO_RAN = "torchao: int8 dynamic activation (per token) + int8 weight (per channel) kernels on a copy of the Linear layers"
TORCH_RAN = "torch: fake quantization (simulated in the model's dtype)"


def check_activation(values: Mapping[str, Any]) -> Iterator[Problem]:
    """torchao runs 8-bit activations only; ``start_token`` 'on' needs the log attention quantizer;
    every time-step interval needs a recorded step of its own."""
    if values.get("backend") == "torchao" and isinstance(values.get("bits"), int) and values["bits"] != 8:
        yield Problem("bad-backend", f"the torchao backend runs 8-bit activations, not {values['bits']}; use backend "
                                     "'torch' (or 'auto')", input="backend")
    attention, method = values.get("attention"), values.get("method")
    if values.get("start_token") == "on" and (attention in ("uniform", "off") or (attention == "auto" and method == "per_tensor")):
        yield Problem("bad-start-token", "start_token 'on' applies to the log attention quantizer; set attention "
                                         "to 'log' (or start_token to 'auto'/'off')", input="start_token")
    intervals, recorded = values.get("intervals"), values.get("calibration_steps")
    if isinstance(intervals, int) and isinstance(recorded, int) and intervals > recorded:
        yield Problem("bad-intervals", f"intervals {intervals} needs at least as many recorded steps, but "
                                       f"calibration_steps is {recorded}; raise calibration_steps or lower intervals",
                      input="intervals")


def resolve(backend: str, device: str, bits: int) -> str:
    """``"torch"`` or ``"torchao"`` (see the node's ``backend`` input).

    :raises NodeInputError: torchao asked for but not installed.
    """
    from dagfusion.nodes.quant.backend import torchao_available

    if backend == "torch":
        return "torch"
    if backend == "torchao":
        if not torchao_available():
            raise NodeInputError("backend", f"backend 'torchao' needs the torchao package, which is not installed; {INSTALL_HINT}")
        return "torchao"
    if str(device).startswith("cuda") and bits == 8 and torchao_available():
        return "torchao"
    return "torch"


def _example(**extra: Any) -> Any:
    def make() -> dict[str, Any]:
        from dagfusion.testing import models as tiny

        parts = tiny.sd_handles()
        return {"model": parts["model"], "conditioning": parts["conditioning"], "latent": parts["latent"],
                "steps": 3, "calibration_steps": 2, "guidance_scale": 4.0, "sampler": "euler", "seed": 1,
                "min_params": 0, "backend": "torch", **extra}

    return make


@node(
    "dagfusion.quant.ActivationQuant",
    version="1.1.0",
    category="quantization",
    inputs=[
        Input("model", MODEL, link_only=True,
              description="A diffusers denoiser (UNet or transformer), maybe with quantized weights "
                          "(dagfusion.quant.WeightOnly: int8 gives W8A8, int4 W4A8); calibrated with them."),
        Input("conditioning", CONDITIONING, link_only=True,
              description="Calibration prompt(s), as you will sample but not the prompts you evaluate on."),
        Input("latent", LATENT, link_only=True, description="A latent of the size you will sample (only its shape counts)."),
        Input("sampler", STRING, "default", choices=SAMPLER_CHOICES, description="The sampler of the calibration run."),
        Input("steps", INT, 20, min=1, max=1000, description="Steps of the calibration run."),
        Input("calibration_steps", INT, 4, min=1, max=1000,
              description="How many of the run's denoiser calls (evenly spaced) the ranges are calibrated on."),
        Input("guidance_scale", FLOAT, 7.5, min=0.0, max=100.0, description="Guidance scale, as you will sample."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed of the calibration run's noise."),
        Input("bits", INT, 8, min=2, max=16, description="Activation bits (8 for W8A8/W4A8)."),
        Input("method", STRING, "dgq", choices=METHODS,
              description="dgq: layer inputs in outlier-aware groups (k-means over per-channel or per-token "
                          "ranges); per_tensor: one static range per layer input (the baseline)."),
        Input("groups", INT, 8, min=1, max=256, description="dgq: groups per layer input (DGQ uses 8 or 16)."),
        Input("attention", STRING, "auto", choices=ATTENTION_INPUT,
              description="Attention probabilities: log (DGQ's prompt-specific logarithmic quantizer), uniform "
                          "(static range), off (unquantized); auto: log for dgq, uniform for per_tensor."),
        Input("start_token", STRING, "auto", choices=START_TOKEN_CHOICES,
              description="Keep the cross-attention start token's probability and key exact (log attention only); "
                          "auto: where calibration finds key 0 attended over twice as much as any other key."),
        Input("margin", FLOAT, 0.0, min=0.0, max=4.0,
              description="Widen each calibrated range by this fraction of its width at both ends (0: as calibrated)."),
        Input("intervals", INT, 1, min=1, max=1000,
              description="Time-step intervals with activation ranges of their own (DGQ's time-aware quantizer): the "
                          "recorded steps split in sampling order into this many runs, each calibrated on its own calls; "
                          "each call while sampling uses the nearest interval. 1: one set for all steps; at most "
                          "calibration_steps (one set per recorded step)."),
        Input("keep", STRING, DEFAULT_KEEP_TEXT,
              description="Comma-separated glob patterns over module names whose inputs stay unquantized (as in "
                          "dagfusion.quant.WeightOnly); 'default' stands for the built-in list."),
        Input("min_params", INT, DEFAULT_MIN_PARAMS, min=0, max=2**40,
              description="Linear/Conv layers with fewer weight elements keep unquantized inputs."),
        Input("backend", STRING, "auto", choices=BACKENDS,
              description="torch: fake quantization on any device; torchao: int8 dynamic-activation + int8-weight "
                          "kernels on a copy of the Linear layers (CUDA; DGQ's groups and log attention do not apply; "
                          "pip install dagfusion[gpu]); auto: torchao on CUDA with 8 bits when installed, else torch."),
    ],
    outputs=[
        Output("model", MODEL, "The model with quantized activations while sampling."),
        Output("report", DICT, "Which backend ran, the settings, how many layer inputs were grouped by channel or "
                               "token, the attention modules and those with the start token kept exact, the kept inputs."),
    ],
    examples=[_example(), _example(method="per_tensor", bits=6), _example(groups=4, attention="log", start_token="on"),
              _example(intervals=2)],
    ui={"color": "#7e57c2"},
    check=check_activation,
)
def activation_quant(
    ctx: RunContext, model: Any, conditioning: Any, latent: Any, sampler: str, steps: int, calibration_steps: int,
    guidance_scale: float, seed: int, bits: int, method: str, groups: int, attention: str, start_token: str,
    margin: float, keep: str, min_params: int, backend: str, intervals: int = 1,
) -> dict[str, Any]:
    """Quantize a denoiser's activations with DGQ (distribution-aware group quantization).

    One calibration run of the plain denoiser records its inputs at calibration_steps steps;
    these are replayed through the model with its weight quantization applied, and every
    selected Linear/Conv layer's input range is recorded per channel and per token. dgq groups
    the axis that spreads more into k-means clusters, one 8-bit range each, so outlier channels
    or tokens get their own; attention probabilities are quantized logarithmically below each
    prompt's own maximum, the first (start) token kept exact where it peaks; with intervals > 1 each
    run of timesteps gets ranges of its own. The first and last layers,
    embeddings and adaLN modulations keep full-precision inputs (keep). The patch is removed after
    each run: the shared model is never changed. Calibrate on other prompts than you evaluate.
    """
    import torch
    from dagfusion.model import StaticRef, apply_patches, patches_of
    from dagfusion.nodes.diffusion.data import _fingerprint
    from dagfusion.nodes.quant.activation import ActivationQuantPatch, calibrate_activations
    from dagfusion.nodes.quant.calibration import record_calls
    from dagfusion.nodes.quant.checks import input_error
    from dagfusion.nodes.quant.nodes import require_denoiser, without_quantization
    from dagfusion.nodes.quant.patch import WeightQuantPatch, parse_keep, plan_layers
    from dagfusion.nodes.quant.qat import QATPatch

    values = {"backend": backend, "bits": bits, "attention": attention, "method": method, "start_token": start_token,
              "intervals": intervals, "calibration_steps": calibration_steps}
    enforce(check_activation, values)
    module = require_denoiser(model)
    patterns = parse_keep(keep)
    chosen = resolve(backend, model.device, bits)
    base = model.with_patches([p for p in model.patches if not isinstance(p, ActivationQuantPatch)])
    if chosen == "torchao":
        from dagfusion.nodes.quant import backend as backends

        layers = backends.linear_layers(module, plan_layers(module, patterns, min_params).quantize)
        copy = backends.torchao_w8a8(module, layers)
        fingerprint = _fingerprint({"source": model.ref.fingerprint, "torchao": f"w8a8:{sorted(layers)}"})
        handle = without_quantization(base).with_denoiser(StaticRef(copy, fingerprint), quantization="torchao:w8a8")
        return {"model": handle, "report": {"backend": TORCHAO_RAN, "bits": 8, "quantized_linear_layers": len(layers)}}
    calls = record_calls(model, conditioning, latent, steps=steps, count=calibration_steps, sampler=sampler,
                         guidance_scale=guidance_scale, seed=seed)
    weights = patches_of(model, (WeightQuantPatch, QATPatch))
    calibration = {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale, "seed": int(seed),
                   "recorded_steps": [c.step for c in calls], "weights": [p.key[:80] for p in weights]}
    try:
        with torch.no_grad(), model.use(module), apply_patches(weights, module):
            spec = calibrate_activations(
                module, calls, bits=bits, method=method, groups=groups,
                attention=None if attention == "auto" else attention, start_token=start_token, keep=patterns,
                min_params=min_params, margin=margin, calibration=calibration, intervals=intervals,
            )
    except ValueError as exc:
        raise input_error(exc, "conditioning") from None
    return {"model": base.with_patch(ActivationQuantPatch(spec)), "report": {"backend": TORCH_RAN, **spec.summary()}}


NODES = (activation_quant,)
"""The nodes of this module."""
