"""The weight-quantization patch: a quantized copy of a denoiser's weights, swapped in while sampling.

:func:`quantize_module` reads a denoiser's (shared) weights once and builds a
:class:`WeightQuantPatch` holding the **complete** weights of the quantized model:

- for each selected Linear/Conv layer, its weight as a
  :class:`~dagfusion.nodes.quant.formats.QuantizedTensor` (packed codes, fp16 scales …);
- every other parameter (biases, norms, embeddings, the layers kept in high precision) as a
  **16-bit** copy: ``float16``, or ``bfloat16`` for bf16 models and for tensors outside the
  float16 range.

That is exactly the model :func:`average_bits` counts and
:func:`~dagfusion.nodes.quant.storage.save` writes, so a saved and loaded model reproduces the
in-memory one bit for bit. (On a float32 model the kept parameters are therefore rounded to
16 bits too — a small, deliberate part of the simulated deployment.)

``patch.apply(module)`` (entered by the sampler for each run) dequantizes every quantized weight
once, on the parameter's device and in its dtype, and swaps it and every kept parameter into the
module as new ``Parameter`` objects; on exit the original ``Parameter`` objects are put back, so
the module is bit-identical — same objects, same values — afterwards. The shared weights are
never written. This is the pure-PyTorch path: it works on any device and simulates the quantized
model's outputs exactly; it does not save memory or time while sampling (the originals stay
alive and the matmuls run in the model's dtype). For speed on CUDA see
:mod:`~dagfusion.nodes.quant.backend` (torchao). Like every ``apply`` that changes a shared
module, the swap is visible to anything else running the same module at the same moment; the
engine runs one sampler at a time.

Which layers are quantized (:func:`plan_layers`): modules that are ``nn.Linear`` or
``nn.Conv1d/2d/3d`` (subclasses included) with at least ``min_params`` weight elements, except
those whose name matches a *keep* pattern (shell-style globs over module names, see
:func:`parse_keep`; a pattern naming a module also keeps everything inside it). The defaults
(:data:`DEFAULT_KEEP`) keep the first and last layers, the time/class/caption embeddings and
the Linear layers inside norm modules (adaLN modulation) of UNets, DiT and PixArt. Embedding
tables, norms and other parameters are never quantized.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from dagfusion.model import ModelPatch, ParameterPlaces, parameter_places, swap_parameters, unwrap_compiled
from dagfusion.nodes.quant.formats import QuantSpec, QuantizedTensor, quantize

DEFAULT_KEEP: tuple[str, ...] = (
    "conv_in",
    "conv_out",
    "proj_out",
    "proj_out_*",
    "pos_embed",
    "time_embedding",
    "*timestep_embedder",
    "add_embedding",
    "class_embedding",
    "*class_embedder",
    "caption_projection",
    "adaln_single",
    "*norm*.linear",
)
"""Module-name patterns kept in 16 bits by default: UNet ``conv_in``/``conv_out`` and time
embedding; DiT/PixArt patch embedding (``pos_embed``), final layers (``proj_out*``), timestep,
class and caption embeddings, ``adaln_single`` and the adaLN ``norm*.linear`` modulations."""

DEFAULT_KEEP_TEXT = ", ".join(DEFAULT_KEEP)
""":data:`DEFAULT_KEEP` as the node's ``keep`` text."""

DEFAULT_MIN_PARAMS = 1024
"""Layers whose weight has fewer elements stay in 16 bits by default."""

KEY_PREFIX = "dagfusion.quant.WeightOnly:"


# --- modules ----------------------------------------------------------------------------------


def is_diffusers_model(module: Any) -> bool:
    """Whether ``module`` (through ``torch.compile``) is a diffusers ``ModelMixin`` with a config."""
    try:
        import diffusers
    except ImportError:  # pragma: no cover - the diffusion pack needs diffusers
        return False
    inner = unwrap_compiled(module)
    return isinstance(inner, diffusers.ModelMixin) and getattr(inner, "config", None) is not None


