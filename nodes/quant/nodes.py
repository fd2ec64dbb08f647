"""The nodes of the quantization pack: WeightOnly, Save, Load, Sensitivity and MixedPrecision."""

from __future__ import annotations

from typing import Any

from dagfusion import DICT, FLOAT, INT, PATH, SEED, STRING, Input, NodeInputError, Output, RunContext, node
from dagfusion.model import applied_patch, patches_of
from dagfusion.nodes.diffusion.schedulers import SAMPLER_CHOICES
from dagfusion.nodes.diffusion.types import CONDITIONING, LATENT, MODEL
from dagfusion.nodes.cache.checks import enforce
from dagfusion.nodes.quant.backend import BACKENDS
from dagfusion.nodes.quant.checks import check_weight_only, input_error
from dagfusion.nodes.quant.formats import FORMATS
from dagfusion.nodes.quant.mixed import DEFAULT_BITS_TEXT, check_bits
from dagfusion.nodes.quant.patch import DEFAULT_KEEP_TEXT, DEFAULT_MIN_PARAMS
from dagfusion.nodes.quant.types import QUANT_SENSITIVITY

# --- shared checks ----------------------------------------------------------------------------


def require_denoiser(model: Any, input_name: str = "model") -> Any:
    """The diffusers denoiser behind ``model`` (a node's ``input_name`` input).

    :raises NodeInputError: naming ``input_name``, what it expects and what it got (the executor
        names the node).
    """
    from dagfusion.model import unwrap_compiled
    from dagfusion.nodes.quant.patch import is_diffusers_model

    module = model.denoiser
    if not is_diffusers_model(module):
        raise NodeInputError(
            input_name,
            "expected a diffusers denoiser (a diffusers ModelMixin such as UNet2DConditionModel or "
            f"PixArtTransformer2DModel), got a {type(unwrap_compiled(module)).__name__}",
        )
    if str(model.info.get("quantization", "")).startswith("torchao"):
        raise NodeInputError(
            input_name,
            "expected an unquantized model (or one quantized by the torch backend), got a model already quantized "
            f"by torchao ({model.info['quantization']}); quantize the original model instead",
        )
    return module


def quant_patches(model: Any) -> list[Any]:
    """The model handle's packed weight-quantization patches, in order."""
    from dagfusion.nodes.quant.patch import WeightQuantPatch

    return patches_of(model, WeightQuantPatch)


def without_quantization(model: Any) -> Any:
    """``model`` without its weight-quantization patches — packed (:class:`WeightQuantPatch`) or
    quantization-aware (:class:`~dagfusion.nodes.quant.qat.QATPatch`) — other patches kept, in order:
    the full-precision model."""
    from dagfusion.nodes.quant.patch import WeightQuantPatch
    from dagfusion.nodes.quant.qat import QATPatch

    kinds = (WeightQuantPatch, QATPatch)
    if applied_patch(model, kinds) is None:
        return model
    return model.with_patches([p for p in model.patches if not isinstance(p, kinds)])


def replacing_quantization(model: Any, patch: Any) -> Any:
    """``model`` with its weight-quantization patches (if any) replaced by ``patch``.

    Each patch holds a complete set of weights, so an older one would only be overridden; dropping
    it keeps the handle's fingerprint honest and avoids doing the swap twice.
    """
    return without_quantization(model).with_patch(patch)


def _weights_device(module: Any) -> str:
    try:
        return str(next(module.parameters()).device)
    except StopIteration:  # pragma: no cover - denoisers have parameters
        return "cpu"


# --- WeightOnly -------------------------------------------------------------------------------


def _example(format: str, **extra: Any) -> Any:
    def make() -> dict[str, Any]:
        from dagfusion.testing import models as tiny

        return {"model": tiny.sd_handles()["model"], "format": format, "backend": "torch", **extra}

    return make


