"""The ``CONTROL_NET`` value (:class:`ControlNetHandle`), loading and saving ControlNets, and the
checks that a ControlNet fits a UNet.

Loading never uses the network: a diffusers folder through ``ControlNetModel.from_pretrained``
(``local_files_only=True``, ``use_safetensors=True``); a single ``.safetensors`` file either as
written by :func:`save_single_file` (diffusers tensor names, the model config in the file's
metadata: read back bit for bit) or in the original ControlNet layout through
``ControlNetModel.from_single_file`` with a config folder — the shipped SD 1.5 / SD 2.1 configs
(package data in ``configs/controlnet/``) or a folder the caller names — so diffusers never
reaches for the Hub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dagfusion.model import ComponentRef, StaticRef, as_ref

CONFIGS = Path(__file__).parent / "configs" / "controlnet"
ARCHITECTURES = {"sd15": 768, "sd21": 1024}
"""Shipped single-file configs and the cross-attention width that identifies each."""

METADATA_KEY = "dagfusion.controlnet"
"""The one metadata entry of a single file written by :func:`save_single_file`: JSON with the model
``config`` and the provenance (one entry, because safetensors writes several in no fixed order and
equal files must be equal byte for byte)."""


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def built_for(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a ControlNet (or UNet) config says about the UNet it works with: cross-attention
    width, block layout, latent and conditioning channels, added embeddings."""
    layers = config.get("layers_per_block", 2)
    return {
        "cross_attention_dim": _plain(config.get("cross_attention_dim")),
        "block_out_channels": _plain(list(config.get("block_out_channels", ()))),
        "down_block_types": _plain(list(config.get("down_block_types", ()))),
        "layers_per_block": _plain(layers),
        "in_channels": int(config.get("in_channels", 4)),
        "conditioning_channels": int(config.get("conditioning_channels", 3)),
        "addition_embed_type": config.get("addition_embed_type"),
        "global_pool_conditions": bool(config.get("global_pool_conditions", False)),
    }


class ControlNetHandle:
    """A ControlNet by reference, with what it was built for (the ``CONTROL_NET`` socket type).

    Like a model handle it is light: the weights live in the shared model cache (loaded) or in
    memory (built or trained), and the handle never changes them.

    Attributes:
        ref: Where the ``ControlNetModel`` lives.
        info: Plain data, read only: ``source``, ``fingerprint`` (the weights' identity),
            ``device``, ``dtype`` and :func:`built_for` of its config.
    """

    def __init__(self, ref: Any, info: Mapping[str, Any]) -> None:
        self.ref = as_ref(ref)
        self.info: Mapping[str, Any] = MappingProxyType(dict(info))

    @classmethod
    def from_module(cls, module: Any, *, source: str, fingerprint: str | None = None) -> ControlNetHandle:
        """A handle over a ``ControlNetModel`` held in memory; ``fingerprint`` defaults to a digest
        of its weights (two equal modules fingerprint equally)."""
        from dagfusion.fingerprint import fingerprint as digest

        fp = fingerprint or f"weights:{digest(module)}"
        param = next(module.parameters())
        info = {"source": source, "fingerprint": fp, "device": str(param.device),
                "dtype": str(param.dtype).replace("torch.", ""), **built_for(module.config)}
        return cls(StaticRef(module, fp), info)

    @property
    def module(self) -> Any:
        """The shared ``ControlNetModel`` (never modify it)."""
        return self.ref.get()

    @property
    def conditioning_channels(self) -> int:
        return int(self.info["conditioning_channels"])

    @property
    def fingerprint(self) -> str:
        return str(self.info["fingerprint"])

    def __dagfusion_fingerprint__(self) -> str:
        return "controlnet:" + json.dumps(_plain(self.info), sort_keys=True, default=str)

    def __repr__(self) -> str:
        return f"ControlNetHandle({self.info.get('source', '?')!r}, conditioning_channels={self.conditioning_channels})"


