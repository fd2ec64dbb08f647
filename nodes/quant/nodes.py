"""The nodes of the quantization pack: WeightOnly, Save and Load."""

from __future__ import annotations

from typing import Any

from dagfusion import DICT, FLOAT, INT, PATH, STRING, Input, Output, RunContext, node
from dagfusion.nodes.diffusion.types import MODEL
from dagfusion.nodes.quant.backend import BACKENDS
from dagfusion.nodes.quant.formats import FORMATS
from dagfusion.nodes.quant.patch import DEFAULT_KEEP_TEXT, DEFAULT_MIN_PARAMS

# --- shared checks ----------------------------------------------------------------------------


def require_denoiser(model: Any, node_id: str, input_name: str = "model") -> Any:
    """The diffusers denoiser behind ``model``.

    :raises TypeError: naming the node input, what it expects and what it got.
    """
    from dagfusion.nodes.quant.patch import is_diffusers_model, unwrap

    module = model.denoiser
    if not is_diffusers_model(module):
        raise TypeError(
            f"{node_id} input {input_name!r}: expected a diffusers denoiser (a diffusers ModelMixin such as "
            f"UNet2DConditionModel or PixArtTransformer2DModel), got a {type(unwrap(module)).__name__}"
        )
    if str(model.info.get("quantization", "")).startswith("torchao"):
        raise TypeError(
            f"{node_id} input {input_name!r}: expected an unquantized model (or one quantized by the torch backend), "
            f"got a model already quantized by torchao ({model.info['quantization']}); quantize the original model instead"
        )
    return module


def quant_patches(model: Any) -> list[Any]:
    from dagfusion.nodes.quant.patch import WeightQuantPatch

    return [p for p in model.patches if isinstance(p, WeightQuantPatch)]


def without_quantization(model: Any) -> Any:
    """``model`` without its weight-quantization patches (other patches kept, in order)."""
    from dagfusion.nodes.quant.patch import WeightQuantPatch

    if not quant_patches(model):
        return model
    base = model.without_patches()
    for other in model.patches:
        if not isinstance(other, WeightQuantPatch):
            base = base.with_patch(other)
    return base


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
        from dagfusion.nodes.diffusion import tiny

        return {"model": tiny.sd_handles()["model"], "format": format, "backend": "torch", **extra}

    return make


@node(
    "dagfusion.quant.WeightOnly",
    version="1.0.0",
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
        Output("average_bits", FLOAT, "Bits per denoiser parameter, counting codes, scales, zero-points and 16-bit layers."),
        Output("report", DICT, "Totals and, per Linear/Conv layer, bits, bytes and relative weight error (or why it was kept)."),
    ],
    examples=[_example("int8"), _example("int4", group_size=32, min_params=0), _example("fp8_e4m3", keep="default, *attn2*")],
    ui={"color": "#7e57c2"},
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

    node_id = "dagfusion.quant.WeightOnly"
    module = require_denoiser(model, node_id)
    spec = QuantSpec.parse(format, group_size=group_size if format == "int4" else None)
    chosen = backends.resolve_backend(backend, model.device, spec)
    patch = quantize_module(
        module, spec, keep=parse_keep(keep), min_params=min_params,
        progress=lambda done, total: ctx.progress(done, total, message="quantizing layers"),
    )
    if chosen == "torchao":
        return _with_torchao(model, module, patch, spec)
    return {
        "model": replacing_quantization(model, patch),
        "average_bits": average_bits(module, patch),
        "report": report(module, patch, backend="torch"),
    }


def _with_torchao(model: Any, module: Any, patch: Any, spec: Any) -> dict[str, Any]:
    from dagfusion.nodes.diffusion.data import _fingerprint
    from dagfusion.nodes.diffusion.handle import StaticRef
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
    return {
        "model": handle,
        "average_bits": average_bits(module, converted),
        "report": report(module, converted, backend="torchao"),
    }


# --- Save -------------------------------------------------------------------------------------


def _save_example() -> dict[str, Any]:
    from dagfusion.nodes.diffusion import tiny
    from dagfusion.nodes.quant.patch import quantize_module

    model = tiny.sd_handles()["model"]
    return {"model": model.with_patch(quantize_module(model.denoiser, "int4")), "filename": "quant/tiny-int4.safetensors"}


@node(
    "dagfusion.quant.Save",
    version="1.0.0",
    category="quantization",
    inputs=[
        Input("model", MODEL, link_only=True, description="A model quantized by dagfusion.quant.WeightOnly (torch backend) or Load."),
        Input("filename", STRING, "quantized.safetensors", description="Name inside the run's output folder."),
    ],
    outputs=[
        Output("path", STRING, "Where the file was written."),
        Output("bytes", INT, "The file's size in bytes."),
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
        raise ValueError(
            "dagfusion.quant.Save input 'model': expected a model quantized by dagfusion.quant.WeightOnly "
            f"(backend 'torch') or loaded by dagfusion.quant.Load, got a model without a weight-quantization patch "
            f"(patches: {names or 'none'})"
        )
    path = storage.save(patches[-1], ctx.output_path(filename))
    return {"path": str(path), "bytes": path.stat().st_size}


# --- Load -------------------------------------------------------------------------------------


def _load_example(folder: Any) -> dict[str, Any]:
    from dagfusion.nodes.diffusion import tiny
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

    module = require_denoiser(model, "dagfusion.quant.Load")
    file = ctx.input_path(path)
    patch = storage.load(file, module, device=_weights_device(module))
    return replacing_quantization(model, patch)


NODES = (weight_only, save_quantized, load_quantized)
"""The nodes of this module, in palette order."""
