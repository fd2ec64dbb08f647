"""Textual-inversion embeddings: new prompt tokens whose input vectors come from a file.

:func:`read_embedding_file` reads the safetensors layouts in use:

- diffusers: one tensor under the token's own name (``{"<cat-toy>": (n, d)}``);
- Automatic1111: one tensor under ``emb_params`` (or ``string_to_param.*``); the token is the
  file's stem unless one is given;
- SDXL: two tensors, ``clip_l`` (first text encoder) and ``clip_g`` (second).

:func:`with_embedding` returns a new :class:`~dagfusion.model.TextEncoderBundle` that knows the
token: each tokenizer is **copied** and given the added tokens (``<tok>``, then ``<tok>_1``,
``<tok>_2`` … for a multi-vector embedding, like diffusers' ``load_textual_inversion``), and an
:class:`EmbeddingPatch` on the bundle swaps each encoder's input-embedding layer, only while it
encodes, for one that returns the file's vectors at the new ids and the untouched layer's rows
everywhere else. No encoder weight is copied or changed; the shared tokenizers are unchanged.
Prompts name the token (``"a photo of <cat-toy>"``); the text encoder expands a multi-vector
token to all its parts (:func:`~dagfusion.nodes.diffusion.text.expand_tokens`) the way diffusers does.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dagfusion import PATH, STRING, Input, Output, RunContext, node
from dagfusion.model import TextEncoderBundle
from dagfusion.model.handle import StaticRef, tokenizer_fingerprint
from dagfusion.model.patch import ModelPatch
from dagfusion.nodes.diffusion.text import TEXTUAL_INVERSION, token_names
from dagfusion.nodes.diffusion.types import CLIP

_SINGLE_KEYS = ("emb_params", "string_to_param.*", "string_to_param")


def read_embedding_file(path: str | Path) -> tuple[dict[str, Any], str | None]:
    """``({part: (n, d) tensor}, token named by the file or None)`` from a safetensors embedding.

    ``part`` is ``"clip_l"``/``"clip_g"`` for SDXL files and ``""`` for single-tensor files.

    :raises ValueError: the file holds none of the known layouts.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if "clip_l" in tensors or "clip_g" in tensors:
        return {k: _rows(v) for k, v in tensors.items() if k in ("clip_l", "clip_g")}, None
    for key in _SINGLE_KEYS:
        if key in tensors:
            return {"": _rows(tensors[key])}, None
    if len(tensors) == 1:
        (name, tensor), = tensors.items()
        return {"": _rows(tensor)}, name
    raise ValueError(
        f"{Path(path).name} is not a textual-inversion embedding: expected one tensor (under the token's "
        f"name, 'emb_params' or 'string_to_param.*') or SDXL's 'clip_l' and 'clip_g', found keys {sorted(tensors)[:8]}"
    )


def _rows(tensor: Any) -> Any:
    """An embedding as ``(n, d)`` float32 (a single vector may be stored as ``(d,)``)."""
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[0] < 1:
        raise ValueError(f"expected an embedding of shape (vectors, width), got {tuple(tensor.shape)}")
    return tensor.detach().float().contiguous()


@functools.lru_cache(maxsize=1)
def _layer_class() -> Any:
    """The input-embedding layer :class:`EmbeddingPatch` swaps in (defined on first use: torch is imported then)."""
    import torch

    class VectorsOverEmbedding(torch.nn.Module):
        """The wrapped layer's rows, except ``vectors[i]`` at token id ``ids[i]``."""

        def __init__(self, inner: Any, ids: Sequence[int], vectors: Any) -> None:
            super().__init__()
            self.inner = inner
            self.register_buffer("ids", torch.tensor(list(ids), dtype=torch.long), persistent=False)
            self.register_buffer("vectors", vectors, persistent=False)

        @property
        def weight(self) -> Any:  # callers read the layer's width, dtype and device from it
            return self.inner.weight

        def forward(self, input_ids: Any) -> Any:
            ids = self.ids.to(input_ids.device)
            hits = input_ids.unsqueeze(-1) == ids  # (..., k)
            found = hits.any(-1)
            out = self.inner(torch.where(found, torch.zeros_like(input_ids), input_ids))
            chosen = (hits.to(torch.long) * torch.arange(len(ids), device=ids.device)).sum(-1)
            vectors = self.vectors.to(device=out.device, dtype=out.dtype)[chosen]
            return torch.where(found.unsqueeze(-1), vectors, out)

    return VectorsOverEmbedding


class EmbeddingPatch(ModelPatch):
    """While applied to a text encoder whose class is ``target`` (any class when empty), its input
    embeddings return ``vectors[i]`` for token id ``ids[i]``; other ids are looked up unchanged.

    The key hashes the ids, the vectors and the target, so different embeddings never share a key.
    """

    def __init__(self, ids: Sequence[int], vectors: Any, target: str = "") -> None:
        self.ids = tuple(int(i) for i in ids)
        self.vectors = vectors.detach().float().cpu().contiguous()
        self.target = target
        digest = hashlib.sha256(self.vectors.numpy().tobytes()).hexdigest()[:16]
        self.key = f"dagfusion.textual_inversion:{target or '*'}:{','.join(map(str, self.ids))}:{digest}"

    @contextlib.contextmanager
    def apply(self, module: Any) -> Iterator[Any]:
        if self.target and type(module).__name__ != self.target:
            yield module
            return
        original = module.get_input_embeddings()
        module.set_input_embeddings(_layer_class()(original, self.ids, self.vectors))
        try:
            yield module
        finally:
            module.set_input_embeddings(original)


