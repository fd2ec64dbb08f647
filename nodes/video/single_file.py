"""Stable Video Diffusion from one checkpoint file in Stability's layout, offline.

Stability publishes SVD as single files (``svd.safetensors``, ``svd_xt.safetensors``,
``svd_xt_1_1.safetensors``) in the layout of its ``generative-models`` code:

- ``model.diffusion_model.*`` — the video UNet (``input_blocks`` / ``middle_block`` /
  ``output_blocks``, temporal layers under ``time_stack``, ``time_mixer.mix_factor``);
- ``first_stage_model.*`` — the VAE: the usual image encoder and a temporal decoder
  (``time_stack`` in every decoder res-block, ``mix_factor``, ``conv_out.time_mix_conv``);
- ``conditioner.embedders.0.open_clip.model.visual.*`` — the OpenCLIP ViT-H/14 image encoder
  (the prefix before ``visual.`` may differ; it is found from the tensor names).

diffusers has no single-file conversion for this layout, so this module maps every tensor
itself, both ways: :func:`load_svd_single_file` builds ``UNetSpatioTemporalConditionModel``,
``AutoencoderKLTemporalDecoder`` and ``CLIPVisionModelWithProjection`` from configs shipped with
this package (``configs/svd/``, the values of Stability's diffusers release) and fills them from
the file, checking that every weight is present and has the right shape;
:func:`svd_checkpoint` writes diffusers components back into the original layout.

Details of the mapping:

- the UNet and VAE tensors are renamed one to one (VAE attention weights are 1x1 convolutions in
  the file and linear layers in diffusers);
- OpenCLIP's fused ``attn.in_proj_weight`` / ``in_proj_bias`` are split into the query, key and
  value projections, ``proj`` is transposed into ``visual_projection``; the text half of the
  OpenCLIP model and the other embedders (``conditioner.embedders.3.encoder.*``, a copy of the VAE
  encoder) are not used;
- the original VAE has no ``quant_conv``: the diffusers one is set to the identity (the file's
  ``first_stage_model.quant_conv.*`` is used where a file has it).

``num_frames`` (the number of frames the UNet was trained for; the most the samplers allow) is
14 for SVD and 25 for SVD-XT; the weights are the same shape, so ``num_frames=0`` takes it from the
file name (``xt`` in the name: 25, else 14) — pass it for renamed files. The image processor is
CLIP's (224 px, CLIP normalisation). A ``config`` folder (a diffusers SVD folder; only its JSON
files are read) replaces the shipped configs for other architectures.

An ``image_encoder_folder`` (a diffusers SVD folder, or its ``image_encoder/`` folder with a
``config.json`` and safetensors weights; a ``feature_extractor/`` beside it is used when present)
supplies the image encoder for files that do not carry one (fine-tuned UNet-only files); it
replaces the file's encoder when both exist.

Not supported: the ``*_image_decoder`` variants, whose VAE decoder is a plain image decoder
(the error says so); pickle checkpoints (``.ckpt``) unless the settings allow pickle.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dagfusion import (
    INT,
    PATH,
    STRING,
    Input,
    NodeInputError,
    RunContext,
    UnsafeOperationError,
    node,
)
from dagfusion.model import (
    ComponentRef,
    ImageEncoderHandle,
    ModelCache,
    ModelHandle,
    VAEHandle,
    default_cache,
    use_time_only_convs,
)
from dagfusion.nodes.diffusion.loading import (
    PICKLE_HINT,
    PICKLE_SUFFIXES,
    _transformers_dtype_kwarg,
    read_json,
    scheduler_spec,
    torch_dtype,
    vae_scale_factor,
)
from dagfusion.nodes.diffusion.single_file import check_sources
from dagfusion.nodes.video.svd import SVD_OUTPUTS

CONFIGS = Path(__file__).parent / "configs" / "svd"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "conditioner.embedders.0.open_clip.model.visual."
"""The image encoder's prefix in Stability's files (another ``conditioner.embedders.N...visual.`` is found too)."""
_CLIP_PATTERN = re.compile(r"^(conditioner\.embedders\.\d+\.(?:.*\.)?visual\.)class_embedding$")

# A renaming: diffusers name -> (original name, tensor from file -> tensor for diffusers).
Transform = Callable[[Any], Any]


def _same(t: Any) -> Any:
    return t


# --- names: diffusers -> original ----------------------------------------------------------------

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_SPATIAL = {"conv_shortcut": "nin_shortcut"}
_VAE_TEMPORAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _swap_head(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _unet_resnet(rest: str) -> str:
    if rest.startswith("spatial_res_block."):
        return _swap_head(rest[len("spatial_res_block."):], _UNET_RESNET)
    if rest.startswith("temporal_res_block."):
        return "time_stack." + _swap_head(rest[len("temporal_res_block."):], _UNET_RESNET)
    return rest  # time_mixer.mix_factor


def _unet_attention(rest: str) -> str:
    if rest.startswith("temporal_transformer_blocks."):
        return "time_stack." + rest[len("temporal_transformer_blocks."):]
    if rest.startswith("time_pos_embed.linear_"):
        index = {"1": "0", "2": "2"}[rest[len("time_pos_embed.linear_")]]
        return f"time_pos_embed.{index}" + rest[len("time_pos_embed.linear_1"):]
    return rest


def _layers_per_block(config: Any, level: int) -> int:
    value = config.layers_per_block
    return int(value[level] if isinstance(value, (list, tuple)) else value)


def unet_name(key: str, config: Any) -> str:
    """The original (``model.diffusion_model.``) name of a ``UNetSpatioTemporalConditionModel`` weight."""
    levels = len(config.block_out_channels)
    fixed = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for old, new in fixed.items():
        if key.startswith(old):
            return UNET_PREFIX + new + key[len(old):]
    parts = key.split(".")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return UNET_PREFIX + f"middle_block.{2 * index}." + _unet_resnet(rest)
        if kind == "attentions":
            return UNET_PREFIX + "middle_block.1." + _unet_attention(rest)
    if parts[0] in ("down_blocks", "up_blocks"):
        level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if parts[0] == "down_blocks":
            per = _layers_per_block(config, level) + 1
            block = 1 + sum(_layers_per_block(config, i) + 1 for i in range(level))
            if kind == "resnets":
                return UNET_PREFIX + f"input_blocks.{block + index}.0." + _unet_resnet(rest)
            if kind == "attentions":
                return UNET_PREFIX + f"input_blocks.{block + index}.1." + _unet_attention(rest)
            if kind == "downsamplers":
                return UNET_PREFIX + f"input_blocks.{block + per - 1}.0.op." + rest.removeprefix("conv.")
        else:
            depth = levels - 1 - level  # up block ``level`` mirrors down block ``depth``
            per = _layers_per_block(config, depth) + 1
            block = sum(_layers_per_block(config, levels - 1 - i) + 1 for i in range(level))
            if kind == "resnets":
                return UNET_PREFIX + f"output_blocks.{block + index}.0." + _unet_resnet(rest)
            if kind == "attentions":
                return UNET_PREFIX + f"output_blocks.{block + index}.1." + _unet_attention(rest)
            if kind == "upsamplers":
                position = 2 if "CrossAttn" in config.up_block_types[level] else 1
                return UNET_PREFIX + f"output_blocks.{block + per - 1}.{position}." + rest
    raise KeyError(f"no original-layout name for UNet weight {key!r}")


def _vae_video_resnet(rest: str) -> str:
    if rest.startswith("spatial_res_block."):
        return _swap_head(rest[len("spatial_res_block."):], _VAE_SPATIAL)
    if rest.startswith("temporal_res_block."):
        return "time_stack." + _swap_head(rest[len("temporal_res_block."):], _VAE_TEMPORAL)
    if rest == "time_mixer.mix_factor":
        return "mix_factor"
    raise KeyError(rest)


def vae_name(key: str, config: Any) -> str:
    """The original (``first_stage_model.``) name of an ``AutoencoderKLTemporalDecoder`` weight."""
    levels = len(config.block_out_channels)
    fixed = {"encoder.conv_in.": "encoder.conv_in.", "encoder.conv_out.": "encoder.conv_out.",
             "encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_in.": "decoder.conv_in.",
             "decoder.conv_norm_out.": "decoder.norm_out.", "decoder.conv_out.": "decoder.conv_out.",
             "decoder.time_conv_out.": "decoder.conv_out.time_mix_conv.", "quant_conv.": "quant_conv."}
    for old, new in fixed.items():
        if key.startswith(old):
            return VAE_PREFIX + new + key[len(old):]
    parts = key.split(".")
    part, block = parts[0], parts[1]
    try:
        if block == "mid_block":
            kind, index, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "attentions":
                return VAE_PREFIX + f"{part}.mid.attn_1." + _swap_head(rest, _VAE_ATTENTION)
            inner = _swap_head(rest, _VAE_SPATIAL) if part == "encoder" else _vae_video_resnet(rest)
            return VAE_PREFIX + f"{part}.mid.block_{index + 1}." + inner
        if part == "encoder" and block == "down_blocks":
            level, kind, rest = int(parts[2]), parts[3], ".".join(parts[5:])
            if kind == "resnets":
                return VAE_PREFIX + f"encoder.down.{level}.block.{int(parts[4])}." + _swap_head(rest, _VAE_SPATIAL)
            if kind == "downsamplers":
                return VAE_PREFIX + f"encoder.down.{level}.downsample." + rest
        if part == "decoder" and block == "up_blocks":
            level, kind, rest = levels - 1 - int(parts[2]), parts[3], ".".join(parts[5:])
            if kind == "resnets":
                return VAE_PREFIX + f"decoder.up.{level}.block.{int(parts[4])}." + _vae_video_resnet(rest)
            if kind == "upsamplers":
                return VAE_PREFIX + f"decoder.up.{level}.upsample." + rest
    except (KeyError, IndexError, ValueError):
        pass
    raise KeyError(f"no original-layout name for VAE weight {key!r}")


def _is_vae_attention_weight(key: str) -> bool:
    return ".mid_block.attentions." in key and key.endswith(".weight") and "group_norm" not in key


_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
_CLIP_FIXED = {"vision_model.embeddings.class_embedding": "class_embedding",
               "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
               "vision_model.embeddings.position_embedding.weight": "positional_embedding",
               "vision_model.pre_layrnorm.weight": "ln_pre.weight", "vision_model.pre_layrnorm.bias": "ln_pre.bias",
               "vision_model.post_layernorm.weight": "ln_post.weight",
               "vision_model.post_layernorm.bias": "ln_post.bias", "visual_projection.weight": "proj"}


def clip_name(key: str, prefix: str = CLIP_PREFIX) -> tuple[str, int | None]:
    """The OpenCLIP name of a ``CLIPVisionModelWithProjection`` weight, and for a query / key /
    value projection its third (0, 1, 2) of the fused ``in_proj`` tensor (else ``None``)."""
    if key in _CLIP_FIXED:
        return prefix + _CLIP_FIXED[key], None
    match = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if match:
        layer, module, kind = match.groups()
        base = f"{prefix}transformer.resblocks.{layer}."
        qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
        if module in qkv:
            return base + f"attn.in_proj_{kind}", qkv[module]
        if module in _CLIP_LAYER:
            return base + f"{_CLIP_LAYER[module]}.{kind}", None
    raise KeyError(f"no OpenCLIP name for image-encoder weight {key!r}")


# --- reading the file ----------------------------------------------------------------------------


class _Source:
    """Tensors of a checkpoint by name: a safetensors file read lazily, or a pickle's state dict."""

    def __init__(self, path: Path, allow_pickle: bool) -> None:
        self.path = path
        self._state: dict[str, Any] | None = None
        self._handle: Any = None
        if path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise UnsafeOperationError(f"{path.name} is a pickle checkpoint; {PICKLE_HINT}")
            import torch

            # opted in (allow_pickle), and still tensors and containers only, as diffusers reads them
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
            state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
            if not isinstance(state, dict):
                raise ValueError(f"{path.name} holds no state dict")
            self._state = state
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(path), framework="pt")
            except Exception as exc:
                raise ValueError(f"{path.name} is not a readable safetensors file: {exc}") from exc
        else:
            raise ValueError(f"expected a .safetensors checkpoint, got {path.name}")

    def keys(self) -> list[str]:
        return list(self._state) if self._state is not None else list(self._handle.keys())

    def get(self, name: str) -> Any:
        return self._state[name] if self._state is not None else self._handle.get_tensor(name)