def architecture_of(module: Any) -> dict[str, Any]:
    """``{"class": name, "config": plain JSON data}`` of a diffusers model (``config`` empty for others)."""
    inner = unwrap_compiled(module)
    config = getattr(inner, "config", None)
    plain: dict[str, Any] = {}
    if config is not None:
        plain = json.loads(json.dumps(dict(config), default=str, sort_keys=True))
    return {"class": type(inner).__name__, "config": plain}


def is_quantizable(module: Any) -> bool:
    """Whether ``module`` is a Linear or Conv layer with a non-empty float weight."""
    import torch

    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return False
    weight = module._parameters.get("weight")
    return weight is not None and weight.is_floating_point() and weight.ndim >= 2 and weight.numel() > 0


# --- which layers -----------------------------------------------------------------------------


def parse_keep(text: str | Iterable[str]) -> tuple[str, ...]:
    """Comma-separated glob patterns (``"conv_in, *attn2*"``) → a tuple; ``default`` expands to :data:`DEFAULT_KEEP`."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    patterns: list[str] = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        for pattern in DEFAULT_KEEP if part == "default" else (part,):
            if pattern not in patterns:
                patterns.append(pattern)
    return tuple(patterns)


def matching_pattern(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern matching module ``name`` or one of the modules containing it, or ``None``."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*"):
            return pattern
    return None


@dataclass(frozen=True)
class LayerPlan:
    """Which Linear/Conv layers get quantized and why the others do not.

    Attributes:
        quantize: Module names to quantize, in module order.
        kept: ``{module name: reason}`` for the Linear/Conv layers kept in 16 bits.
    """

    quantize: tuple[str, ...]
    kept: Mapping[str, str]


def plan_layers(module: Any, keep: Iterable[str] = DEFAULT_KEEP, min_params: int = DEFAULT_MIN_PARAMS) -> LayerPlan:
    """Select the layers of ``module`` to quantize (see the module docstring)."""
    patterns = tuple(keep)
    params = parameter_places(module)
    chosen: list[str] = []
    kept: dict[str, str] = {}
    for name, layer in unwrap_compiled(module).named_modules():
        if not is_quantizable(layer) or f"{name}.weight" not in params:
            continue  # not a Linear/Conv layer, or its weight is tied to one named elsewhere
        pattern = matching_pattern(name, patterns)
        numel = layer.weight.numel()
        if pattern is not None:
            kept[name] = f"matches keep pattern {pattern!r}"
        elif numel < min_params:
            kept[name] = f"{numel} parameters, fewer than min_params {min_params}"
        else:
            chosen.append(name)
    return LayerPlan(tuple(chosen), kept)


def storage_dtype(tensor: Any) -> Any:
    """The 16-bit dtype a kept tensor is stored in: bf16 for bf16 tensors and values beyond the
    float16 range, else float16. Non-float tensors keep their dtype."""
    import torch

    if not tensor.is_floating_point():
        return tensor.dtype
    if tensor.dtype == torch.bfloat16:
        return torch.bfloat16
    if tensor.numel() and float(tensor.detach().abs().max()) > torch.finfo(torch.float16).max:
        return torch.bfloat16
    return torch.float16


# --- the patch --------------------------------------------------------------------------------


class WeightQuantPatch(ModelPatch):
    """The complete weights of a weight-only-quantized denoiser, swapped in while sampling.

    Attributes:
        layers: ``{module name: QuantizedTensor}`` — the quantized weights.
        kept: ``{parameter name: 16-bit tensor}`` — every other parameter.
        architecture: ``{"class", "config"}`` of the model it was made from.
        settings: How it was made: ``format``, ``group_size``, ``keep``, ``min_params`` (plain data).
        errors: ``{module name: relative error}`` of each quantized weight,
            ``‖W - Ŵ‖₂ / ‖W‖₂`` (empty for a patch loaded from a file).
        kept_layers: ``{module name: reason}`` for Linear/Conv layers kept in 16 bits.
        key: ``dagfusion.quant.WeightOnly:{settings}:{digest of every tensor}``.
    """

    def __init__(
        self,
        layers: Mapping[str, QuantizedTensor],
        kept: Mapping[str, Any],
        *,
        architecture: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | None = None,
        errors: Mapping[str, float] | None = None,
        kept_layers: Mapping[str, str] | None = None,
    ) -> None:
        overlap = {f"{name}.weight" for name in layers} & set(kept)
        if overlap:
            raise ValueError(f"parameters both quantized and kept: {sorted(overlap)[:5]}")
        self.layers: dict[str, QuantizedTensor] = dict(layers)
        self.kept: dict[str, Any] = dict(kept)
        self.architecture: dict[str, Any] = dict(architecture or {})
        self.settings: dict[str, Any] = dict(settings or {})
        self.errors: dict[str, float] = dict(errors or {})
        self.kept_layers: dict[str, str] = dict(kept_layers or {})
        self.key = KEY_PREFIX + json.dumps(self.settings, sort_keys=True, default=str) + ":" + self.digest()

    # -- content ---------------------------------------------------------------------------

    @property
    def quantized_params(self) -> dict[str, QuantizedTensor]:
        """``{parameter name: QuantizedTensor}`` (``"<layer>.weight"``)."""
        return {f"{name}.weight": qt for name, qt in self.layers.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the patch holds (codes, scales, zero-points, kept tensors)."""
        kept = sum(int(t.numel()) * int(t.element_size()) for t in self.kept.values())
        return sum(qt.nbytes for qt in self.layers.values()) + kept

    @property
    def numel(self) -> int:
        """Parameters covered (quantized weights plus kept tensors)."""
        return sum(qt.numel for qt in self.layers.values()) + sum(int(t.numel()) for t in self.kept.values())

    def digest(self) -> str:
        """A content hash of every name, shape, format and tensor byte of the patch."""
        from dagfusion.fingerprint import new_hasher

        h = new_hasher()
        for name in sorted(self.layers):
            qt = self.layers[name]
            h.update(f"q:{name}:{json.dumps(qt.spec.to_dict(), sort_keys=True)}:{qt.shape}:{qt.dtype}\0".encode())
            for tensor in (qt.codes, qt.scales, qt.zeros):
                _feed(h, tensor)
        for name in sorted(self.kept):
            h.update(f"k:{name}\0".encode())
            _feed(h, self.kept[name])
        return h.hexdigest()

    # -- sampling --------------------------------------------------------------------------

    def apply(self, module: Any) -> contextlib.AbstractContextManager[Any]:
        """Swap the dequantized weights and the kept tensors into ``module``; restore on exit."""
        return self._swapped(module)

    @contextlib.contextmanager
    def _swapped(self, module: Any) -> Iterator[Any]:
        import torch

        params = parameter_places(module)
        self.check_fits(params)
        values: dict[str, Any] = {}
        with torch.no_grad():
            for name, qt in self.quantized_params.items():
                target = params[name].value
                values[name] = qt.dequantize(dtype=target.dtype, device=target.device)
            for name, tensor in self.kept.items():
                target = params[name].value
                values[name] = tensor.to(device=target.device, dtype=target.dtype)
        with swap_parameters(module, values, places=params):
            yield module

    def check_fits(self, params: Mapping[str, ParameterPlaces]) -> None:
        """:raises ValueError: listing parameters the model lacks or whose shapes differ."""
        problems = []
        wanted = {name: qt.shape for name, qt in self.quantized_params.items()}
        wanted.update({name: tuple(t.shape) for name, t in self.kept.items()})
        for name, shape in wanted.items():
            param = params.get(name)
            if param is None:
                problems.append(f"it has no parameter {name!r}")
            elif tuple(param.value.shape) != tuple(shape):
                problems.append(f"{name!r} has shape {tuple(param.value.shape)}, the patch {tuple(shape)}")
        if problems:
            made_for = self.architecture.get("class", "another model")
            raise ValueError(
                f"this weight-quantization patch (made for a {made_for}) does not fit the model: "
                + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            )

    def __repr__(self) -> str:
        return (
            f"WeightQuantPatch({self.settings.get('format', '?')}, {len(self.layers)} quantized layers, "
            f"{len(self.kept)} kept tensors, {self.nbytes} bytes)"
        )


