"""The UNet side of DeepCache: which branches a UNet has, the partial forward through a shallow
branch on a cached deep feature, and capturing that feature during a full call."""

from __future__ import annotations

import threading
from typing import Any

from dagfusion.model import unwrap_compiled

VIDEO_UNET = "UNetSpatioTemporalConditionModel"
UNET_CLASSES = ("UNet2DConditionModel", VIDEO_UNET)


def unet_of(module: Any) -> Any:
    """The UNet behind ``module`` (looking through ``torch.compile``): a ``UNet2DConditionModel``
    (SD 1/2, SDXL) or a ``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion).

    :raises TypeError: naming the class, when ``module`` is neither.
    """
    inner = unwrap_compiled(module)
    if not {cls.__name__ for cls in type(inner).__mro__} & set(UNET_CLASSES):
        raise TypeError(
            f"DeepCache works on UNet denoisers (diffusers UNet2DConditionModel: SD 1.x/2.x, SDXL; "
            f"UNetSpatioTemporalConditionModel: Stable Video Diffusion); this model's denoiser is a "
            f"{type(inner).__name__}. For transformer denoisers (DiT, PixArt) use the DiT cache nodes of the cache "
            "pack instead"
        )
    return inner


def is_video_unet(unet: Any) -> bool:
    """Whether ``unet`` is a ``UNetSpatioTemporalConditionModel``."""
    return VIDEO_UNET in {cls.__name__ for cls in type(unwrap_compiled(unet)).__mro__}


def max_branch(unet: Any) -> int:
    """The deepest valid ``branch`` of ``unet``: ``len(up_blocks) - 1`` (then only the mid-block is skipped)."""
    return len(unet.up_blocks) - 1


def check_branch(unet: Any, branch: int) -> None:
    """:raises ValueError: naming the maximum, when ``branch`` is not a valid branch of ``unet``."""
    top = max_branch(unet)
    if not 0 <= branch <= top:
        raise ValueError(
            f"branch {branch} is out of range for this UNet: it has {top + 1} up-blocks, so branch must be "
            f"between 0 (shallowest, fastest) and {top} (skips only the mid-block)"
        )


_KNOWN_KWARGS = frozenset({
    "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask", "cross_attention_kwargs",
    "added_cond_kwargs", "down_block_additional_residuals", "mid_block_additional_residual",
    "down_intrablock_additional_residuals", "encoder_attention_mask", "return_dict",
})


def unet_partial_forward(unet: Any, sample: Any, timestep: Any, kwargs: dict[str, Any], branch: int, deep: Any) -> Any:
    """The UNet's output computed from the shallow branch ``branch`` and the cached ``deep`` feature.

    ``deep`` is the input hidden state of up-block ``len(up_blocks) - 1 - branch`` from a full
    forward. Given the ``deep`` feature of the *same* inputs, the result equals
    ``unet(sample, timestep, **kwargs).sample``. Follows the structure of diffusers'
    ``UNet2DConditionModel.forward``: the same embeddings (time, class, added SDXL text/time
    conditions, image hints), attention masks, GLIGEN, ControlNet and T2I-Adapter residuals
    (those of the shallow blocks) and upsample sizes for odd latent sizes.

    A ``UNetSpatioTemporalConditionModel`` goes through :func:`video_partial_forward`.

    :param kwargs: The keyword inputs of the UNet call (``encoder_hidden_states`` …).
    :returns: The output tensor (not a ``UNet2DConditionOutput``).
    """
    import torch

    unet = unwrap_compiled(unet)
    if is_video_unet(unet):
        return video_partial_forward(unet, sample, timestep, kwargs, branch, deep)
    unknown = sorted(set(kwargs) - _KNOWN_KWARGS)
    if unknown:
        raise TypeError(f"DeepCache's partial UNet forward does not know the input(s) {unknown}")
    encoder_hidden_states = kwargs.get("encoder_hidden_states")
    timestep_cond = kwargs.get("timestep_cond")
    attention_mask = kwargs.get("attention_mask")
    encoder_attention_mask = kwargs.get("encoder_attention_mask")
    cross_attention_kwargs = kwargs.get("cross_attention_kwargs")
    added_cond_kwargs = kwargs.get("added_cond_kwargs")
    down_residuals = kwargs.get("down_block_additional_residuals")
    mid_residual = kwargs.get("mid_block_additional_residual")
    intrablock = kwargs.get("down_intrablock_additional_residuals")

    up_blocks = unet.up_blocks
    first_up = len(up_blocks) - 1 - branch
    # Odd latent sizes: the upsamplers are told the size of the skip they meet (as in diffusers).
    factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % factor != 0 for dim in sample.shape[-2:])

    if attention_mask is not None:
        attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if encoder_attention_mask is not None:
        encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0

    # 1. embeddings, with the model's own helpers
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=kwargs.get("class_labels"))
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    if unet.config.addition_embed_type == "image_hint":
        aug_emb, hint = aug_emb
        sample = torch.cat([sample, hint], dim=1)
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )

    # 2. conv_in and the shallow down-blocks, keeping the skips the shallow up-blocks consume
    sample = unet.conv_in(sample)
    if cross_attention_kwargs is not None and cross_attention_kwargs.get("gligen") is not None:
        cross_attention_kwargs = dict(cross_attention_kwargs)
        gligen = cross_attention_kwargs.pop("gligen")
        cross_attention_kwargs["gligen"] = {"objs": unet.position_net(**gligen)}
    is_controlnet = mid_residual is not None and down_residuals is not None
    if intrablock is None and mid_residual is None and down_residuals is not None:
        intrablock = down_residuals  # diffusers' deprecated T2I-Adapter spelling
    adapter = list(intrablock) if intrablock is not None else None  # never pop the caller's list

    needed = sum(len(block.resnets) for block in up_blocks[first_up:])
    skips: tuple[Any, ...] = (sample,)
    for block in unet.down_blocks:
        if len(skips) >= needed:
            break
        if getattr(block, "has_cross_attention", False):
            extra = {"additional_residuals": adapter.pop(0)} if adapter else {}
            sample, res = block(
                hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs,
                encoder_attention_mask=encoder_attention_mask, **extra,
            )
        else:
            sample, res = block(hidden_states=sample, temb=emb)
            if adapter:
                sample += adapter.pop(0)
        skips += res
    if len(skips) < needed:  # pragma: no cover - not a UNet2DConditionModel layout
        raise ValueError(f"the down path gives {len(skips)} skip features, the up-blocks from {first_up} need {needed}")
    if is_controlnet:
        skips = tuple(s + r for s, r in zip(skips, down_residuals))
    skips = skips[:needed]

    # 3. the cached deep feature through the shallow up-blocks
    sample = deep
    upsample_size = skips[-1].shape[2:] if forward_upsample_size and first_up > 0 else None
    for index in range(first_up, len(up_blocks)):
        block = up_blocks[index]
        res = skips[-len(block.resnets):]
        skips = skips[: -len(block.resnets)]
        if index != len(up_blocks) - 1 and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(
                hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                upsample_size=upsample_size, attention_mask=attention_mask,
                encoder_attention_mask=encoder_attention_mask,
            )
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)

    # 4. output
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