def checkpoint_parts(keys: Iterable[str]) -> dict[str, Any]:
    """Which SVD components a checkpoint's tensor names hold.

    Returns ``{"unet": bool, "vae": bool, "temporal_decoder": bool, "image_encoder": prefix | None}``.
    """
    keys = list(keys)
    prefix = None
    for key in keys:
        match = _CLIP_PATTERN.match(key)
        if match:
            prefix = match.group(1)
            break
    return {
        "unet": any(k.startswith(UNET_PREFIX) for k in keys),
        "video_unet": any(k.startswith(UNET_PREFIX) and ".time_stack." in k for k in keys),
        "vae": any(k.startswith(VAE_PREFIX) for k in keys),
        "temporal_decoder": any(k.startswith(VAE_PREFIX + "decoder.") and k.endswith("mix_factor") for k in keys),
        "image_encoder": prefix,
    }


def check_svd_keys(keys: Iterable[str], *, need_image_encoder: bool, name: str = "the file") -> dict[str, Any]:
    """:func:`checkpoint_parts`, raising ``ValueError`` naming the first component that is missing."""
    keys = list(keys)
    parts = checkpoint_parts(keys)
    sample = ", ".join(keys[:3]) or "(no tensors)"
    if not parts["unet"]:
        raise ValueError(f"no {UNET_PREFIX}* keys in {name}: this is not a Stable Video Diffusion single file "
                         f"(first tensors: {sample})")
    if not parts["video_unet"]:
        raise ValueError(f"{name} has {UNET_PREFIX}* keys but no temporal layers (time_stack): an image model, "
                         "not a Stable Video Diffusion single file; load it with dagfusion.models.LoadSingleFile")
    if not parts["vae"]:
        raise ValueError(f"no {VAE_PREFIX}* keys in {name}: this is not a Stable Video Diffusion single file "
                         "(a UNet-only file needs the VAE and image encoder from a diffusers folder: use "
                         "dagfusion.video.LoadSVD)")
    if not parts["temporal_decoder"]:
        raise ValueError(f"{name} has a plain image VAE decoder (no {VAE_PREFIX}decoder.*.mix_factor): the "
                         "*_image_decoder variants of SVD are not supported; use the file with the temporal decoder")
    if need_image_encoder and parts["image_encoder"] is None:
        raise ValueError(f"no conditioner.embedders.*.visual.* keys (the OpenCLIP image encoder) in {name}; pass "
                         "image_encoder_folder: a diffusers SVD folder or its image_encoder/ folder")
    return parts


