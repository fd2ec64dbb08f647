"""LoRA patches on handles: composition with caches and quantization, keys, refusals, save/load, training."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from dagfusion import NodeInputError
from dagfusion.fingerprint import fingerprint
from dagfusion.model import ModelHandle, apply_patches
from dagfusion.nodes.lora import attach, layouts
from dagfusion.nodes.lora.patch import LoraPatch, TrainableLoraPatch, new_layers
from dagfusion.nodes.lora.weights import LoraLayer, LoraWeights
from dagfusion.testing import models as tiny

from .lora_files import write_sd_lora

pytest.importorskip("peft")
LOG = logging.getLogger("test")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sd_lora(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def sd() -> dict[str, Any]:
    return tiny.sd_handles()


def _out(model: Any, patches: tuple[Any, ...]) -> Any:
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 7, 32, generator=g)
    with torch.no_grad(), apply_patches(patches, model.denoiser):
        return model.denoiser(x, torch.tensor([300]), encoder_hidden_states=ctx).sample


def test_strength_and_mode_change_the_key_and_the_fingerprint(files, sd) -> None:
    weights = layouts.load(files["diffusers"])
    handles = [attach.on_model(sd["model"], weights, s, f, LOG) for s, f in ((1.0, False), (0.5, False), (1.0, True))]
    assert len({fingerprint(h) for h in handles}) == 3
    again = attach.on_model(sd["model"], layouts.load(files["diffusers"]), 1.0, False, LOG)
    assert fingerprint(again) == fingerprint(handles[0])
    assert weights.digest in handles[0].patches[0].key
    assert attach.on_model(sd["model"], weights, 0.0, False, LOG) is sd["model"]


def test_side_branch_on_an_int8_model_equals_fusing_into_the_dequantized_weights(files, sd) -> None:
    from dagfusion.nodes.quant.patch import quantize_module

    weights = layouts.load(files["diffusers"])
    quantized = sd["model"].with_patch(quantize_module(sd["model"].denoiser, "int8"))
    side = attach.on_model(quantized, weights, 0.8, True, LOG)  # fuse is refused on a quantized model
    assert not side.patches[-1].fuse
    fused = quantized.with_patch(LoraPatch(side.patches[-1].layers, strength=0.8, fuse=True))
    got, expected = _out(side, side.patches), _out(fused, fused.patches)
    assert (got - expected).abs().max().item() < 1e-5
    assert (got - _out(quantized, quantized.patches)).abs().max() > 1e-3


def test_deepcache_with_a_lora_side_branch_equals_deepcache_with_it_fused(files, sd) -> None:
    from dagfusion.nodes.cache.deepcache import DeepCacheConfig, DeepCachePatch
    from dagfusion.nodes.diffusion.sampling import sample

    weights = layouts.load(files["diffusers"])
    cached = sd["model"].with_patch(DeepCachePatch(DeepCacheConfig(interval=2, branch=0)))
    options = {"steps": 4, "guidance_scale": 4.0, "seed": 3, "sampler": "euler"}
    runs = [sample(attach.on_model(cached, weights, 0.7, fuse, LOG), sd["conditioning"], sd["latent"], **options)
            for fuse in (False, True)]
    plain = sample(cached, sd["conditioning"], sd["latent"], **options)
    assert (runs[0].samples - runs[1].samples).abs().max().item() < 1e-4
    assert (runs[0].samples - plain.samples).abs().max() > 1e-3


def test_a_lora_for_another_architecture_is_refused_naming_what_matched(files, caplog) -> None:
    weights = layouts.load(files["diffusers"])
    with pytest.raises(NodeInputError, match="another architecture: 0 of .* layers matched; .* did not"):
        attach.on_model(tiny.dit_model(), weights, 1.0, False, LOG)
    partial = LoraWeights({"denoiser": {**weights.components["denoiser"],
                                        "no.such.layer": next(iter(weights.components["denoiser"].values()))}})
    with caplog.at_level(logging.WARNING):
        attach.on_model(tiny.sd_handles()["model"], partial, 1.0, False, LOG)
    assert "did not (e.g. no.such.layer: no such module)" in caplog.text


def test_bad_files_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"unet.a.lora_A.weight": torch.zeros(2, 3)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="has no up weight"):
        layouts.load(tmp_path / "half.safetensors")
    save_file({"unet.a.weight": torch.zeros(2, 3)}, str(tmp_path / "full.safetensors"))
    with pytest.raises(ValueError, match="expected only LoRA keys"):
        layouts.load(tmp_path / "full.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="only safetensors"):
        layouts.load(tmp_path / "x.ckpt")


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_save_and_load_again_is_bit_for_bit(files, layout: str, tmp_path: Path) -> None:
    weights = layouts.load(files[layout])
    again = layouts.load(layouts.save(weights, tmp_path / "again.safetensors"))
    assert again.layout == weights.layout and again.digest == weights.digest
    for component, layers in weights.components.items():
        for name, layer in layers.items():
            other = again.components[component][name]
            assert torch.equal(layer.down, other.down) and torch.equal(layer.up, other.up)
            assert layer.alpha == other.alpha


def test_extracted_loras_save_in_the_diffusers_layout_that_diffusers_loads(files, sd, tmp_path: Path) -> None:
    weights = layouts.load(files["diffusers"])
    model = attach.on_model(sd["model"], weights, 0.5, False, LOG)
    model = attach.on_model(model, weights, 0.25, True, LOG)  # stacked: concatenated along the rank
    clip = attach.on_clip(sd["clip"], weights, 0.5, False, LOG)
    extracted = attach.extract(model, clip)
    path = layouts.save(extracted, tmp_path / "extracted.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["dagfusion.lora"])
    assert meta["format"] == "dagfusion.lora/1" and meta["rank"] == [4, 8] and len(meta["target_modules"]["denoiser"]) > 0
    pipe = tiny.build_sd(0)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    pipe.fuse_lora(lora_scale=1.0)
    expected = _out(ModelHandle.from_module(pipe.unet), ())
    assert (_out(model, model.patches) - expected).abs().max().item() < 1e-5


def test_a_trainable_lora_trains_and_extracts(sd) -> None:
    from dagfusion.nodes.shapes.dataset import ShapesDataset
    from dagfusion.nodes.training.loop import TrainConfig, train
    from dagfusion.nodes.training.objectives import EpsilonObjective

    unet = sd["model"].denoiser
    names = [n for n, _ in unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_v"))]
    model = sd["model"].with_patch(TrainableLoraPatch(new_layers(unet, names, 2, 2.0, 0)))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    result = train(model, ShapesDataset(split="train", resolution=32, seed=0), sd["clip"], sd["vae"],
                   EpsilonObjective(), TrainConfig(steps=2, batch_size=2, trainable="patches", learning_rate=1e-2))
    trained = result.model.patches[-1]
    assert isinstance(trained, TrainableLoraPatch) and trained.key != model.patches[-1].key
    assert any(layer.up.abs().sum() > 0 for layer in trained.layers.values())
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    extracted = attach.extract(result.model, None)
    assert set(extracted.components["denoiser"]) == set(names)


def test_lora_layer_scale() -> None:
    layer = LoraLayer(torch.ones(4, 3), torch.ones(5, 4), 2.0)
    assert layer.rank == 4 and layer.scale == 0.5
    assert torch.equal(layer.delta((5, 3)), torch.full((5, 3), 2.0))