def _parts_for(bundle: TextEncoderBundle, parts: Mapping[str, Any]) -> list[Any]:
    """The ``(n, d)`` tensor for each encoder of ``bundle``, in order."""
    if bundle.kind == "sdxl" and len(bundle.encoders) == 2:
        if set(parts) != {"clip_l", "clip_g"}:
            raise ValueError(
                "an SDXL text-encoder pair needs an embedding file with both 'clip_l' and 'clip_g' tensors; "
                f"this one has {sorted(k or 'one tensor' for k in parts)}"
            )
        return [parts["clip_l"], parts["clip_g"]]
    if len(bundle.encoders) != 1:
        raise ValueError(f"textual-inversion embeddings need a text encoder; this {bundle.kind!r} bundle has {len(bundle.encoders)}")
    if "" in parts:
        return [parts[""]]
    if "clip_l" in parts:
        return [parts["clip_l"]]
    raise ValueError("this SDXL embedding file has no 'clip_l' tensor for a single CLIP text encoder")


def with_embedding(
    bundle: TextEncoderBundle, parts: Mapping[str, Any], token: str, patch_class: Callable[..., Any] = EmbeddingPatch
) -> TextEncoderBundle:
    """A new bundle whose tokenizers know ``token`` (see the module docstring); ``bundle`` is unchanged.

    ``patch_class(ids, vectors, target)`` makes each encoder's patch (:class:`EmbeddingPatch`
    unless given, e.g. a trainable one).

    :raises ValueError: a vector's width differs from its encoder's (both widths named), or the
        token (or one of its parts) is already in a tokenizer's vocabulary.
    """
    if bundle.kind == "none":
        raise ValueError("this model has no text encoder (it is class-conditional): there is nothing to embed into")
    if not token.strip() or any(ch.isspace() for ch in token):
        raise ValueError(f"the token must be one word without spaces, got {token!r}")
    tensors = _parts_for(bundle, parts)
    counts = {int(t.shape[0]) for t in tensors}
    if len(counts) != 1:
        raise ValueError(f"the SDXL embedding's two parts have different numbers of vectors: {sorted(counts)}")
    count = counts.pop()
    names = token_names(token, count)
    tokenizers, patches = [], []
    for index, (tensor, tok_ref, enc_ref) in enumerate(zip(tensors, bundle.tokenizers, bundle.encoders)):
        encoder = enc_ref.get()
        width = int(encoder.get_input_embeddings().weight.shape[-1])
        if int(tensor.shape[-1]) != width:
            label = "" if len(tensors) == 1 else f" ({'clip_l' if index == 0 else 'clip_g'}, text encoder {index + 1})"
            raise ValueError(
                f"the embedding's vectors are {int(tensor.shape[-1])} wide but the text encoder's token embeddings "
                f"are {width} wide{label}: the embedding was trained for another model"
            )
        tokenizer = copy.deepcopy(tok_ref.get())
        vocab = tokenizer.get_vocab()
        taken = [n for n in names if n in vocab]
        if taken:
            raise ValueError(f"the token(s) {taken} are already in the tokenizer's vocabulary; choose another token name")
        ids = []
        for name in names:  # one at a time, as diffusers does, so ids match
            tokenizer.add_tokens(name)
            ids.append(int(tokenizer.convert_tokens_to_ids(name)))
        tokenizers.append(StaticRef(tokenizer, tokenizer_fingerprint(tokenizer)))
        target = type(encoder).__name__ if len(tensors) > 1 else ""
        patches.append(patch_class(ids, tensor, target))
    known = dict(bundle.options.get(TEXTUAL_INVERSION) or {})
    known[token] = count
    result = TextEncoderBundle(
        bundle.kind, bundle.encoders, tokenizers, options={**bundle.options, TEXTUAL_INVERSION: known},
        info=bundle.info, offload=bundle.offload, patches=bundle.patches,
    )
    for patch in patches:
        result = result.with_patch(patch)
    return result


def _example(folder: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from dagfusion.testing import models as tiny

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "shiny.safetensors"
    save_file({"emb_params": torch.linspace(-1, 1, 2 * 32).reshape(2, 32)}, str(path))
    return {"clip": tiny.sd_handles()["clip"], "path": str(path), "token": "<shiny>"}


@node(
    "dagfusion.text.LoadEmbedding",
    version="1.0.0",
    category="conditioning",
    inputs=[
        Input("clip", CLIP, link_only=True, description="Text encoder bundle from a model loader."),
        Input("path", PATH, description="A textual-inversion embedding (.safetensors: diffusers, A1111 or SDXL clip_l/clip_g)."),
        Input("token", STRING, "",
              description="The word prompts use for it, e.g. '<my-style>' (empty: the name stored in the file, else the file's stem)."),
    ],
    outputs=[Output("clip", CLIP, "The bundle with the token added (the input bundle is unchanged).")],
    examples=[_example],
)
def load_embedding(ctx: RunContext, clip: TextEncoderBundle, path: str, token: str) -> TextEncoderBundle:
    """Add a textual-inversion embedding to a text encoder: prompts can then use its token by name.

    A multi-vector embedding adds ``token``, ``token_1`` … and a prompt naming ``token`` uses all
    of them. Tokenizers are copied and the encoder's input embeddings are extended only while it
    encodes (no encoder weight is copied). A vector width that differs from the encoder's is an error.
    """
    resolved = ctx.input_path(path)
    if not resolved.is_file():
        raise FileNotFoundError(f"expected an embedding file, but {str(resolved)!r} does not exist")
    if resolved.suffix.lower() != ".safetensors":
        raise ValueError(f"expected a .safetensors embedding, got {resolved.name} (pickled .pt/.bin files are not loaded)")
    parts, stored = read_embedding_file(resolved)
    return with_embedding(clip, parts, token.strip() or stored or resolved.stem)


NODES = (load_embedding,)