def _fill(
    module: Any, source: _Source, names: Mapping[str, tuple[str, Transform]], what: str, dtype: Any,
    fixed: Mapping[str, Any] | None = None,
) -> None:
    """Load ``module`` (its parameters on the meta device or real) from ``source`` by ``names``
    (and the tensors in ``fixed``), checking that every weight is there with its config's shape."""
    expected = module.state_dict()
    missing = [orig for key, (orig, _) in names.items() if orig is not None and not _has(source, orig)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"the {what} in {source.path.name} is incomplete or another architecture: missing {shown} "
                         "(pass a config folder for other architectures)")
    state = {k: v.to(dtype) for k, v in (fixed or {}).items()}
    for key, (orig, transform) in names.items():
        tensor = transform(source.get(orig))
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"the {what} in {source.path.name} does not match its config: {orig} has shape "
                             f"{tuple(tensor.shape)}, the config needs {tuple(expected[key].shape)} for {key} "
                             "(pass a config folder for other architectures)")
        state[key] = tensor.to(dtype).contiguous()
    module.load_state_dict(state, strict=True, assign=True)


def _has(source: _Source, name: str) -> bool:
    if not hasattr(source, "_names"):
        source._names = set(source.keys())  # type: ignore[attr-defined]
    return name in source._names  # type: ignore[attr-defined]


