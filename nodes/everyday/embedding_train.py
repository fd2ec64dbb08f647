"""Training textual-inversion embeddings, and saving them.

:func:`trainable_embedding` adds a new token to a text-encoder bundle the way
:func:`~dagfusion.nodes.everyday.embeddings.with_embedding` (LoadEmbedding) does — copied
tokenizers that know ``<tok>``, ``<tok>_1`` …, and a patch that swaps in the token's vectors while
an encoder runs — but the patch is a :class:`TrainableEmbeddingPatch`: its vectors are a
``torch.nn.Parameter`` offered by ``trainable_parameters()``, and they start at the mean input
embedding of the tokens of an initial text (``"red"`` for a new colour, say).

``dagfusion.train.Train`` with ``trainable: patches`` then trains exactly those vectors (the text
encoder's and the denoiser's weights stay frozen): it encodes each caption with a copy of the
patch every step, with autograd on, and returns the bundle with the trained patch on its ``clip``
output. :func:`embedding_tensors` gives what ``dagfusion.text.SaveEmbedding`` writes: the
diffusers layout ``{token: (n, width)}`` for one text encoder (read by LoadEmbedding and by
diffusers' ``load_textual_inversion``), ``{"clip_l", "clip_g"}`` for an SDXL pair.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dagfusion import INT, PATH, STRING, Input, Output, RunContext, node
from dagfusion.errors import NodeInputError
from dagfusion.model import TextEncoderBundle
from dagfusion.nodes.diffusion.types import CLIP
from dagfusion.nodes.everyday.embeddings import EmbeddingPatch, with_embedding

MAX_VECTORS = 16
FORMAT = "dagfusion textual inversion"


class TrainableEmbeddingPatch(EmbeddingPatch):
    """An :class:`~dagfusion.nodes.everyday.embeddings.EmbeddingPatch` whose vectors train.

    ``vectors`` is a ``torch.nn.Parameter`` (frozen until a training loop enables it). While it
    requires a gradient, :meth:`apply` also turns autograd on around the encoder's use (text
    encoding otherwise runs without it) and freezes the encoder's own weights for that time, so
    gradients reach the vectors only. The key hashes the current vectors: a trained patch never
    shares a key with the untrained one. ``token`` and ``init_text`` are kept for saving.
    """

    def __init__(self, ids: Sequence[int], vectors: Any, target: str = "", *, token: str = "", init_text: str = "") -> None:
        import torch

        self.ids = tuple(int(i) for i in ids)
        self.target = target
        self.token = token
        self.init_text = init_text
        self.vectors = torch.nn.Parameter(vectors.detach().float().cpu().clone().contiguous(), requires_grad=False)

    @property  # type: ignore[override]
    def key(self) -> str:
        digest = hashlib.sha256(self.vectors.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        return f"dagfusion.textual_inversion.trainable:{self.target or '*'}:{','.join(map(str, self.ids))}:{digest}"

    def trainable_parameters(self) -> dict[str, Any]:
        return {"vectors": self.vectors}

    @contextlib.contextmanager
    def apply(self, module: Any) -> Iterator[Any]:
        if not self.vectors.requires_grad or (self.target and type(module).__name__ != self.target):
            with super().apply(module) as applied:
                yield applied
            return
        import torch

        frozen = [p for p in module.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            with torch.enable_grad(), super().apply(module) as applied:
                yield applied
        finally:
            for p in frozen:
                p.requires_grad_(True)


def check_new_token(bundle: TextEncoderBundle, token: str, vectors: int) -> None:
    """:raises ValueError: ``token`` is not one word, or it (or one of its parts) is already a
    single token of one of the bundle's tokenizers (a word the model knows)."""
    from dagfusion.nodes.diffusion.text import token_names

    if not token.strip() or any(ch.isspace() for ch in token):
        raise ValueError(f"the token must be one word without spaces, got {token!r}")
    for ref in bundle.tokenizers:
        tokenizer = ref.get()
        for name in token_names(token, vectors):
            if name in tokenizer.get_vocab() or len(tokenizer(name, add_special_tokens=False).input_ids) == 1:
                raise ValueError(
                    f"{name!r} is already a token the text encoder knows; a new embedding needs a new word, "
                    f"such as '<{token.strip('<>')}>'"
                )


def init_vectors(bundle: TextEncoderBundle, init_text: str, vectors: int) -> list[Any]:
    """For each encoder: ``vectors`` rows, each the mean input embedding of ``init_text``'s tokens."""
    if not init_text.strip():
        raise ValueError("init_text must name at least one word (e.g. 'red' for a new colour)")
    out = []
    for tok_ref, enc_ref in zip(bundle.tokenizers, bundle.encoders):
        ids = tok_ref.get()(init_text, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"init_text {init_text!r} gives no tokens")
        weight = enc_ref.get().get_input_embeddings().weight
        mean = weight.detach()[list(ids)].float().mean(0).cpu()
        out.append(mean.unsqueeze(0).repeat(vectors, 1))
    return out


def trainable_embedding(bundle: TextEncoderBundle, token: str, init_text: str, vectors: int) -> TextEncoderBundle:
    """A new bundle knowing ``token`` through a :class:`TrainableEmbeddingPatch` per encoder (see
    the module docstring); ``bundle`` is unchanged."""
    if bundle.kind == "none":
        raise ValueError("this model has no text encoder (it is class-conditional): there is nothing to embed into")
    if not 1 <= vectors <= MAX_VECTORS:
        raise ValueError(f"vectors must be 1 to {MAX_VECTORS}, got {vectors}")
    check_new_token(bundle, token, vectors)
    rows = init_vectors(bundle, init_text, vectors)
    parts = {"clip_l": rows[0], "clip_g": rows[1]} if bundle.kind == "sdxl" and len(rows) == 2 else {"": rows[0]}
    factory = functools.partial(TrainableEmbeddingPatch, token=token, init_text=init_text)
    return with_embedding(bundle, parts, token, patch_class=factory)


