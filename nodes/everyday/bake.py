"""Baking: a model whose patches only change weights, as a plain model with those weights.

``dagfusion.models.Bake`` turns a patched model (a merge, a fused LoRA, any patch that swaps
parameters while the model runs) into an unpatched handle over a private copy of the denoiser
holding the patched weights, so it can be exported (``dagfusion.train.Export`` writes no
patches) or used where patches are not wanted. The shared weights are never written.

Only patches whose whole effect is on the parameters can be baked. The node enters every patch's
``apply`` on the shared module, reads the parameters and buffers as the patched model computes
with them, and checks that nothing else changed: no forward hook was added, no submodule was
replaced (a LoRA side branch, a quantized layer), and no patch has a per-run step hook (caches,
schedules). Anything else is refused, naming the patch.
"""

from __future__ import annotations

import copy
from typing import Any

from dagfusion import STRING, Input, NodeInputError, Output, RunContext, node
from dagfusion.model import ModelHandle, ModelPatch, StaticRef, apply_patches, unwrap_compiled
from dagfusion.nodes.diffusion.types import MODEL


def _structure(module: Any) -> list[tuple[str, str, int, int, int]]:
    """Every submodule's name, class and hook counts (forward, pre-forward, full backward)."""
    return [
        (name, type(sub).__name__, len(sub._forward_hooks), len(sub._forward_pre_hooks), len(sub._backward_hooks))
        for name, sub in module.named_modules()
    ]


def baked_state(model: ModelHandle) -> dict[str, Any]:
    """The denoiser's state dict as ``model``'s patches make it (copies; see the module docstring).

    :raises ValueError: a patch has a step hook, or changes more than the parameters (naming it).
    """
    hooked = [type(p).__name__ for p in model.patches
              if getattr(type(p), "begin", ModelPatch.begin) is not ModelPatch.begin]
    if hooked:
        raise ValueError(
            f"the model carries per-run step hooks ({', '.join(hooked)}: caches or schedules), which are not weights; "
            "bake the model before adding them"
        )
    module = unwrap_compiled(model.denoiser)
    before = _structure(module)
    with apply_patches(model.patches, module):
        after = _structure(module)
        state = {name: value.detach().clone() for name, value in module.state_dict().items()}
    if after != before:
        changed = sorted({a[0] or "(root)" for a, b in zip(after, before) if a != b} | ({"(submodules)"} if len(after) != len(before) else set()))
        raise ValueError(
            f"the patches ({model._patch_names()}) change more than the weights while the model runs (hooks or "
            f"replaced layers at {', '.join(changed[:4])}{' …' if len(changed) > 4 else ''}); only weight patches "
            "(merges, fused LoRAs) can be baked — apply a LoRA with mode 'fuse' to bake it"
        )
    return state


def bake(model: ModelHandle) -> ModelHandle:
    """An unpatched handle over a private copy of the denoiser with the patched weights."""
    state = baked_state(model)
    module = copy.deepcopy(unwrap_compiled(model.denoiser))
    module.load_state_dict(state)
    module.eval()
    patches = [type(p).__name__ for p in model.patches]
    info = {**dict(model.info), "source": f"baked {model.info.get('source', '?')} ({', '.join(patches) or 'no patches'})"}
    fingerprint = f"baked:{model.__dagfusion_fingerprint__()}"
    baked = ModelHandle(StaticRef(module, fingerprint), scheduler=model.scheduler, info=info, offload=model.offload)
    return baked.with_preview_vae(getattr(model, "preview_vae", None))


def _example() -> dict[str, Any]:
    from dagfusion.nodes.everyday.merge import merged
    from dagfusion.testing import models as tiny

    model = tiny.sd_handles()["model"]
    other = model.with_denoiser(copy.deepcopy(model.denoiser))
    for p in other.denoiser.parameters():
        p.data.mul_(0.5)
    return {"model": merged(model, other, 0.25)}


@node(
    "dagfusion.models.Bake",
    version="1.0.0",
    category="models",
    inputs=[Input("model", MODEL, link_only=True, description="A model whose patches only change weights (merges, fused LoRAs).")],
    outputs=[
        Output("model", MODEL, "The same model without patches: a private copy holding the patched weights."),
        Output("baked", STRING, "Which patches were baked."),
    ],
    examples=[_example],
)
def bake_node(ctx: RunContext, model: ModelHandle) -> dict[str, Any]:
    """Bake weight patches (a merge, a fused LoRA) into a private copy, e.g. to export the merged model."""
    if not model.patches:
        return {"model": model, "baked": ""}
    try:
        out = bake(model)
    except ValueError as error:
        raise NodeInputError("model", str(error)) from None
    return {"model": out, "baked": ", ".join(type(p).__name__ for p in model.patches)}


NODES = (bake_node,)
"""The baking node."""