@node(
    "dagfusion.quant.WeightOnly",
    version="1.1.0",
    category="quantization",
    inputs=[
        Input("model", MODEL, link_only=True, description="A diffusers denoiser (UNet or transformer)."),
        Input("format", STRING, "int8", choices=FORMATS,
              description="int8: symmetric, per output channel; int4: asymmetric with a zero-point per group; "
                          "fp8_e4m3: float8 codes with a scale per output channel."),
        Input("group_size", INT, 64, min=0, max=65536,
              description="int4: inputs sharing one scale and zero-point (0 = one per output channel); "
                          "int8 and fp8_e4m3 always use one scale per output channel."),
        Input("keep", STRING, DEFAULT_KEEP_TEXT,
              description="Comma-separated glob patterns over module names kept in 16 bits (a pattern also "
                          "keeps what is inside the module); 'default' stands for the built-in list."),
        Input("min_params", INT, DEFAULT_MIN_PARAMS, min=0, max=2**40,
              description="Linear/Conv layers with fewer weight elements stay in 16 bits."),
        Input("backend", STRING, "auto", choices=BACKENDS,
              description="torch: dequantize into the model for each run (any device, exact, savable); "
                          "torchao: torchao kernels on a copy (CUDA, int8/fp8, pip install dagfusion[gpu]); "
                          "auto: torchao on CUDA when installed, else torch."),
    ],
    outputs=[
        Output("model", MODEL, "The model with quantized weights while sampling."),
        Output("average_bits", FLOAT, "Nominal bits per denoiser parameter: codes, scales, zero-points and 16-bit layers."),
        Output("report", DICT, "Totals and, per Linear/Conv layer, bits, bytes and relative weight error (or why it was kept)."),
        Output("file_bits", FLOAT, "Bits per denoiser parameter of the file dagfusion.quant.Save writes: every byte, "
                                   "header and index included."),
    ],
    examples=[_example("int8"), _example("int4", group_size=32, min_params=0), _example("fp8_e4m3", keep="default, *attn2*")],
    ui={"color": "#7e57c2"},
    check=check_weight_only,
)
def weight_only(
    ctx: RunContext, model: Any, format: str, group_size: int, keep: str, min_params: int, backend: str
) -> dict[str, Any]:
    """Weight-only quantization of a denoiser: int8, int4 (grouped) or fp8 e4m3 weights.

    Quantizes the Linear and Conv layers once from the shared weights (never changing them).
    The torch backend keeps the weights packed in a patch and dequantizes them into the model
    for each sampling run: exact on any device, and savable with dagfusion.quant.Save. The
    torchao backend (CUDA) quantizes a copy of the Linear layers with torchao's kernels. The
    first and last layers, embeddings, norms and small layers stay in 16 bits (see keep and
    min_params). Compare against the plain model with the same seed (dagfusion.metrics.Fidelity).
    """
    from dagfusion.nodes.quant import backend as backends
    from dagfusion.nodes.quant.formats import QuantSpec
    from dagfusion.nodes.quant.patch import (
        average_bits,
        parse_keep,
        quantize_module,
        report,
    )

    enforce(check_weight_only, {"format": format, "backend": backend})
    module = require_denoiser(model)
    spec = QuantSpec.parse(format, group_size=group_size if format == "int4" else None)
    chosen = backends.resolve_backend(backend, model.device, spec)
    patch = quantize_module(
        module, spec, keep=parse_keep(keep), min_params=min_params,
        progress=lambda done, total: ctx.progress(done, total, message="quantizing layers"),
    )
    if chosen == "torchao":
        return _with_torchao(model, module, patch, spec)
    summary = report(module, patch, backend="torch")
    return {
        "model": replacing_quantization(model, patch),
        "average_bits": average_bits(module, patch),
        "report": summary,
        "file_bits": summary["file_bits"],
    }


