"""Saving image-to-video models as diffusers folders, and the embedded shapes-video models.

``dagfusion.video.SaveSVD`` writes a ``StableVideoDiffusionPipeline`` folder (safetensors and JSON
only) that ``StableVideoDiffusionPipeline.from_pretrained`` and ``dagfusion.video.LoadSVD`` load.
A one-step generator (``dagfusion.video.TrainSFV``'s output) is saved as its UNet with the
scheduler it samples with (SVD's Euler with ``sigma_max`` = the generator's noise level) plus a
``dagfusion.json`` file ``{"format": "dagfusion.svd", "format_version": 1, "one_step": {"method":
"sf-v", "sigma": 700.0}}``; the loaders read it and mark the model again, so a multi-step schedule
on it is refused as before saving. diffusers ignores the file.

``dagfusion.video.LoadEmbeddedVideo`` loads the shapes-video models shipped in the package:
``shapes-video`` (the 25-step base model) and ``shapes-video-1step`` (its SF-V one-step
generator).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dagfusion import STRING, Input, NodeInputError, Output, RunContext, node
from dagfusion.nodes.diffusion.types import MODEL, VAE
from dagfusion.nodes.video.svd import CLIP_VISION, SVD_OUTPUTS

MARKER = "dagfusion.json"
"""The file beside ``model_index.json`` that records what diffusers' folder format cannot (one-step models)."""
MODELS_DIR = Path(__file__).parent / "models"
EMBEDDED: dict[str, str] = {
    "shapes-video": "Stable Video Diffusion layout, 32 px, 8 frames, trained on the shapes-video world; 25 Euler steps.",
    "shapes-video-1step": "shapes-video tuned by SF-V to one forward pass (sample with dagfusion.video.SampleOneStep).",
}
"""Embedded video model name → what it is."""


class SVDFolderError(ValueError):
    """A folder is not a Stable Video Diffusion folder dagfusion can load (no image encoder, or a bad ``dagfusion.json``)."""


def save_svd(model: Any, clip_vision: Any, vae: Any, folder: Path, *, dtype: str = "keep") -> Path:
    """Write ``model`` (an SVD-layout video UNet handle), its image encoder and VAE as a
    ``StableVideoDiffusionPipeline`` folder (see the module docstring) and return it.

    :raises ValueError: the model carries patches other than a one-step mark.
    """
    from dagfusion.nodes.training.export import export
    from dagfusion.nodes.video.sfv import (
        OneStepPatch,
        one_step_patch,
        one_step_scheduler,
    )

    mark = one_step_patch(model)
    if mark is not None:
        model = model.with_patches([p for p in model.patches if not isinstance(p, OneStepPatch)])
        model = model.with_scheduler(one_step_scheduler(mark.sigma))
    path = export(model, None, vae, None, folder, dtype=dtype, pipeline="StableVideoDiffusionPipeline",
                  image_encoder=clip_vision)
    if mark is not None:
        document = {"format": "dagfusion.svd", "format_version": 1,
                    "one_step": {"method": mark.config.method, "sigma": mark.sigma}}
        (path / MARKER).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path


def read_marker(folder: Path) -> dict[str, Any]:
    """The folder's ``dagfusion.json`` document (``{}`` when there is none).

    :raises SVDFolderError: the file is not a version-1 ``dagfusion.svd`` document.
    """
    path = Path(folder) / MARKER
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SVDFolderError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != "dagfusion.svd" or document.get("format_version") != 1:
        raise SVDFolderError(f"expected {path} to be a dagfusion.svd version 1 document, got {str(document)[:200]}")
    return document


def apply_marker(model: Any, document: dict[str, Any]) -> Any:
    """``model`` marked as the one-step generator ``document`` describes (unchanged without ``one_step``)."""
    from dagfusion.nodes.video.sfv import OneStepPatch, one_step_scheduler

    one_step = document.get("one_step")
    if not one_step:
        return model
    sigma = float(one_step["sigma"])
    method = str(one_step.get("method", "sf-v"))
    marked = model.with_denoiser(model.denoiser, one_step={"method": method, "sigma": sigma})
    return marked.with_scheduler(one_step_scheduler(sigma)).with_patch(OneStepPatch(sigma, method))


def read_svd_folder(folder: Path, *, dtype: str = "fp32", device: str = "cpu", allow_pickle: bool = False,
                    source: str | None = None, read_roots: Any = None) -> dict[str, Any]:
    """The four SVD handles (``model``, ``clip_vision``, ``vae``, ``scheduler``) of a diffusers
    folder, through the shared model cache, a one-step mark applied from its ``dagfusion.json``.

    :raises SVDFolderError: the folder has no image encoder, or its ``dagfusion.json`` is not valid.
    """
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder

    kwargs: dict[str, Any] = {"source": source} if source else {"read_roots": read_roots}
    loaded = load_diffusers_folder(folder, dtype=dtype, device=device, allow_pickle=allow_pickle, **kwargs)
    if loaded.image_encoder is None:
        raise SVDFolderError(f"{folder} has no image_encoder component; expected a Stable Video Diffusion folder, got a "
                             f"{loaded.model.info.get('pipeline') or 'different'} folder")
    document = read_marker(folder)
    try:
        model = apply_marker(loaded.model, document)
    except (KeyError, TypeError, ValueError) as exc:
        raise SVDFolderError(f"{folder / MARKER}: {exc}") from exc
    return {"model": model, "clip_vision": loaded.image_encoder, "vae": loaded.vae, "scheduler": model.scheduler}


