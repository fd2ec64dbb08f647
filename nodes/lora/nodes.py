"""The nodes of the LoRA pack: Load, Apply, Trainable, Extract and Save."""

from __future__ import annotations

from typing import Any

from dagfusion import (
    BOOLEAN,
    DICT,
    FLOAT,
    INT,
    PATH,
    SEED,
    STRING,
    Input,
    NodeInputError,
    Output,
    RunContext,
    node,
)
from dagfusion.nodes.diffusion.types import CLIP, MODEL
from dagfusion.nodes.lora.types import LORA

_COLOR = "#f06292"
DEFAULT_TARGETS = "to_q, to_k, to_v, to_out.0"


def _tiny_lora(folder: Any | None = None) -> Any:
    """A rank-2 LoRA over the tiny SD UNet's and CLIP's attention (node examples)."""
    import torch
    from dagfusion.nodes.lora import attach, layouts
    from dagfusion.nodes.lora.patch import TrainableLoraPatch, new_layers
    from dagfusion.testing import models as tiny

    parts = tiny.sd_handles()
    unet = parts["model"].denoiser
    names = [n for n, _ in unet.named_modules() if n.endswith(("attn2.to_q", "attn2.to_v"))]
    layers = new_layers(unet, names, rank=2, alpha=2.0, seed=0)
    for layer in layers.values():
        layer.up.data.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
    weights = attach.extract(parts["model"].with_patch(TrainableLoraPatch(layers)), None)
    if folder is None:
        return weights
    return layouts.save(weights, folder / "tiny-lora.safetensors")


# --- Load ---------------------------------------------------------------------------------------


def _load_example(folder: Any) -> dict[str, Any]:
    return {"path": str(_tiny_lora(folder))}


@node(
    "dagfusion.lora.Load",
    version="1.0.0",
    category="lora",
    inputs=[Input("path", PATH, description="A LoRA .safetensors file (diffusers/peft or kohya keys), under the "
                                            "allowed read folders.")],
    outputs=[
        Output("lora", LORA, "The LoRA's low-rank weights per component and layer, with their alphas."),
        Output("report", DICT, "Layout, layers per component, ranks, alphas and the content digest."),
    ],
    examples=[_load_example],
    ui={"color": _COLOR},
)
def load_lora(ctx: RunContext, path: str) -> dict[str, Any]:
    """Read a LoRA file: diffusers/peft keys (unet./transformer./text_encoder. … lora_A/lora_B, with
    diffusers' alpha metadata) or kohya keys (lora_unet_/lora_te_/lora_te1_/lora_te2_ …
    lora_down/lora_up/alpha). Only safetensors is read. Layer names are matched to a model by
    dagfusion.lora.Apply.
    """
    from dagfusion.nodes.lora import layouts

    file = ctx.settings.check_tree_readable(ctx.input_path(path))
    try:
        weights = layouts.load(file)
    except ValueError as exc:
        raise NodeInputError("path", str(exc)) from None
    return {"lora": weights, "report": {**weights.summary(), "file": file.name}}


# --- Apply --------------------------------------------------------------------------------------


def _apply_example(fuse: bool) -> Any:
    def make() -> dict[str, Any]:
        from dagfusion.testing import models as tiny

        parts = tiny.sd_handles()
        return {"model": parts["model"], "clip": parts["clip"], "lora": _tiny_lora(), "strength_model": 0.8,
                "fuse": fuse}

    return make


@node(
    "dagfusion.lora.Apply",
    version="1.0.0",
    category="lora",
    inputs=[
        Input("model", MODEL, link_only=True, description="The denoiser the LoRA's unet/transformer layers change."),
        Input("clip", CLIP, link_only=True, description="The text encoder(s) the LoRA's text-encoder layers change."),
        Input("lora", LORA, link_only=True, description="A LoRA from dagfusion.lora.Load or dagfusion.lora.Extract."),
        Input("strength_model", FLOAT, 1.0, min=-10.0, max=10.0, description="Multiplies the denoiser update (0: unchanged)."),
        Input("strength_clip", FLOAT, 1.0, min=-10.0, max=10.0, description="Multiplies the text-encoder update (0: unchanged)."),
        Input("fuse", BOOLEAN, False,
              description="Fuse into private copies of the touched weights while the model runs (faster per step) "
                          "instead of a side branch; a quantized model always gets the side branch."),
    ],
    outputs=[
        Output("model", MODEL, "The model with the LoRA while sampling (shared weights untouched)."),
        Output("clip", CLIP, "The text encoder(s) with the LoRA while encoding."),
    ],
    examples=[_apply_example(False), _apply_example(True)],
    ui={"color": _COLOR},
)
def apply_lora(
    ctx: RunContext, model: Any, clip: Any, lora: Any, strength_model: float, strength_clip: float, fuse: bool
) -> dict[str, Any]:
    """Apply a LoRA to a model and its text encoders with separate strengths; chain several Apply
    nodes to stack LoRAs. Unfused, each changed layer gets a low-rank side branch (no weight is
    copied; works with caches and quantized models); fused, the changed layers' weights are
    replaced by private copies while the model runs. A LoRA for another architecture is refused;
    layers that match nothing are reported as a warning.
    """
    import logging

    from dagfusion.nodes.lora import attach

    logger = getattr(ctx, "logger", None) or logging.getLogger("dagfusion.node")
    return {
        "model": attach.on_model(model, lora, strength_model, fuse, logger),
        "clip": attach.on_clip(clip, lora, strength_clip, fuse, logger),
    }