def fit_problems(info: Mapping[str, Any], unet: Any) -> list[str]:
    """Why a ControlNet built as ``info`` says cannot drive ``unet`` (empty when it can): each
    problem names what the ControlNet expects and what the UNet has."""
    config = getattr(unet, "config", None)
    names = {c.__name__ for c in type(unet).__mro__}
    if config is None or "UNet2DConditionModel" not in names:
        return [f"ControlNets drive UNet2DConditionModel denoisers; this model's denoiser is {type(unet).__name__}"]
    unet_info = built_for(config)
    problems = []
    for key, what in (("cross_attention_dim", "cross-attention width"), ("block_out_channels", "block_out_channels"),
                      ("down_block_types", "down blocks"), ("layers_per_block", "layers_per_block"),
                      ("addition_embed_type", "added embeddings")):
        if info.get(key) != unet_info[key]:
            problems.append(f"the ControlNet was built for {what} {info.get(key)!r}, the UNet has {unet_info[key]!r}")
    if int(info.get("in_channels", 4)) > unet_info["in_channels"]:
        problems.append(f"the ControlNet takes {info.get('in_channels')}-channel latents, the UNet "
                        f"{unet_info['in_channels']}")
    return problems


# --- loading ------------------------------------------------------------------------------------


def _torch_dtype(dtype: str) -> Any:
    from dagfusion.nodes.diffusion.loading import torch_dtype

    return torch_dtype(dtype)


def controlnet_folder(path: Path) -> Path:
    """The folder holding the ControlNet's ``config.json``: ``path`` or its ``controlnet/`` subfolder.

    :raises FileNotFoundError: neither has a ``config.json`` naming a ControlNetModel.
    """
    for candidate in (path, path / "controlnet"):
        config = candidate / "config.json"
        if config.is_file():
            with open(config, encoding="utf-8") as fh:
                name = json.load(fh).get("_class_name")
            if name != "ControlNetModel":
                raise ValueError(f"{config} describes a {name}, not a ControlNetModel")
            return candidate
    raise FileNotFoundError(f"expected a diffusers ControlNet folder (config.json and safetensors weights) at {path}")


def read_single_file(path: Path) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata of a safetensors file (header only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys()), dict(fh.metadata() or {})


def _shape(path: Path, key: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return tuple(fh.get_slice(key).get_shape())


def detect_single_file(path: Path, keys: Sequence[str]) -> tuple[str, int]:
    """``(architecture, conditioning channels)`` of an original-layout ControlNet file.

    :raises ValueError: the cross-attention width matches no shipped config (naming it), or the
        file holds no ControlNet.
    """
    hint = next((k for k in keys if k.endswith(("input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight"))), None)
    if hint is None:
        raise ValueError(f"{path.name} holds no ControlNet (no input_hint_block / controlnet_cond_embedding tensors)")
    channels = int(_shape(path, hint)[1])
    to_k = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise ValueError(f"{path.name}: cannot find a cross-attention layer to tell the architecture; pass config")
    width = int(_shape(path, to_k)[1])
    for arch, dim in ARCHITECTURES.items():
        if dim == width:
            return arch, channels
    raise ValueError(f"{path.name} has cross-attention width {width}; the shipped configs are "
                     f"{ {a: d for a, d in ARCHITECTURES.items()} } — pass a config folder for other architectures")


def load_module(path: Path, *, architecture: str, config: Path | None, dtype: str, device: str) -> Any:
    """The ``ControlNetModel`` at ``path`` (folder or ``.safetensors``), in eval mode on ``device``.

    :raises ValueError: a pickle file, an unknown architecture or a file that is no ControlNet.
    """
    from diffusers import ControlNetModel

    torch_dtype = _torch_dtype(dtype)
    if path.is_dir():
        folder = controlnet_folder(path)
        if not any(folder.glob("*.safetensors")):
            raise ValueError(f"{folder} holds no .safetensors weights (pickle weights are never read here)")
        module = ControlNetModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                 torch_dtype=torch_dtype)
        return module.to(device).eval()
    if path.suffix != ".safetensors":
        raise ValueError(f"expected a ControlNet folder or a .safetensors file, got {path.name}")
    keys, metadata = read_single_file(path)
    if METADATA_KEY in metadata and config is None:
        from safetensors.torch import load_file

        module = ControlNetModel.from_config(json.loads(metadata[METADATA_KEY])["config"])
        module.load_state_dict(load_file(str(path)), strict=True)
        return module.to(device=device, dtype=torch_dtype).eval()
    if config is not None:
        folder = controlnet_folder(config)
        hint = next((k for k in keys if k.endswith(("input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight"))), None)
        channels = int(_shape(path, hint)[1]) if hint else int(ControlNetModel.load_config(str(folder)).get("conditioning_channels", 3))
    else:
        arch, channels = detect_single_file(path, keys)
        if architecture != "auto":
            if architecture not in ARCHITECTURES:
                raise ValueError(f"expected an architecture in {['auto', *ARCHITECTURES]}, got {architecture!r}")
            arch = architecture
        folder = CONFIGS / arch
    module = ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True,
                                              torch_dtype=torch_dtype, conditioning_channels=channels)
    return module.to(device).eval()


