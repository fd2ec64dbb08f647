"""Random LoRAs made with peft on the tiny test models, written in the diffusers and kohya layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
DIT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]


def peft_state_dict(module: Any, targets: list[str], r: int, alpha: float, seed: int) -> tuple[dict[str, Any], Any]:
    """A random (``init_lora_weights=False``) peft LoRA of ``module`` (module left unchanged):
    ``(state dict without adapter names, LoraConfig)``."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    scratch = copy.deepcopy(module)
    torch.manual_seed(seed)
    inject_adapter_in_model(config, scratch)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(scratch).items()}, config


def write_sd_lora(folder: Path, *, r: int = 4, unet_alpha: float = 8.0, te_alpha: float = 2.0) -> dict[str, Path]:
    """A UNet + text-encoder LoRA of the tiny SD model, as diffusers writes it and as a kohya copy."""
    from dagfusion.testing import models as tiny
    from diffusers import StableDiffusionPipeline

    pipe = tiny.build_sd(0)
    unet_sd, unet_cfg = peft_state_dict(pipe.unet, UNET_TARGETS, r, unet_alpha, seed=1)
    te_sd, te_cfg = peft_state_dict(pipe.text_encoder, TE_TARGETS, r, te_alpha, seed=2)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
        safe_serialization=True,
    )
    kohya: dict[str, Any] = {}
    for state, prefix, alpha in ((unet_sd, "lora_unet_", unet_alpha), (te_sd, "lora_te_", te_alpha)):
        for key, value in state.items():
            stem, part = key.rsplit(".lora_", 1)
            flat = prefix + stem.replace(".", "_")
            kohya[f"{flat}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value.contiguous()
            kohya[f"{flat}.alpha"] = torch.tensor(float(alpha))
    from safetensors.torch import save_file

    save_file(kohya, str(folder / "kohya.safetensors"))
    save_file(_ldm_names(kohya, pipe.unet), str(folder / "kohya_ldm.safetensors"))
    return {"diffusers": folder / "pytorch_lora_weights.safetensors", "kohya": folder / "kohya.safetensors",
            "kohya_ldm": folder / "kohya_ldm.safetensors"}


def _ldm_names(kohya: dict[str, Any], unet: Any) -> dict[str, Any]:
    """The kohya file with UNet names in the original SD layout (``lora_unet_input_blocks_4_1_…``)."""
    from dagfusion.nodes.diffusion.ldm_layout import unet_to_ldm

    rename = {}
    for key in unet.state_dict():
        if key.endswith(".weight"):
            (ldm,) = unet_to_ldm({key: None}, unet.config)
            rename[key[:-7].replace(".", "_")] = ldm[len("model.diffusion_model."):-7].replace(".", "_")
    out = {}
    for key, value in kohya.items():
        stem, part = key.split(".", 1)
        if stem.startswith("lora_unet_"):
            stem = "lora_unet_" + rename[stem[len("lora_unet_"):]]
        out[f"{stem}.{part}"] = value
    return out
