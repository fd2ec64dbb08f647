"""The packed safetensors format of a weight-only-quantized denoiser.

One ``.safetensors`` file holds exactly the tensors of a
:class:`~dagfusion.nodes.quant.patch.WeightQuantPatch`, so its data takes ``patch.nbytes``
bytes (a 4-bit model's file is about a quarter of its float16 size, plus scales):

- ``quant.<layer>.codes`` — ``uint8``, the bit-packed codes of a quantized weight;
- ``quant.<layer>.scales`` — ``float16``, ``(rows, groups)``;
- ``quant.<layer>.zeros`` — ``uint8``, packed zero-points (asymmetric formats only);
- ``kept.<parameter>`` — every other parameter, in 16 bits.

The header's metadata (strings, JSON where structured):

- ``dagfusion.format`` = ``"dagfusion.quant.weights"``, ``format_version`` = ``"1"``;
- ``architecture`` — the denoiser's class name; ``config`` — its diffusers config (JSON);
- ``layers`` — ``{layer: {"spec": {kind, bits, group_size, symmetric}, "shape": [...], "dtype": "float32",
  "relative_error": e}}``;
- ``kept`` — the kept parameter names; ``kept_layers`` — ``{layer: why it was kept}``;
- ``settings`` — how the model was quantized (format, keep patterns, min_params).

:func:`load` rebuilds the patch; applied to a model of the same architecture (any weights: all
parameters come from the file) it gives bit-for-bit the outputs of the patch that was saved.
Buffers (non-parameter state such as position tables) are not stored; they come from the model
the file is loaded onto.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dagfusion.nodes.quant.formats import (
    QuantizedTensor,
    QuantSpec,
    expected_nbytes,
    packed_size,
)
from dagfusion.model import parameter_places
from dagfusion.nodes.quant.patch import WeightQuantPatch, architecture_of

FORMAT_TAG = "dagfusion.quant.weights"
FORMAT_VERSION = 1


def save(patch: WeightQuantPatch, path: str | os.PathLike[str]) -> Path:
    """Write ``patch`` to ``path`` (parents must exist); returns the path."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    layers: dict[str, Any] = {}
    for name, qt in patch.layers.items():
        tensors[f"quant.{name}.codes"] = qt.codes.detach().contiguous().cpu()
        tensors[f"quant.{name}.scales"] = qt.scales.detach().contiguous().cpu()
        if qt.zeros is not None:
            tensors[f"quant.{name}.zeros"] = qt.zeros.detach().contiguous().cpu()
        layers[name] = {"spec": qt.spec.to_dict(), "shape": list(qt.shape), "dtype": _dtype_name(qt.dtype)}
        if name in patch.errors:
            layers[name]["relative_error"] = patch.errors[name]
    for name, tensor in patch.kept.items():
        tensors[f"kept.{name}"] = tensor.detach().contiguous().cpu()
    architecture = patch.architecture or {}
    metadata = {
        "dagfusion.format": FORMAT_TAG,
        "format_version": str(FORMAT_VERSION),
        "architecture": str(architecture.get("class", "")),
        "config": json.dumps(architecture.get("config", {}), sort_keys=True, default=str),
        "layers": json.dumps(layers, sort_keys=True),
        "kept": json.dumps(sorted(patch.kept)),
        "kept_layers": json.dumps(patch.kept_layers, sort_keys=True),
        "settings": json.dumps(patch.settings, sort_keys=True, default=str),
    }
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The decoded header metadata of a quantized-weights file.

    :raises ValueError: when the file is not one (or is from a newer format version).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    if raw.get("dagfusion.format") != FORMAT_TAG:
        raise ValueError(
            f"{path} is not a dagfusion quantized-weights file (written by dagfusion.quant.Save); "
            f"its metadata has dagfusion.format={raw.get('dagfusion.format')!r}"
        )
    version = int(raw.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} uses quantized-weights format version {version}; this dagfusion reads up to {FORMAT_VERSION}")
    try:
        return {
            "format_version": version,
            "architecture": raw.get("architecture", ""),
            "config": json.loads(raw.get("config", "{}")),
            "layers": json.loads(raw.get("layers", "{}")),
            "kept": json.loads(raw.get("kept", "[]")),
            "kept_layers": json.loads(raw.get("kept_layers", "{}")),
            "settings": json.loads(raw.get("settings", "{}")),
        }
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} has corrupt quantization metadata: {error}") from error


