"""Write SD 1.x diffusers weights in the original (LDM / CompVis) single-file key layout.

The inverse of the conversion diffusers applies in ``from_single_file``: used to make tiny
single-file checkpoints for tests and examples, and to export SD 1.x models as one file.
Keys get the original prefixes ``model.diffusion_model.`` (UNet), ``first_stage_model.``
(VAE) and ``cond_stage_model.transformer.`` (CLIP text encoder).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, prefixes: Mapping[str, str], inner: Mapping[str, str]) -> str | None:
    best = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    if best is None:
        return None
    rest = key[len(best):]
    for old, new in inner.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old):]
            break
    return prefixes[best] + rest


def unet_to_ldm(state: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """UNet2DConditionModel (SD 1.x layout) weights -> ``model.diffusion_model.*`` keys."""
    per = int(config.layers_per_block) + 1
    levels = len(config.block_out_channels)
    simple = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
              "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
              "mid_block.attentions.0.": "middle_block.1."}
    resnets = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."}
    for i in range(levels):
        for j in range(per - 1):
            k = per * i + j + 1
            resnets[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{k}.0."
            simple[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{k}.1."
        if i < levels - 1:
            simple[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{per * (i + 1)}.0.op."
        has_attention = "CrossAttn" in config.up_block_types[i]
        for j in range(per):
            k = per * i + j
            resnets[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{k}.0."
            simple[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{k}.1."
        if i < levels - 1:
            simple[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{per * i + per - 1}.{2 if has_attention else 1}."
    out = {}
    for key, value in state.items():
        new = _rename(key, resnets, _RESNET) if any(key.startswith(p) for p in resnets) else _rename(key, simple, {})
        if new is None:
            raise KeyError(f"no original-layout name for UNet weight {key!r}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """AutoencoderKL weights -> ``first_stage_model.*`` keys (attention weights as 1x1 convolutions)."""
    levels = len(config.block_out_channels)
    resnets: dict[str, str] = {}
    simple = {"encoder.conv_in.": "encoder.conv_in.", "encoder.conv_out.": "encoder.conv_out.",
              "encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_in.": "decoder.conv_in.",
              "decoder.conv_out.": "decoder.conv_out.", "decoder.conv_norm_out.": "decoder.norm_out.",
              "quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for part in ("encoder", "decoder"):
        resnets[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        resnets[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
    for i in range(levels):
        for j in range(int(config.layers_per_block) + 1):
            resnets[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            resnets[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        simple[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        simple[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{levels - 1 - i}.upsample.conv."
    attention = {"encoder.mid_block.attentions.0.": "encoder.mid.attn_1.",
                 "decoder.mid_block.attentions.0.": "decoder.mid.attn_1."}
    out = {}
    for key, value in state.items():
        if any(key.startswith(p) for p in attention):
            new = _rename(key, attention, _VAE_ATTENTION)
            if new is not None and new.endswith(".weight") and value.ndim == 2:
                value = value[:, :, None, None]
        elif any(key.startswith(p) for p in resnets):
            new = _rename(key, resnets, _VAE_RESNET)
        else:
            new = _rename(key, simple, {})
        if new is None:
            raise KeyError(f"no original-layout name for VAE weight {key!r}")
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPTextModel weights -> ``cond_stage_model.transformer.text_model.*`` keys."""
    out = {}
    for key, value in state.items():
        name = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + name] = value
    return out


def sd1_checkpoint(unet: Any, vae: Any, text_encoder: Any) -> dict[str, Any]:
    """One original-layout state dict for an SD 1.x model (contiguous CPU tensors)."""
    state: dict[str, Any] = {}
    state.update(unet_to_ldm(unet.state_dict(), unet.config))
    state.update(vae_to_ldm(vae.state_dict(), vae.config))
    state.update(clip_to_ldm(text_encoder.state_dict()))
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}
