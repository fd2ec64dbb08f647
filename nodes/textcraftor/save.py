"""Writing a (fine-tuned) text encoder into the diffusers folder layout.

:func:`save_encoder` writes ``<folder>/text_encoder/`` (``config.json`` + ``model.safetensors``,
via ``save_pretrained``) and ``<folder>/tokenizer/``, so the two folders can replace those of a
diffusers Stable Diffusion folder and ``DiffusionPipeline.from_pretrained`` loads them. LoRA
patches on the bundle are fused into a copy of the weights first (``W + strength·α/r·up@down``);
other patches cannot be written into a plain encoder and are refused.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def baked_encoder(bundle: Any) -> Any:
    """A CPU copy of the bundle's encoder with its LoRA patches fused in (the bundle is unchanged).

    :raises ValueError: the bundle is not a single CLIP, its encoder is an interpolation, or it
        carries a patch other than a LoRA.
    """
    import torch

    from dagfusion.model import unwrap_compiled
    from dagfusion.nodes.lora.patch import LoraPatch
    from dagfusion.nodes.textcraftor.encoder import clip_parts
    from dagfusion.nodes.textcraftor.interpolate import InterpolatedEncoder

    encoder, _ = clip_parts(bundle)
    encoder = unwrap_compiled(encoder)
    if isinstance(encoder, InterpolatedEncoder):
        raise ValueError("an interpolated encoder (two encoders) has no single set of weights to save")
    other = [type(p).__name__ for p in bundle.patches if not isinstance(p, LoraPatch)]
    if other:
        raise ValueError(f"cannot write the patch(es) {other} into a plain text encoder; only LoRA patches are fused")
    module = copy.deepcopy(encoder).to("cpu")
    modules = dict(module.named_modules())
    with torch.no_grad():
        for patch in bundle.patches:
            if not patch.applies_to(encoder) or patch.strength == 0.0:
                continue
            for name, layer in patch.layers.items():
                weight = modules[name].weight
                weight.copy_((weight.float() + patch.strength * layer.delta(weight.shape)).to(weight.dtype))
    module.requires_grad_(False)
    return module.eval()


def save_encoder(bundle: Any, folder: Path) -> Path:
    """Write ``folder/text_encoder`` and ``folder/tokenizer`` (see the module docstring); returns ``folder``."""
    module = baked_encoder(bundle)
    tokenizer = bundle.tokenizers[0].get()
    folder.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    return folder
