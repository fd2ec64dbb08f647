"""Weighted encoding (CLIP and SDXL in windows, T5 in chunks): the ``comfy`` and ``a1111`` modes of
``dagfusion.text.Encode``.

A prompt is parsed with :func:`~dagfusion.nodes.everyday.weighting.parse_weights`; each span is
tokenized on its own (no special tokens) and every token carries its span's weight. Tokens are laid
into **windows** of the tokenizer's own length ``L`` (``model_max_length``: 77 for SD, 32 for the
embedded shapes-sd): up to ``L - 2`` prompt tokens between BOS and EOS, padded with the
tokenizer's pad token; ``BREAK`` starts a new window; a long prompt fills as many windows as it
needs instead of being truncated. Each window is encoded on its own and the hidden states are
concatenated along the sequence, so the result has ``n·L`` positions.

With ``z`` a window's hidden states, ``z_empty`` those of the empty prompt (BOS, EOS, padding) and
``w`` each position's weight (1.0 at BOS, EOS and padding):

- ``comfy``: ``z_empty + w·(z − z_empty)`` per position;
- ``a1111``: ``z·w``, then multiplied by ``mean(z) / mean(z·w)`` (means over the whole window)
  to keep the window's original mean.

A position of weight exactly 1.0 keeps ``z`` bit for bit, so a prompt without weights and with
one window equals the unweighted encoding. Positive, negative and every prompt of a list are
padded with empty windows (``z_empty``) to the same number of windows. SDXL's pooled embedding is
the second encoder's, of the first window, unweighted. The weighted modes pass no attention mask
(the CLIP models of SD and SDXL use none).

**T5** (PixArt, :func:`encode_t5_weighted`). Spans are tokenized on their own without special
tokens, so every SentencePiece piece of a word carries the word's weight; lower-casing follows the
bundle's ``lowercase`` option. T5 has no fixed window, so there is no overflow into new windows:
each ``BREAK`` section is one **chunk** laid out as the unweighted T5 path lays out a whole prompt
— its pieces, one EOS, padding to ``max_length`` (120 by default) with an attention mask over
pieces and EOS — and a section longer than ``max_length − 1`` pieces is cut there with a warning
naming the cut text. Each chunk is encoded alone with its mask (attention runs on the unweighted
pieces); the weights are applied to the encoder's output as above, ``z_empty`` being the encoding
of the empty prompt in the same layout (EOS, padding, mask ``1, 0, …``); for ``a1111`` both means
are taken over the chunk's unmasked positions and only those are rescaled. The chunks' hidden
states and masks are concatenated along the sequence (``n·max_length`` positions, a hole of zeros
in the mask after each chunk's EOS). Positive, negative and every prompt of a list are padded to
the same number of chunks with ``z_empty`` under an all-zero mask, so padding is never attended.
A prompt without ``BREAK`` whose weights are all 1.0 encodes bit for bit as with ``weighting:
none``, in ``comfy`` as in ``a1111``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dagfusion.nodes.everyday.weighting import Span, parse_weights

MODES = ("none", "comfy", "a1111")
"""Values of Encode's ``weighting`` input."""


def windows(tokenizer: Any, sections: list[list[Span]]) -> list[tuple[list[int], list[float]]]:
    """Token ids and weights of each window, each ``model_max_length`` long with BOS/EOS/padding.

    An empty prompt is one window (BOS, EOS, padding), as the unweighted encoder gives.
    """
    length = int(tokenizer.model_max_length)
    room = length - 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    chunks: list[tuple[list[int], list[float]]] = []
    for section in sections:
        ids: list[int] = []
        weights: list[float] = []
        for span in section:
            pieces = tokenizer(span.text, add_special_tokens=False).input_ids
            ids.extend(pieces)
            weights.extend([span.weight] * len(pieces))
        if not ids and chunks:
            continue
        for start in range(0, max(len(ids), 1), room):
            chunks.append((ids[start : start + room], weights[start : start + room]))
    out = []
    for ids, weights in chunks or [([], [])]:
        fill = length - 2 - len(ids)
        out.append(([bos, *ids, eos] + [pad] * fill, [1.0, *weights, 1.0] + [1.0] * fill))
    return out


def apply_weights(z: Any, z_empty: Any, weights: Any, mode: str, mask: Any = None) -> Any:
    """Weighted hidden states of one window ``(B, L, D)`` by ``mode`` (see the module docstring).

    With an attention ``mask`` ``(1, L)`` (T5), ``a1111`` takes both means over the unmasked
    positions only and rescales only those; the masked ones keep ``z``.
    """
    import torch

    w = weights.to(z.dtype).reshape(1, -1, 1)
    if bool((w == 1.0).all()):
        return z
    if mode == "comfy":
        return torch.where(w == 1.0, z, z_empty + w * (z - z_empty))
    if mode == "a1111":
        scaled = z * w
        if mask is None:
            return scaled * (z.mean() / scaled.mean())
        keep = mask.reshape(-1).to(torch.bool)
        factor = z[:, keep].mean() / scaled[:, keep].mean()
        return torch.where(keep.reshape(1, -1, 1), scaled * factor, z)
    raise ValueError(f"expected a weighting in {MODES}, got {mode!r}")