def load_svd_folder(ctx: RunContext, folder: Path, device: str, dtype: str, *, input: str, source: str | None = None,
                    read_roots: Any = None) -> dict[str, Any]:
    """:func:`read_svd_folder` for a node: placement from the settings, problems named as node input ``input``."""
    from dagfusion.nodes.diffusion.loaders import placement

    device, dtype = placement(ctx, device, dtype)
    try:
        return read_svd_folder(folder, dtype=dtype, device=device, allow_pickle=ctx.settings.allow_pickle, source=source,
                               read_roots=read_roots)
    except SVDFolderError as exc:
        raise NodeInputError(input, str(exc)) from exc


def embedded_folder(name: str) -> Path:
    """The diffusers folder of embedded video model ``name``.

    :raises ValueError: not an embedded video model.
    :raises FileNotFoundError: this installation holds no weights for it.
    """
    if name not in EMBEDDED:
        raise ValueError(f"expected an embedded video model in {list(EMBEDDED)}, got {name!r}")
    path = MODELS_DIR / name
    if not (path / "model_index.json").is_file() or not any(path.glob("*/*.safetensors")):
        raise FileNotFoundError(f"the embedded model {name!r} is not in this installation ({path} holds no weights); "
                                f"train it with workflows/train_shapes_video.yaml")
    return path


def _save_example() -> dict[str, Any]:
    from dagfusion.nodes.video.svd import _tiny_cached

    parts = _tiny_cached()
    return {"model": parts["model"], "clip_vision": parts["clip_vision"], "vae": parts["vae"], "folder": "tiny-svd",
            "dtype": "fp16"}


@node(
    "dagfusion.video.SaveSVD",
    version="1.0.0",
    category="video",
    inputs=[
        Input("model", MODEL, link_only=True, description="The video UNet (a one-step generator keeps its mark; no other patches)."),
        Input("clip_vision", CLIP_VISION, link_only=True, description="Its image encoder and processor."),
        Input("vae", VAE, link_only=True, description="Its temporal-decoder VAE."),
        Input("folder", STRING, "svd-model", description="Folder name inside the run's output folder."),
        Input("dtype", STRING, "keep", choices=("keep", "fp32", "fp16", "bf16"),
              description="Weight precision to store ('keep': as the modules are)."),
    ],
    outputs=[Output("path", STRING, "The written folder (StableVideoDiffusionPipeline.from_pretrained and LoadSVD load it).")],
    pure=False,
    examples=[_save_example],
)
def save_svd_node(ctx: RunContext, model: Any, clip_vision: Any, vae: Any, folder: str, dtype: str) -> str:
    """Save an image-to-video model as a Stable Video Diffusion diffusers folder (safetensors)."""
    target = ctx.output_path(folder)
    if target.exists() and any(target.iterdir()):
        raise NodeInputError("folder", f"expected a new folder name, got {folder!r}, which already holds files")
    try:
        return str(save_svd(model, clip_vision, vae, target, dtype=dtype))
    except ValueError as exc:
        raise NodeInputError("model", str(exc)) from exc


@node(
    "dagfusion.video.LoadEmbeddedVideo",
    version="1.0.0",
    category="models",
    inputs=[
        Input("model", STRING, "shapes-video", choices=tuple(EMBEDDED),
              description="'shapes-video' (25-step image-to-video, 32 px, 8 frames) or 'shapes-video-1step' (its SF-V one-step generator)."),
        Input("device", STRING, "auto", choices=("auto", "cpu", "cuda", "mps"),
              description="Where to compute; 'auto' takes the settings' device, else cuda > mps > cpu."),
        Input("dtype", STRING, "auto", choices=("auto", "fp32", "fp16", "bf16"),
              description="Weight precision; 'auto' is fp16 on a GPU and fp32 on the CPU."),
    ],
    outputs=list(SVD_OUTPUTS),
)
def load_embedded_video(ctx: RunContext, model: str, device: str, dtype: str) -> dict[str, Any]:
    """Load a shapes-video model shipped with dagfusion (trained by its own workflow) offline."""
    try:
        folder = embedded_folder(model)
    except FileNotFoundError as exc:
        raise NodeInputError("model", str(exc)) from exc
    return load_svd_folder(ctx, folder, device, dtype, input="model", source=f"embedded:{model}")


NODES = (save_svd_node, load_embedded_video)
