"""Quantization-aware distillation: fine-tune a weight-quantized denoiser against its full-precision self.

BitsFusion (Sui et al., 2024) recovers the quality of a low-bit UNet by training the quantized
model against the full-precision one in two stages. Here the quantized model is a
:class:`QATPatch` built from a :class:`~dagfusion.nodes.quant.patch.WeightQuantPatch` (uniform or
mixed precision) and the module's own full-precision weights:

- every quantized layer gets a **latent weight** (initialised to the full-precision weight) and its
  **scales** (initialised to the quantized tensor's) as trainable parameters; zero-points and
  bit widths stay fixed;
- while the patch is applied, each quantized layer computes with the *fake-quantized* weight
  ``ŵ = (clamp(⌊w / s⌉ + z, lo, hi) − z) · s`` per group, the rounding passed through by the
  **straight-through estimator** (``⌊x⌉ → x + (round(x) − x).detach()``), so gradients reach both
  the latent weight and the scales (learned-step-size style); the clamp cuts the gradient of
  weights outside the grid;
- :meth:`QATPatch.teacher` switches every layer back to its full-precision weight for the
  duration of a ``with`` block — the teacher is the same module, so distillation costs no second
  copy of the model.

The patch offers the latent weights and scales through ``trainable_parameters()``, so the
ordinary training loop (``dagfusion.train.Train`` with ``trainable: patches``) trains it with a
distillation objective (:mod:`~dagfusion.nodes.quant.distill`); :func:`freeze` turns the trained
patch back into a packed :class:`WeightQuantPatch` that saves and loads bit for bit. The scales
are float16 in the packed format, so the fake quantization already computes with the scales
rounded to float16 (the gradient passed straight through): the packed model computes what was
trained.

Only integer formats train; fp8 layers (and the 16-bit kept parameters) are fixed at their
quantized / full-precision values. While training, the kept parameters are the module's own
full-precision ones; :func:`freeze` stores them in 16 bits, as every WeightQuantPatch does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from typing import Any

from dagfusion.model import ModelPatch, applied_patch, applying, parameter_places, swap_parameters
from dagfusion.nodes.quant.formats import QuantizedTensor, _grouped, pack_bits, zero_points
from dagfusion.nodes.quant.patch import WeightQuantPatch

KEY_PREFIX = "dagfusion.quant.QAT:"



def _code_range(qt: QuantizedTensor) -> tuple[float, float]:
    """The smallest and largest code of ``qt``'s grid."""
    bits = qt.spec.bits
    if qt.spec.symmetric:
        offset, qmax = 1 << (bits - 1), (1 << (bits - 1)) - 1
        return float(offset - qmax), float(offset + qmax)
    return 0.0, float((1 << bits) - 1)


def fake_quantize(latent: Any, scale: Any, zero: Any, group: int, lo: float, hi: float, shape: tuple[int, ...]) -> Any:
    """The fake-quantized weight of ``latent`` ``(rows, cols)`` on the grid ``(scale, zero)``,
    differentiable through the straight-through estimator; returned in ``shape``."""
    import torch

    rows, cols = latent.shape
    blocks = _grouped(latent, group)  # (rows, groups, group)
    scale = scale.clamp_min(torch.finfo(torch.float16).tiny)
    # The scales are stored in float16: compute with the rounded value, pass the gradient straight through.
    scale = scale + (scale.to(torch.float16).to(scale.dtype) - scale).detach()
    s = scale.unsqueeze(-1)
    x = blocks / s
    rounded = x + (torch.round(x) - x).detach()
    codes = torch.clamp(rounded + zero.unsqueeze(-1), lo, hi)
    values = (codes - zero.unsqueeze(-1)) * s
    return values.reshape(rows, -1)[:, :cols].reshape(shape)