def _empty(factory: Callable[[], Any]) -> Any:
    """A module whose parameters are on the meta device (buffers real), filled later by assignment."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def unet_names(unet: Any) -> dict[str, tuple[str, Transform]]:
    return {k: (unet_name(k, unet.config), _same) for k in unet.state_dict()}


def vae_names(vae: Any, keys: set[str]) -> dict[str, tuple[str | None, Transform]]:
    out: dict[str, tuple[str | None, Transform]] = {}
    for key in vae.state_dict():
        name = vae_name(key, vae.config)
        if key.startswith("quant_conv.") and name not in keys:
            out[key] = (None, _same)  # identity, set below
        elif _is_vae_attention_weight(key):
            out[key] = (name, lambda t: t.reshape(t.shape[0], -1) if t.ndim == 4 else t)
        else:
            out[key] = (name, _same)
    return out


def clip_names(encoder: Any, prefix: str) -> dict[str, tuple[str, Transform]]:
    out: dict[str, tuple[str, Transform]] = {}
    for key in encoder.state_dict():
        if key.endswith("position_ids"):
            continue
        name, third = clip_name(key, prefix)
        if third is not None:
            out[key] = (name, lambda t, i=third: t.chunk(3, dim=0)[i])
        elif key == "visual_projection.weight":
            out[key] = (name, lambda t: t.t())
        else:
            out[key] = (name, _same)
    return out


def load_svd_components(
    path: Path, configs: Path, image_encoder_folder: Path | None, num_frames: int, dtype: str, placement: str,
    allow_pickle: bool,
) -> dict[str, Any]:
    """``unet``, ``vae``, ``image_encoder`` and ``feature_extractor`` from a single file (a model-cache loader)."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    source = _Source(path, allow_pickle)
    keys = set(source.keys())
    parts = check_svd_keys(source.keys(), need_image_encoder=image_encoder_folder is None, name=path.name)
    target = torch_dtype(dtype)

    unet_config = read_json(configs / "unet" / "config.json", "a UNet config")
    unet_config["num_frames"] = int(num_frames)
    unet = _empty(lambda: UNetSpatioTemporalConditionModel.from_config(unet_config))
    _fill(unet, source, unet_names(unet), "UNet", target)

    vae_config = read_json(configs / "vae" / "config.json", "a VAE config")
    vae = _empty(lambda: AutoencoderKLTemporalDecoder.from_config(vae_config))
    names = vae_names(vae, keys)
    fixed = {}
    if any(orig is None for orig, _ in names.values()):  # the original VAE has no quant_conv: the identity
        channels = int(vae.quant_conv.weight.shape[0])
        fixed = {"quant_conv.weight": torch.eye(channels)[:, :, None, None], "quant_conv.bias": torch.zeros(channels)}
    _fill(vae, source, {k: v for k, v in names.items() if v[0] is not None}, "VAE", target,  # type: ignore[misc]
          fixed)

    if image_encoder_folder is not None:
        folder = image_encoder_folder / "image_encoder" if (image_encoder_folder / "image_encoder").is_dir() else image_encoder_folder
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            str(folder), use_safetensors=None if allow_pickle else True, local_files_only=True,
            **{_transformers_dtype_kwarg(): target})
        processor_dir = folder.parent / "feature_extractor"
    else:
        clip_config = CLIPVisionConfig.from_pretrained(str(configs / "image_encoder"), local_files_only=True)
        encoder = _empty(lambda: CLIPVisionModelWithProjection(clip_config))
        _fill(encoder, source, clip_names(encoder, parts["image_encoder"]), "image encoder", target)
        processor_dir = configs / "feature_extractor"
    if not (processor_dir / "preprocessor_config.json").is_file():
        processor_dir = CONFIGS / "feature_extractor"
    processor = CLIPImageProcessor.from_pretrained(str(processor_dir), local_files_only=True)
    use_time_only_convs(unet)
    use_time_only_convs(vae)
    return {
        "unet": unet.to(placement).eval(), "vae": vae.to(placement).eval(),
        "image_encoder": encoder.to(placement).eval(), "feature_extractor": processor,
    }


