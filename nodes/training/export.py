"""Export a model as a diffusers pipeline folder (``model_index.json`` + one folder per component).

The folder is written by diffusers itself: the pipeline class for the layout
(``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``PixArtAlphaPipeline``,
``DiTPipeline`` …) is built in memory from the handles' modules and saved with
``save_pretrained(safe_serialization=True)``, so ``DiffusionPipeline.from_pretrained(folder)`` and
dagfusion's LoadDiffusers node load it back. Weights are safetensors only (the export fails if
anything else appears), and the folder lies inside the run's output folder.

The model's scheduler (or the ``scheduler`` input) is what the folder samples with — after a
Train node that is the objective's scheduler (v-prediction with zero terminal SNR: DDIM with
trailing timesteps, …). Patches cannot be stored in a diffusers folder, so a patched model is
refused rather than silently exported without them.
"""

from __future__ import annotations

import copy
import inspect
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dagfusion import STRING, Input, Output, RunContext, node

PIPELINES = ("auto", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "PixArtAlphaPipeline",
             "PixArtSigmaPipeline", "DiTPipeline")
DTYPES = ("keep", "fp32", "fp16", "bf16")
_SAFE_SUFFIXES = {".safetensors", ".json", ".txt", ".model", ".md"}
_NONE_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def pipeline_name(model: Any, clip: Any, requested: str = "auto") -> str:
    """The diffusers pipeline class for ``model``: ``requested``, the model's own (from its
    folder), or the one its denoiser family and text encoder imply."""
    from dagfusion.model import family_for

    if requested != "auto":
        return requested
    own = str(model.info.get("pipeline") or "")
    if own:
        return own
    family = family_for(model.denoiser).name
    kind = clip.kind if clip is not None else "none"
    names = {("unet", "clip"): "StableDiffusionPipeline", ("unet", "sdxl"): "StableDiffusionXLPipeline",
             ("pixart", "t5"): "PixArtAlphaPipeline", ("dit", "none"): "DiTPipeline"}
    if (family, kind) not in names:
        raise ValueError(f"no diffusers pipeline known for a {family} model with {kind!r} text encoding; name one with pipeline")
    return names[(family, kind)]


def _pipeline_class(name: str) -> type:
    import diffusers

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ValueError(f"expected a diffusers pipeline class, got {name!r}")
    return cls


def _cast(module: Any, dtype: Any) -> Any:
    """``module`` itself if already in ``dtype`` (or ``dtype`` is None), else a converted copy."""
    if module is None or dtype is None:
        return module
    try:
        current = next(p.dtype for p in module.parameters() if p.is_floating_point())
    except StopIteration:
        return module
    return module if current == dtype else copy.deepcopy(module).to(dtype)


