"""The packed safetensors format of a weight-only-quantized denoiser.

One ``.safetensors`` file holds exactly the tensors of a
:class:`~dagfusion.nodes.quant.patch.WeightQuantPatch`, so its data takes ``patch.nbytes``
bytes (a 4-bit model's file is about a quarter of its float16 size, plus scales), and a
header of a few kilobytes. Layout (format version 2, what :func:`save` writes): a few flat
tensors and one index —

- ``quant.codes`` — ``uint8``, the bit-packed codes of every quantized weight, one after the other;
- ``quant.scales`` — ``float16``, their scales (each layer's ``(rows, groups)`` flattened);
- ``quant.zeros`` — ``uint8``, the packed zero-points of the asymmetric layers (absent if none);
- ``quant.errors`` — ``float64``, each quantized layer's relative weight error (NaN: unknown;
  absent if none is known);
- ``kept.<dtype>`` — every other parameter, flattened and concatenated per storage dtype
  (``kept.float16``, ``kept.bfloat16`` …);
- ``index`` — ``int32`` (``int64`` when an offset needs it), one row per quantized layer and per kept parameter, in the order of
  the ``names`` metadata; its columns are named by the ``index_columns`` metadata:
  ``role`` (0 quantized layer, 1 kept parameter), ``kind``/``bits``/``group_size``/``symmetric``
  (the layer's format), ``dtype`` (the original dtype of a quantized weight, the storage dtype
  of a kept one; a position in :data:`DTYPES`), ``ndim`` and ``dim0…`` (the shape), and the
  element offsets of the row's slices: ``data_offset`` (into ``quant.codes``, or the kept
  values), ``scales_offset`` and ``zeros_offset`` (−1: none). The slices' lengths follow from
  the shape and the format (:func:`~dagfusion.nodes.quant.formats.expected_nbytes`).

Every tensor costs its own entry in the safetensors JSON header (about 115 bytes), so one
tensor per layer (version 1) made the header 5–7 % of a 2-bit file; version 2's header is
the names and the model's config. :func:`file_nbytes` gives a file's exact size without
writing it, and :func:`file_bits` its bits per denoiser parameter, header included.

The header's metadata (strings, JSON where structured):

- ``dagfusion.format`` = ``"dagfusion.quant.weights"``, ``format_version`` = ``"2"``;
- ``architecture`` — the denoiser's class name; ``config`` — its diffusers config (JSON);
- ``names`` — the index rows' layer/parameter names; ``index_columns`` — its column names;
- ``kept_layers`` — ``{layer: why it was kept}``;
- ``settings`` — how the model was quantized (format, keep patterns, min_params); a mixed
  model's per-layer ``layer_bits`` are not repeated when they are the layers' own bits
  (``layer_bits_from_layers`` = ``"1"``).

Version 1 files (one ``quant.<layer>.codes``/``.scales``/``.zeros`` and one
``kept.<parameter>`` tensor each, the layers described by a ``layers`` JSON metadata entry and
the kept parameters by ``kept``) still load, to the same patch.

:func:`load` rebuilds the patch; applied to a model of the same architecture (any weights: all
parameters come from the file) it gives bit-for-bit the outputs of the patch that was saved.
Buffers (non-parameter state such as position tables) are not stored; they come from the model
the file is loaded onto.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

from dagfusion.nodes.quant.formats import (
    QuantizedTensor,
    QuantSpec,
    expected_nbytes,
    group_width,
    matrix_shape,
    packed_size,
)
from dagfusion.model import parameter_places
from dagfusion.nodes.quant.patch import WeightQuantPatch, architecture_of

FORMAT_TAG = "dagfusion.quant.weights"
FORMAT_VERSION = 2
"""The version :func:`save` writes; :func:`load` reads 1 and 2."""

DTYPES = (
    "float32", "float16", "bfloat16", "float64", "uint8", "int8", "int16", "int32", "int64", "bool",
    "float8_e4m3fn", "float8_e5m2",
)
"""The dtypes an index row's ``dtype`` column can name, by position."""

KINDS = ("int", "fp8_e4m3")
"""The quantization kinds an index row's ``kind`` column can name, by position."""

_FIXED_COLUMNS = (
    "role", "kind", "bits", "group_size", "symmetric", "dtype", "ndim", "data_offset", "scales_offset", "zeros_offset",
)
_QUANT, _KEPT = 0, 1


