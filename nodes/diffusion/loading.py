"""Loading models, offline: diffusers folders, the local Hugging Face cache, single-file checkpoints.

Every load goes through the process-wide :mod:`~dagfusion.model.cache`, keyed
by the resolved path, its content fingerprint, the dtype and where the weights are placed, so
the same folder is never loaded twice. Handles reference cache entries; nothing here keeps a
module alive by itself.

Security: only diffusers and transformers classes named in ``model_index.json`` can be
instantiated (and only the components a sampler needs); pickle weights (``.ckpt``, ``.bin``,
``.pt``, ``.pth``) are refused unless the *settings* allow pickle (never a workflow input);
nothing is ever downloaded (``local_files_only=True``; single-file loading gets its
architecture configs from this package). Given read roots, a loader first checks every file
under the folder it reads, symbolic links followed, with :func:`check_tree_readable`: a link
inside a model folder can never reach a file outside the allowed read folders.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from dagfusion import UnsafeOperationError
from dagfusion.confinement import check_tree_readable
from dagfusion.model import (
    ComponentRef,
    ImageEncoderHandle,
    ModelCache,
    ModelHandle,
    TextEncoderBundle,
    VAEHandle,
    default_cache,
    use_time_only_convs,
)
from dagfusion.nodes.diffusion.data import SchedulerSpec

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEVICES = ("auto", "cpu", "cuda", "mps")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
DENOISER_COMPONENTS = ("unet", "transformer")
PICKLE_HINT = (
    "pickle files can run arbitrary code when loaded. Convert the weights to safetensors, or, if you trust "
    "the file, opt in through the settings: allow_pickle = true in the settings file, DAGFUSION_ALLOW_PICKLE=1, "
    "or the CLI's --allow-pickle flag (a workflow cannot opt in)"
)


@dataclass(frozen=True)
class Loaded:
    """The outputs of a loader node (``image_encoder`` for image-conditioned pipelines such as
    Stable Video Diffusion, else ``None``)."""

    model: ModelHandle
    clip: TextEncoderBundle
    vae: VAEHandle
    scheduler: SchedulerSpec
    image_encoder: ImageEncoderHandle | None = None


def resolve_device(requested: str, auto: str) -> str:
    """``requested`` (or ``auto`` for ``"auto"``), checked to exist on this machine."""
    device = auto if requested == "auto" else requested
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was requested but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    if device == "mps":
        import torch

        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RuntimeError("device 'mps' was requested but this torch has no MPS support; use 'auto' or 'cpu'")
    return device


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise ValueError(f"expected a dtype in {list(DTYPES)}, got {name!r}")
    return getattr(torch, DTYPES[name])


def check_weights(folder: Path, allow_pickle: bool) -> None:
    """Raise unless ``folder`` holds safetensors weights (or pickle weights with ``allow_pickle``)."""
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    safe = [p for p in files if p.name.endswith(".safetensors")]
    unsafe = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if safe:
        return
    if unsafe:
        if not allow_pickle:
            names = ", ".join(sorted(p.name for p in unsafe))
            raise UnsafeOperationError(f"{folder} holds only pickle weights ({names}); {PICKLE_HINT}")
        return
    raise FileNotFoundError(f"expected model weights (*.safetensors) in {folder}, found none")


#: Where the classes the supported pipelines name are defined: (library, class) → module.
#: Importing that module alone skips the libraries' lazy top-level lookup; a class missing here
#: (or moved in another library version) is found through the top level instead.
KNOWN_CLASSES: dict[tuple[str, str], str] = {
    ("diffusers", "UNet2DConditionModel"): "diffusers.models.unets.unet_2d_condition",
    ("diffusers", "UNetSpatioTemporalConditionModel"): "diffusers.models.unets.unet_spatio_temporal_condition",
    ("diffusers", "AutoencoderKL"): "diffusers.models.autoencoders.autoencoder_kl",
    ("diffusers", "AutoencoderKLTemporalDecoder"): "diffusers.models.autoencoders.autoencoder_kl_temporal_decoder",
    ("diffusers", "AutoencoderTiny"): "diffusers.models.autoencoders.autoencoder_tiny",
    ("diffusers", "DiTTransformer2DModel"): "diffusers.models.transformers.dit_transformer_2d",
    ("diffusers", "PixArtTransformer2DModel"): "diffusers.models.transformers.pixart_transformer_2d",
    ("diffusers", "Transformer2DModel"): "diffusers.models.transformers.transformer_2d",
    ("transformers", "CLIPTextModel"): "transformers.models.clip.modeling_clip",
    ("transformers", "CLIPTextModelWithProjection"): "transformers.models.clip.modeling_clip",
    ("transformers", "CLIPVisionModelWithProjection"): "transformers.models.clip.modeling_clip",
    ("transformers", "CLIPTokenizer"): "transformers.models.clip.tokenization_clip",
    ("transformers", "T5EncoderModel"): "transformers.models.t5.modeling_t5",
    ("transformers", "T5Tokenizer"): "transformers.models.t5.tokenization_t5",
    ("transformers", "UMT5EncoderModel"): "transformers.models.umt5.modeling_umt5",
}


def _lookup_class(library: str, class_name: str) -> Any:
    """What ``library.class_name`` is: from its :data:`KNOWN_CLASSES` module, else the library's
    top level (``None`` if neither has it). Imports nothing outside ``library``."""
    import importlib

    module_name = KNOWN_CLASSES.get((library, class_name))
    if module_name is not None:
        try:
            found = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            found = None
        if found is not None:
            return found
    return getattr(importlib.import_module(library), class_name, None)


def _component_class(library: str, class_name: str) -> tuple[type, str]:
    """The class a ``model_index.json`` entry names, and its kind (model/tokenizer/processor).

    Only diffusers models (``ModelMixin``) and transformers models (``PreTrainedModel``),
    tokenizers (``PreTrainedTokenizerBase``) and image processors (``ImageProcessingMixin``:
    configuration only, no weights) are accepted, whatever module the class is found in.
    """
    if library == "diffusers":
        from diffusers.models.modeling_utils import ModelMixin

        cls = _lookup_class(library, class_name)
        if isinstance(cls, type) and issubclass(cls, ModelMixin):
            return cls, "diffusers-model"
    elif library == "transformers":
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase

        cls = _lookup_class(library, class_name)
        if isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerBase):
            return cls, "tokenizer"
        from transformers.modeling_utils import PreTrainedModel

        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls, "transformers-model"
        from transformers.image_processing_base import ImageProcessingMixin

        if isinstance(cls, type) and issubclass(cls, ImageProcessingMixin):
            return cls, "processor"
    raise ValueError(
        f"model_index.json names {library}.{class_name}, which is not a diffusers model or a transformers "
        "model, tokenizer or image processor; dagfusion loads no other classes"
    )


def _transformers_dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_component(
    folder: Path,
    name: str,
    library: str,
    class_name: str,
    dtype: str,
    placement: str,
    allow_pickle: bool,
    read_roots: Sequence[Path] | None = None,
) -> dict[str, Any]:
    """Load one component of a diffusers folder (a model-cache loader).

    With ``read_roots``, the component's files are checked (:func:`check_tree_readable`) right
    before loading, every time the cache (re)loads it.
    """
    sub = folder / name
    if not sub.is_dir():
        raise FileNotFoundError(f"model_index.json lists component {name!r} but {sub} is not a folder")
    if read_roots is not None:
        check_tree_readable(sub, read_roots)
    cls, kind = _component_class(library, class_name)
    if kind in ("tokenizer", "processor"):
        return {name: cls.from_pretrained(str(sub), local_files_only=True)}
    check_weights(sub, allow_pickle)
    safetensors_only = None if allow_pickle else True
    if kind == "diffusers-model":
        module = cls.from_pretrained(
            str(sub), torch_dtype=torch_dtype(dtype), use_safetensors=safetensors_only, local_files_only=True
        )
    else:
        module = cls.from_pretrained(
            str(sub), use_safetensors=safetensors_only, local_files_only=True,
            **{_transformers_dtype_kwarg(): torch_dtype(dtype)},
        )
    use_time_only_convs(module)
    return {name: module.to(placement).eval()}


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"expected {what} at {path}, but it does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object")
    return data


def scheduler_spec(folder: Path, class_name: str | None = None) -> SchedulerSpec:
    """The scheduler of a diffusers folder (``scheduler/scheduler_config.json``)."""
    config = read_json(folder / "scheduler" / "scheduler_config.json", "a scheduler config")
    name = class_name or config.get("_class_name") or "DDIMScheduler"
    return SchedulerSpec(str(name), config, "default")


def vae_scale_factor(folder: Path) -> int:
    path = folder / "vae" / "config.json"
    if not path.is_file():
        return 8
    channels = read_json(path, "a VAE config").get("block_out_channels") or [0, 0, 0, 0]
    return 2 ** (len(channels) - 1)


def text_kind(index: Mapping[str, Any], pipeline: str) -> tuple[str, list[str], dict[str, Any]]:
    """(bundle kind, encoder component names, options) for a pipeline's text encoders."""
    names = [n for n in ("text_encoder", "text_encoder_2") if _present(index, n)]
    if not names:
        return "none", [], {}
    if "text_encoder_2" in names:
        return "sdxl", names, {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}
    entry = index["text_encoder"]
    if "T5" in str(entry[1]) or "UMT5" in str(entry[1]):
        max_length = 300 if "Sigma" in pipeline else 120
        return "t5", names, {"max_length": max_length, "lowercase": "PixArt" in pipeline}
    return "clip", names, {}