def embedding_tensors(bundle: TextEncoderBundle, token: str = "") -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` of the bundle's trainable embedding for ``token`` (any, when the
    bundle holds one) in the file layout SaveEmbedding writes.

    :raises ValueError: the bundle holds no such embedding, or several and no token was named.
    """
    found: dict[str, list[TrainableEmbeddingPatch]] = {}
    for patch in bundle.patches:
        if isinstance(patch, TrainableEmbeddingPatch):
            found.setdefault(patch.token, []).append(patch)
    if not found:
        raise ValueError("this text encoder bundle has no trainable embedding; make one with dagfusion.text.TrainableEmbedding")
    if token:
        if token not in found:
            raise ValueError(f"the bundle has no trainable embedding for {token!r}; it has {sorted(found)}")
    elif len(found) > 1:
        raise ValueError(f"the bundle has several trainable embeddings {sorted(found)}: name the token to save")
    else:
        (token,) = found
    patches = found[token]
    rows = [p.vectors.detach().float().cpu().contiguous().clone() for p in patches]
    tensors = {"clip_l": rows[0], "clip_g": rows[1]} if len(rows) == 2 else {token: rows[0]}
    metadata = {"format": FORMAT, "token": token, "vectors": str(int(rows[0].shape[0])),
                "init_text": patches[0].init_text, "width": ",".join(str(int(r.shape[-1])) for r in rows)}
    return tensors, metadata


def _train_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"clip": tiny.sd_handles()["clip"], "token": "<pink>", "init_text": "red", "vectors": 2}


def _save_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    clip = trainable_embedding(tiny.sd_handles()["clip"], "<pink>", "red", 2)
    return {"clip": clip, "filename": "embeddings/pink.safetensors", "token": ""}


@node(
    "dagfusion.text.TrainableEmbedding",
    version="1.0.0",
    category="conditioning",
    inputs=[
        Input("clip", CLIP, link_only=True, description="Text encoder bundle from a model loader."),
        Input("token", STRING, "<new>", description="The new word prompts use, e.g. '<pink>' (must not be a word the tokenizer knows)."),
        Input("init_text", STRING, "object",
              description="Words whose mean token embedding the vectors start from, e.g. 'red' for a new colour."),
        Input("vectors", INT, 1, min=1, max=MAX_VECTORS, description="Vectors per token (the prompt's token expands to this many)."),
    ],
    outputs=[Output("clip", CLIP, "The bundle with the token and its trainable vectors (train with dagfusion.train.Train, trainable 'patches').")],
    examples=[_train_example],
)
def trainable_embedding_node(ctx: RunContext, clip: TextEncoderBundle, token: str, init_text: str, vectors: int) -> TextEncoderBundle:
    """Add a new token with trainable vectors to a text encoder, to learn a textual-inversion embedding.

    The tokenizers learn the token as LoadEmbedding does; its vectors start at the mean input
    embedding of ``init_text``. Feed the bundle to dagfusion.train.Train as its ``clip`` with
    ``trainable: patches``: only these vectors train, and Train's ``clip`` output carries them
    (save them with dagfusion.text.SaveEmbedding). A token the tokenizer already knows as one
    token is refused.
    """
    try:
        return trainable_embedding(clip, token.strip(), init_text, vectors)
    except ValueError as error:
        name = "init_text" if "init_text" in str(error) else "vectors" if "vectors must" in str(error) else "token"
        raise NodeInputError(name, str(error)) from error


@node(
    "dagfusion.text.SaveEmbedding",
    version="1.0.0",
    category="conditioning",
    inputs=[
        Input("clip", CLIP, link_only=True, description="A bundle with a trainable embedding (after dagfusion.train.Train)."),
        Input("filename", STRING, "embedding.safetensors", description="Name inside the run's output folder (.safetensors)."),
        Input("token", STRING, "", description="Which embedding to save when the bundle has several (empty: its only one)."),
    ],
    outputs=[
        Output("path", PATH, "Where the file was written (links to dagfusion.text.LoadEmbedding's path)."),
        Output("token", STRING, "The embedding's token."),
    ],
    pure=False,
    output_node=True,
    examples=[_save_example],
)
def save_embedding(ctx: RunContext, clip: TextEncoderBundle, filename: str, token: str) -> dict[str, Any]:
    """Write a trained textual-inversion embedding as safetensors in the diffusers layout.

    One text encoder: ``{token: (vectors, width)}``, which dagfusion.text.LoadEmbedding and
    diffusers' ``load_textual_inversion`` read; an SDXL pair: ``clip_l`` and ``clip_g``. The file's
    metadata names the token, the number of vectors and the initial text.
    """
    from safetensors.torch import save_file

    if not filename.endswith(".safetensors"):
        raise NodeInputError("filename", f"expected a name ending in .safetensors, got {filename!r}")
    try:
        tensors, metadata = embedding_tensors(clip, token.strip())
    except ValueError as error:
        raise NodeInputError("clip" if "no trainable" in str(error) and not token else "token", str(error)) from error
    path: Path = ctx.output_path(filename)
    save_file(tensors, str(path), metadata=metadata)
    return {"path": str(path), "token": metadata["token"]}


NODES = (trainable_embedding_node, save_embedding)
