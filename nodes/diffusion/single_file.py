"""Single-file checkpoints (original Stable Diffusion layout) loaded with shipped configs, offline.

diffusers' ``from_single_file`` fetches architecture configs from the Hub unless given
``config=``; this package ships the configs of the supported architectures in ``configs/``
(``sd1`` = SD 1.x, ``sd2`` = SD 2.x 768 v-prediction, ``sdxl`` = SDXL base) and passes them.
Single files carry no tokenizer: tokenizer folders (``tokenizer/`` and, for SDXL,
``tokenizer_2/``) come from, in order, the node's ``tokenizers`` input, the ``config`` folder
when it has them, or ``<model dir>/tokenizers/<architecture>/`` in the settings' model folders.
Given read roots, the checkpoint, the config folder and the tokenizer folders are checked, links
followed, before anything in them is read (:func:`~dagfusion.nodes.diffusion.loading.check_tree_readable`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dagfusion import UnsafeOperationError
from dagfusion.model import ComponentRef, ModelHandle, TextEncoderBundle, VAEHandle
from dagfusion.nodes.diffusion.loading import (
    PICKLE_HINT,
    PICKLE_SUFFIXES,
    Loaded,
    check_tree_readable,
    read_json,
    scheduler_spec,
    text_kind,
    torch_dtype,
    vae_scale_factor,
)
from dagfusion.model import ModelCache, default_cache

CONFIGS = Path(__file__).parent / "configs"
ARCHITECTURES = ("sd1", "sd2", "sdxl")
PIPELINES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline"}


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names in a safetensors file (reads the header only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys())


def detect_architecture(keys: list[str]) -> str:
    """``sd1``, ``sd2`` or ``sdxl`` from a checkpoint's tensor names.

    :raises ValueError: the layout is none of the supported ones.
    """
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    sample = ", ".join(keys[:3])
    raise ValueError(
        "cannot tell the architecture of this checkpoint (expected the original Stable Diffusion layout of "
        f"SD 1.x, SD 2.x or SDXL; first tensors: {sample}); pass architecture explicitly"
    )


def find_tokenizers(arch: str, tokenizers: Path | None, config: Path | None, model_dirs: tuple[Path, ...]) -> Path:
    """The folder holding ``tokenizer/`` (and ``tokenizer_2/`` for SDXL)."""
    needed = tokenizer_names(arch)

    def complete(folder: Path | None) -> bool:
        return folder is not None and all((folder / n).is_dir() for n in needed)

    if tokenizers is not None:
        if not complete(tokenizers):
            raise FileNotFoundError(f"expected tokenizer folders {needed} in {tokenizers}")
        return tokenizers
    if complete(config):
        assert config is not None
        return config
    for model_dir in model_dirs:
        candidate = Path(model_dir) / "tokenizers" / arch
        if complete(candidate):
            return candidate
    searched = ", ".join(str(Path(d) / "tokenizers" / arch) for d in model_dirs) or "(no model folders in the settings)"
    raise FileNotFoundError(
        f"single-file checkpoints carry no tokenizer; expected folders {needed} in the tokenizers input, in the "
        f"config folder, or in <model dir>/tokenizers/{arch}/ (searched {searched})"
    )


def tokenizer_names(arch: str) -> list[str]:
    """The tokenizer folders an architecture needs."""
    return ["tokenizer", "tokenizer_2"] if arch == "sdxl" else ["tokenizer"]


def check_sources(sources: Sequence[Path], read_roots: Sequence[Path] | None) -> None:
    """Check every file under ``sources`` against ``read_roots`` (nothing to check without roots).

    :raises UnsafeOperationError: a file's real path lies outside the roots.
    """
    if read_roots is None:
        return
    for source in sources:
        check_tree_readable(source, read_roots)


def _stage(configs: Path, tokenizers: Path, staging: Path, names: list[str]) -> None:
    shutil.copytree(configs, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    for name in names:
        target = staging / name
        if not target.exists():
            shutil.copytree(tokenizers / name, target)


def load_pipeline_components(
    path: Path, arch: str, configs: Path, tokenizers: Path, dtype: str, placement: str, allow_pickle: bool
) -> dict[str, Any]:
    """Every component of a single-file checkpoint (a model-cache loader)."""
    import diffusers

    index = read_json(configs / "model_index.json", "a model_index.json in the config folder")
    pipeline_name = str(index.get("_class_name"))
    if pipeline_name not in PIPELINES:
        raise ValueError(f"single-file loading supports {sorted(PIPELINES)}, the config names {pipeline_name!r}")
    pipeline_cls = getattr(diffusers, pipeline_name)
    names = tokenizer_names(arch)
    with tempfile.TemporaryDirectory(prefix="dagfusion-single-file-") as tmp:
        staging = Path(tmp) / "config"
        _stage(configs, tokenizers, staging, names)
        kwargs: dict[str, Any] = {}
        if pipeline_name == "StableDiffusionPipeline":
            kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = pipeline_cls.from_single_file(
            str(path), config=str(staging), local_files_only=True, torch_dtype=torch_dtype(dtype), **kwargs,
        )
    components: dict[str, Any] = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        value = getattr(pipe, name, None)
        if value is None:
            continue
        if hasattr(value, "to") and hasattr(value, "parameters"):
            value = value.to(placement).eval()
        components[name] = value
    return components


def load_single_file(
    path: str | os.PathLike[str],
    *,
    architecture: str = "auto",
    config: str | os.PathLike[str] | None = None,
    tokenizers: str | os.PathLike[str] | None = None,
    model_dirs: tuple[Path, ...] = (),
    dtype: str = "fp32",
    device: str = "cpu",
    offload: bool = False,
    allow_pickle: bool = False,
    cache: ModelCache | None = None,
    read_roots: Sequence[Path] | None = None,
) -> Loaded:
    """Load a single-file checkpoint through the model cache; see the module docstring.

    With ``read_roots`` (a node passes the settings' read folders), the checkpoint, the
    ``config`` folder and the tokenizer folders must really lie under them, links followed,
    before they are read, and again whenever the cache reloads them (:class:`UnsafeOperationError`
    otherwise). The shipped configs are package data and need no check.
    """
    from dagfusion.fingerprint import fingerprint_path, new_hasher

    roots = tuple(read_roots) if read_roots is not None else None
    check_sources([Path(path)], roots)
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"expected a checkpoint file, but {path} does not exist")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UnsafeOperationError(f"{path.name} is a pickle checkpoint; {PICKLE_HINT}")
        if architecture == "auto":
            raise ValueError("architecture 'auto' reads safetensors headers only; name the architecture of a pickle checkpoint")
        arch = architecture
    elif path.suffix != ".safetensors":
        raise ValueError(f"expected a .safetensors checkpoint, got {path.name}")
    else:
        arch = detect_architecture(checkpoint_keys(path)) if architecture == "auto" else architecture
    if arch not in ARCHITECTURES:
        raise ValueError(f"expected an architecture in {['auto', *ARCHITECTURES]}, got {arch!r}")
    configs = Path(config).resolve() if config else CONFIGS / arch
    if not (configs / "model_index.json").is_file():
        raise FileNotFoundError(f"expected a diffusers config folder with model_index.json at {configs}")
    tokenizer_dir = find_tokenizers(arch, Path(tokenizers).resolve() if tokenizers else None,
                                    Path(config).resolve() if config else None, model_dirs).resolve()
    sources = [path, *([configs] if config else []), tokenizer_dir]  # everything fingerprinted below
    check_sources(sources, roots)
    torch_dtype(dtype)
    content = fingerprint_path(path)
    config_fp = fingerprint_path(configs)
    tokenizer_fp = fingerprint_path(tokenizer_dir)
    placement = "cpu" if offload else device
    cache = cache if cache is not None else default_cache()
    key = ("single-file", str(path), content, config_fp, tokenizer_fp, dtype, placement)

    def loader() -> dict[str, Any]:
        check_sources(sources, roots)
        return load_pipeline_components(path, arch, configs, tokenizer_dir, dtype, placement, allow_pickle)

    def ref(name: str) -> ComponentRef:
        h = new_hasher()
        h.update(f"{content}:{config_fp}:{tokenizer_fp}:{name}:{dtype}:{placement}".encode())
        return ComponentRef(key, name, loader, h.hexdigest(), cache)

    index = read_json(configs / "model_index.json", "a model_index.json")
    pipeline = str(index.get("_class_name", ""))
    info = {
        "source": str(path), "fingerprint": content, "dtype": dtype, "device": device, "pipeline": pipeline,
        "architecture": arch, "vae_scale_factor": vae_scale_factor(configs),
    }
    spec = scheduler_spec(configs, index.get("scheduler", [None, None])[1])
    model = ModelHandle(ref("unet"), scheduler=spec, info={**info, "component": "unet"}, offload=offload)
    vae = VAEHandle(ref("vae"), info={**info, "component": "vae"}, offload=offload)
    kind, encoders, options = text_kind(index, pipeline)
    clip = TextEncoderBundle(
        kind, [ref(n) for n in encoders], [ref(n.replace("text_encoder", "tokenizer")) for n in encoders],
        options=options, info={**info, "component": ",".join(encoders)}, offload=offload,
    )
    model.ref.get()  # load now: errors belong to the loader node
    return Loaded(model, clip, vae, spec)