def frames_from_name(path: Path) -> int:
    """25 for SVD-XT files (``xt`` in the file name), else 14."""
    return 25 if re.search(r"(^|[^a-z])xt([^a-z]|$)", path.stem.lower()) else 14


def load_svd_single_file(
    path: str | os.PathLike[str],
    *,
    image_encoder_folder: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    num_frames: int = 0,
    device: str = "cpu",
    dtype: str = "fp32",
    offload: bool = False,
    allow_pickle: bool = False,
    cache: ModelCache | None = None,
    read_roots: Sequence[Path] | None = None,
) -> dict[str, Any]:
    """Load an SVD single file through the model cache; see the module docstring.

    Returns the handles :func:`~dagfusion.nodes.video.svd.load_svd` returns: ``model`` (the video
    UNet with the scheduler and ``vae`` as its preview VAE), ``clip_vision``, ``vae`` and
    ``scheduler``. The file's header is checked before any tensor is read. With ``read_roots``,
    the file, ``config`` and ``image_encoder_folder`` must really lie under them (links followed).

    :raises UnsafeOperationError: a pickle file without ``allow_pickle``, or a path outside the roots.
    :raises ValueError: not an SVD single file (the message names the missing component).
    """
    from dagfusion.fingerprint import fingerprint_path, new_hasher

    roots = tuple(read_roots) if read_roots is not None else None
    sources = [Path(p) for p in (path, config, image_encoder_folder) if p]
    check_sources(sources, roots)
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"expected a checkpoint file, but {path} does not exist")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UnsafeOperationError(f"{path.name} is a pickle checkpoint; {PICKLE_HINT}")
    elif path.suffix != ".safetensors":
        raise ValueError(f"expected a .safetensors checkpoint, got {path.name}")
    else:
        check_svd_keys(_Source(path, False).keys(), need_image_encoder=image_encoder_folder is None, name=path.name)
    encoder_dir = Path(image_encoder_folder).resolve() if image_encoder_folder else None
    if encoder_dir is not None and not ((encoder_dir / "config.json").is_file()
                                        or (encoder_dir / "image_encoder" / "config.json").is_file()):
        raise FileNotFoundError(f"expected a diffusers SVD folder or an image_encoder folder (config.json and "
                                f"safetensors weights) at {encoder_dir}")
    configs = Path(config).resolve() if config else CONFIGS
    for part in ("unet", "vae", *([] if encoder_dir else ["image_encoder"])):
        if not (configs / part / "config.json").is_file():
            raise FileNotFoundError(f"expected {part}/config.json in the config folder {configs}")
    frames = int(num_frames) if num_frames else frames_from_name(path)
    if frames < 1:
        raise ValueError(f"expected num_frames >= 1 (0: from the file name), got {num_frames}")
    torch_dtype(dtype)
    content = fingerprint_path(path)
    extra = "".join(fingerprint_path(p) for p in (configs, encoder_dir) if p is not None)
    placement = "cpu" if offload else device
    cache = cache if cache is not None else default_cache()
    key = ("svd-single-file", str(path), content, extra, frames, dtype, placement, allow_pickle)

    def loader() -> dict[str, Any]:
        check_sources(sources, roots)
        return load_svd_components(path, configs, encoder_dir, frames, dtype, placement, allow_pickle)

    def ref(name: str) -> ComponentRef:
        h = new_hasher()
        h.update(f"{content}:{extra}:{frames}:{name}:{dtype}:{placement}".encode())
        return ComponentRef(key, name, loader, h.hexdigest(), cache)

    scheduler_dir = configs if (configs / "scheduler" / "scheduler_config.json").is_file() else CONFIGS
    spec = scheduler_spec(scheduler_dir)
    info = {"source": str(path), "fingerprint": content, "dtype": dtype, "device": device,
            "pipeline": "StableVideoDiffusionPipeline", "vae_scale_factor": vae_scale_factor(configs),
            "num_frames": frames}
    model = ModelHandle(ref("unet"), scheduler=spec, info={**info, "component": "unet"}, offload=offload)
    vae = VAEHandle(ref("vae"), info={**info, "component": "vae"}, offload=offload)
    encoder = ImageEncoderHandle(ref("image_encoder"), ref("feature_extractor"),
                                 info={**info, "component": "image_encoder"}, offload=offload)
    model.ref.get()  # load now: errors belong to the loader node
    return {"model": model.with_preview_vae(vae), "clip_vision": encoder, "vae": vae, "scheduler": spec}