def _layout(patch: WeightQuantPatch, materialize: bool = True) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and metadata of ``patch``'s version-2 file (the flat tensors as empty ``meta``
    tensors of the right sizes unless ``materialize``: enough to know the file's size)."""
    import torch

    def joined(parts: list[Any]) -> Any:
        if materialize:
            return torch.cat([part.cpu() for part in parts]).contiguous()
        return torch.empty(sum(int(part.numel()) for part in parts), dtype=parts[0].dtype, device="meta")

    names: list[str] = []
    rows: list[list[int]] = []
    codes: list[Any] = []
    scales: list[Any] = []
    zeros: list[Any] = []
    errors: list[float] = []
    offsets = {"codes": 0, "scales": 0, "zeros": 0}
    for name, qt in patch.layers.items():
        c = qt.codes.detach().reshape(-1)
        sc = qt.scales.detach().reshape(-1)
        z = None if qt.zeros is None else qt.zeros.detach().reshape(-1)
        row = [_QUANT, KINDS.index(qt.spec.kind), qt.spec.bits, qt.spec.group_size, int(qt.spec.symmetric),
               DTYPES.index(_dtype_name(qt.dtype)), len(qt.shape),
               offsets["codes"], offsets["scales"], offsets["zeros"] if z is not None else -1]
        offsets["codes"] += c.numel()
        offsets["scales"] += sc.numel()
        codes.append(c)
        scales.append(sc)
        if z is not None:
            offsets["zeros"] += z.numel()
            zeros.append(z)
        names.append(name)
        rows.append(row + list(qt.shape))
        errors.append(float(patch.errors[name]) if name in patch.errors else float("nan"))
    kept_parts: dict[str, list[Any]] = {}
    kept_offsets: dict[str, int] = {}
    for name, tensor in patch.kept.items():
        dtype = _dtype_name(tensor.dtype)
        flat = tensor.detach().reshape(-1)
        offset = kept_offsets.get(dtype, 0)
        rows.append([_KEPT, 0, 0, 0, 0, DTYPES.index(dtype), tensor.dim(), offset, 0, -1] + list(tensor.shape))
        kept_offsets[dtype] = offset + flat.numel()
        kept_parts.setdefault(dtype, []).append(flat)
        names.append(name)
    width = max((len(row) for row in rows), default=len(_FIXED_COLUMNS))
    columns = list(_FIXED_COLUMNS) + [f"dim{i}" for i in range(width - len(_FIXED_COLUMNS))]
    table = [row + [0] * (width - len(row)) for row in rows]
    small = all(-(2**31) <= v < 2**31 for row in table for v in row)  # int32 unless an offset needs more
    tensors: dict[str, Any] = {
        "index": torch.tensor(table, dtype=torch.int32 if small else torch.int64).reshape(len(rows), width)
    }
    if codes:
        tensors["quant.codes"] = joined(codes)
        tensors["quant.scales"] = joined(scales)
    if zeros:
        tensors["quant.zeros"] = joined(zeros)
    if any(e == e for e in errors):  # any not NaN
        tensors["quant.errors"] = torch.tensor(errors, dtype=torch.float64)
    for dtype, parts in kept_parts.items():
        tensors[f"kept.{dtype}"] = joined(parts)
    settings = dict(patch.settings)
    own_bits = {name: qt.spec.bits for name, qt in patch.layers.items()}
    bits_from_layers = "layer_bits" in settings and settings["layer_bits"] == own_bits
    if bits_from_layers:
        del settings["layer_bits"]
    architecture = patch.architecture or {}
    metadata = {
        "dagfusion.format": FORMAT_TAG,
        "format_version": str(FORMAT_VERSION),
        "architecture": str(architecture.get("class", "")),
        "config": json.dumps(architecture.get("config", {}), sort_keys=True, default=str, separators=(",", ":")),
        "names": json.dumps(names, separators=(",", ":")),
        "index_columns": json.dumps(columns, separators=(",", ":")),
        "kept_layers": json.dumps(patch.kept_layers, sort_keys=True, separators=(",", ":")),
        "settings": json.dumps(settings, sort_keys=True, default=str, separators=(",", ":")),
    }
    if bits_from_layers:
        metadata["layer_bits_from_layers"] = "1"
    return tensors, metadata


def save(patch: WeightQuantPatch, path: str | os.PathLike[str]) -> Path:
    """Write ``patch`` to ``path`` in the version-2 layout (parents must exist); returns the path."""
    from safetensors.torch import save_file

    tensors, metadata = _layout(patch)
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path


_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


@functools.lru_cache(maxsize=32)
def _header_order(dtypes: tuple[str, ...]) -> dict[str, int]:
    """The rank safetensors gives each dtype when it lays tensors out (asked of safetensors itself
    with one-element tensors, so that a change of its order cannot make :func:`file_nbytes` wrong)."""
    import torch
    from safetensors.torch import save as save_bytes

    probe = {f"t{i}": torch.zeros(1, dtype=getattr(torch, d)) for i, d in enumerate(dtypes)}
    header = _parse_header(save_bytes(probe))
    order = sorted(header, key=lambda key: header[key]["data_offsets"][0])
    return {dtypes[int(key[1:])]: rank for rank, key in enumerate(order)}