def _with_torchao(model: Any, module: Any, patch: Any, spec: Any) -> dict[str, Any]:
    from dagfusion.model import StaticRef
    from dagfusion.nodes.diffusion.data import _fingerprint
    from dagfusion.nodes.quant import backend as backends
    from dagfusion.nodes.quant.patch import WeightQuantPatch, average_bits, report

    linear = backends.linear_layers(module, patch.layers)
    quantized = backends.torchao_quantize(module, spec, linear)
    # What torchao stores: our accounting of the same per-channel format for the Linear layers it
    # converts; every other parameter stays in the model's own dtype.
    converted = WeightQuantPatch(
        {name: patch.layers[name] for name in linear}, {}, architecture=patch.architecture,
        settings={**patch.settings, "backend": "torchao"},
        errors={name: patch.errors[name] for name in linear if name in patch.errors},
        kept_layers={**patch.kept_layers, **{n: "Conv layer (torchao converts Linear layers only)" for n in patch.layers if n not in linear}},
    )
    fingerprint = _fingerprint({"source": model.ref.fingerprint, "torchao": converted.key})
    # An earlier torch-backend patch would swap dense weights back into the torchao copy: drop it.
    handle = without_quantization(model).with_denoiser(StaticRef(quantized, fingerprint), quantization=f"torchao:{spec.name}")
    # torchao's copy is not saved by dagfusion.quant.Save: the file bits are those of the torch backend's file
    summary = {**report(module, converted, backend="torchao"), **{k: report(module, patch)[k] for k in ("file_bits", "file_bytes")}}
    return {
        "model": handle,
        "average_bits": average_bits(module, converted),
        "report": summary,
        "file_bits": summary["file_bits"],
    }


# --- Save -------------------------------------------------------------------------------------


def _save_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny
    from dagfusion.nodes.quant.patch import quantize_module

    model = tiny.sd_handles()["model"]
    return {"model": model.with_patch(quantize_module(model.denoiser, "int4")), "filename": "quant/tiny-int4.safetensors"}


@node(
    "dagfusion.quant.Save",
    version="1.1.0",
    category="quantization",
    inputs=[
        Input("model", MODEL, link_only=True, description="A model quantized by dagfusion.quant.WeightOnly (torch backend) or Load."),
        Input("filename", STRING, "quantized.safetensors", description="Name inside the run's output folder."),
    ],
    outputs=[
        Output("path", STRING, "Where the file was written."),
        Output("bytes", INT, "The file's size in bytes."),
        Output("file_bits", FLOAT, "The file's bits per denoiser parameter (every byte, header included)."),
        Output("average_bits", FLOAT, "Nominal bits per denoiser parameter (the tensors' bytes only)."),
    ],
    pure=False,
    output_node=True,
    examples=[_save_example],
    ui={"color": "#7e57c2"},
)
def save_quantized(ctx: RunContext, model: Any, filename: str) -> dict[str, Any]:
    """Save a quantized denoiser as one packed safetensors file (codes, scales, 16-bit layers, metadata).

    The file's size reflects the bits: a 4-bit model is about a quarter of its float16 size plus
    scales. dagfusion.quant.Load restores exactly the same outputs onto a model of the same
    architecture.
    """
    from dagfusion.nodes.quant import storage

    patches = quant_patches(model)
    if not patches:
        names = [type(p).__name__ for p in model.patches]
        raise NodeInputError(
            "model",
            "expected a model quantized by dagfusion.quant.WeightOnly (backend 'torch') or loaded by "
            f"dagfusion.quant.Load, got a model without a weight-quantization patch (patches: {names or 'none'})",
        )
    from dagfusion.nodes.quant.patch import average_bits, stored_bits

    path = storage.save(patches[-1], ctx.output_path(filename))
    size, count = path.stat().st_size, stored_bits(model.denoiser, patches[-1])[1]
    return {"path": str(path), "bytes": size, "file_bits": size * 8 / count if count else 0.0,
            "average_bits": average_bits(model.denoiser, patches[-1])}