_VIDEO_KWARGS = frozenset({"encoder_hidden_states", "added_time_ids", "return_dict"})


def video_partial_forward(unet: Any, sample: Any, timestep: Any, kwargs: dict[str, Any], branch: int, deep: Any) -> Any:
    """:func:`unet_partial_forward` for a ``UNetSpatioTemporalConditionModel``: video latents
    ``(B, F, C, h, w)`` in, the output ``(B, F, C_out, h, w)`` out.

    Follows diffusers' ``UNetSpatioTemporalConditionModel.forward`` for the shallow blocks: the
    timestep and added-time-id embeddings, both repeated per frame, the image embeddings repeated
    per frame, frames flattened into the batch, an all-video ``image_only_indicator`` for the
    temporal layers; the cached ``deep`` feature (frames flattened) enters up-block
    ``len(up_blocks) - 1 - branch``.
    """
    import torch

    unknown = sorted(set(kwargs) - _VIDEO_KWARGS)
    if unknown:
        raise TypeError(f"DeepCache's partial video UNet forward does not know the input(s) {unknown}")
    encoder_hidden_states = kwargs["encoder_hidden_states"]
    added_time_ids = kwargs["added_time_ids"]
    up_blocks = unet.up_blocks
    first_up = len(up_blocks) - 1 - branch
    factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % factor != 0 for dim in sample.shape[-2:])

    timesteps = timestep
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.float32, device=sample.device)
    elif timesteps.ndim == 0:
        timesteps = timesteps[None].to(sample.device)
    batch, frames = sample.shape[:2]
    emb = unet.time_embedding(unet.time_proj(timesteps.expand(batch)).to(dtype=sample.dtype))
    time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape((batch, -1)).to(emb.dtype)
    emb = emb + unet.add_embedding(time_embeds)
    hidden = sample.flatten(0, 1)
    emb = emb.repeat_interleave(frames, dim=0)
    encoder_hidden_states = encoder_hidden_states.repeat_interleave(frames, dim=0)
    indicator = torch.zeros(batch, frames, dtype=hidden.dtype, device=hidden.device)

    hidden = unet.conv_in(hidden)
    needed = sum(len(block.resnets) for block in up_blocks[first_up:])
    skips: tuple[Any, ...] = (hidden,)
    for block in unet.down_blocks:
        if len(skips) >= needed:
            break
        if getattr(block, "has_cross_attention", False):
            hidden, res = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                image_only_indicator=indicator)
        else:
            hidden, res = block(hidden_states=hidden, temb=emb, image_only_indicator=indicator)
        skips += res
    skips = skips[:needed]

    hidden = deep
    upsample_size = None
    for index in range(first_up, len(up_blocks)):
        block = up_blocks[index]
        res = skips[-len(block.resnets):]
        skips = skips[: -len(block.resnets)]
        if index != len(up_blocks) - 1 and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res,
                           encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size,
                           image_only_indicator=indicator)
        else:
            hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size,
                           image_only_indicator=indicator)
    hidden = unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))
    return hidden.reshape(batch, frames, *hidden.shape[1:])


def capture_deep_feature(unet: Any, branch: int, run: Any, transform: Any = None) -> tuple[Any, Any]:
    """``run()`` with the input of up-block ``len(up_blocks) - 1 - branch`` captured.

    Registers a forward pre-hook for the duration of ``run()`` only (removed on exit, also after
    an error) that records the block's ``hidden_states`` when called from this thread.

    :param transform: Optional ``transform(feature) -> feature`` the block computes with instead
        (CacheQuant's correction of the quantization error); the *untransformed* feature is returned.
    :returns: ``(what run() returned, the last captured feature or None)``.
    """
    unet = unwrap_compiled(unet)
    block = unet.up_blocks[len(unet.up_blocks) - 1 - branch]
    owner = threading.get_ident()
    captured: list[Any] = []

    def hook(module: Any, args: Any, kwargs: Any) -> Any:
        if threading.get_ident() == owner:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is not None:
                captured.append(hidden)
                if transform is not None:
                    if "hidden_states" in kwargs:
                        return args, {**kwargs, "hidden_states": transform(hidden)}
                    return (transform(hidden), *args[1:]), kwargs
        return None

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    return out, (captured[-1] if captured else None)
