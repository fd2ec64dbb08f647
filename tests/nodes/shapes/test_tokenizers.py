"""The shapes world's tokenizers: every caption word is one token, captions round-trip through
save/load, builds are deterministic, other words are still spelt out, and the word-level BPE
construction survives word lists whose merges interfere."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from dagfusion.nodes.shapes import tokenizers  # noqa: E402
from dagfusion.nodes.shapes.world import scenes  # noqa: E402

CAPTION = "a large red circle on the left on a black background"


@pytest.fixture(scope="module")
def clip():
    return tokenizers.clip_tokenizer()


@pytest.fixture(scope="module")
def t5():
    return tokenizers.t5_tokenizer()


@pytest.fixture(scope="module")
def every_caption() -> list[str]:
    return sorted({s.caption for split in ("train", "eval") for objects in (1, 2) for s in scenes(split, objects)})


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False).input_ids)


def test_caption_words_are_the_sorted_distinct_words_of_every_caption(every_caption):
    words = tokenizers.caption_words()
    assert words == sorted(set(words))
    assert set(words) == {w for caption in every_caption for w in caption.split()}
    assert {"a", "circle", "background", "above", "left"} <= set(words)


@pytest.mark.parametrize("name", ["clip", "t5"])
def test_every_caption_word_is_one_token(name, request):
    tok = request.getfixturevalue(name)
    ids = {}
    for word in tokenizers.caption_words():
        encoded = _ids(tok, word)
        assert len(encoded) == 1, f"{name} splits {word!r} into {tok.convert_ids_to_tokens(encoded)}"
        assert encoded[0] != tok.unk_token_id
        ids[word] = encoded[0]
    assert len(set(ids.values())) == len(ids)  # distinct words, distinct tokens


def test_a_caption_is_one_token_per_word_plus_the_specials(clip, t5):
    words = CAPTION.split()
    word_ids = {w: _ids(clip, w)[0] for w in words}
    assert clip(CAPTION).input_ids == [clip.bos_token_id, *(word_ids[w] for w in words), clip.eos_token_id]
    assert clip.convert_ids_to_tokens(clip(CAPTION).input_ids)[1:-1] == [w + "</w>" for w in words]

    word_ids = {w: _ids(t5, w)[0] for w in words}
    assert t5(CAPTION).input_ids == [*(word_ids[w] for w in words), t5.eos_token_id]  # T5: only </s> appended
    assert t5.convert_ids_to_tokens(t5(CAPTION).input_ids)[:-1] == ["\u2581" + w for w in words]


def test_specials_have_the_ids_the_shapes_text_encoders_expect(clip, t5):
    assert (clip.bos_token_id, clip.eos_token_id, clip.pad_token_id) == (0, 1, 1)  # SD 1: end-of-text pads
    assert clip.model_max_length == tokenizers.CLIP_MAX_LENGTH
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)


@pytest.mark.parametrize("name", ["clip", "t5"])
def test_every_caption_of_the_world_fits_without_truncation_or_unknowns(name, request, every_caption):
    tok = request.getfixturevalue(name)
    specials = 2 if name == "clip" else 1
    encoded = tok(every_caption, padding="max_length", truncation=True, max_length=tokenizers.CLIP_MAX_LENGTH)
    for caption, ids, mask in zip(every_caption, encoded.input_ids, encoded.attention_mask):
        assert sum(mask) == len(caption.split()) + specials, caption
        words = ids[1 : sum(mask) - 1] if name == "clip" else ids[: sum(mask) - 1]  # CLIP's unk is its end-of-text
        assert len(ids) == tokenizers.CLIP_MAX_LENGTH and tok.unk_token_id not in words


def test_save_pretrained_and_from_pretrained_give_identical_ids(clip, t5, tmp_path: Path):
    from transformers import CLIPTokenizer, T5Tokenizer

    texts = [CAPTION, "a small blue square above a green triangle on a white background", "zebra 42", ""]
    for tok, cls in ((clip, CLIPTokenizer), (t5, T5Tokenizer)):
        folder = tmp_path / cls.__name__
        tok.save_pretrained(folder)
        loaded = cls.from_pretrained(folder, local_files_only=True)
        assert isinstance(loaded, cls)
        assert len(loaded) == len(tok) and loaded.get_vocab() == tok.get_vocab()
        for text in texts:
            assert loaded(text).input_ids == tok(text).input_ids, (cls.__name__, text)
        padded = {"padding": "max_length", "max_length": tokenizers.CLIP_MAX_LENGTH}
        assert loaded(CAPTION, **padded).input_ids == tok(CAPTION, **padded).input_ids
    assert CLIPTokenizer.from_pretrained(tmp_path / "CLIPTokenizer").model_max_length == tokenizers.CLIP_MAX_LENGTH


def test_building_twice_is_deterministic(tmp_path: Path):
    assert tokenizers.clip_vocab() == tokenizers.clip_vocab()
    assert tokenizers.t5_pieces() == tokenizers.t5_pieces()
    # fresh tokenizers: a used one saves its last call's padding/truncation settings in tokenizer.json
    for name, make in (("clip", tokenizers.clip_tokenizer), ("t5", tokenizers.t5_tokenizer)):
        first, again = make(), make()
        assert again.get_vocab() == first.get_vocab()
        first.save_pretrained(tmp_path / f"{name}-a")
        again.save_pretrained(tmp_path / f"{name}-b")
        files_a = sorted(p.name for p in (tmp_path / f"{name}-a").iterdir())
        assert files_a == sorted(p.name for p in (tmp_path / f"{name}-b").iterdir())
        for file in files_a:  # byte-identical saved files
            assert (tmp_path / f"{name}-a" / file).read_bytes() == (tmp_path / f"{name}-b" / file).read_bytes(), file


def test_a_word_outside_the_vocabulary_is_spelt_in_pieces(clip, t5):
    pieces = clip.convert_ids_to_tokens(_ids(clip, "zebra"))
    assert len(pieces) > 1 and clip.unk_token_id not in _ids(clip, "zebra")
    assert "".join(pieces).replace("</w>", "") == "zebra" and pieces[-1].endswith("</w>")
    assert clip.decode(_ids(clip, "a zebra")).strip() == "a zebra"
    assert clip.convert_ids_to_tokens(_ids(clip, "2024"))  # digits spell too
    assert clip.unk_token_id not in _ids(clip, "2024")

    ids = _ids(t5, "zebra")
    assert len(ids) > 1 and t5.unk_token_id not in ids
    assert "".join(t5.convert_ids_to_tokens(ids)).replace("\u2581", "") == "zebra"
    # a caption word stays one token next to an unknown word
    assert _ids(t5, "red zebra")[0] == _ids(t5, "red")[0] and _ids(clip, "red zebra")[0] == _ids(clip, "red")[0]


def test_the_clip_vocabulary_is_a_valid_bpe(clip):
    vocab, merges = tokenizers.clip_vocab()
    assert vocab == clip.get_vocab()
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert len(set(merges)) == len(merges)
    for left, right in merges:
        assert left in vocab and right in vocab and left + right in vocab, (left, right)


def _single_tokens_by_ranks(words: list[str]) -> None:
    vocab, merges = tokenizers.clip_vocab(words)
    assert len(set(merges)) == len(merges), f"duplicate merges for {words}: {merges}"
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    for word in words:
        assert tokenizers._bpe(word, ranks) == [word + "</w>"], word
        assert word + "</w>" in vocab


CONFLICTS = [
    ["ab", "abc", "b"],  # a word that is a prefix of another
    ["bc", "abc"],  # an earlier merge ("bc") cuts across a later word's left-to-right chain
    ["abc", "ab", "bc"],
    ["ab", "ba", "aba", "bab"],
    ["aa", "aaa"],
    ["cab", "abc", "bca"],
]


@pytest.mark.parametrize("words", CONFLICTS, ids="-".join)
def test_small_word_lists_with_interfering_merges_still_give_single_tokens(words):
    _single_tokens_by_ranks(words)


@pytest.mark.parametrize("words", CONFLICTS[:3], ids="-".join)
def test_the_real_tokenizer_agrees_on_a_small_vocabulary(words):
    from transformers import CLIPTokenizer

    vocab, merges = tokenizers.clip_vocab(words)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>")
    for word in words:
        assert tok.convert_ids_to_tokens(_ids(tok, word)) == [word + "</w>"], word
    assert tok.convert_ids_to_tokens(_ids(tok, " ".join(words))) == [w + "</w>" for w in words]


@pytest.mark.parametrize("words", [["aaaaa"], ["bbaa", "aaaaa", "ab", "ba", "abb"]], ids="-".join)
def test_repeated_letters_give_single_tokens_without_duplicate_merges(words):
    _single_tokens_by_ranks(words)