def export(model: Any, clip: Any, vae: Any, scheduler: Any, folder: Path, *, dtype: str = "keep", pipeline: str = "auto",
           image_encoder: Any = None) -> Path:
    """Write the diffusers folder ``folder`` (which must not exist yet) and return it.

    ``image_encoder`` (an image-encoder handle) fills the pipeline's ``image_encoder`` and
    ``feature_extractor`` (Stable Video Diffusion's layout)."""
    import torch

    if model.patches:
        names = ", ".join(type(p).__name__ for p in model.patches)
        raise ValueError(
            f"the model carries patches ({names}), which a diffusers folder cannot hold; export the unpatched model, "
            "or bake weight patches (merges, fused LoRAs) into it first with dagfusion.models.Bake"
        )
    for what, handle in (("text encoder", clip), ("VAE", vae), ("image encoder", image_encoder)):
        if handle is not None and handle.patches:
            names = ", ".join(type(p).__name__ for p in handle.patches)
            raise ValueError(f"the {what} carries patches ({names}), which a diffusers folder cannot hold; export the unpatched one")
    if dtype not in DTYPES:
        raise ValueError(f"expected dtype in {list(DTYPES)}, got {dtype!r}")
    target = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    name = pipeline_name(model, clip, pipeline)
    cls = _pipeline_class(name)
    spec = scheduler if scheduler is not None else model.scheduler
    if spec is None:
        raise ValueError("the model has no scheduler; connect one to the scheduler input")
    encoders = [r.get() for r in clip.encoders] if clip is not None else []
    tokenizers = [r.get() for r in clip.tokenizers] if clip is not None else []
    denoiser = _cast(model.denoiser, target)
    offer: dict[str, Any] = {
        "unet": denoiser, "transformer": denoiser,
        "vae": _cast(vae.module, target) if vae is not None else None, "scheduler": spec.create(),
        "requires_safety_checker": False,
    }
    if image_encoder is not None:
        offer["image_encoder"] = _cast(image_encoder.module, target)
        offer["feature_extractor"] = image_encoder.image_processor
    for i, (encoder, tokenizer) in enumerate(zip(encoders, tokenizers)):
        suffix = "" if i == 0 else f"_{i + 1}"
        offer[f"text_encoder{suffix}"] = _cast(encoder, target)
        offer[f"tokenizer{suffix}"] = tokenizer
    kwargs: dict[str, Any] = {}
    missing = []
    for pname, param in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if pname in _NONE_COMPONENTS and offer.get(pname) is None:
            kwargs[pname] = None
        elif pname in offer and (offer[pname] is not None or param.default is not inspect.Parameter.empty):
            kwargs[pname] = offer[pname]
        elif param.default is inspect.Parameter.empty:
            missing.append(pname)
    if missing:
        raise ValueError(f"{name} needs {missing}, which were not given (connect the model's clip and vae)")
    pipe = cls(**kwargs)
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} already exists and is not empty; choose another folder name")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        unsafe = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and p.suffix not in _SAFE_SUFFIXES)
        if unsafe:
            raise RuntimeError(f"the export wrote files that are not safetensors/JSON/text: {unsafe}")
        if folder.exists():
            folder.rmdir()
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    parts = tiny.sd_handles()
    return {"model": parts["model"], "clip": parts["clip"], "vae": parts["vae"], "folder": "tiny-sd", "dtype": "fp16"}


@node(
    "dagfusion.train.SaveDiffusers",
    version="1.0.0",
    category="training",
    inputs=[
        Input("model", "MODEL", link_only=True, description="The denoiser to export (without patches)."),
        Input("clip", "CLIP", optional=True, link_only=True, description="Its text encoder(s) and tokenizer(s)."),
        Input("vae", "VAE", optional=True, link_only=True, description="Its VAE."),
        Input("scheduler", "SCHEDULER", optional=True, link_only=True,
              description="The scheduler to store (default: the model's own, which a Train node sets to match its objective)."),
        Input("folder", STRING, "model", description="Folder name inside the run's output folder."),
        Input("dtype", STRING, "keep", choices=DTYPES, description="Weight precision to store ('keep': as the modules are)."),
        Input("pipeline", STRING, "auto", choices=PIPELINES,
              description="The diffusers pipeline class; 'auto': the model's own, or the one its layout implies."),
    ],
    outputs=[Output("path", STRING, "The written folder (DiffusionPipeline.from_pretrained and LoadDiffusers load it).")],
    examples=[_example],
    pure=False,
    output_node=True,
)
def save_diffusers(
    ctx: RunContext, model: Any, clip: Any, vae: Any, scheduler: Any, folder: str, dtype: str, pipeline: str
) -> str:
    """Save a model as a diffusers pipeline folder (model_index.json, safetensors weights) in the output folder."""
    if not folder.strip():
        raise ValueError("folder must name a folder inside the output folder")
    return str(export(model, clip, vae, scheduler, ctx.output_path(folder), dtype=dtype, pipeline=pipeline))


NODES = (save_diffusers,)