def _feed(h: Any, tensor: Any) -> None:
    import torch

    if tensor is None:
        h.update(b"none")
        return
    t = tensor.detach().reshape(-1).contiguous().cpu()
    h.update(f"{t.dtype}:{t.numel()}\0".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().tobytes())


# --- building and measuring -------------------------------------------------------------------


def relative_error(weight: Any, qt: QuantizedTensor) -> float:
    """``‖W - Ŵ‖₂ / ‖W‖₂`` in float32 (0 for an all-zero weight)."""
    import torch

    reference = weight.detach().to(torch.float32)
    restored = qt.dequantize(dtype=torch.float32, device=reference.device)
    norm = float(torch.linalg.vector_norm(reference))
    return float(torch.linalg.vector_norm(restored - reference)) / norm if norm > 0 else 0.0


def quantize_module(
    module: Any,
    spec: QuantSpec | str,
    *,
    keep: Iterable[str] = DEFAULT_KEEP,
    min_params: int = DEFAULT_MIN_PARAMS,
    progress: Callable[[int, int], None] | None = None,
    layer_specs: Mapping[str, QuantSpec] | None = None,
) -> WeightQuantPatch:
    """Quantize ``module``'s selected layers (reading its weights, never changing them).

    :param spec: A :class:`~dagfusion.nodes.quant.formats.QuantSpec` or a format name
        (``"int8"``, ``"int4"`` with groups of 64, ``"fp8_e4m3"``, ``"intN"``).
    :param keep: Module-name glob patterns kept in 16 bits (see :func:`parse_keep`).
    :param min_params: Layers with fewer weight elements are kept in 16 bits.
    :param progress: Called as ``progress(done, total)`` after each quantized layer.
    :param layer_specs: Mixed precision: ``{layer: QuantSpec}`` for layers quantized in another
        format than ``spec`` (layers not named use ``spec``). The patch's settings then record
        ``format`` ``"mixed"`` and ``layer_bits`` ``{layer: bits}`` of every quantized layer.
    :raises ValueError: when ``layer_specs`` names a layer that is not selected for quantization.
    """
    import torch

    if isinstance(spec, str):
        spec = QuantSpec.parse(spec)
    patterns = tuple(keep)
    plan = plan_layers(module, patterns, min_params)
    specs = dict(layer_specs or {})
    unknown = sorted(set(specs) - set(plan.quantize))
    if unknown:
        raise ValueError(
            f"layer_specs names {len(unknown)} layer(s) that are not quantized with keep={list(patterns)} and "
            f"min_params={min_params}, e.g. {unknown[:3]}"
        )
    params = parameter_places(module)
    layers: dict[str, QuantizedTensor] = {}
    errors: dict[str, float] = {}
    with torch.no_grad():
        for index, name in enumerate(plan.quantize):
            weight = params[f"{name}.weight"].value
            layers[name] = quantize(weight, specs.get(name, spec))
            errors[name] = relative_error(weight, layers[name])
            if progress is not None:
                progress(index + 1, len(plan.quantize))
        quantized = {f"{name}.weight" for name in layers}
        kept = {
            name: param.value.detach().to(dtype=storage_dtype(param.value), copy=True)
            for name, param in params.items()
            if name not in quantized
        }
    settings: dict[str, Any] = {
        "format": spec.name,
        "spec": spec.to_dict(),
        "keep": list(patterns),
        "min_params": int(min_params),
    }
    if layer_specs is not None:
        settings["format"] = "mixed"
        settings["layer_bits"] = {name: qt.spec.bits for name, qt in layers.items()}
    return WeightQuantPatch(
        layers, kept, architecture=architecture_of(module), settings=settings, errors=errors, kept_layers=plan.kept
    )


