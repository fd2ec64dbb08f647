"""LoRA files: the diffusers/peft and kohya key layouts, read and written as safetensors.

Reading (:func:`parse`) understands

- diffusers/peft: ``unet.`` / ``transformer.`` / ``text_encoder.`` / ``text_encoder_2.`` (or no
  prefix: the denoiser; ``base_model.model.`` is dropped) + module name + ``.lora_A.weight`` /
  ``.lora_B.weight`` (or the older ``.lora.down.weight`` / ``.lora.up.weight``), an optional
  ``.alpha`` per module, and alphas/ranks from diffusers' ``lora_adapter_metadata`` (``lora_alpha``,
  ``alpha_pattern``); without any alpha, ``alpha = rank`` (scale 1), as diffusers assumes;
- kohya: ``lora_unet_`` / ``lora_transformer_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` +
  the module name with ``.`` flattened to ``_`` + ``.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``.

Writing (:func:`to_state_dict`) produces the diffusers/peft layout (what ``load_lora_weights``
reads, with ``lora_adapter_metadata``) for dotted names, or the kohya layout for a LoRA read from a
kohya file, plus a ``dagfusion.lora`` metadata entry (format, ranks, alphas, target modules,
provenance) from which :func:`parse` restores every alpha exactly. Tensors are written as they
are, so saving and loading again is bit for bit. Only safetensors is read or written.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagfusion.nodes.lora.weights import LoraLayer, LoraWeights

META_KEY = "dagfusion.lora"
DIFFUSERS_META_KEY = "lora_adapter_metadata"
FORMAT = "dagfusion.lora/1"

KOHYA_PREFIXES = (
    ("lora_unet_", "denoiser"), ("lora_transformer_", "denoiser"),
    ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder"),
)
PEFT_PREFIXES = (
    ("unet.", "denoiser"), ("transformer.", "denoiser"),
    ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"),
)
SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)
_KOHYA_OUT = {"denoiser": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def _split(key: str) -> tuple[str, str, str, str] | None:
    """``(layout, component, module name, part)`` of one key, or ``None`` if it is no LoRA key."""
    part = next(((suffix, kind) for suffix, kind in SUFFIXES if key.endswith(suffix)), None)
    if part is None:
        return None
    stem = key[: -len(part[0])]
    for prefix, component in KOHYA_PREFIXES:
        if stem.startswith(prefix):
            return "kohya", component, stem[len(prefix):], part[1]
    stem = stem.removeprefix("base_model.model.")
    for prefix, component in PEFT_PREFIXES:
        if stem.startswith(prefix):
            return "peft", component, stem[len(prefix):], part[1]
    return "peft", "denoiser", stem, part[1]


def _denoiser_prefix(keys: list[str]) -> str:
    return "transformer" if any(k.startswith(("transformer.", "lora_transformer_")) for k in keys) else "unet"


def _alpha_from_metadata(metadata: Mapping[str, str], component: str, prefix: str, name: str) -> float | None:
    """The alpha that dagfusion's or diffusers' metadata gives module ``name``, if any."""
    ours = metadata.get(META_KEY)
    if ours:
        alphas = json.loads(ours).get("alphas", {}).get(component, {})
        if name in alphas:
            return float(alphas[name])
    theirs = metadata.get(DIFFUSERS_META_KEY)
    if not theirs:
        return None
    meta = json.loads(theirs)
    key = prefix if component == "denoiser" else component
    for pattern, alpha in (meta.get(f"{key}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return float(alpha)
    alpha = meta.get(f"{key}.lora_alpha")
    return None if alpha is None else float(alpha)


def parse(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *, digest: str = "") -> LoraWeights:
    """A :class:`LoraWeights` from a state dict in one of the layouts above.

    :raises ValueError: no LoRA key at all, keys in no known layout (DoRA, LoHa, full diffs —
        with examples), layouts mixed, or a module without both its ``down`` and ``up``.
    """
    metadata = dict(metadata or {})
    parts: dict[tuple[str, str], dict[str, Any]] = {}
    layouts: set[str] = set()
    unknown: list[str] = []
    for key, tensor in tensors.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        layout, component, name, part = split
        layouts.add(layout)
        parts.setdefault((component, name), {})[part] = tensor
    if unknown:
        raise ValueError(
            f"expected only LoRA keys (…lora_A/lora_B.weight, …lora.down/up.weight, …lora_down/lora_up.weight, "
            f"…alpha), got {len(unknown)} other keys such as {unknown[:3]} (DoRA, LoHa/LoKr and full-weight "
            "diffs are not supported)"
        )
    if not parts:
        raise ValueError("expected a LoRA file, got one without tensors")
    if len(layouts) > 1:
        raise ValueError("expected one key layout, got kohya (lora_unet_…) and diffusers/peft keys mixed in one file")
    prefix = _denoiser_prefix(list(tensors))
    components: dict[str, dict[str, LoraLayer]] = {}
    for (component, name), found in sorted(parts.items()):
        if "down" not in found or "up" not in found:
            missing = "up" if "down" in found else "down"
            raise ValueError(f"LoRA module {name!r} ({component}) has no {missing} weight")
        down, up = found["down"], found["up"]
        if "alpha" in found:
            alpha = float(found["alpha"].reshape(-1)[0].item())
        else:
            meta_alpha = _alpha_from_metadata(metadata, component, prefix, name)
            alpha = float(down.shape[0]) if meta_alpha is None else meta_alpha
        components.setdefault(component, {})[name] = LoraLayer(down, up, alpha)
    info = json.loads(metadata[META_KEY]).get("provenance", {}) if META_KEY in metadata else {}
    return LoraWeights(components, layout=layouts.pop(), digest=digest, denoiser_prefix=prefix, info=info)


def _file_prefix(weights: LoraWeights, component: str) -> str:
    return weights.denoiser_prefix if component == "denoiser" else component


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def to_state_dict(weights: LoraWeights) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` to write ``weights`` as safetensors (see the module docstring)."""
    tensors: dict[str, Any] = {}
    diffusers_meta: dict[str, Any] = {}
    alphas: dict[str, dict[str, float]] = {}
    targets: dict[str, list[str]] = {}
    for component, layers in weights.components.items():
        prefix = _file_prefix(weights, component)
        for name, layer in layers.items():
            down, up = layer.down.detach().contiguous(), layer.up.detach().contiguous()
            if weights.layout == "kohya":
                stem = _KOHYA_OUT[component] + name
                tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
            else:
                tensors[f"{prefix}.{name}.lora_A.weight"], tensors[f"{prefix}.{name}.lora_B.weight"] = down, up
        alphas[component] = {name: float(layer.alpha) for name, layer in layers.items()}
        targets[component] = sorted(layers)
        ranks = {name: layer.rank for name, layer in layers.items()}
        if weights.layout == "peft" and layers:
            r = _most_common(list(ranks.values()))
            alpha = _most_common(list(alphas[component].values()))
            diffusers_meta.update({
                f"{prefix}.r": r,
                f"{prefix}.lora_alpha": alpha,
                f"{prefix}.target_modules": targets[component],
                f"{prefix}.rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
                f"{prefix}.alpha_pattern": {re.escape(n): v for n, v in alphas[component].items() if v != alpha},
            })
    ranks_all = sorted({layer.rank for layers in weights.components.values() for layer in layers.values()})
    ours = {
        "format": FORMAT,
        "layout": weights.layout,
        "denoiser_prefix": weights.denoiser_prefix,
        "rank": ranks_all[0] if len(ranks_all) == 1 else ranks_all,
        "alphas": alphas,
        "target_modules": targets,
        "provenance": dict(weights.info),
    }
    metadata = {"format": "pt", META_KEY: json.dumps(ours, sort_keys=True, default=str)}
    if diffusers_meta:
        metadata[DIFFUSERS_META_KEY] = json.dumps(diffusers_meta, sort_keys=True)
    return _unshared(tensors), metadata