# --- Load -------------------------------------------------------------------------------------


def _load_example(folder: Any) -> dict[str, Any]:
    from dagfusion.testing import models as tiny
    from dagfusion.nodes.quant import storage
    from dagfusion.nodes.quant.patch import quantize_module

    model = tiny.sd_handles()["model"]
    path = storage.save(quantize_module(model.denoiser, "int4"), folder / "tiny-int4.safetensors")
    return {"model": model, "path": str(path)}


@node(
    "dagfusion.quant.Load",
    version="1.0.0",
    category="quantization",
    inputs=[
        Input("model", MODEL, link_only=True, description="A model of the same architecture (its weights are replaced while sampling)."),
        Input("path", PATH, description="A file written by dagfusion.quant.Save, under the allowed read folders."),
    ],
    outputs=[Output("model", MODEL, "The model with the file's quantized weights while sampling.")],
    examples=[_load_example],
    ui={"color": "#7e57c2"},
)
def load_quantized(ctx: RunContext, model: Any, path: str) -> Any:
    """Load a quantized denoiser saved by dagfusion.quant.Save onto a model of the same architecture.

    Every parameter comes from the file (quantized weights and 16-bit layers), so the outputs are
    bit for bit those of the model that was saved; the model given only supplies the architecture.
    """
    from dagfusion.nodes.quant import storage

    module = require_denoiser(model)
    file = ctx.input_path(path)
    try:
        patch = storage.load(file, module, device=_weights_device(module))
    except ValueError as exc:  # not such a file, or one of another architecture
        raise NodeInputError("path", str(exc)) from None
    return replacing_quantization(model, patch)


# --- Sensitivity ------------------------------------------------------------------------------


def _sensitivity_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    parts = tiny.sd_handles()
    return {"model": parts["model"], "conditioning": parts["conditioning"], "latent": parts["latent"],
            "steps": 3, "calibration_steps": 2, "guidance_scale": 4.0, "sampler": "euler", "seed": 1,
            "bits": "2,8", "min_params": 16384}