class _Layer:
    """The trainable state of one quantized layer."""

    def __init__(self, name: str, qt: QuantizedTensor, weight: Any, train_weights: bool) -> None:
        import torch

        self.name = name
        self.qt = qt
        self.shape = tuple(qt.shape)
        matrix = weight.detach().to(torch.float32).reshape(qt.rows, qt.cols).clone()
        self.latent = torch.nn.Parameter(matrix, requires_grad=train_weights)
        self.scale = torch.nn.Parameter(qt.scales.detach().to(torch.float32).clone())
        self.zero = zero_points(qt)
        self.lo, self.hi = _code_range(qt)

    def weight(self, dtype: Any) -> Any:
        zero = self.zero.to(self.latent.device)
        return fake_quantize(self.latent, self.scale, zero, self.qt.group, self.lo, self.hi, self.shape).to(dtype)


class QATPatch(ModelPatch):
    """A weight-quantized denoiser whose latent weights and scales train (see the module docstring).

    Attributes:
        base: The :class:`WeightQuantPatch` it was made from (formats, bit map, kept tensors).
        layers: ``{layer name: _Layer}`` for the trainable integer-format layers.
        train_weights: Whether the latent weights train (else only the scales).
    """

    def __init__(self, base: WeightQuantPatch, module: Any, *, train_weights: bool = True) -> None:
        params = parameter_places(module)
        base.check_fits(params)
        self.base = base
        self.train_weights = bool(train_weights)
        self.layers: dict[str, _Layer] = {}
        for name, qt in sorted(base.layers.items()):
            if qt.spec.kind != "int":
                continue
            self.layers[name] = _Layer(name, qt, params[f"{name}.weight"].value, self.train_weights)
        if not self.layers:
            raise ValueError("the quantized model has no integer-format layers to train (fp8 layers stay fixed)")
        self.teaching = False

    # -- identity ---------------------------------------------------------------------------

    def digest(self) -> str:
        """A content hash of the trainable tensors."""
        h = hashlib.sha256()
        for name, layer in self.layers.items():
            h.update(name.encode())
            h.update(layer.latent.detach().float().cpu().contiguous().numpy().tobytes())
            h.update(layer.scale.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:24]

    @property
    def key(self) -> str:  # type: ignore[override]
        return KEY_PREFIX + json.dumps({"base": self.base.key, "train_weights": self.train_weights,
                                        "values": self.digest()}, sort_keys=True)

    def __dagfusion_fingerprint__(self) -> str:
        return self.key

    def trainable_parameters(self) -> dict[str, Any]:
        """``{"<layer>.scale": Parameter, "<layer>.latent": Parameter (when weights train)}``."""
        out: dict[str, Any] = {}
        for name, layer in self.layers.items():
            out[f"{name}.scale"] = layer.scale
            if self.train_weights:
                out[f"{name}.latent"] = layer.latent
        return out

    # -- the teacher ------------------------------------------------------------------------

    @contextlib.contextmanager
    def teacher(self) -> Iterator[None]:
        """Within the block, every layer computes with its full-precision weight (the teacher)."""
        previous, self.teaching = self.teaching, True
        try:
            yield
        finally:
            self.teaching = previous

    # -- applying ---------------------------------------------------------------------------

    def apply(self, module: Any) -> contextlib.AbstractContextManager[Any]:
        return self._installed(module)

    @contextlib.contextmanager
    def _installed(self, module: Any) -> Iterator[Any]:
        """Fake-quantized weights for the trainable layers and the fixed dequantized weights of the
        others, set before each call of each layer and the original parameter put back right after
        it (so ``state_dict()`` and checkpoints always see the full-precision weights); registered
        as the module's applied patch (:func:`active`) until exit."""
        params = parameter_places(module)
        self.check_fits(params)
        fixed = {name: qt for name, qt in self.base.layers.items() if name not in self.layers}
        names = [*self.layers, *fixed]
        pinned = {f"{name}.weight": params[f"{name}.weight"].value for name in names}  # the originals, back on exit
        handles: list[Any] = []
        with swap_parameters(module, pinned, places=params), applying(module, self):
            try:
                for name in names:
                    handles.extend(self._hook_layer(name, params[f"{name}.weight"], fixed.get(name)))
                yield module
            finally:
                for handle in handles:
                    handle.remove()

    def _hook_layer(self, name: str, place: Any, fixed: Any) -> list[Any]:
        """Forward hooks on the layer owning ``place`` that swap its weight in for each call: the
        student's (fake-quantized, or ``fixed`` dequantized) weight, or the original while teaching."""
        import torch

        owner, attr = place.places[0]
        original = place.value
        if fixed is None:
            student = self.layers[name].weight  # dtype -> fake-quantized weight
        else:
            with torch.no_grad():
                value = torch.nn.Parameter(fixed.dequantize(dtype=original.dtype, device=original.device), requires_grad=False)
            student = lambda dtype, _value=value: _value  # noqa: E731 - the fixed layers' counterpart

        def pre_hook(mod: Any, args: Any) -> None:
            mod._parameters[attr] = original if self.teaching else student(original.dtype)

        def post_hook(mod: Any, args: Any, out: Any) -> None:
            mod._parameters[attr] = original

        return [owner.register_forward_pre_hook(pre_hook), owner.register_forward_hook(post_hook)]

    def check_fits(self, params: Any) -> None:
        """:raises ValueError: when the module lacks a quantized layer or its shape differs."""
        problems = [name for name, qt in self.base.layers.items()
                    if f"{name}.weight" not in params or tuple(params[f"{name}.weight"].value.shape) != tuple(qt.shape)]
        if problems:
            raise ValueError(f"this quantization-aware patch does not fit the model: layers {problems[:5]} differ")

    def __repr__(self) -> str:
        return f"QATPatch({len(self.layers)} trainable layers, weights {'train' if self.train_weights else 'fixed'})"


