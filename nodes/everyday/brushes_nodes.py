"""The Layered Diffusion Brushes nodes: ``dagfusion.edit.BrushBase`` records a generation,
``dagfusion.edit.BrushLayer`` edits a masked region of it from an intermediate step (stackable).

See :mod:`~dagfusion.nodes.everyday.brushes` for the method. The engine caches node outputs, so
a workflow that changes only a layer's inputs re-runs that layer (and the layers after it) from
the recorded base instead of generating it again.
"""

from __future__ import annotations

from typing import Any

from dagfusion import DICT, FLOAT, INT, SEED, STRING, Input, Output, RunContext, node
from dagfusion.errors import NodeInputError
from dagfusion.nodes.diffusion.schedulers import SAMPLER_CHOICES
from dagfusion.nodes.diffusion.types import CONDITIONING, LATENT, MASK, MODEL
from dagfusion.nodes.everyday.brushes import (
    BRUSH_BASE,
    BrushState,
    brush_base,
    brush_layer,
)
from dagfusion.nodes.everyday.inpaint import LATENT_RESIZE, fit_mask, to_latent_size


def _base_example() -> dict[str, Any]:
    from dagfusion.testing.models import sd_handles

    parts = sd_handles()
    return {"model": parts["model"], "conditioning": parts["conditioning"], "latent": parts["latent"], "seed": 3,
            "steps": 2, "guidance_scale": 4.0, "sampler": "euler"}


def _layer_example() -> dict[str, Any]:
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.everyday.inpaint import rectangle_mask
    from dagfusion.testing.models import sd_handles

    parts = sd_handles()
    state, _ = brush_base(parts["model"], parts["conditioning"], parts["latent"], steps=2, guidance_scale=4.0,
                          sampler="euler", seed=3)
    return {"model": parts["model"], "brush": state, "mask": rectangle_mask(32, 32, 0, 0, 16, 32),
            "conditioning": encode_prompt(parts["clip"], "a small blue bird", ""), "strength": 0.5, "seed": 7,
            "guidance_scale": None, "latent_resize": "nearest"}