def _parse_header(raw: bytes) -> dict[str, Any]:
    import struct

    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    header.pop("__metadata__", None)
    return header


def header_nbytes(tensors: dict[str, Any], metadata: dict[str, str]) -> int:
    """Bytes the safetensors header of ``tensors`` and ``metadata`` takes (the 8-byte length
    included, padded to a multiple of 8 with spaces, as safetensors writes it)."""
    dtypes = tuple(sorted({_dtype_name(t.dtype) for t in tensors.values()}))
    rank = _header_order(dtypes)
    order = sorted(tensors, key=lambda name: (rank[_dtype_name(tensors[name].dtype)], name))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = int(tensor.numel()) * int(tensor.element_size())
        header[name] = {"dtype": _ST_DTYPES[_dtype_name(tensor.dtype)], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return 8 + len(text) + (-len(text)) % 8


def file_nbytes(patch: WeightQuantPatch) -> int:
    """The exact size in bytes of the file :func:`save` writes for ``patch`` (header included),
    without writing it."""
    tensors, metadata = _layout(patch, materialize=False)
    data = sum(int(t.numel()) * int(t.element_size()) for t in tensors.values())
    return header_nbytes(tensors, metadata) + data


def file_bits(module: Any, patch: WeightQuantPatch) -> float:
    """Bits per parameter of ``module`` in the file :func:`save` writes for ``patch``: every byte
    of it, header included, over the module's distinct parameters (the denominator of
    :func:`~dagfusion.nodes.quant.patch.average_bits`)."""
    count = sum(int(p.value.numel()) for p in parameter_places(module).values())
    return file_nbytes(patch) * 8 / count if count else 0.0


def _raw_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
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
    return raw


def _index_rows(path: Any, raw: dict[str, str], handle: Any) -> list[tuple[str, dict[str, int]]]:
    """``[(name, {column: value})]`` of a version-2 file's index."""
    names = json.loads(raw.get("names", "[]"))
    columns = json.loads(raw.get("index_columns", "[]"))
    if "index" not in set(handle.keys()):
        raise ValueError(f"{path} is missing tensor 'index'")
    index = handle.get_tensor("index")
    if index.dim() != 2 or index.shape[0] != len(names) or index.shape[1] != len(columns) or not set(_FIXED_COLUMNS) <= set(columns):
        raise ValueError(f"{path}: its index ({list(index.shape)}) does not match its {len(names)} names and {len(columns)} columns")
    return [(name, dict(zip(columns, (int(v) for v in row)))) for name, row in zip(names, index.tolist())]


def _shape(row: dict[str, int]) -> tuple[int, ...]:
    return tuple(row[f"dim{i}"] for i in range(row["ndim"]))


def _spec(row: dict[str, int]) -> QuantSpec:
    return QuantSpec(KINDS[row["kind"]], row["bits"], row["group_size"], bool(row["symmetric"]))


def _settings(raw: dict[str, str], layer_bits: dict[str, int]) -> dict[str, Any]:
    settings = json.loads(raw.get("settings", "{}"))
    if raw.get("layer_bits_from_layers") == "1":
        settings["layer_bits"] = dict(layer_bits)
    return settings


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The decoded header metadata of a quantized-weights file (either version), described the
    same way: ``layers`` ``{layer: {"spec", "shape", "dtype", "relative_error"?}}`` and ``kept``
    (the kept parameter names) among the rest.

    :raises ValueError: when the file is not one (or is from a newer format version).
    """
    raw = _raw_metadata(path)
    version = int(raw.get("format_version", "0"))
    try:
        meta: dict[str, Any] = {
            "format_version": version,
            "architecture": raw.get("architecture", ""),
            "config": json.loads(raw.get("config", "{}")),
            "kept_layers": json.loads(raw.get("kept_layers", "{}")),
        }
        if version < 2:
            meta["layers"] = json.loads(raw.get("layers", "{}"))
            meta["kept"] = json.loads(raw.get("kept", "[]"))
            meta["settings"] = json.loads(raw.get("settings", "{}"))
            return meta
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            rows = _index_rows(path, raw, handle)
            errors = handle.get_tensor("quant.errors").tolist() if "quant.errors" in set(handle.keys()) else []
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} has corrupt quantization metadata: {error}") from error
    layers: dict[str, Any] = {}
    kept: list[str] = []
    for name, row in rows:
        if row["role"] == _KEPT:
            kept.append(name)
            continue
        info: dict[str, Any] = {"spec": _spec(row).to_dict(), "shape": list(_shape(row)), "dtype": DTYPES[row["dtype"]]}
        position = len(layers)
        if position < len(errors) and errors[position] == errors[position]:
            info["relative_error"] = errors[position]
        layers[name] = info
    meta["layers"] = layers
    meta["kept"] = sorted(kept)
    meta["settings"] = _settings(raw, {name: info["spec"]["bits"] for name, info in layers.items()})
    return meta


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
    """Read a file written by :func:`save` (either layout version) as a patch, its tensors on ``device``.

    With ``module``, first check that the file fits it (:func:`check_architecture`).

    :raises ValueError: not such a file, a corrupt one, or one of another architecture.
    """
    meta = read_metadata(path)
    if module is not None:
        check_architecture(meta, module, path)
    if meta["format_version"] < 2:
        layers, kept, errors = _load_v1(path, meta, device)
    else:
        layers, kept, errors = _load_v2(path, meta, device)
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


def _checked(path: Any, name: str, qt: QuantizedTensor) -> QuantizedTensor:
    import torch

    if qt.codes.dtype != torch.uint8 or qt.codes.numel() != packed_size(qt.numel, qt.spec.bits) or qt.nbytes != expected_nbytes(qt.shape, qt.spec):
        raise ValueError(f"{path}: the tensors of layer {name!r} do not match its recorded shape {list(qt.shape)} and format")
    return qt


def _load_v1(path: Any, meta: dict[str, Any], device: Any) -> tuple[dict[str, QuantizedTensor], dict[str, Any], dict[str, float]]:
    """Version 1: one tensor per codes, scales, zero-points and kept parameter."""
    import torch
    from safetensors import safe_open

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
            layers[name] = _checked(path, name, QuantizedTensor(spec, codes, scales, zeros, shape, getattr(torch, info["dtype"])))
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
    return layers, kept, errors


def _load_v2(path: Any, meta: dict[str, Any], device: Any) -> tuple[dict[str, QuantizedTensor], dict[str, Any], dict[str, float]]:
    """Version 2: flat tensors sliced by the index rows."""
    import torch
    from safetensors import safe_open

    raw = _raw_metadata(path)
    layers: dict[str, QuantizedTensor] = {}
    kept: dict[str, Any] = {}
    errors: dict[str, float] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        keys = set(handle.keys())
        rows = _index_rows(path, raw, handle)
        flat: dict[str, Any] = {}

        def tensor(key: str) -> Any:
            if key not in flat:
                if key not in keys:
                    raise ValueError(f"{path} is missing tensor {key!r}")
                flat[key] = handle.get_tensor(key).reshape(-1)
            return flat[key]

        def piece(key: str, offset: int, length: int, name: str) -> Any:
            values = tensor(key)
            if offset < 0 or length < 0 or offset + length > values.numel():
                raise ValueError(f"{path}: the index points layer {name!r} outside {key!r}")
            return values[offset:offset + length]

        for name, row in rows:
            try:
                dtype = DTYPES[row["dtype"]]
                shape = _shape(row)
                if row["role"] == _KEPT:
                    kept[name] = piece(f"kept.{dtype}", row["data_offset"], math.prod(shape), name).reshape(shape)
                    continue
                spec = _spec(row)
            except (IndexError, KeyError, ValueError, RuntimeError) as error:
                raise ValueError(f"{path}: corrupt index row for {name!r}: {error}") from None
            matrix_rows, cols = matrix_shape(shape)
            groups = -(-cols // group_width(cols, spec.group_size)) if cols else 0
            codes = piece("quant.codes", row["data_offset"], packed_size(math.prod(shape), spec.bits), name)
            scales = piece("quant.scales", row["scales_offset"], matrix_rows * groups, name).reshape(matrix_rows, groups)
            if (row["zeros_offset"] < 0) != spec.symmetric:
                raise ValueError(f"{path}: layer {name!r} has {'no ' if row['zeros_offset'] < 0 else ''}zero-points but a "
                                 f"{'symmetric' if spec.symmetric else 'asymmetric'} format")
            zeros = None if spec.symmetric else piece("quant.zeros", row["zeros_offset"], packed_size(matrix_rows * groups, spec.bits), name)
            layers[name] = _checked(path, name, QuantizedTensor(spec, codes, scales, zeros, shape, getattr(torch, dtype)))
        for name, info in meta["layers"].items():
            if info.get("relative_error") is not None:
                errors[name] = float(info["relative_error"])
        known = {"index", "quant.codes", "quant.scales", "quant.zeros", "quant.errors"} | {f"kept.{d}" for d in DTYPES}
        extra = sorted(keys - known)
        if extra:
            raise ValueError(f"{path} has tensors its metadata does not describe, e.g. {extra[:3]}")
    return layers, kept, errors


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")