# --- writing the original layout -----------------------------------------------------------------


def svd_checkpoint(unet: Any, vae: Any, image_encoder: Any | None = None) -> dict[str, Any]:
    """Diffusers SVD components as one state dict in Stability's layout (contiguous CPU tensors).

    The inverse of :func:`load_svd_single_file`'s mapping: used to write test files and to export
    tuned models. A VAE ``quant_conv`` that is not the identity is folded into the encoder's
    ``conv_out`` (the original VAE has none).
    """
    import torch

    out: dict[str, Any] = {}
    for key, value in unet.state_dict().items():
        out[unet_name(key, unet.config)] = value
    state = dict(vae.state_dict())
    weight, bias = state.pop("quant_conv.weight"), state.pop("quant_conv.bias")
    q = weight[:, :, 0, 0]
    if not (torch.equal(q, torch.eye(q.shape[0], dtype=q.dtype, device=q.device)) and not bool(bias.any())):
        state["encoder.conv_out.weight"] = torch.einsum("oc,cikl->oikl", q, state["encoder.conv_out.weight"])
        state["encoder.conv_out.bias"] = q @ state["encoder.conv_out.bias"] + bias
    for key, value in state.items():
        if _is_vae_attention_weight(key) and value.ndim == 2:
            value = value[:, :, None, None]
        out[vae_name(key, vae.config)] = value
    if image_encoder is not None:
        fused: dict[str, list[Any]] = {}
        for key, value in image_encoder.state_dict().items():
            if key.endswith("position_ids"):
                continue
            name, third = clip_name(key)
            if third is not None:
                fused.setdefault(name, [None, None, None])[third] = value
            else:
                out[name] = value.t() if key == "visual_projection.weight" else value
        for name, pieces in fused.items():
            out[name] = torch.cat(pieces, dim=0)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def write_tiny(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """The tiny SVD pipeline (node examples, tests) as ``{"checkpoint", "config", "folder"}``:
    one Stability-layout file, a config folder (the diffusers folder without weights) and the same
    pipeline as a full diffusers folder. Its VAE ``quant_conv`` is set to the identity, as in SVD."""
    import copy
    import shutil

    import torch
    from dagfusion.testing import models as tiny
    from safetensors.torch import save_file

    folder = Path(folder)
    pipe = copy.deepcopy(tiny._cached_pipeline("svd", 0))
    with torch.no_grad():
        channels = pipe.vae.quant_conv.weight.shape[0]
        pipe.vae.quant_conv.weight.copy_(torch.eye(channels)[:, :, None, None])
        pipe.vae.quant_conv.bias.zero_()
    full = tiny.save(pipe, folder / "tiny-svd")
    config = folder / "config"
    shutil.copytree(full, config, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    checkpoint = folder / "tiny-svd.safetensors"
    save_file(svd_checkpoint(pipe.unet, pipe.vae, pipe.image_encoder), str(checkpoint))
    return {"checkpoint": checkpoint, "config": config, "folder": full}


# --- the node ------------------------------------------------------------------------------------


def _example(folder: Any) -> dict[str, Any]:
    paths = write_tiny(folder / "tiny-svd-single")
    return {"path": str(paths["checkpoint"]), "config": str(paths["config"]), "num_frames": 14, "device": "cpu",
            "dtype": "fp32"}


@node(
    "dagfusion.video.LoadSVDSingleFile",
    version="1.0.0",
    category="video",
    inputs=[
        Input("path", PATH, description="A Stable Video Diffusion single file in Stability's layout "
                                        "(svd.safetensors, svd_xt.safetensors, ...) under the allowed read folders."),
        Input("num_frames", INT, 0, min=0, max=1024,
              description="Frames the model was trained for (14: SVD, 25: SVD-XT); 0 reads it from the file name "
                          "('xt' in the name: 25, else 14)."),
        Input("image_encoder", PATH, optional=True,
              description="A diffusers SVD folder or image_encoder folder supplying the image encoder (for files "
                          "without conditioner.embedders.*.visual.*; replaces the file's encoder when given)."),
        Input("config", PATH, optional=True,
              description="A diffusers SVD folder whose configs replace the shipped ones (other architectures); "
                          "only its JSON files are read."),
        Input("device", STRING, "auto", choices=("auto", "cpu", "cuda", "mps"),
              description="Where to compute; 'auto' takes the settings' device, else cuda > mps > cpu."),
        Input("dtype", STRING, "auto", choices=("auto", "fp32", "fp16", "bf16"),
              description="Weight precision; 'auto' is fp16 on a GPU and fp32 on the CPU."),
    ],
    outputs=list(SVD_OUTPUTS),
    examples=[_example],
)
def load_svd_single_file_node(
    ctx: RunContext, path: str, num_frames: int, image_encoder: str | None, config: str | None, device: str,
    dtype: str,
) -> dict[str, Any]:
    """Load Stable Video Diffusion from one Stability-layout file, offline, with shipped configs."""
    from dagfusion.nodes.diffusion.loaders import placement

    device, dtype = placement(ctx, device, dtype)
    try:
        return load_svd_single_file(
            ctx.input_path(path),
            image_encoder_folder=ctx.input_path(image_encoder) if image_encoder else None,
            config=ctx.input_path(config) if config else None,
            num_frames=num_frames, device=device, dtype=dtype, allow_pickle=ctx.settings.allow_pickle,
            read_roots=ctx.settings.readable_roots,
        )
    except ValueError as exc:
        raise NodeInputError("path", str(exc)) from exc


NODES = (load_svd_single_file_node,)
"""The nodes of this module."""