def encode_windows(
    encoder_fn: Callable[[Any], tuple[Any, Any]],
    tokenizer: Any,
    text: str,
    mode: str,
    device: Any,
) -> tuple[list[Any], Any, Any]:
    """``([hidden per window], z_empty, pooled of the first window)`` for ``text``.

    ``encoder_fn(ids (1, L)) -> (hidden (1, L, D), pooled or None)``.
    """
    import torch

    def run(ids: list[int]) -> tuple[Any, Any]:
        return encoder_fn(torch.tensor([ids], dtype=torch.long, device=device))

    empty_ids, _ = windows(tokenizer, [[]])[0]
    z_empty, _ = run(empty_ids)
    hidden, pooled = [], None
    for ids, weights in windows(tokenizer, parse_weights(text)):
        z, pool = run(ids)
        if pooled is None:
            pooled = pool
        hidden.append(apply_weights(z, z_empty, torch.tensor(weights), mode))
    return hidden, z_empty, pooled


def pad_windows(groups: Sequence[list[Any]], z_empty: Any, count: int) -> Any:
    """Concatenate each group's windows, padded with ``z_empty`` to ``count`` windows, as one tensor."""
    import torch

    return torch.cat([torch.cat(list(g) + [z_empty] * (count - len(g)), dim=1) for g in groups])


def window_count(tokenizers: Sequence[Any], texts: Sequence[str]) -> int:
    """The most windows any of ``texts`` needs with any of ``tokenizers``."""
    return max(len(windows(t, parse_weights(text))) for t in tokenizers for text in texts)


def encode_clip_weighted(
    encoder: Any, tokenizer: Any, prompt: str, negative: str, clip_skip: int, mode: str, min_windows: int = 1
) -> tuple[dict, dict]:
    """SD 1/2 positive and negative conditioning, weighted and windowed."""
    from dagfusion.nodes.diffusion.text import _clip_hidden, _device_of

    def fn(ids: Any) -> tuple[Any, Any]:
        return _clip_hidden(encoder, ids, None, clip_skip), None

    device = _device_of(encoder)
    pos, z_empty, _ = encode_windows(fn, tokenizer, prompt, mode, device)
    neg, _, _ = encode_windows(fn, tokenizer, negative, mode, device)
    count = max(len(pos), len(neg), min_windows)
    return (
        {"encoder_hidden_states": pad_windows([pos], z_empty, count)},
        {"encoder_hidden_states": pad_windows([neg], z_empty, count)},
    )


def encode_sdxl_weighted(
    encoders: list[Any], tokenizers: list[Any], prompt: str, prompt_2: str, negative: str, clip_skip: int,
    force_zeros: bool, mode: str, min_windows: int = 1,
) -> tuple[dict, dict]:
    """SDXL's two encoders, each weighted and windowed; features concatenated, pooled from the second."""
    import torch
    from dagfusion.nodes.diffusion.text import _device_of

    def run(texts: list[str], layer: int) -> tuple[list[list[Any]], list[Any], Any]:
        per_encoder, empties, pooled = [], [], None
        for text, tokenizer, encoder in zip(texts, tokenizers, encoders):
            def fn(ids: Any, encoder: Any = encoder) -> tuple[Any, Any]:
                out = encoder(ids, output_hidden_states=True)
                return out.hidden_states[layer], out[0] if out[0].ndim == 2 else None

            hidden, z_empty, pool = encode_windows(fn, tokenizer, text, mode, _device_of(encoder))
            per_encoder.append(hidden)
            empties.append(z_empty)
            pooled = pool if pool is not None else pooled
        if pooled is None:
            raise ValueError("the SDXL text encoders gave no pooled embedding (expected a CLIP with projection last)")
        return per_encoder, empties, pooled

    def join(per_encoder: list[list[Any]], empties: list[Any], count: int) -> Any:
        return torch.cat([pad_windows([h], e, count) for h, e in zip(per_encoder, empties)], dim=-1)

    texts = [prompt, prompt_2][: len(encoders)]
    pos, pos_empty, pooled = run(texts, -(clip_skip + 2))
    if not negative and force_zeros:
        count = max(min_windows, *(len(h) for h in pos))
        hidden = join(pos, pos_empty, count)
        neg_hidden, neg_pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    else:
        neg, neg_empty, neg_pooled = run([negative] * len(encoders), -2)
        count = max(min_windows, *(len(h) for h in pos + neg))
        hidden, neg_hidden = join(pos, pos_empty, count), join(neg, neg_empty, count)
    return (
        {"encoder_hidden_states": hidden, "text_embeds": pooled},
        {"encoder_hidden_states": neg_hidden, "text_embeds": neg_pooled},
    )


