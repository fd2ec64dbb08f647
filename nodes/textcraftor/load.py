"""Putting a saved (fine-tuned) text encoder into a model's text-encoder bundle.

:func:`load_encoder` reads ``<folder>/text_encoder`` (``config.json`` + ``*.safetensors``, the
layout :func:`~dagfusion.nodes.textcraftor.save.save_encoder` and diffusers write; pickle files
are never read) and returns a new bundle holding it in place of the bundle's encoder, with the
bundle's tokenizer, options and patches. The bundle itself is unchanged. The new encoder must fit
the bundle: the same class, width (hidden size) and vocabulary; when ``<folder>/tokenizer``
exists, its vocabulary must equal the bundle's tokenizer's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class EncoderMismatch(ValueError):
    """The saved encoder does not fit the bundle (the message names both sides)."""


def _check_fits(saved: Any, encoder: Any, saved_tokenizer: Any, tokenizer: Any) -> None:
    if type(saved).__name__ != type(encoder).__name__:
        raise EncoderMismatch(f"the saved encoder is a {type(saved).__name__}, the bundle's a {type(encoder).__name__}")
    for field in ("hidden_size", "vocab_size", "max_position_embeddings"):
        mine, theirs = getattr(encoder.config, field, None), getattr(saved.config, field, None)
        if mine != theirs:
            raise EncoderMismatch(f"the saved encoder has {field} {theirs}, the bundle's encoder {mine}")
    if saved_tokenizer is not None and saved_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise EncoderMismatch(
            f"the saved tokenizer differs from the bundle's ({len(saved_tokenizer.get_vocab())} vs "
            f"{len(tokenizer.get_vocab())} tokens, or other token ids): embeddings would not line up"
        )


def load_encoder(bundle: Any, folder: Path) -> Any:
    """A copy of ``bundle`` whose encoder is read from ``folder/text_encoder``.

    :raises FileNotFoundError: no ``text_encoder/config.json`` or no safetensors weights there.
    :raises EncoderMismatch: the saved encoder or tokenizer does not fit the bundle.
    :raises ValueError: the bundle is not a single-CLIP bundle.
    """
    from dagfusion.model import StaticRef, TextEncoderBundle
    from dagfusion.nodes.diffusion.sampling import module_dtype
    from dagfusion.nodes.textcraftor.encoder import clip_parts

    encoder, tokenizer = clip_parts(bundle)
    weights = folder / "text_encoder"
    if not (weights / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no text_encoder/config.json (expected SaveEncoder's or a diffusers layout)")
    if not list(weights.glob("*.safetensors")):
        raise FileNotFoundError(f"{weights} holds no .safetensors weights (pickle files are not read)")
    saved = type(encoder).from_pretrained(str(weights), use_safetensors=True, local_files_only=True)
    saved_tokenizer = None
    if (folder / "tokenizer").is_dir():
        saved_tokenizer = type(tokenizer).from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    _check_fits(saved, encoder, saved_tokenizer, tokenizer)
    saved.requires_grad_(False)
    saved.eval()
    saved.to(device=next(encoder.parameters()).device, dtype=module_dtype(encoder))
    from dagfusion.fingerprint import fingerprint_path

    info = {**dict(bundle.info), "source": f"text encoder from {folder}"}
    return TextEncoderBundle(bundle.kind, [StaticRef(saved, f"encoder:{fingerprint_path(weights)}")], bundle.tokenizers,
                             options=bundle.options, info=info, offload=bundle.offload, patches=bundle.patches)
