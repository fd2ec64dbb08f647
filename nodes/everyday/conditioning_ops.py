"""Combining two conditionings: a weighted average, or one after the other along the sequence.

Both act on the positive tensors and, when both conditionings have one, on the negative ones in
the same way (so guidance keeps matching shapes); a conditioning without a negative (DiT class
labels, SVD) combined with one that has a negative is an error. Neither input is changed.

- ``dagfusion.conditioning.Average``: ``(1 − weight)·a + weight·b`` for every floating-point
  tensor (``encoder_hidden_states``, SDXL's pooled ``text_embeds``); other tensors (T5's
  ``encoder_attention_mask``) must be equal and are kept. Keys, kinds and shapes must match.
- ``dagfusion.conditioning.Concat``: ``encoder_hidden_states`` (and an ``encoder_attention_mask``)
  of ``b`` appended after ``a``'s along the sequence dimension (dim 1); every other tensor (the
  pooled ``text_embeds``) comes from ``a``. Batch sizes must match, or one of them be 1 (it is
  repeated); the feature width must match.

A mismatch is a :class:`~dagfusion.errors.NodeInputError` on ``b`` naming both shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagfusion import FLOAT, Input, Output, RunContext, node
from dagfusion.errors import NodeInputError
from dagfusion.nodes.diffusion.data import Conditioning
from dagfusion.nodes.diffusion.types import CONDITIONING

SEQUENCE_KEYS = ("encoder_hidden_states", "encoder_attention_mask")
"""Tensors joined along the sequence by Concat; every other key is taken from ``a``."""


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in getattr(value, "shape", ()))


def _check_pair(a: Conditioning, b: Conditioning) -> None:
    if not isinstance(a, Conditioning) or not isinstance(b, Conditioning):
        bad = "a" if not isinstance(a, Conditioning) else "b"
        raise NodeInputError(bad, f"expected a CONDITIONING, got {type(a if bad == 'a' else b).__name__}")
    if a.kind != b.kind:
        raise NodeInputError("b", f"expected conditioning of the same kind as a ({a.kind!r}), got {b.kind!r}")
    if set(a.positive) != set(b.positive):
        raise NodeInputError("b", f"expected the same tensors as a ({sorted(a.positive)}), got {sorted(b.positive)}")
    if (a.negative is None) != (b.negative is None):
        has = "a" if a.negative is not None else "b"
        raise NodeInputError("b", f"only {has} has a negative conditioning; combine conditionings made the same way")


def _pairs(a: Conditioning, b: Conditioning) -> list[tuple[str, Mapping[str, Any], Mapping[str, Any]]]:
    out = [("positive", a.positive, b.positive)]
    if a.negative is not None and b.negative is not None:
        out.append(("negative", a.negative, b.negative))
    return out


def _meta(op: str, a: Conditioning, b: Conditioning, **extra: Any) -> dict[str, Any]:
    return {"combine": op, **extra, "encoder": a.meta.get("encoder", a.kind),
            "a": dict(a.meta), "b": dict(b.meta), "truncated": bool(a.meta.get("truncated") or b.meta.get("truncated"))}


def average(a: Conditioning, b: Conditioning, weight: float) -> Conditioning:
    """``(1 − weight)·a + weight·b`` (see the module docstring)."""
    import torch

    _check_pair(a, b)
    sides: dict[str, dict[str, Any]] = {}
    for side, left, right in _pairs(a, b):
        merged: dict[str, Any] = {}
        for key, x in left.items():
            y = right[key]
            if _shape(x) != _shape(y):
                raise NodeInputError(
                    "b", f"expected {side} {key} of a's shape {_shape(x)} to average with, got {_shape(y)}"
                )
            if torch.is_floating_point(x):
                merged[key] = torch.lerp(x, y.to(device=x.device, dtype=x.dtype), float(weight))
            elif torch.equal(x, y.to(x.device)):
                merged[key] = x.clone()
            else:
                raise NodeInputError("b", f"{side} {key} differs from a's and cannot be averaged (it is not a float tensor)")
        sides[side] = merged
    return Conditioning(a.kind, sides["positive"], sides.get("negative"), _meta("average", a, b, weight=float(weight)))


def concat(a: Conditioning, b: Conditioning) -> Conditioning:
    """``b``'s sequence appended after ``a``'s (see the module docstring)."""
    import torch

    _check_pair(a, b)
    if "encoder_hidden_states" not in a.positive:
        raise NodeInputError("a", f"expected text conditioning with encoder_hidden_states, got {sorted(a.positive)}")
    sides: dict[str, dict[str, Any]] = {}
    for side, left, right in _pairs(a, b):
        merged = {key: value.clone() for key, value in left.items() if key not in SEQUENCE_KEYS}
        for key in SEQUENCE_KEYS:
            if key not in left:
                continue
            x, y = left[key], right[key]
            sx, sy = _shape(x), _shape(y)
            batch_ok = sx[0] == sy[0] or 1 in (sx[0], sy[0])
            if len(sx) != len(sy) or not batch_ok or sx[2:] != sy[2:]:
                raise NodeInputError(
                    "b", f"expected {side} {key} like a's {sx} (same batch or 1, same width; any length) "
                         f"to join along the sequence, got {sy}"
                )
            batch = max(sx[0], sy[0])
            x = x.expand(batch, *sx[1:])
            y = y.to(device=x.device, dtype=x.dtype).expand(batch, *sy[1:])
            merged[key] = torch.cat([x, y], dim=1)
        batch = _shape(merged["encoder_hidden_states"])[0]
        for key, value in list(merged.items()):
            if key not in SEQUENCE_KEYS and _shape(value)[:1] == (1,) and batch > 1:
                merged[key] = value.expand(batch, *_shape(value)[1:]).clone()
        sides[side] = merged
    return Conditioning(a.kind, sides["positive"], sides.get("negative"), _meta("concat", a, b))


def _examples() -> dict[str, Any]:
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.testing import models as tiny

    clip = tiny.sd_handles()["clip"]
    return {"a": encode_prompt(clip, "a red fox", ""), "b": encode_prompt(clip, "a blue cat", "")}


@node(
    "dagfusion.conditioning.Average",
    version="1.0.0",
    category="conditioning",
    inputs=[
        Input("a", CONDITIONING, link_only=True, description="First conditioning."),
        Input("b", CONDITIONING, link_only=True, description="Second conditioning, of the same kind, keys and shapes."),
        Input("weight", FLOAT, 0.5, min=0.0, max=1.0, description="Share of b: 0 gives a, 1 gives b."),
    ],
    outputs=[Output("conditioning", CONDITIONING, "(1 − weight)·a + weight·b, positive and negative.")],
    examples=[lambda: {**_examples(), "weight": 0.25}],
)
def average_node(ctx: RunContext, a: Conditioning, b: Conditioning, weight: float) -> Conditioning:
    """Blend two conditionings of equal shape: ``(1 − weight)·a + weight·b`` for every float tensor,
    positive and negative; a shape mismatch is an error naming both shapes."""
    return average(a, b, weight)


@node(
    "dagfusion.conditioning.Concat",
    version="1.0.0",
    category="conditioning",
    inputs=[
        Input("a", CONDITIONING, link_only=True, description="First conditioning (gives the pooled embedding)."),
        Input("b", CONDITIONING, link_only=True, description="Conditioning appended after a along the sequence."),
    ],
    outputs=[Output("conditioning", CONDITIONING, "a's tokens then b's, positive and negative; pooled from a.")],
    examples=[_examples],
)
def concat_node(ctx: RunContext, a: Conditioning, b: Conditioning) -> Conditioning:
    """Join two text conditionings along the sequence dimension (``a`` first; pooled from ``a``);
    batch and width must fit, else an error names both shapes."""
    return concat(a, b)


NODES = (average_node, concat_node)