def _bits_of(tensor: Any) -> int:
    return int(tensor.element_size()) * 8


def stored_bits(module: Any, patch: WeightQuantPatch | None = None) -> tuple[int, int]:
    """``(bits, parameters)``: the storage of ``module`` as ``patch`` stores it (see :func:`average_bits`)."""
    params = parameter_places(module)
    quantized = patch.quantized_params if patch is not None else {}
    kept = patch.kept if patch is not None else {}
    total_bits = 0
    count = 0
    for name, param in params.items():
        numel = int(param.value.numel())
        count += numel
        if name in quantized:
            total_bits += quantized[name].nbytes * 8
        elif name in kept:
            total_bits += int(kept[name].numel()) * _bits_of(kept[name])
        else:
            total_bits += numel * _bits_of(param.value)
    return total_bits, count


def average_bits(module: Any, patch: WeightQuantPatch | None = None) -> float:
    """Bits per parameter of ``module`` as ``patch`` stores it, counting every byte.

    Quantized weights count their codes, scales and zero-points; the patch's kept tensors their
    16-bit size; parameters the patch does not cover (or all, without a patch) their own dtype.
    Divided by the number of distinct parameters of ``module``.
    """
    bits, count = stored_bits(module, patch)
    return bits / count if count else 0.0


def report(module: Any, patch: WeightQuantPatch, *, backend: str = "torch") -> dict[str, Any]:
    """Plain-data summary: totals and, per Linear/Conv layer, bits, bytes and error (or why kept).

    Keys: ``format``, ``group_size``, ``backend``, ``average_bits`` (nominal: the stored
    tensors' bits per parameter, as :func:`average_bits`; also as ``nominal_bits``),
    ``file_bits`` (the bits per parameter of the file :func:`~dagfusion.nodes.quant.storage.save`
    writes, header and index included), ``params``, ``bytes`` (all parameters as stored),
    ``file_bytes`` (that file's exact size), ``quantized_layers``, ``quantized_params``, ``kept_layers``,
    ``mean_relative_error`` (parameter-weighted over quantized layers) and ``layers``:
    ``{name: {"bits", "bits_per_weight", "params", "bytes", "format", "group_size",
    "relative_error"}}`` for quantized layers and ``{"bits", "params", "bytes", "kept"}`` (the
    reason) for kept ones.
    """
    params = parameter_places(module)
    layers: dict[str, dict[str, Any]] = {}
    quantized_params = 0
    weighted_error = 0.0
    for name, qt in patch.layers.items():
        error = patch.errors.get(name)
        layers[name] = {
            "format": qt.spec.name,
            "bits": qt.spec.bits,
            "group_size": qt.group if qt.spec.group_size else 0,
            "params": qt.numel,
            "bytes": qt.nbytes,
            "bits_per_weight": qt.bits_per_weight,
            "relative_error": error,
        }
        quantized_params += qt.numel
        if error is not None:
            weighted_error += error * qt.numel
    for name, reason in patch.kept_layers.items():
        weight_name = f"{name}.weight"
        tensor = patch.kept.get(weight_name)
        if tensor is None:
            tensor = params[weight_name].value if weight_name in params else None
        if tensor is None:
            continue
        layers[name] = {
            "bits": _bits_of(tensor),
            "params": int(tensor.numel()),
            "bytes": int(tensor.numel()) * int(tensor.element_size()),
            "kept": reason,
        }
    from dagfusion.nodes.quant.storage import file_nbytes

    bits, total = stored_bits(module, patch)
    file_bytes = file_nbytes(patch)
    return {
        "format": patch.settings.get("format"),
        "group_size": patch.settings.get("spec", {}).get("group_size", 0),
        "backend": backend,
        "average_bits": bits / total if total else 0.0,
        "nominal_bits": bits / total if total else 0.0,
        "file_bits": file_bytes * 8 / total if total else 0.0,
        "params": total,
        "bytes": bits // 8,
        "file_bytes": file_bytes,
        "quantized_layers": len(patch.layers),
        "quantized_params": quantized_params,
        "kept_layers": len(patch.kept_layers),
        "mean_relative_error": weighted_error / quantized_params if quantized_params and patch.errors else None,
        "layers": dict(sorted(layers.items())),
    }
