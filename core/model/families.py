"""Model families: how the sampler calls each kind of denoiser.

A :class:`Family` knows, for one kind of denoiser module, the latent shape it works on, how to
turn a :class:`~dagfusion.nodes.diffusion.data.Conditioning` into the module's keyword inputs
(batched for classifier-free guidance), how the timestep is passed and how the output is
combined. The sampler loop itself is family-agnostic.

Built in: ``unet`` (``UNet2DConditionModel``: SD 1/2, SDXL with added conditions, LCM-style
guidance embedding), ``dit`` (``DiTTransformer2DModel``), ``pixart`` (``PixArtTransformer2DModel``)
and ``svd`` (``UNetSpatioTemporalConditionModel``, video). Other packs add families (flow-matching
transformers, say) with :func:`register_family`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagfusion.nodes.diffusion.data import Conditioning


def config_of(module: Any) -> Any:
    """The diffusers config of ``module`` (looking through ``torch.compile`` wrappers)."""
    inner = getattr(module, "_orig_mod", module)
    config = getattr(inner, "config", None)
    if config is None:
        raise TypeError(f"expected a diffusers model with a config, got {type(module).__name__}")
    return config


def class_names(module: Any) -> set[str]:
    inner = getattr(module, "_orig_mod", module)
    return {cls.__name__ for cls in type(inner).__mro__}


def expand(tensor: Any, batch: int, what: str) -> Any:
    """Repeat each of a conditioning's ``P`` rows ``batch // P`` times (``[p0, p0, p1, p1]``)."""
    rows = int(tensor.shape[0])
    if rows == batch:
        return tensor
    if rows == 0 or batch % rows:
        raise ValueError(
            f"the conditioning holds {rows} {what}(s) but the latent batch is {batch}; "
            f"the batch must be a multiple of {rows}"
        )
    return tensor.repeat_interleave(batch // rows, dim=0)


def rescale_guidance(guided: Any, cond: Any, factor: float) -> Any:
    """Rescale a CFG prediction towards the conditional one's standard deviation (Lin et al. 2023, 3.4)."""
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return factor * rescaled + (1 - factor) * guided


class Prepared:
    """What :meth:`Family.prepare` returns: keyword inputs plus optional channel-concatenated latents."""

    __slots__ = ("kwargs", "concat", "batches")

    def __init__(self, kwargs: dict[str, Any], batches: tuple[str, ...], concat: Any = None) -> None:
        self.kwargs = kwargs
        self.batches = batches
        self.concat = concat


class Family:
    """Base class: an image denoiser conditioned on ``encoder_hidden_states``."""

    name = "base"
    #: Batch order under classifier-free guidance.
    cfg_batches: tuple[str, ...] = ("uncond", "cond")
    #: Expand the timestep to one value per batch row (transformers) or pass it as a scalar (UNets).
    timestep_per_row = False
    #: Dimension of the channels in the latent tensor (2 for video ``(B, F, C, h, w)``).
    channel_dim = 1
    video = False

    def matches(self, module: Any) -> bool:
        raise NotImplementedError

    def latent_channels(self, module: Any) -> int:
        return int(config_of(module).in_channels)

    def latent_shape(self, module: Any, batch: int, height: int, width: int, scale: int, frames: int = 1) -> tuple[int, ...]:
        """Shape of the latents for images of ``height`` x ``width`` pixels."""
        if height % scale or width % scale:
            raise ValueError(f"width and height must be multiples of {scale} for this model, got {width}x{height}")
        shape = (batch, self.latent_channels(module), height // scale, width // scale)
        if self.video:
            return (batch, frames, *shape[1:])
        return shape

    def supports_cfg(self, module: Any) -> bool:
        return True

    def prepare(
        self,
        module: Any,
        cond: Conditioning,
        *,
        batch: int,
        cfg: bool,
        device: Any,
        dtype: Any,
        latent_shape: tuple[int, ...],
        scale: int,
        guidance_scale: float,
    ) -> Prepared:
        raise NotImplementedError

    def timestep(self, t: Any, rows: int, device: Any) -> Any:
        if not self.timestep_per_row:
            return t
        if t.ndim == 0:
            t = t[None].to(device)
        return t.expand(rows)

    def combine(self, out: Any, module: Any, cfg: bool, batches: tuple[str, ...], scale: float, rescale: float) -> Any:
        """The guided prediction the scheduler steps with (learned variance dropped)."""
        if cfg:
            first, second = out.chunk(2)
            cond, uncond = (second, first) if batches[0] == "uncond" else (first, second)
            out = uncond + scale * (cond - uncond)
            if rescale > 0:
                out = rescale_guidance(out, cond, rescale)
        return self.drop_variance(out, module)

    def drop_variance(self, out: Any, module: Any) -> Any:
        channels = self.latent_channels(module)
        if out.shape[self.channel_dim] == 2 * channels:
            return out.narrow(self.channel_dim, 0, channels)
        return out

    def call(self, module: Any, sample: Any, timestep: Any, kwargs: Mapping[str, Any]) -> Any:
        return module(sample, timestep=timestep, **kwargs, return_dict=False)[0]

    @staticmethod
    def _pair(cond: Conditioning, key: str, batch: int, cfg: bool, what: str, negative_default: Any = None) -> Any:
        import torch

        if key not in cond.positive:
            raise ValueError(f"{cond.kind} conditioning has no {key!r}; it has {sorted(cond.positive)}")
        positive = expand(cond.positive[key], batch, what)
        if not cfg:
            return positive
        if cond.negative is not None and key in cond.negative:
            negative = expand(cond.negative[key], batch, what)
        elif negative_default is not None:
            negative = negative_default(positive)
        else:
            raise ValueError(
                f"guidance_scale > 1 needs a negative {key!r} but the {cond.kind} conditioning has none; "
                "encode a negative prompt or set guidance_scale to 1"
            )
        return torch.cat([negative, positive])


def _requires_kind(cond: Conditioning, family: str, kinds: tuple[str, ...]) -> None:
    if cond.kind not in kinds:
        raise ValueError(f"a {family} model needs {' or '.join(kinds)} conditioning, got {cond.kind!r} conditioning")


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
        _requires_kind(cond, "SDXL UNet" if sdxl else "UNet", ("sdxl",) if sdxl else ("clip",))
        hidden = self._pair(cond, "encoder_hidden_states", batch, cfg, "prompt")
        kwargs: dict[str, Any] = {"encoder_hidden_states": hidden.to(device=device, dtype=dtype)}
        if sdxl:
            pooled = self._pair(cond, "text_embeds", batch, cfg, "prompt").to(device=device, dtype=dtype)
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

        _requires_kind(cond, "DiT", ("class",))
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

        _requires_kind(cond, "PixArt", ("t5",))
        hidden = self._pair(cond, "encoder_hidden_states", batch, cfg, "prompt").to(device=device, dtype=dtype)
        mask = self._pair(cond, "encoder_attention_mask", batch, cfg, "prompt").to(device=device)
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        inner = getattr(module, "_orig_mod", module)
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

        _requires_kind(cond, "video UNet", ("svd",))
        hidden = self._pair(cond, "encoder_hidden_states", batch, cfg, "image", torch.zeros_like)
        frames = latent_shape[1]
        image = expand(cond.positive["image_latents"], batch, "image")
        if image.ndim == 4:
            image = image.unsqueeze(1)
        image = image.expand(-1, frames, -1, -1, -1) if image.shape[1] == 1 else image
        if cfg:
            negative = cond.negative.get("image_latents") if cond.negative is not None else None
            negative = torch.zeros_like(image) if negative is None else expand(negative, batch, "image")
            image = torch.cat([negative.expand_as(image), image])
        ids = self._pair(cond, "added_time_ids", batch, cfg, "image", lambda p: p)
        kwargs = {
            "encoder_hidden_states": hidden.to(device=device, dtype=dtype),
            "added_time_ids": ids.to(device=device, dtype=dtype),
        }
        return Prepared(kwargs, self.cfg_batches if cfg else ("cond",), concat=image.to(device=device, dtype=dtype))

    def call(self, module: Any, sample: Any, timestep: Any, kwargs: Mapping[str, Any]) -> Any:
        return module(sample, timestep, **kwargs, return_dict=False)[0]


FAMILIES: list[Family] = [UNetFamily(), DiTFamily(), PixArtFamily(), SVDFamily()]
"""Known families, asked in order; the first whose ``matches`` is true handles a module."""


def register_family(family: Family, *, first: bool = True) -> None:
    """Teach the sampler a new kind of denoiser (``first``: asked before the built-in ones)."""
    FAMILIES.insert(0, family) if first else FAMILIES.append(family)


def family_for(module: Any) -> Family:
    """The family that handles ``module``.

    :raises TypeError: no family knows this kind of module.
    """
    for family in FAMILIES:
        if family.matches(module):
            return family
    known = ", ".join(f.name for f in FAMILIES)
    raise TypeError(
        f"no sampler family handles a {type(getattr(module, '_orig_mod', module)).__name__} "
        f"(known families: {known}); register one with dagfusion.nodes.diffusion.denoisers.register_family"
    )
