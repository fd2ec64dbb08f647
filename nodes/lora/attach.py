"""Putting a LoRA on handles, and taking LoRAs back off them.

:func:`on_model` / :func:`on_clip` match a :class:`LoraWeights` component to the handle's
module(s) and return the handle with a :class:`LoraPatch` added (the shared weights untouched).
A component of which nothing matches is refused; a partial match is logged as a warning with
counts and examples. :func:`extract` collects the LoRA patches of handles back into one
:class:`LoraWeights` (several LoRAs on one layer are combined exactly, strengths folded in).
"""

from __future__ import annotations

import logging
from typing import Any

from dagfusion import NodeInputError
from dagfusion.nodes.lora.matching import Match, match_layers
from dagfusion.nodes.lora.patch import LoraPatch, module_id
from dagfusion.nodes.lora.weights import LoraWeights, combine

_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2")


def _checked(match: Match, what: str, module: Any, logger: logging.Logger) -> None:
    from dagfusion.model import unwrap_compiled

    if not match.matched:
        names = [n for n, _ in unwrap_compiled(module).named_modules() if n][:3]
        raise NodeInputError(
            "lora",
            f"expected a LoRA for this {what} ({type(unwrap_compiled(module)).__name__}, modules like {names}), "
            f"got one for another architecture: {match.describe()}",
        )
    if match.unmatched:
        logger.warning("LoRA on the %s: %s; the others are ignored", what, match.describe())


def _is_quantized(model: Any) -> bool:
    from dagfusion.model import applied_patch

    try:
        from dagfusion.nodes.quant.patch import WeightQuantPatch
        from dagfusion.nodes.quant.qat import QATPatch
    except ImportError:  # pragma: no cover - the quant pack ships with dagfusion
        return False
    return applied_patch(model, (WeightQuantPatch, QATPatch)) is not None or "quantization" in model.info


def on_model(model: Any, weights: LoraWeights, strength: float, fuse: bool, logger: logging.Logger) -> Any:
    """``model`` with the LoRA's denoiser layers as a patch (unchanged if it has none or
    ``strength`` is 0). On a quantized model the LoRA is always a side branch.

    :raises NodeInputError: none of the LoRA's denoiser layers fits the denoiser.
    """
    layers = weights.components.get("denoiser")
    if not layers or strength == 0.0:
        return model
    match = match_layers(layers, model.denoiser)
    _checked(match, "denoiser", model.denoiser, logger)
    if fuse and _is_quantized(model):
        logger.warning("the model is quantized: the LoRA is added as a side branch instead of fused")
        fuse = False
    return model.with_patch(LoraPatch(match.matched, strength=strength, fuse=fuse, source=weights.digest))


def on_clip(clip: Any, weights: LoraWeights, strength: float, fuse: bool, logger: logging.Logger) -> Any:
    """``clip`` with a patch per text encoder the LoRA changes (unchanged if it changes none or
    ``strength`` is 0).

    :raises NodeInputError: the LoRA has text-encoder layers for an encoder the bundle lacks, or
        none of them fits.
    """
    if strength == 0.0:
        return clip
    for index, component in enumerate(_ENCODER_COMPONENTS):
        layers = weights.components.get(component)
        if not layers:
            continue
        if index >= len(clip.encoders):
            raise NodeInputError(
                "clip", f"expected a bundle with {index + 1} text encoders (the LoRA changes {component}), "
                        f"got {len(clip.encoders)} ({clip.kind})",
            )
        module = clip.encoders[index].get()
        match = match_layers(layers, module)
        _checked(match, component.replace("_", " "), module, logger)
        clip = clip.with_patch(LoraPatch(match.matched, strength=strength, fuse=fuse, source=weights.digest,
                                         component=component, target=module_id(module)))
    return clip


def extract(model: Any | None, clip: Any | None) -> LoraWeights:
    """The LoRA patches of ``model`` and ``clip`` as one LoRA (strengths folded into the alphas,
    or into ``up`` where several LoRAs change one layer).

    :raises NodeInputError: neither handle carries a LoRA patch.
    """
    from dagfusion.model import patches_of, unwrap_compiled

    components: dict[str, Any] = {}
    sources: list[str] = []
    prefix = "unet"
    for handle in (model, clip):
        if handle is None:
            continue
        patches = patches_of(handle, LoraPatch)
        for component in ("denoiser", *_ENCODER_COMPONENTS):
            mine = [p for p in patches if p.component == component]
            if mine:
                components[component] = combine((p.layers, p.strength) for p in mine)
                sources.extend(p.key for p in mine)
        if handle is model and model is not None:
            name = type(unwrap_compiled(model.denoiser)).__name__
            prefix = "unet" if name.startswith("UNet") else "transformer"
    if not components:
        raise NodeInputError(
            "model", "expected a model and/or clip carrying LoRA patches (dagfusion.lora.Apply or "
                     "dagfusion.lora.Trainable), got handles without any",
        )
    return LoraWeights(components, layout="peft", denoiser_prefix=prefix,
                       info={"source": "extracted from LoRA patches", "patches": sources})