def _present(index: Mapping[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and bool(entry[0]) and bool(entry[1])


def load_diffusers_folder(
    folder: str | os.PathLike[str],
    *,
    dtype: str = "fp32",
    device: str = "cpu",
    offload: bool = False,
    allow_pickle: bool = False,
    cache: ModelCache | None = None,
    source: str | None = None,
    read_roots: Sequence[Path] | None = None,
) -> Loaded:
    """Load a diffusers folder (``model_index.json``) through the model cache; see the module docstring.

    With ``read_roots`` (a node passes the settings' read folders), every file under ``folder``
    must really lie under them, links followed, before anything is read
    (:class:`UnsafeOperationError` otherwise); ``None`` trusts the folder (package data, callers'
    own files).
    """
    from dagfusion.fingerprint import fingerprint_path, new_hasher

    roots = tuple(read_roots) if read_roots is not None else None
    if roots is not None:
        check_tree_readable(folder, roots)
    folder = Path(folder).resolve()
    index = read_json(folder / "model_index.json", "a diffusers model folder with model_index.json")
    pipeline = str(index.get("_class_name", ""))
    denoiser = next((n for n in DENOISER_COMPONENTS if _present(index, n)), None)
    if denoiser is None:
        raise ValueError(
            f"{folder} has no denoiser: model_index.json lists no 'unet' or 'transformer' component "
            f"(it lists {sorted(k for k in index if not k.startswith('_'))})"
        )
    torch_dtype(dtype)  # validate early
    content = fingerprint_path(folder)
    placement = "cpu" if offload else device
    cache = cache if cache is not None else default_cache()

    def ref(name: str) -> ComponentRef:
        library, class_name = index[name]
        key = ("diffusers", str(folder), content, name, dtype, placement, allow_pickle)
        h = new_hasher()
        h.update(f"{content}:{name}:{dtype}:{placement}".encode())
        loader = partial(load_component, folder, name, library, class_name, dtype, placement, allow_pickle, roots)
        return ComponentRef(key, name, loader, h.hexdigest(), cache)

    info = {
        "source": source or str(folder), "fingerprint": content, "dtype": dtype, "device": device,
        "pipeline": pipeline, "vae_scale_factor": vae_scale_factor(folder),
    }
    spec = scheduler_spec(folder, index["scheduler"][1] if _present(index, "scheduler") else None)
    model = ModelHandle(ref(denoiser), scheduler=spec, info={**info, "component": denoiser}, offload=offload)
    if not _present(index, "vae"):
        raise ValueError(f"{folder} has no 'vae' component in model_index.json")
    vae = VAEHandle(ref("vae"), info={**info, "component": "vae"}, offload=offload)
    kind, encoders, options = text_kind(index, pipeline)
    tokenizers = [n.replace("text_encoder", "tokenizer") for n in encoders]
    missing = [t for t in tokenizers if not _present(index, t)]
    if missing:
        raise ValueError(f"{folder} has text encoders {encoders} but no {missing} in model_index.json")
    clip = TextEncoderBundle(
        kind, [ref(n) for n in encoders], [ref(t) for t in tokenizers], options=options,
        info={**info, "component": ",".join(encoders) or "none"}, offload=offload,
    )
    image_encoder = None
    if _present(index, "image_encoder"):
        processor = ref("feature_extractor") if _present(index, "feature_extractor") else None
        image_encoder = ImageEncoderHandle(
            ref("image_encoder"), processor, info={**info, "component": "image_encoder"}, offload=offload
        )
    extra = (image_encoder.encoder, *([image_encoder.processor] if image_encoder and image_encoder.processor else [])) if image_encoder else ()
    for r in (model.ref, vae.ref, *clip.encoders, *clip.tokenizers, *extra):  # load now: errors belong to the loader node
        r.get()
    return Loaded(model.with_preview_vae(vae), clip, vae, spec, image_encoder)


# --- the local Hugging Face cache ---------------------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]*$")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME")
    base = Path(home).expanduser() if home else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface"
    return base / "hub"


def resolve_hf_snapshot(repo_id: str, revision: str = "main", cache_dir: Path | None = None) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` in the local cache (never the network).

    :raises FileNotFoundError: the model (or that revision) is not in the cache.
    """
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise ValueError(f"expected a model id like 'owner/name', got {repo_id!r}")
    if not _REVISION.match(revision) or ".." in revision:
        raise ValueError(f"expected a branch, tag or commit hash as revision, got {revision!r}")
    cache = (cache_dir or hf_cache_dir()).resolve()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        raise FileNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({cache}); dagfusion never downloads: "
            f"fetch it first (huggingface-cli download {repo_id}) or point HF_HUB_CACHE at the right cache"
        )
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    else:
        ref = repo / "refs" / revision
        if not ref.is_file():
            raise FileNotFoundError(f"revision {revision!r} of {repo_id!r} is not in the local cache ({repo})")
        commit = ref.read_text(encoding="utf-8").strip()
    snapshot = (repo / "snapshots" / commit).resolve()
    if repo.resolve() not in snapshot.parents or not snapshot.is_dir():
        raise FileNotFoundError(f"snapshot {commit} of {repo_id!r} is missing from the local cache ({repo})")
    return snapshot
