"""The sampler family of the joint RGB + depth + normal denoiser (importable without torch, so the
pack can register it when the registry is built)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagfusion.model import Family, Prepared, class_names, expand, unwrap_compiled


class StructuralFamily(Family):
    """How the shared sampler and training loop call a
    :class:`~dagfusion.nodes.structure.structural_model.StructuralUNet`.

    The latents are the stacked targets (``T·C`` channels); the text conditioning is prepared as
    for the UNet it was built from (SD 1/2 CLIP states; SDXL added conditions pass through). A
    ``layout`` tensor in the conditioning (``positive["layout"]``, rows expanded like the
    prompts) is passed as the layout raster to both guidance halves — the negative's own
    ``layout`` when it has one — so classifier-free guidance contrasts the text only.
    """

    name = "structural"

    def matches(self, module: Any) -> bool:
        return "StructuralUNet" in class_names(module)

    def latent_channels(self, module: Any) -> int:
        return int(unwrap_compiled(module).config.in_channels)

    def supports_cfg(self, module: Any) -> bool:
        return unwrap_compiled(module).trunk.config.time_cond_proj_dim is None

    def prepare(self, module, cond, *, batch, cfg, device, dtype, latent_shape, scale, guidance_scale):  # type: ignore[no-untyped-def]
        import torch

        from dagfusion.nodes.diffusion.families import UNetFamily

        inner = unwrap_compiled(module)
        text_only = _WithoutLayout(cond)
        prepared = UNetFamily().prepare(
            inner.trunk, text_only, batch=batch, cfg=cfg, device=device, dtype=dtype, latent_shape=latent_shape,
            scale=scale, guidance_scale=guidance_scale,
        )
        kwargs = dict(prepared.kwargs)
        layout = cond.positive.get("layout")
        if layout is not None:
            if inner.layout_channels == 0:
                raise ValueError("the conditioning carries a layout but this structural model has no layout conditioning")
            positive = expand(layout, batch, "layout raster")
            if cfg:
                negative = cond.negative.get("layout") if cond.negative is not None else None
                negative = positive if negative is None else expand(negative, batch, "layout raster")
                positive = torch.cat([negative, positive])
            kwargs["layout"] = positive.to(device=device, dtype=dtype)
        return Prepared(kwargs, prepared.batches, prepared.concat)

    def call(self, module: Any, sample: Any, timestep: Any, kwargs: Mapping[str, Any]) -> Any:
        return module(sample, timestep, **kwargs, return_dict=False)[0]


class _WithoutLayout:
    """A conditioning seen without its ``layout`` entries (the text part, for the UNet family)."""

    def __init__(self, cond: Any) -> None:
        self.kind = cond.kind
        self.positive = {k: v for k, v in cond.positive.items() if k != "layout"}
        self.negative = None if cond.negative is None else {k: v for k, v in cond.negative.items() if k != "layout"}
        self.meta = cond.meta


def register_denoiser_families(register: Any) -> None:
    """The structure pack's denoiser family: ``register(StructuralFamily())``."""
    register(StructuralFamily())
