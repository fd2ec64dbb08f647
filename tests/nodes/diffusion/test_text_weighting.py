"""Prompt weighting and BREAK windows on the CLIP and SDXL paths of the text encoder."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dagfusion import NodeInputError
from dagfusion.nodes.diffusion.loading import load_diffusers_folder
from dagfusion.nodes.diffusion.text import encode_node, encode_prompt
from dagfusion.nodes.everyday.weighted_encode import windows
from dagfusion.nodes.everyday.weighting import parse_weights


@pytest.fixture(scope="module")
def clip() -> Any:
    from dagfusion.testing import models as tiny

    return tiny.sd_handles()["clip"]


def hidden(cond: Any, which: str = "positive") -> Any:
    return getattr(cond, which)["encoder_hidden_states"]


def raw(clip: Any, ids: list[int]) -> Any:
    """The unweighted hidden states of one window of token ids."""
    with torch.no_grad():
        return clip.encoders[0].get()(torch.tensor([ids]))[0]


@pytest.mark.parametrize("mode", ["comfy", "a1111"])
@pytest.mark.parametrize("prompt", ["a red fox", "(a red fox:1.0)", "[(a red fox)]", ""])
def test_weights_of_one_equal_the_unweighted_encoding_bit_for_bit(clip: Any, mode: str, prompt: str) -> None:
    plain = encode_prompt(clip, prompt.strip("[()]").replace(":1.0", ""), "blurry")
    weighted = encode_prompt(clip, prompt, "blurry", weighting=mode)
    assert torch.equal(hidden(plain), hidden(weighted))
    assert torch.equal(hidden(plain, "negative"), hidden(weighted, "negative"))
    assert weighted.meta["weighting"] == mode and "weighting" not in plain.meta


def test_weighting_none_is_todays_encoding(clip: Any) -> None:
    a = encode_prompt(clip, "a (red:1.5) fox", "")
    b = encode_prompt(clip, "a (red:1.5) fox", "", weighting="none")
    assert torch.equal(hidden(a), hidden(b)) and hidden(a).shape[1] == 77


def test_comfy_moves_weighted_tokens_along_the_line_from_the_empty_prompt(clip: Any) -> None:
    tokenizer = clip.tokenizers[0].get()
    [(ids, weights)] = windows(tokenizer, parse_weights("a (red:1.5) fox"))
    [(plain_ids, _)] = windows(tokenizer, parse_weights("a red fox"))
    assert ids == plain_ids
    z, z_empty = raw(clip, ids), raw(clip, windows(tokenizer, [[]])[0][0])
    w = torch.tensor(weights).reshape(1, -1, 1)
    assert sorted(set(weights)) == [1.0, 1.5]
    got = hidden(encode_prompt(clip, "a (red:1.5) fox", weighting="comfy"))
    expected = torch.where(w == 1.0, z, z_empty + w * (z - z_empty))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(got[:, (w[0, :, 0] == 1.0)], z[:, (w[0, :, 0] == 1.0)])


def test_a1111_multiplies_then_restores_the_mean(clip: Any) -> None:
    tokenizer = clip.tokenizers[0].get()
    [(ids, weights)] = windows(tokenizer, parse_weights("a ((red)) [fox]"))
    z = raw(clip, ids)
    w = torch.tensor(weights).reshape(1, -1, 1)
    got = hidden(encode_prompt(clip, "a ((red)) [fox]", weighting="a1111"))
    expected = z * w * (z.mean() / (z * w).mean())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.mean(), z.mean(), rtol=1e-5, atol=1e-7)


def test_break_and_long_prompts_make_windows_of_the_encoders_length(clip: Any) -> None:
    tokenizer = clip.tokenizers[0].get()
    length = tokenizer.model_max_length
    cond = encode_prompt(clip, "a red fox BREAK in the snow", "", weighting="comfy")
    assert hidden(cond).shape[1] == 2 * length and hidden(cond, "negative").shape == hidden(cond).shape
    first = encode_prompt(clip, "a red fox", weighting="comfy")
    second = encode_prompt(clip, "in the snow", weighting="comfy")
    assert torch.equal(hidden(cond)[:, :length], hidden(first))
    assert torch.equal(hidden(cond)[:, length:], hidden(second))
    # the negative is the empty prompt, padded with empty windows to the same length
    assert torch.equal(hidden(cond, "negative")[:, length:], hidden(cond, "negative")[:, :length])

    long = " ".join(["red fox"] * 60)
    count = len(tokenizer(long, add_special_tokens=False).input_ids)
    cond = encode_prompt(clip, long, weighting="a1111")
    assert hidden(cond).shape[1] == -(-count // (length - 2)) * length and not cond.meta["truncated"]
    for ids, _ in windows(tokenizer, parse_weights(long)):
        assert len(ids) == length and ids[0] == tokenizer.bos_token_id


def test_a_list_of_prompts_pads_every_row_to_the_same_windows(clip: Any) -> None:
    cond = encode_prompt(clip, ["a fox BREAK b BREAK c", "cat"], "dog BREAK x", weighting="comfy")
    assert hidden(cond).shape == (2, 3 * 77, 32) and hidden(cond, "negative").shape == (2, 3 * 77, 32)
    alone = encode_prompt(clip, "cat", weighting="comfy")
    assert torch.equal(hidden(cond)[1:, :77], hidden(alone))


def test_sdxl_weighting_keeps_pooled_and_zero_negative(sdxl_folder: Any) -> None:
    clip = load_diffusers_folder(sdxl_folder).clip
    plain = encode_prompt(clip, "a red fox")
    same = encode_prompt(clip, "a red fox", weighting="comfy")
    assert torch.equal(hidden(plain), hidden(same))
    assert torch.equal(plain.positive["text_embeds"], same.positive["text_embeds"])
    cond = encode_prompt(clip, "a (red:1.4) fox BREAK snow", weighting="a1111")
    length = clip.tokenizers[0].get().model_max_length
    assert hidden(cond).shape[1] == 2 * length and hidden(cond, "negative").abs().sum() == 0
    assert torch.equal(cond.positive["text_embeds"], plain.positive["text_embeds"])
    with_neg = encode_prompt(clip, "a fox", "ugly BREAK bad", weighting="comfy")
    assert hidden(with_neg).shape == hidden(with_neg, "negative").shape


def test_node_errors_name_the_input_and_position(clip: Any, pixart_folder: Any) -> None:
    args: dict[str, Any] = {"clip": clip, "prompt": "a fox", "negative_prompt": "", "prompt_2": "", "clip_skip": 0, "max_length": 0}
    with pytest.raises(NodeInputError, match="position 5") as info:
        encode_node.fn(None, **{**args, "negative_prompt": "ugly (bad", "weighting": "comfy"})
    assert info.value.input == "negative_prompt"
    problems = encode_node.check({"prompt": ["ok", "a]"], "weighting": "a1111"})
    assert problems[0].input == "prompt" and "item 1" in problems[0].message
    assert encode_node.check({"prompt": "a]"}) == []  # no weighting: brackets are plain text
    t5 = load_diffusers_folder(pixart_folder).clip  # T5 weighting (PixArt) works: tests/nodes/everyday/test_weighting_t5.py
    cond = encode_prompt(t5, "a (red:1.2) fox", weighting="comfy")
    assert cond.kind == "t5" and cond.meta["weighting"] == "comfy"
