"""The diffusion pack's denoiser families: UNet (SD 1/2, SDXL, LCM), DiT, PixArt and SVD (video).

They are registered through :func:`register_denoiser_families` (see
:mod:`dagfusion.model.families` for the protocol); the sampler finds them with
:func:`dagfusion.model.family_for`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagfusion.model import Family, Prepared, RegisterFamily, class_names, config_of, expand, require_kind, unwrap_compiled


class UNetFamily(Family):
    """``UNet2DConditionModel``: SD 1.x/2.x, SDXL (``text_time`` added conditions), LCM guidance embedding."""

    name = "unet"

    def matches(self, module: Any) -> bool:
        return "UNet2DConditionModel" in class_names(module)

    def latent_channels(self, module: Any) -> int:
        config = config_of(module)
        return int(config.out_channels if config.in_channels != config.out_channels else config.in_channels)

    def supports_cfg(self, module: Any) -> bool:
        return config_of(module).time_cond_proj_dim is None

    def prepare(self, module, cond, *, batch, cfg, device, dtype, latent_shape, scale, guidance_scale):  # type: ignore[no-untyped-def]
        import torch

        config = config_of(module)
        sdxl = config.addition_embed_type == "text_time"
        require_kind(cond, "SDXL UNet" if sdxl else "UNet", ("sdxl",) if sdxl else ("clip",))
        hidden = self.paired(cond, "encoder_hidden_states", batch, cfg, "prompt")
        kwargs: dict[str, Any] = {"encoder_hidden_states": hidden.to(device=device, dtype=dtype)}
        if sdxl:
            pooled = self.paired(cond, "text_embeds", batch, cfg, "prompt").to(device=device, dtype=dtype)
            height, width = latent_shape[-2] * scale, latent_shape[-1] * scale
            original = tuple(cond.meta.get("original_size") or (height, width))
            crops = tuple(cond.meta.get("crops_coords_top_left") or (0, 0))
            target = tuple(cond.meta.get("target_size") or (height, width))
            ids = [*original, *crops, *target]
            expected = module.add_embedding.linear_1.in_features
            passed = config.addition_time_embed_dim * len(ids) + int(pooled.shape[-1])
            if expected != passed:
                raise ValueError(
                    f"the UNet expects added conditions of size {expected}, but the text embeddings give {passed}; "
                    "is the text encoder from the same model?"
                )
            time_ids = torch.tensor([ids], dtype=dtype).repeat(pooled.shape[0], 1).to(device)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        if config.time_cond_proj_dim is not None:
            w = torch.tensor(guidance_scale - 1).repeat(batch)
            kwargs["timestep_cond"] = guidance_embedding(w, config.time_cond_proj_dim).to(device=device, dtype=dtype)
        return Prepared(kwargs, self.cfg_batches if cfg else ("cond",))

    def call(self, module: Any, sample: Any, timestep: Any, kwargs: Mapping[str, Any]) -> Any:
        return module(sample, timestep, **kwargs, return_dict=False)[0]


def guidance_embedding(w: Any, dim: int) -> Any:
    """Sinusoidal embedding of guidance scales (LCM's ``w`` conditioning), shape ``(len(w), dim)``."""
    import math

    import torch

    w = w * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w.to(torch.float32)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class DiTFamily(Family):
    """``DiTTransformer2DModel``: class-conditional; the null class is the last embedding row."""

    name = "dit"
    cfg_batches = ("cond", "uncond")
    timestep_per_row = True

    def matches(self, module: Any) -> bool:
        names = class_names(module)
        if "DiTTransformer2DModel" in names:
            return True
        return "Transformer2DModel" in names and getattr(config_of(module), "norm_type", None) == "ada_norm_zero"

    def prepare(self, module, cond, *, batch, cfg, device, dtype, latent_shape, scale, guidance_scale):  # type: ignore[no-untyped-def]
        import torch

        require_kind(cond, "DiT", ("class",))
        classes = int(getattr(config_of(module), "num_embeds_ada_norm", None) or 1000)
        labels = expand(cond.positive["class_labels"], batch, "class label").to(device=device, dtype=torch.long)
        bad = [int(v) for v in labels.tolist() if not 0 <= int(v) < classes]
        if bad:
            raise ValueError(f"class labels must be in 0..{classes - 1} for this model, got {sorted(set(bad))}")
        if cfg:
            if cond.negative is not None and "class_labels" in cond.negative:
                null = expand(cond.negative["class_labels"], batch, "class label").to(device=device, dtype=torch.long)
            else:
                null = torch.full((batch,), classes, dtype=torch.long, device=device)
            labels = torch.cat([labels, null])
        return Prepared({"class_labels": labels}, self.cfg_batches if cfg else ("cond",))


class PixArtFamily(Family):
    """``PixArtTransformer2DModel``: T5 text with an attention mask, resolution micro-conditions at 1024 px."""

    name = "pixart"
    timestep_per_row = True

    def matches(self, module: Any) -> bool:
        names = class_names(module)
        if "PixArtTransformer2DModel" in names:
            return True
        return "Transformer2DModel" in names and getattr(config_of(module), "norm_type", None) == "ada_norm_single"

    def prepare(self, module, cond, *, batch, cfg, device, dtype, latent_shape, scale, guidance_scale):  # type: ignore[no-untyped-def]
        import torch

        require_kind(cond, "PixArt", ("t5",))
        hidden = self.paired(cond, "encoder_hidden_states", batch, cfg, "prompt").to(device=device, dtype=dtype)
        mask = self.paired(cond, "encoder_attention_mask", batch, cfg, "prompt").to(device=device)
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        inner = unwrap_compiled(module)
        micro = getattr(inner, "use_additional_conditions", None)
        if micro is None:
            micro = config_of(module).sample_size == 128
        if micro:
            height, width = latent_shape[-2] * scale, latent_shape[-1] * scale
            rows = hidden.shape[0]
            added = {
                "resolution": torch.tensor([height, width]).repeat(rows, 1).to(device=device, dtype=dtype),
                "aspect_ratio": torch.tensor([float(height / width)]).repeat(rows, 1).to(device=device, dtype=dtype),
            }
        kwargs = {"encoder_hidden_states": hidden, "encoder_attention_mask": mask, "added_cond_kwargs": added}
        return Prepared(kwargs, self.cfg_batches if cfg else ("cond",))


class SVDFamily(Family):
    """``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion): video latents ``(B, F, C, h, w)``.

    Conditioning kind ``"svd"``: ``encoder_hidden_states`` (image embeddings ``(P, 1, D)``),
    ``image_latents`` (``(P, 1 or F, C, h, w)``, concatenated to the noisy latents along channels)
    and ``added_time_ids`` (``(P, 3)``: fps, motion bucket, noise augmentation). Without a
    negative, zeros are used for the embeddings and image latents (as diffusers does).
    """

    name = "svd"
    channel_dim = 2
    video = True

    def matches(self, module: Any) -> bool:
        return "UNetSpatioTemporalConditionModel" in class_names(module)

    def latent_channels(self, module: Any) -> int:
        return int(config_of(module).out_channels)

    def prepare(self, module, cond, *, batch, cfg, device, dtype, latent_shape, scale, guidance_scale):  # type: ignore[no-untyped-def]
        import torch

        require_kind(cond, "video UNet", ("svd",))
        hidden = self.paired(cond, "encoder_hidden_states", batch, cfg, "image", torch.zeros_like)
        frames = latent_shape[1]
        image = expand(cond.positive["image_latents"], batch, "image")
        if image.ndim == 4:
            image = image.unsqueeze(1)
        image = image.expand(-1, frames, -1, -1, -1) if image.shape[1] == 1 else image
        if cfg:
            negative = cond.negative.get("image_latents") if cond.negative is not None else None
            negative = torch.zeros_like(image) if negative is None else expand(negative, batch, "image")
            image = torch.cat([negative.expand_as(image), image])
        ids = self.paired(cond, "added_time_ids", batch, cfg, "image", lambda p: p)
        kwargs = {
            "encoder_hidden_states": hidden.to(device=device, dtype=dtype),
            "added_time_ids": ids.to(device=device, dtype=dtype),
        }
        return Prepared(kwargs, self.cfg_batches if cfg else ("cond",), concat=image.to(device=device, dtype=dtype))

    def call(self, module: Any, sample: Any, timestep: Any, kwargs: Mapping[str, Any]) -> Any:
        return module(sample, timestep, **kwargs, return_dict=False)[0]


BUILTIN_FAMILIES: tuple[type[Family], ...] = (UNetFamily, DiTFamily, PixArtFamily, SVDFamily)
"""The pack's family classes, in asking order."""


def register_denoiser_families(register: RegisterFamily) -> None:
    """Register one instance of each of :data:`BUILTIN_FAMILIES`, in order."""
    for cls in BUILTIN_FAMILIES:
        register(cls())
