"""Model loader nodes: a diffusers folder, a model in the local Hugging Face cache, a single file.

All three output the same four handles (MODEL, CLIP, VAE, SCHEDULER) and share one model cache,
so loading the same weights twice — in one workflow or across runs — costs nothing. They never
use the network. Every file they read must really lie under the allowed read folders, symbolic
links followed (the HF cache loader: under the model's own cache folder). See
:mod:`~dagfusion.nodes.diffusion.loading` for the security rules.
"""

from __future__ import annotations

from typing import Any

from dagfusion import BOOLEAN, PATH, STRING, Input, Output, RunContext, node
from dagfusion.nodes.diffusion.types import CLIP, MODEL, SCHEDULER, VAE

_DTYPES = ("auto", "fp32", "fp16", "bf16")
_DEVICES = ("auto", "cpu", "cuda", "mps")

_COMMON_INPUTS = [
    Input("device", STRING, "auto", choices=_DEVICES,
          description="Where to compute; 'auto' takes the settings' device, else cuda > mps > cpu."),
    Input("dtype", STRING, "auto", choices=_DTYPES,
          description="Weight precision; 'auto' is fp16 on a GPU and fp32 on the CPU."),
    Input("offload", BOOLEAN, False,
          description="Keep weights on the CPU and move each model to the device only while it runs."),
]
_OUTPUTS = [
    Output("model", MODEL, "The denoiser handle (UNet or transformer) with the model's scheduler."),
    Output("clip", CLIP, "The text encoder(s) and tokenizer(s); kind 'none' for class-conditional models."),
    Output("vae", VAE, "The VAE."),
    Output("scheduler", SCHEDULER, "The model's own scheduler configuration."),
]


def placement(ctx: RunContext, device: str, dtype: str) -> tuple[str, str]:
    """``(device, dtype)`` a loader places weights at (``"auto"`` resolved; fp32 on the CPU, else
    fp16), after giving the shared model cache the settings' budget."""
    from dagfusion.model import default_cache
    from dagfusion.nodes.diffusion.loading import resolve_device

    default_cache().set_budget(ctx.settings.model_cache_bytes)
    resolved = resolve_device(device, ctx.device)
    if dtype == "auto":
        dtype = "fp32" if resolved == "cpu" else "fp16"
    return resolved, dtype


def _outputs(loaded: Any) -> dict[str, Any]:
    return {"model": loaded.model, "clip": loaded.clip, "vae": loaded.vae, "scheduler": loaded.scheduler}


def _example_folder(folder: Any) -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"path": str(tiny.write_model("sd", folder / "tiny-sd")), "device": "cpu", "dtype": "fp32"}


@node(
    "dagfusion.models.LoadDiffusers",
    version="1.0.0",
    category="models",
    inputs=[
        Input("path", PATH, description="A diffusers model folder (with model_index.json) under the allowed read folders."),
        *_COMMON_INPUTS,
    ],
    outputs=_OUTPUTS,
    examples=[_example_folder],
)
def load_diffusers(ctx: RunContext, path: str, device: str, dtype: str, offload: bool) -> dict[str, Any]:
    """Load a diffusers model folder (SD 1/2, SDXL, DiT, PixArt …) offline, through the shared model cache."""
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder

    folder = ctx.input_path(path)
    device, dtype = placement(ctx, device, dtype)
    return _outputs(
        load_diffusers_folder(
            folder, dtype=dtype, device=device, offload=offload, allow_pickle=ctx.settings.allow_pickle,
            read_roots=ctx.settings.readable_roots,
        )
    )


def _example_hub(folder: Any) -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    cache = tiny.write_hf_cache("sd", folder / "hub", "dagfusion-tests/tiny-sd")
    return {"repo_id": "dagfusion-tests/tiny-sd", "cache_dir": str(cache), "device": "cpu", "dtype": "fp32"}


@node(
    "dagfusion.models.LoadFromHFCache",
    version="1.0.0",
    category="models",
    inputs=[
        Input("repo_id", STRING, description="Model id in the local Hugging Face cache, like 'owner/name'."),
        Input("revision", STRING, "main", description="Branch, tag or commit hash of the cached snapshot."),
        Input("cache_dir", PATH, optional=True,
              description="Hugging Face hub cache folder to read (under the read folders); default: HF_HUB_CACHE."),
        *_COMMON_INPUTS,
    ],
    outputs=_OUTPUTS,
    examples=[_example_hub],
)
def load_from_hf_cache(
    ctx: RunContext, repo_id: str, revision: str, cache_dir: str | None, device: str, dtype: str, offload: bool
) -> dict[str, Any]:
    """Load a diffusers model already in the local Hugging Face cache; never downloads.

    Without cache_dir the standard cache (HF_HUB_CACHE, else $HF_HOME/hub) is read; it is
    reachable only through a model id, whatever the read folders in the settings are. Every file
    of the snapshot must really lie in the model's cache folder (``models--owner--name``, whose
    ``blobs/`` the snapshot links to).
    """
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder, resolve_hf_snapshot

    cache = ctx.input_path(cache_dir) if cache_dir else None
    snapshot = resolve_hf_snapshot(repo_id, revision, cache)
    device, dtype = placement(ctx, device, dtype)
    return _outputs(
        load_diffusers_folder(
            snapshot, dtype=dtype, device=device, offload=offload, allow_pickle=ctx.settings.allow_pickle,
            source=f"hf:{repo_id}@{revision}", read_roots=(snapshot.parents[1],),
        )
    )


def _example_single_file(folder: Any) -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    paths = tiny.write_single_file("sd", folder / "single")
    return {"path": str(paths["checkpoint"]), "config": str(paths["config"]), "device": "cpu", "dtype": "fp32"}


@node(
    "dagfusion.models.LoadSingleFile",
    version="1.0.0",
    category="models",
    inputs=[
        Input("path", PATH, description="A single-file checkpoint (.safetensors, original SD layout)."),
        Input("architecture", STRING, "auto", choices=("auto", "sd1", "sd2", "sdxl"),
              description="Architecture; 'auto' reads it from the tensor names (sd2 means SD 2.x 768 v-prediction)."),
        Input("config", PATH, optional=True,
              description="A diffusers folder of configs to use instead of the shipped ones (custom architectures)."),
        Input("tokenizers", PATH, optional=True,
              description="Folder with tokenizer/ (and tokenizer_2/); default: the config folder or <model dir>/tokenizers/<arch>."),
        *_COMMON_INPUTS,
    ],
    outputs=_OUTPUTS,
    examples=[_example_single_file],
)
def load_single_file_node(
    ctx: RunContext,
    path: str,
    architecture: str,
    config: str | None,
    tokenizers: str | None,
    device: str,
    dtype: str,
    offload: bool,
) -> dict[str, Any]:
    """Load a single-file Stable Diffusion checkpoint (SD 1.x, 2.x, SDXL) with shipped configs, offline."""
    from dagfusion.nodes.diffusion.single_file import load_single_file

    device, dtype = placement(ctx, device, dtype)
    return _outputs(
        load_single_file(
            ctx.input_path(path),
            architecture=architecture,
            config=ctx.input_path(config) if config else None,
            tokenizers=ctx.input_path(tokenizers) if tokenizers else None,
            model_dirs=tuple(ctx.settings.model_dirs),
            dtype=dtype,
            device=device,
            offload=offload,
            allow_pickle=ctx.settings.allow_pickle,
            read_roots=ctx.settings.readable_roots,
        )
    )


NODES = (load_diffusers, load_from_hf_cache, load_single_file_node)