def check_architecture(meta: dict[str, Any], module: Any, path: Any = "the file") -> None:
    """:raises ValueError: when ``module`` is not the architecture the file was saved from."""
    target = architecture_of(module)
    saved_class = meta.get("architecture", "")
    if saved_class != target["class"]:
        raise ValueError(
            f"{path} holds a quantized {saved_class or 'model of unknown class'}, but the model it is loaded onto "
            f"is a {target['class']}; load it onto a model of the same architecture"
        )
    params = parameter_places(module)
    wanted = {f"{name}.weight": tuple(info["shape"]) for name, info in meta["layers"].items()}
    problems = []
    for name in meta["kept"]:
        wanted.setdefault(name, None)  # shape checked when the tensors are read
    for name, shape in wanted.items():
        if name not in params:
            problems.append(f"the model has no parameter {name!r}")
        elif shape is not None and tuple(params[name].value.shape) != shape:
            problems.append(f"{name!r} is {tuple(params[name].value.shape)} in the model, {shape} in the file")
    missing = sorted(set(params) - set(wanted))
    if missing:
        problems.append(f"the file has no values for {len(missing)} parameter(s) of the model, e.g. {missing[:3]}")
    if problems:
        differing = _config_differences(meta.get("config", {}), target["config"])
        hint = f"; config differences (file vs model): {differing}" if differing else ""
        raise ValueError(
            f"{path} was saved from a {saved_class} with a different configuration: "
            + "; ".join(problems[:5]) + hint
        )


def _config_differences(saved: dict[str, Any], current: dict[str, Any], limit: int = 5) -> str:
    keys = sorted(k for k in set(saved) | set(current) if not k.startswith("_") and saved.get(k) != current.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} vs {current.get(k)!r}" for k in keys[:limit])


def load(path: str | os.PathLike[str], module: Any = None, *, device: Any = "cpu") -> WeightQuantPatch:
    """Read a file written by :func:`save` as a patch, its tensors on ``device``.

    With ``module``, first check that the file fits it (:func:`check_architecture`).

    :raises ValueError: not such a file, a corrupt one, or one of another architecture.
    """
    import torch
    from safetensors import safe_open

    meta = read_metadata(path)
    if module is not None:
        check_architecture(meta, module, path)
    layers: dict[str, QuantizedTensor] = {}
    kept: dict[str, Any] = {}
    errors: dict[str, float] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        keys = set(handle.keys())
        expected = set()
        for name, info in meta["layers"].items():
            spec = QuantSpec.from_dict(info["spec"])
            shape = tuple(int(d) for d in info["shape"])
            names = [f"quant.{name}.codes", f"quant.{name}.scales"] + ([] if spec.symmetric else [f"quant.{name}.zeros"])
            absent = [key for key in names if key not in keys]
            if absent:
                raise ValueError(f"{path} is missing tensor(s) {absent}")
            expected.update(names)
            codes = handle.get_tensor(names[0])
            scales = handle.get_tensor(names[1])
            zeros = handle.get_tensor(names[2]) if not spec.symmetric else None
            qt = QuantizedTensor(spec, codes, scales, zeros, shape, getattr(torch, info["dtype"]))
            numel = qt.numel
            if codes.dtype != torch.uint8 or codes.numel() != packed_size(numel, spec.bits) or qt.nbytes != expected_nbytes(shape, spec):
                raise ValueError(f"{path}: the tensors of layer {name!r} do not match its recorded shape {list(shape)} and format")
            layers[name] = qt
            if info.get("relative_error") is not None:
                errors[name] = float(info["relative_error"])
        for name in meta["kept"]:
            key = f"kept.{name}"
            if key not in keys:
                raise ValueError(f"{path} is missing tensor {key!r}")
            expected.add(key)
            kept[name] = handle.get_tensor(key)
        extra = sorted(keys - expected)
        if extra:
            raise ValueError(f"{path} has tensors its metadata does not describe, e.g. {extra[:3]}")
    if module is not None:
        params = parameter_places(module)
        wrong = [n for n, t in kept.items() if tuple(params[n].value.shape) != tuple(t.shape)]
        if wrong:
            raise ValueError(f"{path} was saved from a differently shaped {meta['architecture']}: {wrong[:3]} differ")
    return WeightQuantPatch(
        layers, kept,
        architecture={"class": meta["architecture"], "config": meta["config"]},
        settings=meta["settings"], errors=errors, kept_layers=meta["kept_layers"],
    )


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")