@node(
    "dagfusion.quant.Sensitivity",
    version="1.0.0",
    category="quantization",
    inputs=[
        Input("model", MODEL, link_only=True,
              description="A diffusers denoiser (UNet or transformer); measured without its patches."),
        Input("conditioning", CONDITIONING, link_only=True,
              description="Calibration prompt(s) or class labels, as you will sample (a batch of prompts is used whole)."),
        Input("latent", LATENT, link_only=True, description="A latent of the size you will sample (only its shape counts)."),
        Input("sampler", STRING, "default", choices=SAMPLER_CHOICES, description="The sampler of the calibration run."),
        Input("steps", INT, 20, min=1, max=1000, description="Steps of the calibration run."),
        Input("calibration_steps", INT, 4, min=1, max=1000,
              description="How many of the run's denoiser calls are recorded (evenly spaced from the first step to "
                          "the last) and replayed for every layer and bit width; the run stops after the last."),
        Input("guidance_scale", FLOAT, 7.5, min=0.0, max=100.0, description="Guidance scale, as you will sample."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed of the calibration run's noise."),
        Input("bits", STRING, DEFAULT_BITS_TEXT,
              description="Candidate bit widths, comma-separated, each 1 to 8: up to 4 bits asymmetric with a "
                          "scale and zero-point per group, 5 to 8 bits symmetric per output channel."),
        Input("group_size", INT, 64, min=0, max=65536,
              description="Inputs sharing one scale and zero-point at 4 bits and below (0 = one per output channel)."),
        Input("keep", STRING, DEFAULT_KEEP_TEXT,
              description="Comma-separated glob patterns over module names kept in 16 bits (as in "
                          "dagfusion.quant.WeightOnly); 'default' stands for the built-in list."),
        Input("min_params", INT, DEFAULT_MIN_PARAMS, min=0, max=2**40,
              description="Linear/Conv layers with fewer weight elements stay in 16 bits."),
    ],
    outputs=[
        Output("sensitivity", QUANT_SENSITIVITY,
               "Per quantizable layer and bit width: the mean squared error of the denoiser output with only that "
               "layer quantized, against full precision; with the layers' shapes and the settings."),
        Output("report", STRING, "The same as JSON: summed error per bit width, per layer its size and errors "
                                 "(also relative to the output's mean square), and the calibration run."),
    ],
    persist=True,
    examples=[_sensitivity_example],
    ui={"color": "#7e57c2"},
    check=check_bits,
)
def sensitivity(
    ctx: RunContext, model: Any, conditioning: Any, latent: Any, sampler: str, steps: int, calibration_steps: int,
    guidance_scale: float, seed: int, bits: str, group_size: int, keep: str, min_params: int,
) -> dict[str, Any]:
    """Measure how much each layer's quantization hurts the denoiser output, per candidate bit width (BitsFusion).

    One calibration sampling run of the plain denoiser (its patches left out) records the
    denoiser's inputs at calibration_steps evenly spaced steps. Then, for every layer that
    dagfusion.quant.WeightOnly would quantize (keep, min_params) and every width in bits, only
    that layer is quantized — its weight swapped for the dequantized one and put back right
    after, also on errors; the shared weights are never written — and the recorded calls are
    replayed: the result is the mean squared error of the output against full precision.
    Cost: one forward pass of the recorded calls per layer and width. Feed the sensitivity to
    dagfusion.quant.MixedPrecision; it is kept in the disk cache (persist).
    """
    import json
    import math

    from dagfusion.nodes.quant.mixed import measure_sensitivity, parse_bits, record_calls
    from dagfusion.nodes.quant.patch import parse_keep

    module = require_denoiser(model)
    try:
        widths = parse_bits(bits)
    except ValueError as exc:
        raise NodeInputError("bits", str(exc)) from None
    patterns = parse_keep(keep)
    calls = record_calls(model, conditioning, latent, steps=steps, count=calibration_steps, sampler=sampler,
                         guidance_scale=guidance_scale, seed=seed)
    calibration = {
        "sampler": sampler, "steps": steps, "guidance_scale": guidance_scale, "seed": int(seed),
        "recorded_steps": [c.step for c in calls], "timesteps": [c.timestep_value for c in calls],
        "weights": str(model.ref.fingerprint),
    }
    with model.use(module):
        result = measure_sensitivity(
            module, calls, bits=widths, group_size=group_size, keep=patterns, min_params=min_params,
            calibration=calibration,
            progress=lambda done, total: ctx.progress(done, total, message="measuring layer sensitivity"),
        )

    def finite(value: Any) -> Any:  # JSON has no inf/NaN
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, list):
            return [finite(v) for v in value]
        return value

    return {"sensitivity": result, "report": json.dumps(finite(result.report()), indent=1)}


# --- MixedPrecision ---------------------------------------------------------------------------


def _proxy_sensitivity(module: Any, bits: tuple[int, ...], min_params: int) -> Any:
    """A stand-in sensitivity for examples (:func:`~dagfusion.nodes.quant.calibration.weight_error_sensitivity`)."""
    from dagfusion.nodes.quant.calibration import weight_error_sensitivity

    return weight_error_sensitivity(module, bits, min_params)


def _mixed_example(target: float, bits: tuple[int, ...] = (2, 3, 4, 8)) -> Any:
    def make() -> dict[str, Any]:
        from dagfusion.testing import models as tiny

        model = tiny.sd_handles()["model"]
        return {"model": model, "sensitivity": _proxy_sensitivity(model.denoiser, bits, DEFAULT_MIN_PARAMS),
                "target_bits": target}

    return make