def _unshared(tensors: dict[str, Any]) -> dict[str, Any]:
    """Tensors safetensors can write (no two sharing storage)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def save(weights: LoraWeights, path: str | Path) -> Path:
    """Write ``weights`` to ``path`` (safetensors); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = to_state_dict(weights)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def load(path: str | Path) -> LoraWeights:
    """Read a LoRA safetensors file (any layout above); its digest hashes the content (names,
    alphas, tensors), not the file's bytes (safetensors orders metadata arbitrarily).

    :raises ValueError: not a safetensors file, or not a LoRA (see :func:`parse`).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"expected a .safetensors LoRA file, got {path.name!r} (only safetensors is read)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"expected a safetensors file, could not read {path.name!r}: {exc}") from None
    return parse(tensors, metadata)


def save_value(value: LoraWeights, path: str) -> None:
    """Serializer for the LORA socket type (the digest is kept in the provenance)."""
    save(LoraWeights(value.components, value.layout, value.digest, value.denoiser_prefix,
                     {**value.info, "digest": value.digest}), path)


def load_value(path: str) -> LoraWeights:
    """Serializer for the LORA socket type: the saved LoRA with its original digest."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    weights = load(path)
    digest = json.loads(metadata.get(META_KEY, "{}")).get("provenance", {}).get("digest", weights.digest)
    return LoraWeights(weights.components, weights.layout, digest, weights.denoiser_prefix, weights.info)
