"""Embedding interpolation and saving the encoder for diffusers."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from dagfusion.errors import NodeInputError
from dagfusion.model import TextEncoderBundle
from dagfusion.nodes.diffusion.text import encode_prompt
from dagfusion.nodes.textcraftor.interpolate import interpolate
from dagfusion.nodes.textcraftor.save import save_encoder

PROMPT = "a red circle"


def perturbed(clip: Any, seed: int = 1) -> Any:
    encoder = copy.deepcopy(clip.encoders[0].get())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return TextEncoderBundle.from_modules("clip", [encoder], [clip.tokenizers[0].get()])


def hidden(clip: Any) -> torch.Tensor:
    return encode_prompt(clip, PROMPT, "").positive["encoder_hidden_states"]


def test_interpolation_endpoints_and_midpoint(parts: dict[str, Any]) -> None:
    a, b = parts["clip"], perturbed(parts["clip"])
    assert torch.equal(hidden(interpolate(a, b, 1.0)), hidden(a))
    assert torch.equal(hidden(interpolate(a, b, 0.0)), hidden(b))
    assert torch.allclose(hidden(interpolate(a, b, 0.25)), 0.25 * hidden(a) + 0.75 * hidden(b), atol=1e-6)


def test_interpolation_refuses_other_tokenizers_and_widths(parts: dict[str, Any]) -> None:
    from transformers import CLIPTextModel

    from dagfusion.testing import models as tiny

    a = parts["clip"]
    other_tokenizer = TextEncoderBundle.from_modules("clip", [a.encoders[0].get()], [tiny.clip_tokenizer(max_length=40)])
    with pytest.raises(NodeInputError, match="tokenizers differ.*clip_a.*clip_b"):
        interpolate(a, other_tokenizer, 0.5)
    wide = TextEncoderBundle.from_modules("clip", [CLIPTextModel(tiny.clip_text_config(hidden_size=48))],
                                          [a.tokenizers[0].get()])
    with pytest.raises(NodeInputError, match="widths differ \\(32 for clip_a, 48 for clip_b\\)"):
        interpolate(a, wide, 0.5)


@pytest.mark.parametrize("with_lora", [False, True])
def test_saved_encoder_loads_in_diffusers_with_equal_outputs(parts: dict[str, Any], tmp_path: Path, with_lora: bool) -> None:
    from diffusers import DiffusionPipeline

    from dagfusion.nodes.lora.patch import TrainableLoraPatch, module_id, new_layers
    from dagfusion.testing import models as tiny

    clip = perturbed(parts["clip"])
    if with_lora:
        encoder = clip.encoders[0].get()
        layers = new_layers(encoder, ["encoder.layers.0.self_attn.q_proj"], 2, 2.0, 0)
        for layer in layers.values():
            layer.up.data.normal_()
        clip = clip.with_patch(TrainableLoraPatch(layers, component="text_encoder", target=module_id(encoder)))
    folder = tiny.write_model("sd", tmp_path / "sd")
    saved = save_encoder(clip, tmp_path / "out")
    for part in ("text_encoder", "tokenizer"):
        shutil.rmtree(folder / part)
        shutil.copytree(saved / part, folder / part)
    assert (folder / "text_encoder" / "model.safetensors").is_file()
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0]
    assert torch.allclose(theirs, hidden(clip), atol=1e-5)
    assert not torch.allclose(theirs, hidden(parts["clip"]), atol=1e-3)


def test_load_encoder_puts_a_saved_encoder_into_the_bundle(parts: dict[str, Any], tmp_path: Path) -> None:
    from dagfusion.nodes.textcraftor.load import load_encoder

    tuned = perturbed(parts["clip"])
    save_encoder(tuned, tmp_path / "tuned")
    loaded = load_encoder(parts["clip"], tmp_path / "tuned")
    assert torch.allclose(hidden(loaded), hidden(tuned), atol=1e-6)
    assert not torch.allclose(hidden(loaded), hidden(parts["clip"]), atol=1e-3)
    assert loaded.tokenizers == parts["clip"].tokenizers and parts["clip"].encoders[0].get() is not loaded.encoders[0].get()


def test_load_encoder_refuses_what_does_not_fit(parts: dict[str, Any], tmp_path: Path) -> None:
    from transformers import CLIPTextModel

    from dagfusion.nodes.textcraftor.load import EncoderMismatch, load_encoder

    encoder = parts["clip"].encoders[0].get()
    config = copy.deepcopy(encoder.config)
    config.hidden_size *= 2
    wider = TextEncoderBundle.from_modules("clip", [CLIPTextModel(config)], [parts["clip"].tokenizers[0].get()])
    save_encoder(wider, tmp_path / "wider")
    with pytest.raises(EncoderMismatch, match=f"hidden_size {config.hidden_size}, the bundle's encoder {encoder.config.hidden_size}"):
        load_encoder(parts["clip"], tmp_path / "wider")
    save_encoder(parts["clip"], tmp_path / "pickled")
    for f in (tmp_path / "pickled" / "text_encoder").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        load_encoder(parts["clip"], tmp_path / "pickled")
    with pytest.raises(FileNotFoundError, match="text_encoder/config.json"):
        load_encoder(parts["clip"], tmp_path)