@node(
    "dagfusion.quant.MixedPrecision",
    version="1.1.0",
    category="quantization",
    inputs=[
        Input("model", MODEL, link_only=True,
              description="The denoiser the sensitivity was measured on (or one of the same architecture)."),
        Input("sensitivity", QUANT_SENSITIVITY, link_only=True, description="From dagfusion.quant.Sensitivity."),
        Input("target_bits", FLOAT, 3.0, min=1.0, max=32.0,
              description="Average bits per denoiser parameter, counting codes, scales, zero-points and the "
                          "16-bit layers (as WeightOnly's average_bits); the result never exceeds it."),
    ],
    outputs=[
        Output("model", MODEL, "The model with mixed-precision weights while sampling (savable with dagfusion.quant.Save)."),
        Output("bits", DICT, "The bit width chosen for each quantized layer."),
        Output("average_bits", FLOAT, "Nominal bits per denoiser parameter actually stored (at most target_bits)."),
        Output("report", DICT, "WeightOnly's report plus the allocation: target, summed predicted error, layers "
                               "and parameters per bit width, whether the knapsack was solved exactly."),
        Output("file_bits", FLOAT, "Bits per denoiser parameter of the file dagfusion.quant.Save writes: every byte, "
                                   "header and index included (a little above average_bits)."),
    ],
    examples=[_mixed_example(3.0), _mixed_example(4.5, (1, 2, 4))],
    ui={"color": "#7e57c2"},
)
def mixed_precision(ctx: RunContext, model: Any, sensitivity: Any, target_bits: float) -> dict[str, Any]:
    """Mixed-precision weights (BitsFusion): bits per layer chosen from a sensitivity to meet an average-bits budget.

    Allocation and quantization in one node, so the budget is checked against the model it
    quantizes. Chooses one of the sensitivity's bit widths for every layer it measured,
    minimising the summed per-layer output errors (the layers' errors are assumed to add up)
    subject to the stored size — every byte, as average_bits counts it — staying at or below
    target_bits per parameter: a multiple-choice knapsack solved by dynamic programming, exact
    up to 2^18 budget cells and otherwise with costs rounded up (so the budget always holds)
    and the remainder spent greedily. Then quantizes the layers with those widths (group size
    and keep patterns from the sensitivity) into a new handle; the input handle is unchanged.
    A target below what the 16-bit layers and the narrowest width allow is an error that
    names the least feasible average.
    """
    from dagfusion.nodes.quant.mixed import allocate, quantize_allocation
    from dagfusion.nodes.quant.patch import average_bits, report

    module = require_denoiser(model)
    try:
        allocation = allocate(module, sensitivity, target_bits)
    except ValueError as exc:  # "input 'target_bits': …" or "input 'sensitivity': …"
        raise input_error(exc) from None
    patch = quantize_allocation(
        module, sensitivity, allocation,
        progress=lambda done, total: ctx.progress(done, total, message="quantizing layers"),
    )
    achieved = average_bits(module, patch)
    summary = report(module, patch, backend="torch")
    for name, b in allocation.bits.items():
        summary["layers"][name]["sensitivity"] = sensitivity.errors[name][b]
    summary["allocation"] = {
        "target_bits": float(target_bits),
        "average_bits": achieved,
        "minimum_average_bits": allocation.minimum_average_bits,
        "maximum_average_bits": allocation.maximum_average_bits,
        "predicted_error": allocation.predicted_error,
        "candidate_bits": list(sensitivity.bits),
        "group_size": sensitivity.group_size,
        "bits_histogram": allocation.histogram(sensitivity.sizes),
        "exact": allocation.exact,
        "measured_on_these_weights": sensitivity.calibration.get("weights") in (None, str(model.ref.fingerprint)),
    }
    return {
        "model": replacing_quantization(model, patch),
        "bits": dict(allocation.bits),
        "average_bits": achieved,
        "report": summary,
        "file_bits": summary["file_bits"],
    }


NODES = (weight_only, save_quantized, load_quantized, sensitivity, mixed_precision)
"""The nodes of this module, in palette order."""