def load_controlnet(path: Path, *, architecture: str = "auto", config: Path | None = None, dtype: str = "fp32",
                    device: str = "cpu") -> ControlNetHandle:
    """A handle over the ControlNet at ``path`` through the shared model cache (see the module docstring)."""
    from dagfusion.fingerprint import fingerprint_path, new_hasher
    from dagfusion.model import default_cache
    from diffusers import ControlNetModel

    path = Path(path).resolve()
    content = fingerprint_path(path)
    config_fp = fingerprint_path(config) if config is not None else ""
    key = ("controlnet", str(path), content, config_fp, architecture, dtype, device)

    def loader() -> dict[str, Any]:
        return {"controlnet": load_module(path, architecture=architecture, config=config, dtype=dtype, device=device)}

    h = new_hasher()
    h.update(f"{content}:{config_fp}:{architecture}:{dtype}:{device}".encode())
    ref = ComponentRef(key, "controlnet", loader, h.hexdigest(), default_cache())
    module = ref.get()  # load now: errors belong to the loader node
    assert isinstance(module, ControlNetModel)
    info = {"source": str(path), "fingerprint": ref.fingerprint, "device": device, "dtype": dtype,
            **built_for(module.config)}
    return ControlNetHandle(ref, info)


def from_unet(unet: Any, *, conditioning_channels: int, seed: int, source: str, fingerprint: str,
              embedding_channels: Sequence[int] = (16, 32, 96, 256)) -> ControlNetHandle:
    """A new ControlNet initialised from ``unet`` (``ControlNetModel.from_unet``: the encoder's
    weights copied, zero convolutions at zero, the conditioning embedding — ``embedding_channels``,
    one downsampling by 2 between each — drawn from ``seed``)."""
    import torch
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        module = ControlNetModel.from_unet(unet, conditioning_channels=int(conditioning_channels),
                                           conditioning_embedding_out_channels=tuple(embedding_channels))
    param = next(unet.parameters())
    if next(module.parameters()).dtype != param.dtype:
        module = module.to(dtype=param.dtype)
    module = module.to(param.device).eval()
    module.requires_grad_(False)
    return ControlNetHandle.from_module(module, source=source, fingerprint=fingerprint)


# --- saving -------------------------------------------------------------------------------------


def save_folder(handle: ControlNetHandle, folder: Path) -> Path:
    """Write the ControlNet as a diffusers folder (``config.json`` + safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle.module.save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_single_file(
    handle: ControlNetHandle, path: Path, extra: Mapping[str, Any] | None = None, dtype: str = "fp32"
) -> Path:
    """Write the ControlNet as one safetensors file: diffusers tensor names (floating tensors in
    ``dtype``: ``"fp32"`` or ``"fp16"``), the config and the provenance in the metadata
    (:data:`METADATA_KEY`); :func:`load_module` reads it back exactly."""
    import torch
    from safetensors.torch import save_file

    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"expected dtype 'fp32' or 'fp16', got {dtype!r}")
    target = torch.float16 if dtype == "fp16" else torch.float32
    module = handle.module
    tensors = {
        k: (v.detach().to(target) if v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in module.state_dict().items()
    }
    config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    document = {"config": _plain(config), "source": str(handle.info.get("source", "")),
                "fingerprint": handle.fingerprint, **dict(extra or {})}
    metadata = {METADATA_KEY: json.dumps(document, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, os.fspath(path), metadata=metadata)
    return path