@node(
    "dagfusion.edit.BrushBase",
    version="1.0.0",
    category="edit",
    inputs=[
        Input("model", MODEL, link_only=True, description="The denoiser handle (weight patches are fine; step hooks are refused)."),
        Input("conditioning", CONDITIONING, link_only=True, description="The base picture's prompt."),
        Input("latent", LATENT, link_only=True, description="Only its shape counts (an empty latent)."),
        Input("sampler", STRING, "default", choices=SAMPLER_CHOICES,
              description="Sampler; it must be resumable at any step (not PNDM or second-order ones)."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed of the noise (a CPU generator: same on every machine)."),
        Input("steps", INT, 25, min=1, max=1000, description="Number of denoising steps."),
        Input("guidance_scale", FLOAT, 7.5, min=0.0, max=100.0,
              description="Classifier-free guidance scale; 1 or less disables guidance."),
    ],
    outputs=[
        Output("brush", BRUSH_BASE, "The generation with the latents before every step, for brush layers."),
        Output("latent", LATENT, "The final latents (the same as dagfusion.sampling.Sample's)."),
        Output("report", DICT, "denoiser_calls, steps, sampler, scheduler."),
    ],
    examples=[_base_example],
    ui={"color": "#7e57c2"},
)
def brush_base_node(ctx: RunContext, model: Any, conditioning: Any, latent: Any, sampler: str, seed: int, steps: int,
                    guidance_scale: float) -> dict[str, Any]:
    """Generate a picture for Layered Diffusion Brushes, recording the latents of every step.

    The final latents are those of dagfusion.sampling.Sample with the same settings; the recorded
    steps let brush layers edit regions from any intermediate step without generating again.
    """
    from dagfusion.nodes.diffusion.data import Latent

    if latent.samples.ndim != 4:
        raise NodeInputError("latent", f"expected image latents (B, C, h, w), got shape {tuple(latent.samples.shape)}")
    try:
        state, report = brush_base(model, conditioning, latent, steps=steps, guidance_scale=guidance_scale,
                                   sampler=sampler, seed=seed, ctx=ctx)
    except ValueError as error:
        name = "sampler" if "scheduler" in str(error) else "model" if "patches" in str(error) else "conditioning"
        raise NodeInputError(name, str(error)) from error
    return {"brush": state, "latent": Latent(state.final, state.lineage), "report": report}


@node(
    "dagfusion.edit.BrushLayer",
    version="1.0.0",
    category="edit",
    inputs=[
        Input("model", MODEL, link_only=True, description="The base generation's model."),
        Input("brush", BRUSH_BASE, link_only=True,
              description="A BrushBase, or the previous BrushLayer (layers stack)."),
        Input("mask", MASK, link_only=True,
              description="1 = the region to edit; the picture's pixel size (a same-aspect mask is resized with a "
                          "warning, another aspect is refused)."),
        Input("conditioning", CONDITIONING, link_only=True, description="The edit's prompt."),
        Input("strength", FLOAT, 0.5, min=0.0, max=1.0,
              description="Fraction of the schedule re-rendered: the edit starts at step steps - round(strength * "
                          "steps); 1 redraws the region from noise, 0 changes nothing."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed of the fresh noise put into the region."),
        Input("guidance_scale", FLOAT, optional=True, min=0.0, max=100.0,
              description="Guidance of the edit (unset: the base generation's)."),
        Input("latent_resize", STRING, "nearest", choices=LATENT_RESIZE,
              description="How the mask shrinks to latent size: nearest (hard edges) or area (soft edges blend)."),
    ],
    outputs=[
        Output("brush", BRUSH_BASE, "The edited generation (link it to the next layer)."),
        Output("latent", LATENT, "The edited final latents (equal to the input's outside the mask)."),
        Output("report", DICT, "denoiser_calls, start_step, rerendered_steps, masked_fraction, layers."),
    ],
    examples=[_layer_example],
    ui={"color": "#7e57c2"},
)
def brush_layer_node(ctx: RunContext, model: Any, brush: BrushState, mask: Any, conditioning: Any, strength: float,
                     seed: int, guidance_scale: float | None, latent_resize: str) -> dict[str, Any]:
    """Edit a masked region of a recorded generation with a new prompt, re-rendering only the last
    part of the schedule (Layered Diffusion Brushes).

    The region's latent at the start step is re-noised with the layer's seed; after every step
    the latents outside the mask are reset to the input's recorded ones, so the picture outside
    the mask is unchanged. Costs round(strength * steps) denoiser calls.
    """
    from dagfusion.nodes.diffusion.data import Latent

    shape = brush.shape
    known, given = brush.model, model.info.get("fingerprint")
    if known is not None and given is not None and str(given) != known:
        raise NodeInputError("model", f"expected the model the brush base was generated with (fingerprint {known}), "
                                      f"got another one ({given}); the recorded latents only fit their own model")
    h, w = int(shape[-2]), int(shape[-1])
    scale = int(model.vae_scale_factor or 1)
    pixels = fit_mask(mask, h * scale, w * scale, ctx.logger if ctx is not None else None)
    if pixels.shape[0] not in (1, shape[0]):
        raise NodeInputError("mask", f"expected 1 or {shape[0]} masks (one per picture), got {pixels.shape[0]}")
    small = to_latent_size(pixels, h, w, latent_resize)
    try:
        state, report = brush_layer(model, brush, conditioning, small, strength=strength, seed=seed,
                                    guidance_scale=guidance_scale, ctx=ctx)
    except ValueError as error:
        name = "model" if "patches" in str(error) else "conditioning"
        raise NodeInputError(name, str(error)) from error
    lineage = {**dict(state.lineage), "brush_layers": [dict(layer) for layer in state.layers]}
    return {"brush": state, "latent": Latent(state.final, lineage), "report": report}


NODES = (brush_base_node, brush_layer_node)
"""The brush nodes, in palette order."""
