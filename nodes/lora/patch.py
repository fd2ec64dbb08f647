"""The LoRA patch: low-rank updates of a module's layers while it is used.

Two modes, both leaving the shared weights untouched:

- **side branch** (default): a forward hook on each targeted layer adds
  ``strength * alpha / rank * up(down(x))`` to its output. No weight is copied; it composes with
  patches that swap weights (quantization: the branch adds to the quantized layer's output) and
  with caches (a skipped block simply does not run its hooks).
- **fused**: during ``apply`` the targeted layers' weights are replaced by private copies
  ``W + strength * alpha / rank * up @ down`` (:func:`~dagfusion.model.swap_parameters`; untouched
  layers are not copied) and the originals are put back on exit. The weight read is the one on
  the module when ``apply`` is entered, so a weight-swapping patch entered *after* this one
  (later in the handle's patch list) overrides the fused weights.

A text-encoder patch names the encoder it is for (``module_id``: its class and size); the
bundle's other encoders pass through unchanged.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from dagfusion.model import (
    ModelPatch,
    parameter_places,
    swap_parameters,
    unwrap_compiled,
)
from dagfusion.nodes.lora.weights import LoraLayer, tensor_digest


def module_id(module: Any) -> str:
    """Which module a text-encoder patch is for: class name and size (hidden size, layers, projection)."""
    module = unwrap_compiled(module)
    config = getattr(module, "config", None)
    size = {k: getattr(config, k, None) for k in ("hidden_size", "d_model", "num_hidden_layers", "num_layers", "projection_dim")}
    return f"{type(module).__name__}:{json.dumps(size, sort_keys=True)}"


def _branch_hook(layer: LoraLayer, factor: float, device: Any) -> Any:
    """A forward hook adding ``factor * up(down(x))``; the pair is moved to ``device`` once (a
    parameter already there stays the same object, so gradients reach it)."""
    import torch
    import torch.nn.functional as F

    down_placed, up_placed = layer.down.to(device=device), layer.up.to(device=device)

    def hook(module: Any, args: tuple[Any, ...], output: Any) -> Any:
        x = args[0]
        down = down_placed.to(device=x.device, dtype=x.dtype)
        up = up_placed.to(device=x.device, dtype=x.dtype)
        if down.dim() == 2 and not isinstance(module, torch.nn.Linear):
            down, up = down[:, :, None, None], up[:, :, None, None]
        if down.dim() == 2:
            return output + factor * F.linear(F.linear(x, down), up)
        h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
        return output + factor * F.conv2d(h, up)

    return hook


class LoraPatch(ModelPatch):
    """A LoRA on one module (the denoiser, or one text encoder of a bundle).

    :param layers: ``{module name (dotted): LoraLayer}``, already matched to the module.
    :param strength: Multiplies every update.
    :param fuse: Fuse into private weight copies while applied instead of adding a side branch.
    :param source: The LoRA's content digest (keys the patch).
    :param component: ``"denoiser"``, ``"text_encoder"`` or ``"text_encoder_2"``.
    :param target: For text encoders, the :func:`module_id` of the encoder it changes; ``None``
        changes whatever module it is applied to.
    """

    def __init__(
        self,
        layers: Mapping[str, LoraLayer],
        *,
        strength: float = 1.0,
        fuse: bool = False,
        source: str = "",
        component: str = "denoiser",
        target: str | None = None,
    ) -> None:
        if not layers:
            raise ValueError("a LoRA patch needs at least one layer")
        self.layers = dict(layers)
        self.strength = float(strength)
        self.fuse = bool(fuse)
        self.source = source
        self.component = component
        self.target = target

    @property
    def key(self) -> str:
        """The LoRA's content digest, component, target, strength and mode."""
        source = self.source or tensor_digest({self.component: self.layers})
        return (f"dagfusion.lora:{source}|{self.component}|{self.target or ''}|"
                f"strength={self.strength!r}|fuse={self.fuse}")

    def applies_to(self, module: Any) -> bool:
        """Whether this patch changes ``module`` (always, unless it names another encoder)."""
        return self.target is None or module_id(module) == self.target

    def apply(self, module: Any) -> contextlib.AbstractContextManager[Any]:
        if not self.applies_to(module) or self.strength == 0.0:
            return contextlib.nullcontext(module)
        return self._fused(module) if self.fuse else self._side_branch(module)

    def _modules(self, module: Any) -> dict[str, Any]:
        modules = dict(unwrap_compiled(module).named_modules())
        missing = [n for n in self.layers if n not in modules]
        if missing:
            raise ValueError(
                f"LoRA patch: the {type(unwrap_compiled(module)).__name__} has no module {missing[0]!r} "
                f"({len(missing)} of {len(self.layers)} missing); apply the LoRA to the model it was matched to"
            )
        return modules

    @contextlib.contextmanager
    def _side_branch(self, module: Any) -> Iterator[Any]:
        modules = self._modules(module)
        handles = []
        try:
            for name, layer in self.layers.items():
                factor = self.strength * layer.scale
                target = modules[name]
                hook = _branch_hook(layer, factor, target.weight.device)
                handles.append(target.register_forward_hook(hook))
            yield module
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def _fused(self, module: Any) -> Iterator[Any]:
        import torch

        self._modules(module)
        places = parameter_places(module)
        values = {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                weight = places[f"{name}.weight"].value
                delta = layer.delta(weight.shape).to(weight.device)
                values[f"{name}.weight"] = (weight.float() + self.strength * delta).to(weight.dtype)
        with swap_parameters(module, values, places=places):
            yield module

    def __repr__(self) -> str:
        mode = "fused" if self.fuse else "side branch"
        return f"LoraPatch({self.component}, {len(self.layers)} layers, strength={self.strength}, {mode})"


class TrainableLoraPatch(LoraPatch):
    """A side-branch LoRA whose ``down``/``up`` are parameters a training run may change
    (``trainable: patches`` in dagfusion.train.Train). Its key hashes the current tensors, so a
    trained copy never shares a key with the untrained one."""

    def __init__(self, layers: Mapping[str, LoraLayer], **kwargs: Any) -> None:
        super().__init__(layers, **{**kwargs, "fuse": False, "source": ""})

    def trainable_parameters(self) -> dict[str, Any]:
        """``{"<module>.lora_A": down, "<module>.lora_B": up}`` for every layer."""
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = layer.down, layer.up
        return out


def new_layers(module: Any, names: list[str], rank: int, alpha: float, seed: int) -> dict[str, LoraLayer]:
    """Fresh trainable layers for ``names`` (Linear or Conv2d modules of ``module``): ``down``
    Kaiming-uniform from ``seed`` (as peft initialises it), ``up`` zero, so the model starts
    unchanged. Parameters are float32 on the module's device."""
    import math

    import torch

    modules = dict(unwrap_compiled(module).named_modules())
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name in names:
        target = modules[name]
        if isinstance(target, torch.nn.Linear):
            down_shape, up_shape = (rank, target.in_features), (target.out_features, rank)
        else:
            down_shape = (rank, target.in_channels, *target.kernel_size)
            up_shape = (target.out_channels, rank, 1, 1)
        fan_in = math.prod(down_shape[1:])
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) bound
        down = (torch.rand(down_shape, generator=generator) * 2 - 1) * bound
        device = target.weight.device
        layers[name] = LoraLayer(
            torch.nn.Parameter(down.to(device), requires_grad=False),
            torch.nn.Parameter(torch.zeros(up_shape, device=device), requires_grad=False),
            float(alpha),
        )
    return layers

