"""Embedding interpolation between two text encoders sharing a tokenizer.

:class:`InterpolatedEncoder` is a module that runs both encoders (each with its bundle's patches)
on the same tokens and returns ``α·e_a + (1 − α)·e_b`` for the last hidden state and the pooled
output. This interpolates the *embeddings*, not the weights: at ``α = 1`` it gives exactly
encoder a's embeddings, at ``α = 0`` exactly b's. :func:`interpolate` wraps it in a new bundle
(tokenizer and options of ``a``), so every node that encodes prompts uses it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from dagfusion.errors import NodeInputError


class InterpolatedEncoder(torch.nn.Module):
    """``α·a(ids) + (1 − α)·b(ids)`` (see the module docstring); ``config`` is ``a``'s."""

    def __init__(self, a: Any, b: Any, alpha: float, patches_a: tuple[Any, ...] = (), patches_b: tuple[Any, ...] = ()) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.alpha = float(alpha)
        self.patches_a, self.patches_b = tuple(patches_a), tuple(patches_b)
        self.config = a.config

    def forward(self, input_ids: Any, attention_mask: Any = None, output_hidden_states: bool = False, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        from dagfusion.model import apply_patches

        if output_hidden_states:
            raise ValueError("an interpolated text encoder gives the last hidden state only; use clip_skip 0")
        device = next(self.a.parameters()).device
        with apply_patches(self.patches_a, self.a):
            out_a = self.a(input_ids.to(device), attention_mask=attention_mask)
        device_b = next(self.b.parameters()).device
        mask_b = attention_mask.to(device_b) if attention_mask is not None else None
        with apply_patches(self.patches_b, self.b):
            out_b = self.b(input_ids.to(device_b), attention_mask=mask_b)

        def mix(x: Any, y: Any) -> Any:
            return self.alpha * x + (1.0 - self.alpha) * y.to(device=x.device, dtype=x.dtype)

        return BaseModelOutputWithPooling(
            last_hidden_state=mix(out_a[0], out_b[0]), pooler_output=mix(out_a[1], out_b[1]),
        )


def _width(encoder: Any) -> int:
    return int(getattr(encoder.config, "hidden_size", 0) or 0)


def interpolate(a: Any, b: Any, alpha: float) -> Any:
    """A bundle encoding with ``α·e_a + (1 − α)·e_b``.

    :raises NodeInputError: a bundle is not a single CLIP, or the tokenizers or widths differ
        (the message names both).
    """
    from dagfusion.model import StaticRef, TextEncoderBundle
    from dagfusion.nodes.textcraftor.encoder import clip_parts

    try:
        enc_a, _ = clip_parts(a)
    except ValueError as exc:
        raise NodeInputError("clip_a", str(exc)) from exc
    try:
        enc_b, _ = clip_parts(b)
    except ValueError as exc:
        raise NodeInputError("clip_b", str(exc)) from exc
    tok_a, tok_b = a.tokenizers[0].fingerprint, b.tokenizers[0].fingerprint
    if tok_a != tok_b:
        raise NodeInputError(
            "clip_b", f"the bundles' tokenizers differ ({a.tokenizers[0]!r} {tok_a[:12]} for clip_a, "
                      f"{b.tokenizers[0]!r} {tok_b[:12]} for clip_b); interpolation needs one shared tokenizer")
    if _width(enc_a) != _width(enc_b):
        raise NodeInputError(
            "clip_b", f"the encoders' widths differ ({_width(enc_a)} for clip_a, {_width(enc_b)} for clip_b)")
    module = InterpolatedEncoder(enc_a, enc_b, alpha, a.patches, b.patches)
    from dagfusion.fingerprint import fingerprint

    key = fingerprint({"interpolate": [a, b], "alpha": float(alpha)})
    info = {**dict(a.info), "source": f"interpolation {alpha:g}·({a.info.get('source', '?')}) + "
                                      f"{1 - alpha:g}·({b.info.get('source', '?')})"}
    return TextEncoderBundle("clip", [StaticRef(module, key)], a.tokenizers, options=a.options, info=info,
                             offload=a.offload or b.offload)