def t5_chunks(
    tokenizer: Any, sections: list[list[Span]], length: int, lowercase: bool, warn: Callable[[str], None] | None = None,
) -> list[tuple[list[int], list[float], list[int]]]:
    """T5 token ids, weights and attention mask of each ``BREAK`` section, each ``length`` long.

    Each span is tokenized on its own without special tokens (every SentencePiece piece of a word
    carries the word's weight) and the pieces are concatenated; then one EOS and padding to
    ``length`` follow, the mask covering the prompt pieces and the EOS. A section longer than
    ``length − 1`` pieces is cut there, with a ``warn`` naming the cut text. Empty sections after
    the first are dropped; an empty prompt is one chunk (EOS, padding) as the unweighted encoder
    gives. ``lowercase`` lower-cases and strips each section as the unweighted T5 path does.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    room = max(length - 1, 0)
    chunks: list[tuple[list[int], list[float], list[int]]] = []
    for index, section in enumerate(sections):
        texts = [span.text for span in section]
        if lowercase and texts:
            texts = [text.lower() for text in texts]
            texts[0] = texts[0].lstrip()
            texts[-1] = texts[-1].rstrip()
        ids: list[int] = []
        weights: list[float] = []
        for text, span in zip(texts, section):
            pieces = tokenizer(text, add_special_tokens=False).input_ids
            ids.extend(pieces)
            weights.extend([span.weight] * len(pieces))
        if not ids and chunks:
            continue
        if len(ids) > room:
            if warn is not None:
                where = "the prompt" if len(sections) == 1 else f"section {index + 1} of the prompt (split at BREAK)"
                warn(
                    f"{where} is longer than the T5 text encoder takes ({len(ids) + 1} tokens, maximum {length}); "
                    f"this part was cut: {tokenizer.decode(ids[room:])!r}"
                )
            ids, weights = ids[:room], weights[:room]
        fill = length - 1 - len(ids)
        chunks.append(([*ids, eos] + [pad] * fill, [*weights, 1.0] + [1.0] * fill, [1] * (len(ids) + 1) + [0] * fill))
    return chunks or [([eos] + [pad] * (length - 1), [1.0] * length, [1] + [0] * (length - 1))]


def t5_chunk_count(tokenizer: Any, texts: Sequence[str], length: int, lowercase: bool) -> int:
    """The most chunks any of ``texts`` needs (see :func:`t5_chunks`)."""
    return max(len(t5_chunks(tokenizer, parse_weights(text), length, lowercase)) for text in texts)


def encode_t5_weighted(
    encoder: Any, tokenizer: Any, prompt: str, negative: str, length: int, lowercase: bool, mode: str,
    warn: Callable[[str], None] | None = None, min_windows: int = 1,
) -> tuple[dict, dict]:
    """T5 (PixArt) positive and negative conditioning, weighted, one chunk of ``length`` per ``BREAK`` section.

    Each chunk is encoded alone with its attention mask; weights are applied to the encoder's
    output (:func:`apply_weights`, the ``a1111`` mean over the unmasked positions). Chunks are
    concatenated along the sequence with their masks; positive and negative are padded to the same
    number of chunks with the empty prompt's hidden states under an all-zero mask.
    """
    import torch
    from dagfusion.nodes.diffusion.text import _device_of

    device = _device_of(encoder)

    def run(ids: list[int], mask: list[int]) -> tuple[Any, Any]:
        ids_t = torch.tensor([ids], dtype=torch.long, device=device)
        mask_t = torch.tensor([mask], dtype=torch.long, device=device)
        return encoder(ids_t, attention_mask=mask_t)[0], mask_t

    empty_ids, _, empty_mask = t5_chunks(tokenizer, [[]], length, lowercase)[0]
    z_empty, _ = run(empty_ids, empty_mask)

    def encode(text: str) -> tuple[list[Any], list[Any]]:
        hidden, masks = [], []
        for ids, weights, mask in t5_chunks(tokenizer, parse_weights(text), length, lowercase, warn):
            z, mask_t = run(ids, mask)
            hidden.append(apply_weights(z, z_empty, torch.tensor(weights), mode, mask_t))
            masks.append(mask_t)
        return hidden, masks

    pos, pos_masks = encode(prompt)
    neg, neg_masks = encode(negative)
    count = max(len(pos), len(neg), min_windows)
    off = torch.zeros_like(pos_masks[0])

    def join(hidden: list[Any], masks: list[Any]) -> dict:
        extra = count - len(hidden)
        return {
            "encoder_hidden_states": torch.cat(hidden + [z_empty] * extra, dim=1),
            "encoder_attention_mask": torch.cat(masks + [off] * extra, dim=1),
        }

    return join(pos, pos_masks), join(neg, neg_masks)