def freeze(patch: QATPatch) -> WeightQuantPatch:
    """The packed :class:`WeightQuantPatch` of a (trained) :class:`QATPatch`: codes of the latent
    weights on the scales rounded to float16, as the fake quantization computes them (the
    zero-points and formats unchanged)."""
    import torch

    layers = dict(patch.base.layers)
    errors = dict(patch.base.errors)
    with torch.no_grad():
        for name, layer in patch.layers.items():
            qt = layer.qt
            scale16 = layer.scale.detach().float().clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)
            zero = layer.zero.to(layer.latent.device)
            blocks = _grouped(layer.latent.detach().float(), qt.group)
            codes = torch.clamp(torch.round(blocks / scale16.float().unsqueeze(-1)) + zero.unsqueeze(-1), layer.lo, layer.hi)
            codes = codes.reshape(qt.rows, -1)[:, : qt.cols].to(torch.uint8)
            layers[name] = QuantizedTensor(qt.spec, pack_bits(codes.cpu(), qt.spec.bits), scale16.cpu(), qt.zeros,
                                           qt.shape, qt.dtype)
            reference = layer.latent.detach().float()
            restored = layers[name].dequantize(dtype=torch.float32, device=reference.device).reshape(reference.shape)
            norm = float(torch.linalg.vector_norm(reference))
            errors[name] = float(torch.linalg.vector_norm(restored - reference)) / norm if norm > 0 else 0.0
    settings = {**patch.base.settings, "distilled": patch.digest()}
    return WeightQuantPatch(layers, patch.base.kept, architecture=patch.base.architecture, settings=settings,
                            errors=errors, kept_layers=patch.base.kept_layers)


def active(module: Any) -> QATPatch:
    """The :class:`QATPatch` applied to ``module`` right now (what a distillation objective teaches with).

    :raises ValueError: when there is none.
    """
    patch = applied_patch(module, QATPatch)
    if patch is None:
        raise ValueError(
            "quantization-aware distillation needs a quantized model made trainable by dagfusion.quant.Trainable "
            f"(no quantization-aware patch is applied to this {type(module).__name__})"
        )
    return patch
