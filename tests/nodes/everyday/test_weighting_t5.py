"""Prompt weighting on T5 text encoders (the tiny PixArt bundle)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from dagfusion.model import TextEncoderBundle
from dagfusion.nodes.diffusion.text import encode_node, encode_prompt
from dagfusion.nodes.everyday.weighting import PromptSyntaxError
from dagfusion.testing.models import _cached_pipeline, pixart_handles

LENGTH = 120


@pytest.fixture(scope="module")
def t5() -> TextEncoderBundle:
    pipe = _cached_pipeline("pixart", 0)
    return TextEncoderBundle.from_modules("t5", [pipe.text_encoder], [pipe.tokenizer],
                                          options={"max_length": LENGTH, "lowercase": True})


def hidden(cond: Any, side: str = "positive") -> torch.Tensor:
    return getattr(cond, side)["encoder_hidden_states"]


def mask(cond: Any, side: str = "positive") -> torch.Tensor:
    return getattr(cond, side)["encoder_attention_mask"]


def ids(bundle: TextEncoderBundle, text: str) -> list[int]:
    return bundle.tokenizers[0].get()(text, add_special_tokens=False).input_ids


def changed_rows(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero((a[0] != b[0]).any(dim=-1)).flatten()]


def test_unweighted_comfy_equals_none(t5: TextEncoderBundle) -> None:
    plain = encode_prompt(t5, "A Red Fox in the snow", "blurry")
    for mode in ("comfy", "a1111"):
        same = encode_prompt(t5, "A Red Fox in the snow", "blurry", weighting=mode)
        for side in ("positive", "negative"):
            assert hidden(same, side).shape == hidden(plain, side).shape == (1, LENGTH, 32)
            assert torch.allclose(hidden(same, side), hidden(plain, side), atol=1e-6, rtol=0)
            assert torch.equal(mask(same, side), mask(plain, side))
        assert same.meta["weighting"] == mode


def test_comfy_weight_changes_only_the_rows_of_its_word(t5: TextEncoderBundle) -> None:
    plain = encode_prompt(t5, "a red fox in the snow", weighting="comfy")
    cond = encode_prompt(t5, "a (red:1.5) fox in the (snow:0.5)", weighting="comfy")
    assert torch.equal(mask(cond), mask(plain))
    red = len(ids(t5, "a"))
    snow_start = len(ids(t5, "a red fox in the"))
    snow = list(range(snow_start, snow_start + len(ids(t5, "snow"))))
    assert len(snow) > 1  # a word of several SentencePiece pieces: every piece carries the weight
    assert changed_rows(hidden(cond), hidden(plain)) == [red, *snow]
    empty = hidden(encode_prompt(t5, "", weighting="none"))
    z, z_plain = hidden(cond)[0], hidden(plain)[0]
    assert torch.allclose(z[red], empty[0, red] + 1.5 * (z_plain[red] - empty[0, red]), atol=1e-6)
    for row in snow:
        assert torch.allclose(z[row], empty[0, row] + 0.5 * (z_plain[row] - empty[0, row]), atol=1e-6)


def test_explicit_weight_one_equals_unweighted(t5: TextEncoderBundle) -> None:
    plain = encode_prompt(t5, "a red fox")
    for mode in ("comfy", "a1111"):
        cond = encode_prompt(t5, "a (red:1.0) fox", weighting=mode)
        assert torch.equal(hidden(cond), hidden(plain)) and torch.equal(mask(cond), mask(plain))


def test_a1111_keeps_the_mean_over_unmasked_tokens(t5: TextEncoderBundle) -> None:
    plain = encode_prompt(t5, "a red fox in the snow", weighting="a1111")
    cond = encode_prompt(t5, "a (red:1.8) fox in the [snow]", weighting="a1111")
    keep = mask(plain)[0].bool()
    assert torch.equal(mask(cond), mask(plain))
    before, after = hidden(plain)[0][keep], hidden(cond)[0][keep]
    assert not torch.allclose(before, after)
    assert torch.allclose(after.mean(), before.mean(), atol=1e-6)
    # the masked positions (padding) are left as they are
    assert torch.equal(hidden(cond)[0][~keep], hidden(plain)[0][~keep])
    # and unlike comfy, the rescale moves every unmasked row, not only the weighted words
    assert len(changed_rows(hidden(cond), hidden(plain))) == int(keep.sum())


def test_break_concatenates_chunks_and_masks(t5: TextEncoderBundle) -> None:
    cond = encode_prompt(t5, "a red fox BREAK in the (snow:1.2)", "blurry", weighting="comfy")
    assert hidden(cond).shape == (1, 2 * LENGTH, 32) and mask(cond).shape == (1, 2 * LENGTH)
    first, second = len(ids(t5, "a red fox")) + 1, len(ids(t5, "in the snow")) + 1
    expected = [1] * first + [0] * (LENGTH - first) + [1] * second + [0] * (LENGTH - second)
    assert mask(cond)[0].tolist() == expected
    alone = encode_prompt(t5, "a red fox")  # each chunk is encoded on its own
    assert torch.equal(hidden(cond)[:, :LENGTH], hidden(alone))
    # the negative is padded to the same length with a chunk that is never attended
    assert hidden(cond, "negative").shape == hidden(cond).shape
    neg_alone = encode_prompt(t5, "blurry")
    assert torch.equal(hidden(cond, "negative")[:, :LENGTH], hidden(neg_alone))
    assert mask(cond, "negative")[0, LENGTH:].sum() == 0
    many = encode_prompt(t5, ["a fox", "a fox BREAK snow BREAK night"], weighting="a1111")
    assert hidden(many).shape == (2, 3 * LENGTH, 32) and mask(many)[0, LENGTH:].sum() == 0


def test_long_section_is_truncated_with_a_warning(t5: TextEncoderBundle, caplog: Any) -> None:
    words = " ".join(["fox"] * 130)
    with caplog.at_level(logging.WARNING):
        cond = encode_prompt(t5, f"(red) {words}", weighting="comfy")
    assert cond.meta["truncated"] and "was cut" in cond.meta["warnings"][0]
    assert hidden(cond).shape == (1, LENGTH, 32) and int(mask(cond).sum()) == LENGTH


def test_unbalanced_brackets_raise(t5: TextEncoderBundle) -> None:
    with pytest.raises(PromptSyntaxError):
        encode_prompt(t5, "a (red fox", weighting="comfy")
    with pytest.raises(PromptSyntaxError):
        encode_prompt(t5, "a fox", "ugly]", weighting="a1111")


def test_node_accepts_t5_weighting(t5: TextEncoderBundle) -> None:
    args = {"clip": t5, "prompt": "a (red:1.3) fox", "negative_prompt": "", "prompt_2": "", "clip_skip": 0,
            "max_length": 0, "weighting": "comfy"}
    cond = encode_node.fn(_Ctx(), **args)
    assert cond.kind == "t5" and hidden(cond).shape == (1, LENGTH, 32)


class _Ctx:
    logger = logging.getLogger("test")


def test_sampling_with_weighted_t5_conditioning_runs(t5: TextEncoderBundle) -> None:
    from dagfusion.nodes.diffusion.sampling import sample

    handles = pixart_handles()
    cond = encode_prompt(t5, "a (red:1.4) fox BREAK [snow]", "blurry", weighting="comfy")
    out = sample(handles["model"], cond, handles["latent"], steps=2, guidance_scale=4.0, seed=0)
    assert out.samples.shape == handles["latent"].samples.shape and torch.isfinite(out.samples).all()
    plain = encode_prompt(t5, "a red fox BREAK snow", "blurry")
    assert hidden(plain).shape[1] == LENGTH  # no BREAK without weighting: one chunk
    other = sample(handles["model"], plain, handles["latent"], steps=2, guidance_scale=4.0, seed=0)
    assert not torch.equal(out.samples, other.samples)
