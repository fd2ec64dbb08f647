"""Saving and loading structural models: a folder with safetensors weights and a JSON config.

Format ``dagfusion.structural``, version 1 — a folder holding:

- ``config.json``::

      {"format": "dagfusion.structural", "format_version": 1,
       "targets": ["rgb", "depth", "normal"], "latent_channels": 4, "layout_channels": 2,
       "unet": {... the diffusers UNet2DConditionModel config the model was built from ...},
       "scheduler": {"class_name": "DDIMScheduler", "config": {...}, "name": "default"} or null,
       "vae_scale_factor": 8, "dtype": "float32", "parameters": 1213036,
       "weights": "structural.safetensors", "weights_sha256": "…", "source": "…"}

- ``structural.safetensors``: the :class:`~dagfusion.nodes.structure.structural_model.StructuralUNet`
  state dict — the trunk under ``trunk.`` (diffusers UNet names, without the branch layers) and
  each target's branch under ``branches.<target>.`` (``conv_in``, ``down``, ``up``,
  ``conv_norm_out``, ``conv_out``) — with the same config (without the digest) as the file's
  only metadata entry, ``dagfusion_config`` (safetensors writes several entries in no fixed
  order), so the file alone is enough to load and equal models give byte-identical files.

Loading builds the UNet from its config, the structural model from it, and loads the weights
strictly (every tensor present, none extra, shapes equal). Only safetensors is read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT = "dagfusion.structural"
FORMAT_VERSION = 1
WEIGHTS = "structural.safetensors"
CONFIG = "config.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe(handle: Any, dtype: Any) -> dict[str, Any]:
    """The config document of ``handle`` saved in ``dtype`` (without the weights' digest)."""
    module = handle.module
    scheduler = None
    if handle.scheduler is not None:
        scheduler = {"class_name": handle.scheduler.class_name, "config": json.loads(json.dumps(dict(handle.scheduler.config), default=_jsonable)),
                     "name": getattr(handle.scheduler, "name", "default")}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **module.config.to_dict(),
        "scheduler": scheduler,
        "vae_scale_factor": handle.vae_scale_factor,
        "dtype": str(dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in module.parameters()),
        "weights": WEIGHTS,
        "source": str(handle.info.get("source", "")),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def save(handle: Any, folder: Path, dtype: str = "keep") -> Path:
    """Write ``handle`` (a structural handle) into ``folder`` (created); returns the folder.

    :param dtype: ``"keep"`` (the model's), ``"fp32"``, ``"fp16"`` or ``"bf16"``.
    :raises ValueError: an unknown dtype, or a handle with patches (they are not weights).
    """
    import torch
    from safetensors.torch import save_file

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype != "keep" and dtype not in dtypes:
        raise ValueError(f"expected dtype in ['keep', 'fp32', 'fp16', 'bf16'], got {dtype!r}")
    if handle.patches:
        names = ", ".join(type(p).__name__ for p in handle.patches)
        raise ValueError(f"a structural model with patches ({names}) cannot be saved as weights; save the unpatched model")
    module = handle.module
    target = dtypes.get(dtype, handle.module.dtype)
    tensors = {}
    for name, value in module.state_dict().items():
        value = value.detach()
        if value.is_floating_point():
            value = value.to(target)
        tensors[name] = value.contiguous().cpu()
    document = describe(handle, target)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS
    # one metadata entry: safetensors writes several in no fixed order, and the file's bytes are its identity
    save_file(tensors, str(weights), metadata={"dagfusion_config": json.dumps(document, sort_keys=True)})
    document["weights_sha256"] = _sha256(weights)
    (folder / CONFIG).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def read_config(path: Path) -> tuple[dict[str, Any], Path]:
    """The config document and the weights file of a saved model (a folder, or its ``.safetensors``).

    :raises ValueError: not a structural model folder, or an unknown format version.
    """
    from safetensors import safe_open

    folder = path if path.is_dir() else path.parent
    weights = folder / WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise ValueError(f"expected a structural model folder with {WEIGHTS}, found no such file in {folder}")
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata() or {}
    text = metadata.get("dagfusion_config")
    if text is None:
        config_file = folder / CONFIG
        if not config_file.is_file():
            raise ValueError(f"{weights.name} carries no structural config and there is no {CONFIG} beside it")
        text = config_file.read_text(encoding="utf-8")
    document = json.loads(text)
    if document.get("format") != FORMAT:
        raise ValueError(f"expected a {FORMAT} model, got format {document.get('format')!r}")
    if int(document.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"this model is format version {document.get('format_version')}; this dagfusion reads up to {FORMAT_VERSION}"
        )
    return document, weights


def load(path: Path, *, device: str = "cpu", dtype: str = "auto") -> Any:
    """A :class:`~dagfusion.nodes.structure.structural_model.StructuralHandle` from a saved model.

    :param dtype: ``"auto"`` (as stored), ``"fp32"``, ``"fp16"`` or ``"bf16"``.
    :raises ValueError: see :func:`read_config`; weights that do not match the config.
    """
    import torch
    from dagfusion.fingerprint import fingerprint_path
    from dagfusion.nodes.diffusion.data import SchedulerSpec
    from dagfusion.nodes.structure.structural_model import (
        StructuralHandle,
        structural_from_config,
    )
    from safetensors.torch import load_file

    document, weights = read_config(path)
    module = structural_from_config(document["unet"], document["targets"], int(document["layout_channels"]))
    if module.latent_channels != int(document["latent_channels"]):
        raise ValueError(
            f"the config says {document['latent_channels']} latent channels but its UNet config gives {module.latent_channels}"
        )
    state = load_file(str(weights))
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or extra or wrong:
        raise ValueError(
            f"the weights do not match the config: missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}"
        )
    module.load_state_dict(state, strict=True)
    stored = next(iter(state.values())).dtype if state else torch.float32
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    wanted = stored if dtype == "auto" else names[dtype]
    module.to(device=device, dtype=wanted).eval().requires_grad_(False)
    scheduler = None
    if document.get("scheduler"):
        spec = document["scheduler"]
        scheduler = SchedulerSpec(spec["class_name"], spec["config"], spec.get("name", "default"))
    fp = f"structural-file:{fingerprint_path(weights)}:{wanted}:{device}"
    return StructuralHandle.wrap(
        module, fingerprint=fp, scheduler=scheduler, vae_scale_factor=int(document.get("vae_scale_factor", 8)),
        info={"source": str(weights.parent), "format": f"{FORMAT}/{document.get('format_version')}"},
    )
