"""Training textual-inversion embeddings (dagfusion.text.TrainableEmbedding) with the shared
training loop, saving them (dagfusion.text.SaveEmbedding) and loading them back (LoadEmbedding,
diffusers' load_textual_inversion), on the tiny SD model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dagfusion.nodes.diffusion.text import encode_prompt
from dagfusion.nodes.everyday.embedding_train import (
    TrainableEmbeddingPatch,
    embedding_tensors,
    trainable_embedding,
)
from dagfusion.nodes.everyday.embeddings import read_embedding_file, with_embedding
from dagfusion.nodes.training.data import ImageCaptionData, ReplacedCaptions
from dagfusion.nodes.training.loop import TrainConfig, train
from dagfusion.nodes.training.objectives import VPredictionObjective
from safetensors import safe_open

PROMPT = "a large <pink> circle on a black background"


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return tiny.sd_handles()


def _state(module: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _data() -> ImageCaptionData:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=generator)
    captions = ["a <pink> circle", "a large <pink> square", "a <pink> fox", "a small <pink> circle"]
    return ImageCaptionData(images, captions, seed=0, shuffle=False)


def _config(**overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {"steps": 1, "batch_size": 4, "learning_rate": 0.0, "weight_decay": 0.0,
                              "trainable": "patches", "caption_dropout": 0.0, "seed": 3}
    values.update(overrides)
    return TrainConfig(**values)


def test_vectors_start_at_the_init_text_embedding(parts: dict[str, Any]) -> None:
    clip = parts["clip"]
    bundle = trainable_embedding(clip, "<pink>", "red", 2)
    (patch,) = bundle.patches
    assert isinstance(patch, TrainableEmbeddingPatch)
    tokenizer, encoder = clip.tokenizers[0].get(), clip.encoders[0].get()
    ids = tokenizer("red", add_special_tokens=False).input_ids
    expected = encoder.get_input_embeddings().weight.detach()[ids].mean(0)
    assert patch.vectors.shape == (2, 32)
    assert torch.allclose(patch.vectors, expected.expand(2, -1))
    assert set(patch.trainable_parameters()) == {"vectors"}
    # the tokenizer learnt the token (and its second part) the way LoadEmbedding teaches it
    copy = bundle.tokenizers[0].get()
    assert {"<pink>", "<pink>_1"} <= set(copy.get_vocab()) and "<pink>" not in tokenizer.get_vocab()
    assert bundle.options["textual_inversion"] == {"<pink>": 2}
    # and the vectors are what the encoder sees for it: equal to a LoadEmbedding of the same rows
    loaded = with_embedding(clip, {"": patch.vectors.detach().clone()}, "<pink>")
    a = encode_prompt(bundle, PROMPT, "").positive["encoder_hidden_states"]
    b = encode_prompt(loaded, PROMPT, "").positive["encoder_hidden_states"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("token", ["the", "a", "x"])
def test_a_known_word_is_refused(parts: dict[str, Any], token: str) -> None:
    with pytest.raises(ValueError, match="already a token"):
        trainable_embedding(parts["clip"], token, "red", 1)


def test_a_token_twice_and_bad_settings_are_refused(parts: dict[str, Any]) -> None:
    bundle = trainable_embedding(parts["clip"], "<pink>", "red", 1)
    with pytest.raises(ValueError, match="already"):
        trainable_embedding(bundle, "<pink>", "red", 1)
    with pytest.raises(ValueError, match="vectors"):
        trainable_embedding(parts["clip"], "<pink>", "red", 17)
    with pytest.raises(ValueError, match="init_text"):
        trainable_embedding(parts["clip"], "<pink>", " ", 1)


def test_training_changes_only_the_vectors_and_lowers_the_loss(parts: dict[str, Any]) -> None:
    model, clip, vae = parts["model"], parts["clip"], parts["vae"]
    bundle = trainable_embedding(clip, "<pink>", "red", 2)
    start = bundle.patches[0].vectors.detach().clone()
    unet, text = _state(model.denoiser), _state(clip.encoders[0].get())
    objective = VPredictionObjective()
    data = _data()

    def loss_of(embedded: Any) -> float:  # one step at learning rate 0: the loss on a fixed batch and noise
        return train(model, data, embedded, vae, objective, _config()).losses[0]

    before = loss_of(bundle)
    result = train(model, data, bundle, vae, objective, _config(steps=30, learning_rate=0.05, seed=0))
    trained = result.clip
    (patch,) = trained.patches
    assert isinstance(patch, TrainableEmbeddingPatch) and not patch.vectors.requires_grad
    assert not torch.equal(patch.vectors, start)
    assert torch.equal(bundle.patches[0].vectors, start)  # the input bundle is unchanged
    assert patch.key != bundle.patches[0].key
    # nothing else changed: the shared encoder and UNet, and the trained output's UNet
    assert _same(unet, _state(model.denoiser)) and _same(text, _state(clip.encoders[0].get()))
    assert _same(unet, _state(result.model.denoiser))
    assert all(not p.requires_grad for p in clip.encoders[0].get().parameters() if p.grad is not None)
    assert all(p.grad is None for p in clip.encoders[0].get().parameters())
    after = loss_of(trained)
    assert after < before, (before, after)


def test_save_and_load_round_trip(parts: dict[str, Any], tmp_path: Path) -> None:
    from dagfusion.nodes.everyday.embedding_train import save_embedding

    bundle = trainable_embedding(parts["clip"], "<pink>", "red", 2)
    with torch.no_grad():
        bundle.patches[0].vectors.add_(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)))

    class Context:  # the one RunContext method the node uses
        def output_path(self, name: str) -> Path:
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            return path

    out = save_embedding.fn(Context(), clip=bundle, filename="emb/pink.safetensors", token="")
    path = Path(out["path"])
    assert path == tmp_path / "emb" / "pink.safetensors" and out["token"] == "<pink>"
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"<pink>"}
        assert {k: f.metadata()[k] for k in ("token", "vectors", "init_text")} == {"token": "<pink>", "vectors": "2", "init_text": "red"}
    loaded_parts, token = read_embedding_file(path)
    assert token == "<pink>"
    loaded = with_embedding(parts["clip"], loaded_parts, token)
    a = encode_prompt(bundle, PROMPT, "blurry <pink>")
    b = encode_prompt(loaded, PROMPT, "blurry <pink>")
    assert torch.equal(a.positive["encoder_hidden_states"], b.positive["encoder_hidden_states"])
    assert torch.equal(a.negative["encoder_hidden_states"], b.negative["encoder_hidden_states"])
    plain = encode_prompt(parts["clip"], PROMPT, "").positive["encoder_hidden_states"]
    assert not torch.allclose(a.positive["encoder_hidden_states"], plain)
    with pytest.raises(ValueError, match="no trainable embedding"):
        embedding_tensors(parts["clip"])


def test_saved_file_loads_in_diffusers(parts: dict[str, Any], tmp_path: Path) -> None:
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.testing import models as tiny
    from safetensors.torch import save_file

    folder = tiny.write_model("sd", tmp_path / "sd")
    clip = load_diffusers_folder(folder).clip
    bundle = trainable_embedding(clip, "<pink>", "red", 2)
    with torch.no_grad():
        bundle.patches[0].vectors.add_(torch.randn(2, 32, generator=torch.Generator().manual_seed(2)))
    tensors, metadata = embedding_tensors(bundle)
    path = tmp_path / "pink.safetensors"
    save_file(tensors, str(path), metadata=metadata)

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(path))
    positive, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True, "blurry <pink>")
    ours = encode_prompt(bundle, PROMPT, "blurry <pink>")
    assert float((ours.positive["encoder_hidden_states"] - positive.detach()).abs().max()) <= 1e-6
    assert float((ours.negative["encoder_hidden_states"] - negative.detach()).abs().max()) <= 1e-6


def test_replace_in_captions() -> None:
    source = ImageCaptionData(torch.zeros(2, 3, 8, 8), ["a pink <pink> pinkish circle", "pink"], shuffle=False)
    data = ReplacedCaptions(source, "pink", "<q>")
    assert data.examples(0, 2).captions == ("a <q> <pink> pinkish circle", "<q>")
