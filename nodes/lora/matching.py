"""Matching a LoRA's layer names to a model's modules.

A name matches a module when it is the module's dotted name (diffusers/peft files) or the
dotted name with ``.`` flattened to ``_`` (kohya files; for an SD 1.x UNet also the original
LDM module names such as ``input_blocks_4_1_…``, as kohya writes them), the module is a ``Linear`` or an
ungrouped ``Conv2d``, and the pair's shapes fit it. :func:`match_layers` says, for every name,
which module it changes or why it changes none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dagfusion.nodes.lora.weights import LoraLayer


@dataclass(frozen=True)
class Match:
    """The outcome of matching one component's layers.

    Attributes:
        matched: ``{module name (dotted): layer}`` — what the LoRA changes.
        unmatched: ``{LoRA name: reason}`` — names that change nothing.
    """

    matched: dict[str, LoraLayer] = field(default_factory=dict)
    unmatched: dict[str, str] = field(default_factory=dict)

    def describe(self, limit: int = 3) -> str:
        """``"N of M layers matched (e.g. …); K did not (e.g. name: reason)"``."""
        total = len(self.matched) + len(self.unmatched)
        text = f"{len(self.matched)} of {total} layers matched"
        if self.matched:
            text += f" (e.g. {list(self.matched)[:limit]})"
        if self.unmatched:
            examples = "; ".join(f"{n}: {r}" for n, r in list(self.unmatched.items())[:limit])
            text += f"; {len(self.unmatched)} did not (e.g. {examples})"
        return text


def _fits(module: Any, layer: LoraLayer) -> str | None:
    """Why ``layer`` cannot change ``module``, or ``None`` if it fits."""
    import torch

    down, up = layer.down, layer.up
    if isinstance(module, torch.nn.Linear):
        want_down, want_up = (layer.rank, module.in_features), (module.out_features, layer.rank)
        got_down, got_up = tuple(down.shape), tuple(up.shape)
    elif isinstance(module, torch.nn.Conv2d):
        if module.groups != 1:
            return "grouped convolutions are not supported"
        kh, kw = module.kernel_size
        want_down = (layer.rank, module.in_channels, kh, kw)
        want_up = (module.out_channels, layer.rank, 1, 1)
        got_down = tuple(down.shape) + (1, 1) if down.dim() == 2 else tuple(down.shape)
        got_up = tuple(up.shape) + (1, 1) if up.dim() == 2 else tuple(up.shape)
    else:
        return f"module is a {type(module).__name__}, not a Linear or Conv2d"
    if got_down != want_down or got_up != want_up:
        return f"shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit {want_down} / {want_up}"
    return None


def ldm_aliases(module: Any) -> dict[str, str]:
    """``{flattened original (LDM) module name: diffusers module name}`` for an SD 1.x-layout
    ``UNet2DConditionModel``; empty for other modules (or modules the conversion does not cover)."""
    from dagfusion.nodes.diffusion.ldm_layout import unet_to_ldm

    if type(module).__name__ != "UNet2DConditionModel":
        return {}
    aliases: dict[str, str] = {}
    for key in module.state_dict():
        if not key.endswith(".weight"):
            continue
        try:
            (ldm,) = unet_to_ldm({key: None}, module.config)
        except (KeyError, IndexError, TypeError, AttributeError):
            continue
        name = ldm[len("model.diffusion_model."):-len(".weight")]
        aliases.setdefault(name.replace(".", "_"), key[: -len(".weight")])
    return aliases


def match_layers(layers: Mapping[str, LoraLayer], module: Any) -> Match:
    """Match ``layers`` (dotted or kohya-flattened names) against ``module``'s submodules."""
    from dagfusion.model import unwrap_compiled

    module = unwrap_compiled(module)
    modules = dict(module.named_modules())
    flat: dict[str, str] = {}
    for name in modules:
        flat.setdefault(name.replace(".", "_"), name)
    if any(n not in modules and n not in flat for n in layers):
        for alias, name in ldm_aliases(module).items():
            flat.setdefault(alias, name)
    match = Match()
    for lora_name, layer in layers.items():
        name = lora_name if lora_name in modules else flat.get(lora_name)
        if name is None or not name:
            match.unmatched[lora_name] = "no such module"
            continue
        reason = _fits(modules[name], layer)
        if reason is not None:
            match.unmatched[lora_name] = reason
        else:
            match.matched[name] = layer
    return match
