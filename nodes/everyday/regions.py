"""Area (regional) conditioning: another prompt for one region of the picture.

``dagfusion.conditioning.Region`` adds a :class:`RegionPatch` to a model. At every denoiser call
the hook runs the call as usual, then runs the conditional half once more with the region's
conditioning, and blends the two conditional predictions with the region's mask (at latent
size) times ``strength``::

    cond = cond_main · (1 − s·m) + cond_region · s·m

The unconditional half is left as it is, so classifier-free guidance then pushes towards the main
prompt outside the region and towards the region's prompt inside it (the noise-prediction
blending of area conditioning in node-graph tools). Several Region nodes chain; each adds one
denoiser call of the conditional rows per step. A mask of zeros leaves the run unchanged; a mask
of ones with strength 1 samples the region's prompt against the main negative.

The region is a ``MASK`` (1 = the region; resized to the latents, bilinear) or, without one, a box
``x, y, width, height`` in fractions of the picture.
"""

from __future__ import annotations

from typing import Any

from dagfusion import FLOAT, Input, NodeInputError, Output, RunContext, node
from dagfusion.model import DenoiserCall, Forward, ModelPatch, SamplingRun, StepHook
from dagfusion.nodes.diffusion.types import CONDITIONING, MASK, MODEL


class RegionPatch(ModelPatch):
    """Blend a region's conditional prediction into the main one (see the module docstring).

    :param conditioning: The region's conditioning (its positive part is used).
    :param mask: ``(1, 1, H, W)`` in [0, 1] at any size, or ``None`` for the box.
    :param box: ``(x, y, width, height)`` fractions, used when ``mask`` is ``None``.
    :param strength: How much of the region's prediction replaces the main one inside it.
    """

    def __init__(self, conditioning: Any, mask: Any = None, box: tuple[float, float, float, float] = (0, 0, 1, 1),
                 strength: float = 1.0) -> None:
        from dagfusion.fingerprint import fingerprint

        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        self.conditioning = conditioning
        self.mask = None if mask is None else mask.detach().float().cpu()[:1, :1]
        self.box = tuple(float(v) for v in box)
        self.strength = float(strength)
        self.key = "dagfusion.everyday.region:" + str(fingerprint(
            {"conditioning": conditioning, "mask": self.mask, "box": list(self.box), "strength": self.strength}
        ))

    def latent_mask(self, height: int, width: int) -> Any:
        """The region at latent size ``(1, 1, height, width)``."""
        import torch

        if self.mask is not None:
            return torch.nn.functional.interpolate(self.mask, size=(height, width), mode="bilinear", align_corners=False)
        x, y, w, h = self.box
        mask = torch.zeros(1, 1, height, width)
        mask[..., round(y * height):round((y + h) * height), round(x * width):round((x + w) * width)] = 1.0
        return mask

    def begin(self, run: SamplingRun) -> RegionHook:
        from dagfusion.model import family_for

        if len(run.shape) != 4:
            raise ValueError(f"regional conditioning works on image latents (B, C, h, w), not {tuple(run.shape)}")
        family = family_for(run.module)
        rows = int(run.shape[0])
        prepared = family.prepare(
            run.module, self.conditioning, batch=rows, cfg=False, device=run.device, dtype=run.dtype,
            latent_shape=run.shape, scale=int(getattr(run.handle, "vae_scale_factor", 8)), guidance_scale=1.0,
        )
        mask = (self.latent_mask(int(run.shape[-2]), int(run.shape[-1])) * self.strength).to(run.device, run.dtype)
        return RegionHook(prepared.kwargs, mask)


class RegionHook(StepHook):
    """Per-run state of a :class:`RegionPatch`: the region's bound inputs and its latent mask."""

    def __init__(self, kwargs: dict[str, Any], mask: Any) -> None:
        self._kwargs = kwargs
        self._mask = mask
        self._calls = 0

    def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
        out = forward(call)
        if "cond" not in call.batches:
            return out
        cond_call = call.select("cond")
        region = forward(cond_call.replace(kwargs={**cond_call.kwargs, **self._kwargs}))
        self._calls += 1
        halves = call.split(out) if len(call.batches) > 1 else {"cond": out}
        mask = self._mask
        halves["cond"] = halves["cond"] * (1 - mask) + region * mask
        return call.merge(halves) if len(call.batches) > 1 else halves["cond"]

    def end(self) -> dict[str, Any]:
        return {"region_calls": self._calls}


def _example() -> dict[str, Any]:
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.testing import models as tiny

    parts = tiny.sd_handles()
    return {"model": parts["model"], "conditioning": encode_prompt(parts["clip"], "a blue square", ""),
            "x": 0.5, "y": 0.0, "width": 0.5, "height": 1.0, "strength": 1.0}


@node(
    "dagfusion.conditioning.Region",
    version="1.0.0",
    category="conditioning",
    inputs=[
        Input("model", MODEL, link_only=True),
        Input("conditioning", CONDITIONING, link_only=True, description="What to draw in the region."),
        Input("mask", MASK, optional=True, link_only=True, description="The region (1 = inside); without it, the box below."),
        Input("x", FLOAT, 0.0, min=0.0, max=1.0, description="Box left, as a fraction of the width."),
        Input("y", FLOAT, 0.0, min=0.0, max=1.0, description="Box top, as a fraction of the height."),
        Input("width", FLOAT, 1.0, min=0.0, max=1.0, description="Box width, as a fraction."),
        Input("height", FLOAT, 1.0, min=0.0, max=1.0, description="Box height, as a fraction."),
        Input("strength", FLOAT, 1.0, min=0.0, max=1.0, description="How much the region's prompt replaces the main one inside it."),
    ],
    outputs=[Output("model", MODEL, "The model with the region applied while sampling (chain for several).")],
    examples=[_example],
)
def region_node(ctx: RunContext, model: Any, conditioning: Any, mask: Any, x: float, y: float, width: float,
                height: float, strength: float) -> Any:
    """Condition one region of the picture on another prompt (area conditioning)."""
    if mask is not None and (mask.ndim != 4 or mask.shape[1] != 1):
        raise NodeInputError("mask", f"expected a MASK (B, 1, H, W), got shape {tuple(mask.shape)}")
    if mask is None and (width <= 0 or height <= 0):
        raise NodeInputError("width", f"expected a box with area, got width {width} and height {height}")
    return model.with_patch(RegionPatch(conditioning, mask, (x, y, width, height), strength))


NODES = (region_node,)
"""The regional conditioning node."""
