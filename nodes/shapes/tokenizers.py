"""Tokenizers for the caption language of the shapes world, built here from its vocabulary.

No tokenizer file is downloaded or committed from elsewhere: each is made from the words the
shapes world's captions use (:func:`caption_words`), so every caption word is one token.

- :func:`clip_tokenizer`: a byte-level BPE in CLIP's format (saved as ``tokenizer.json``;
  ``CLIPTokenizer.from_pretrained`` loads it). Its vocabulary holds the specials,
  every lower-case letter and digit (plain and word-final, so any other word is still spelt
  out) and, for each caption word, the chain of merges that builds it left to right.
- :func:`t5_tokenizer`: a unigram (SentencePiece-style) vocabulary in T5's format with one piece
  per caption word plus single characters, loaded by ``T5Tokenizer``.

Both are deterministic: the same vocabulary gives the same vocabulary, merges and ids.
"""

from __future__ import annotations

import string
from typing import Any

from dagfusion.nodes.shapes.world import scenes

_CHARS = string.ascii_lowercase + string.digits
CLIP_MAX_LENGTH = 32
"""Token positions of the CLIP encoder: the longest caption is 12 words plus the two specials."""


def caption_words() -> list[str]:
    """Every word of every caption of the shapes world (both splits, one and two objects), sorted."""
    words: set[str] = set()
    for split in ("train", "eval"):
        for objects in (1, 2):
            for scene in scenes(split, objects):
                words.update(scene.caption.split())
    return sorted(words)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word: merge the lowest-ranked adjacent pair until none is known."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def clip_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of the word-level BPE: specials, characters, then merges until every
    caption word is one token (a word's current pieces are joined left to right, repeated until
    no merge added for one word splits another)."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS:
        for token in (ch, ch + "</w>"):
            vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    words = words if words is not None else caption_words()
    for _ in range(sum(map(len, words)) + 1):
        split = [(w, pieces) for w in words if len(pieces := _bpe(w, ranks)) > 1]
        if not split:
            return vocab, merges
        _, pieces = split[0]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in ranks:
                ranks[(left, right)] = len(merges)
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    raise RuntimeError(f"no merge list makes every word one token: {[w for w, _ in split]}")


def clip_tokenizer(max_length: int = CLIP_MAX_LENGTH) -> Any:
    """A ``CLIPTokenizer`` over :func:`clip_vocab` (end-of-text pads, as in Stable Diffusion 1)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>", model_max_length=max_length)


def t5_pieces(words: list[str] | None = None) -> list[tuple[str, float]]:
    """The unigram pieces of :func:`t5_tokenizer`: specials, ``▁word`` per caption word, characters."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for word in words if words is not None else caption_words():
        pieces.append(("\u2581" + word, -1.0))
    for ch in _CHARS:
        pieces.append(("\u2581" + ch, -4.0))
        pieces.append((ch, -4.5))
    return pieces


def t5_tokenizer(max_length: int = 120) -> Any:
    """A ``T5Tokenizer`` whose vocabulary is :func:`t5_pieces` (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_pieces(), extra_ids=0, model_max_length=max_length)
