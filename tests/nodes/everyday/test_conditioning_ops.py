"""Average and Concat of two conditionings."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from dagfusion import NodeInputError
from dagfusion.nodes.diffusion.conditioning import class_conditioning
from dagfusion.nodes.diffusion.data import Conditioning
from dagfusion.nodes.everyday.conditioning_ops import (
    average,
    average_node,
    concat,
    concat_node,
)


def text(batch: int = 1, length: int = 4, width: int = 8, pooled: bool = False, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    pos: dict[str, Any] = {"encoder_hidden_states": torch.randn(batch, length, width, generator=g)}
    neg: dict[str, Any] = {"encoder_hidden_states": torch.randn(batch, length, width, generator=g)}
    if pooled:
        pos["text_embeds"] = torch.randn(batch, 3, generator=g)
        neg["text_embeds"] = torch.randn(batch, 3, generator=g)
    return Conditioning("sdxl" if pooled else "clip", pos, neg, {"prompt": f"p{seed}"})


def test_average_is_a_weighted_blend_of_positive_and_negative() -> None:
    a, b = text(pooled=True, seed=1), text(pooled=True, seed=2)
    out = average_node.fn(None, a=a, b=b, weight=0.25)
    for side in ("positive", "negative"):
        for key in ("encoder_hidden_states", "text_embeds"):
            expected = 0.75 * getattr(a, side)[key] + 0.25 * getattr(b, side)[key]
            torch.testing.assert_close(getattr(out, side)[key], expected)
    assert torch.equal(average(a, b, 0.0).positive["encoder_hidden_states"], a.positive["encoder_hidden_states"])
    assert torch.equal(average(a, b, 1.0).positive["encoder_hidden_states"], b.positive["encoder_hidden_states"])
    assert out.meta["combine"] == "average" and out.meta["weight"] == 0.25


def test_average_keeps_equal_masks_and_refuses_different_ones() -> None:
    a, b = text(seed=1), text(seed=2)
    mask = torch.ones(1, 4, dtype=torch.long)
    a = Conditioning("t5", {**a.positive, "encoder_attention_mask": mask}, None)
    b = Conditioning("t5", {**b.positive, "encoder_attention_mask": mask.clone()}, None)
    assert torch.equal(average(a, b, 0.5).positive["encoder_attention_mask"], mask)
    c = Conditioning("t5", {**b.positive, "encoder_attention_mask": torch.zeros(1, 4, dtype=torch.long)}, None)
    with pytest.raises(NodeInputError, match="not a float tensor"):
        average(a, c, 0.5)


def test_average_errors_name_both_shapes() -> None:
    with pytest.raises(NodeInputError, match=r"\(1, 4, 8\).*\(1, 6, 8\)") as info:
        average(text(), text(length=6), 0.5)
    assert info.value.input == "b"
    with pytest.raises(NodeInputError, match="same kind"):
        average(text(), text(pooled=True), 0.5)
    with pytest.raises(NodeInputError, match="negative"):
        average(text(), Conditioning("clip", text().positive, None), 0.5)


def test_concat_joins_the_sequence_and_takes_pooled_from_a() -> None:
    a, b = text(pooled=True, seed=1), text(length=6, pooled=True, seed=2)
    out = concat_node.fn(None, a=a, b=b)
    for side in ("positive", "negative"):
        joined = getattr(out, side)["encoder_hidden_states"]
        assert joined.shape == (1, 10, 8)
        assert torch.equal(joined[:, :4], getattr(a, side)["encoder_hidden_states"])
        assert torch.equal(joined[:, 4:], getattr(b, side)["encoder_hidden_states"])
        assert torch.equal(getattr(out, side)["text_embeds"], getattr(a, side)["text_embeds"])
    assert not torch.equal(a.positive["text_embeds"], b.positive["text_embeds"])


def test_concat_repeats_a_batch_of_one_and_refuses_other_mismatches() -> None:
    out = concat(text(batch=1, pooled=True), text(batch=3, pooled=True))
    assert out.positive["encoder_hidden_states"].shape == (3, 8, 8) and out.positive["text_embeds"].shape == (3, 3)
    with pytest.raises(NodeInputError, match=r"\(2, 4, 8\).*\(3, 4, 8\)"):
        concat(text(batch=2), text(batch=3))
    with pytest.raises(NodeInputError, match=r"\(1, 4, 8\).*\(1, 4, 16\)"):
        concat(text(), text(width=16))
    labels = class_conditioning([1, 2])
    with pytest.raises(NodeInputError, match="encoder_hidden_states"):
        concat(labels, labels)


def test_concat_of_real_prompts_samples_shapes() -> None:
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.testing import models as tiny

    clip = tiny.sd_handles()["clip"]
    a, b = encode_prompt(clip, "a red fox", "blurry"), encode_prompt(clip, "snow", "")
    out = concat(a, b)
    assert out.positive["encoder_hidden_states"].shape == (1, 154, 32)
    assert out.negative["encoder_hidden_states"].shape == (1, 154, 32)
    assert a.positive["encoder_hidden_states"].shape == (1, 77, 32)  # inputs unchanged
