"""Textual-inversion embeddings (dagfusion.text.LoadEmbedding) against diffusers' load_textual_inversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.torch import save_file  # noqa: E402

from dagfusion.fingerprint import fingerprint  # noqa: E402
from dagfusion.nodes.diffusion.loading import load_diffusers_folder  # noqa: E402
from dagfusion.nodes.diffusion.text import encode_prompt  # noqa: E402
from dagfusion.nodes.everyday.embeddings import read_embedding_file, with_embedding  # noqa: E402

PROMPT = "a photo of <cat-toy> on the grass"
NEGATIVE = "blurry <cat-toy>"


def _vectors(rows: int, width: int, seed: int = 1) -> Any:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


def _max_diff(a: Any, b: Any) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


@pytest.mark.parametrize("rows", [1, 3])
def test_sd_embedding_equals_diffusers(sd_folder: Path, reference: Any, tmp_path: Path, rows: int) -> None:
    path = tmp_path / "cat.safetensors"
    save_file({"<cat-toy>": _vectors(rows, 32)}, str(path))
    pipe = reference(diffusers.StableDiffusionPipeline, sd_folder, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(path))
    positive, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)

    clip = load_diffusers_folder(sd_folder).clip
    tokenizer, encoder = clip.tokenizers[0].get(), clip.encoders[0].get()
    vocab, weights = len(tokenizer), encoder.get_input_embeddings().weight.clone()
    parts, token = read_embedding_file(path)
    assert token == "<cat-toy>"
    cond = encode_prompt(with_embedding(clip, parts, token), PROMPT, NEGATIVE)
    assert _max_diff(cond.positive["encoder_hidden_states"], positive) <= 1e-6
    assert _max_diff(cond.negative["encoder_hidden_states"], negative) <= 1e-6
    # the shared tokenizer and encoder are untouched, and the plain bundle encodes as before
    assert len(tokenizer) == vocab and "<cat-toy>" not in tokenizer.get_vocab()
    assert torch.equal(encoder.get_input_embeddings().weight, weights)
    assert type(encoder.get_input_embeddings()).__name__ == "Embedding"
    assert _max_diff(encode_prompt(clip, PROMPT).positive["encoder_hidden_states"], positive) > 1e-3


def test_sdxl_embedding_equals_diffusers(sdxl_folder: Path, reference: Any, tmp_path: Path) -> None:
    path = tmp_path / "sdxl.safetensors"
    clip_l, clip_g = _vectors(2, 32, 1), _vectors(2, 32, 2)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(path))
    pipe = reference(diffusers.StableDiffusionXLPipeline, sdxl_folder)
    pipe.load_textual_inversion(clip_l, token="<cat-toy>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token="<cat-toy>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    positive, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=NEGATIVE
    )
    clip = load_diffusers_folder(sdxl_folder).clip
    parts, _ = read_embedding_file(path)
    cond = encode_prompt(with_embedding(clip, parts, "<cat-toy>"), PROMPT, NEGATIVE)
    assert _max_diff(cond.positive["encoder_hidden_states"], positive) <= 1e-6
    assert _max_diff(cond.positive["text_embeds"], pooled) <= 1e-6
    assert _max_diff(cond.negative["encoder_hidden_states"], negative) <= 1e-6
    assert _max_diff(cond.negative["text_embeds"], negative_pooled) <= 1e-6


def test_node_in_a_workflow_and_a1111_layout(sd_folder: Path, engine: Any, helpers: Any, tmp_path: Path) -> None:
    path = tmp_path / "shiny.safetensors"
    save_file({"emb_params": _vectors(2, 32)}, str(path))
    result = helpers.run_ok(engine, f"""
    nodes:
      load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{sd_folder}", dtype: fp32}}}}
      embed: {{type: dagfusion.text.LoadEmbedding, inputs: {{clip: {{from: load.clip}}, path: "{path}"}}}}
      text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: embed.clip}}, prompt: "a shiny fox"}}}}
      plain: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: "a shiny fox"}}}}
    """, tmp_path / "out")
    embedded = result.outputs["text"]["conditioning"].positive["encoder_hidden_states"]
    plain = result.outputs["plain"]["conditioning"].positive["encoder_hidden_states"]
    assert _max_diff(embedded, plain) > 1e-3  # "shiny" (the file's stem) is one token now
    bundle = result.outputs["embed"]["clip"]
    assert "shiny" in bundle.tokenizers[0].get().get_vocab() and "shiny_1" in bundle.tokenizers[0].get().get_vocab()


def test_chained_embeddings_and_distinct_fingerprints(sd_folder: Path) -> None:
    clip = load_diffusers_folder(sd_folder).clip
    one = with_embedding(clip, {"": _vectors(1, 32, 1)}, "<a>")
    other = with_embedding(clip, {"": _vectors(1, 32, 2)}, "<a>")
    both = with_embedding(one, {"": _vectors(2, 32, 3)}, "<b>")
    assert len({fingerprint(clip), fingerprint(one), fingerprint(other), fingerprint(both)}) == 4
    a_only = encode_prompt(one, "<a> and <b>").positive["encoder_hidden_states"]
    a_and_b = encode_prompt(both, "<a> and <b>").positive["encoder_hidden_states"]
    assert _max_diff(a_only, a_and_b) > 1e-3
    assert "<b>_1" in both.tokenizers[0].get().get_vocab() and "<b>" not in one.tokenizers[0].get().get_vocab()


def test_width_mismatch_and_taken_token_are_clear_errors(sd_folder: Path, sdxl_folder: Path) -> None:
    clip = load_diffusers_folder(sd_folder).clip
    with pytest.raises(ValueError, match=r"768 wide but the text encoder's token embeddings are 32 wide"):
        with_embedding(clip, {"": _vectors(1, 768)}, "<big>")
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        with_embedding(clip, {"": _vectors(1, 32)}, "a")
    with pytest.raises(ValueError, match="clip_l' and 'clip_g"):
        with_embedding(load_diffusers_folder(sdxl_folder).clip, {"": _vectors(1, 32)}, "<x>")


def test_unknown_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a textual-inversion embedding"):
        read_embedding_file(path)