# --- Trainable ----------------------------------------------------------------------------------


def _trainable_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.sd_handles()["model"], "rank": 2, "alpha": 2.0}


def _pattern_matches(name: str, pattern: str) -> bool:
    import fnmatch

    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


@node(
    "dagfusion.lora.Trainable",
    version="1.0.0",
    category="lora",
    inputs=[
        Input("model", MODEL, link_only=True, description="The denoiser to adapt."),
        Input("rank", INT, 4, min=1, max=1024, description="The LoRA rank."),
        Input("alpha", FLOAT, 4.0, exclusive_min=0.0, max=65536.0, description="The update is alpha / rank * up @ down."),
        Input("targets", STRING, DEFAULT_TARGETS,
              description="Comma-separated module names or suffixes (as peft's target_modules) or glob patterns; "
                          "Linear and Conv2d layers only."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seed of the down projections' initialisation."),
    ],
    outputs=[Output("model", MODEL, "The model with a fresh, zero-effect LoRA that dagfusion.train.Train "
                                    "trains with trainable: patches.")],
    examples=[_trainable_example],
    ui={"color": _COLOR},
)
def trainable_lora(ctx: RunContext, model: Any, rank: int, alpha: float, targets: str, seed: int) -> Any:
    """Add a new LoRA adapter to a denoiser for training: down projections initialised as peft does,
    up projections zero (the model starts unchanged). Train it with dagfusion.train.Train
    (trainable: patches), then save it with dagfusion.lora.Extract and dagfusion.lora.Save.
    """
    import torch
    from dagfusion.model import unwrap_compiled
    from dagfusion.nodes.lora.patch import TrainableLoraPatch, new_layers
    from dagfusion.nodes.training.params import patterns

    globs = patterns(targets)
    if not globs:
        raise NodeInputError("targets", "expected module names or patterns such as 'to_q, to_v', got nothing")
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    modules = unwrap_compiled(model.denoiser).named_modules()
    names = [n for n, m in modules if isinstance(m, kinds) and any(_pattern_matches(n, g) for g in globs)]
    if not names:
        raise NodeInputError("targets", f"expected patterns matching Linear/Conv2d modules, got {globs} which match none")
    return model.with_patch(TrainableLoraPatch(new_layers(model.denoiser, names, rank, alpha, seed)))


# --- Extract ------------------------------------------------------------------------------------


def _extract_example() -> dict[str, Any]:
    from dagfusion.nodes.lora.patch import TrainableLoraPatch, new_layers
    from dagfusion.testing import models as tiny

    parts = tiny.sd_handles()
    unet = parts["model"].denoiser
    names = [n for n, _ in unet.named_modules() if n.endswith("attn1.to_k")]
    return {"model": parts["model"].with_patch(TrainableLoraPatch(new_layers(unet, names, 2, 1.0, 0)))}


@node(
    "dagfusion.lora.Extract",
    version="1.0.0",
    category="lora",
    inputs=[
        Input("model", MODEL, link_only=True, description="A model carrying LoRA patches (applied or trained)."),
        Input("clip", CLIP, link_only=True, optional=True, description="Text encoder(s) carrying LoRA patches, if any."),
    ],
    outputs=[Output("lora", LORA, "The handles' LoRAs as one (strengths folded in; stacked LoRAs concatenated).")],
    examples=[_extract_example],
    ui={"color": _COLOR},
)
def extract_lora(ctx: RunContext, model: Any, clip: Any | None) -> Any:
    """Collect the LoRA patches of a model (and text encoders) into one LoRA: a trained adapter
    from dagfusion.lora.Trainable, or LoRAs applied with dagfusion.lora.Apply. One LoRA per layer
    keeps its tensors (the strength goes into alpha); several on one layer are concatenated along
    the rank, which reproduces their sum exactly.
    """
    from dagfusion.nodes.lora import attach

    return attach.extract(model, clip)


# --- Save ---------------------------------------------------------------------------------------


def _save_example() -> dict[str, Any]:
    return {"lora": _tiny_lora(), "filename": "lora/tiny.safetensors"}


@node(
    "dagfusion.lora.Save",
    version="1.0.0",
    category="lora",
    inputs=[
        Input("lora", LORA, link_only=True, description="The LoRA to write."),
        Input("filename", STRING, "lora.safetensors", description="Name inside the run's output folder (.safetensors)."),
    ],
    outputs=[
        Output("path", STRING, "Where the file was written."),
        Output("bytes", INT, "The file's size in bytes."),
    ],
    pure=False,
    output_node=True,
    examples=[_save_example],
    ui={"color": _COLOR},
)
def save_lora(ctx: RunContext, lora: Any, filename: str) -> dict[str, Any]:
    """Write a LoRA as safetensors in the diffusers/peft layout (unet./transformer./text_encoder.
    … lora_A/lora_B, with diffusers' lora_adapter_metadata, so diffusers' load_lora_weights reads
    it), or in the kohya layout for a LoRA read from a kohya file; with dagfusion metadata (format,
    ranks, alphas, target modules, provenance). dagfusion.lora.Load reads it back bit for bit.
    """
    from dagfusion.nodes.lora import layouts

    if not filename.endswith(".safetensors"):
        raise NodeInputError("filename", f"expected a name ending in .safetensors, got {filename!r}")
    path = layouts.save(lora, ctx.output_path(filename))
    return {"path": str(path), "bytes": path.stat().st_size}


NODES = (load_lora, apply_lora, trainable_lora, extract_lora, save_lora)
"""Every node of the pack, in palette order."""
