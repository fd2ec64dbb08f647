"""The LoRA nodes in workflows and called directly: files, refusals, SDXL's second encoder, the LORA type."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from dagfusion import NodeInputError
from dagfusion.model import TextEncoderBundle, apply_patches
from dagfusion.nodes.lora import attach, layouts, nodes
from dagfusion.nodes.lora.types import LORA
from dagfusion.nodes.lora.weights import LoraLayer, LoraWeights
from dagfusion.testing import NodeCallContext, run_workflow
from dagfusion.testing import models as tiny

from .lora_files import write_sd_lora

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sd_lora(tmp_path_factory.mktemp("lora"))


def test_load_apply_save_and_load_again_in_a_workflow(files, tmp_path: Path) -> None:
    import shutil

    shutil.copy(files["kohya"], tmp_path / "kohya.safetensors")
    result = run_workflow(f"""format_version: 1
nodes:
  load: {{type: dagfusion.models.LoadEmbedded, inputs: {{model: shapes-sd}}}}
  lora: {{type: dagfusion.lora.Load, inputs: {{path: {tmp_path / 'kohya.safetensors'}}}}}
  save: {{type: dagfusion.lora.Save, inputs: {{lora: {{from: lora.lora}}, filename: out/again.safetensors}}}}
""", tmp_path=tmp_path)
    report = result.outputs["lora"]["report"]
    assert report["layout"] == "kohya" and report["alphas"] == [2.0, 8.0]
    again = layouts.load(result.outputs["save"]["path"])
    assert again.digest == report["digest"]


def test_a_lora_of_another_model_fails_the_node_with_a_clear_message(files, tmp_path: Path) -> None:
    spec = nodes.apply_lora
    pixart_unet_lora = layouts.load(files["diffusers"])
    parts = tiny.pixart_handles()
    clip = TextEncoderBundle("none")
    with pytest.raises(NodeInputError) as info:
        spec.fn(NodeCallContext(tmp_path), model=parts["model"], clip=clip, lora=pixart_unet_lora,
                strength_model=1.0, strength_clip=1.0, fuse=False)
    assert info.value.input == "lora"
    assert "another architecture" in str(info.value) and "0 of" in str(info.value)


def test_load_refuses_paths_outside_the_read_folders_and_non_safetensors(tmp_path: Path) -> None:
    from dagfusion import ValidationError

    text = "format_version: 1\nnodes:\n  lora: {{type: dagfusion.lora.Load, inputs: {{path: {}}}}}\n"
    with pytest.raises(ValidationError, match="outside the allowed read folders"):
        run_workflow(text.format("/etc/hostname"), tmp_path=tmp_path)
    (tmp_path / "x.ckpt").write_bytes(b"not a pickle either")
    with pytest.raises(AssertionError, match="only safetensors is read"):
        run_workflow(text.format(tmp_path / "x.ckpt"), tmp_path=tmp_path)


def test_the_second_sdxl_encoder_gets_only_its_own_layers() -> None:
    pipe = tiny.build_sdxl(0)
    bundle = TextEncoderBundle.from_modules("sdxl", [pipe.text_encoder, pipe.text_encoder_2],
                                            [pipe.tokenizer, pipe.tokenizer_2])
    g = torch.Generator().manual_seed(0)
    name = "text_model.encoder.layers.0.self_attn.q_proj"
    layer = LoraLayer(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 2.0)
    weights = LoraWeights({"text_encoder_2": {name: layer}})
    patched = attach.on_clip(bundle, weights, 1.0, False, logging.getLogger("test"))
    ids = torch.tensor([[0, 5, 9, 2]])
    outs = []
    for te in (pipe.text_encoder, pipe.text_encoder_2):
        with torch.no_grad():
            plain = te(ids)[0]
            with apply_patches(patched.patches, te):
                outs.append((te(ids)[0] - plain).abs().max().item())
    assert outs[0] == 0.0 and outs[1] > 1e-4
    with pytest.raises(NodeInputError, match="2 text encoders"):
        attach.on_clip(tiny.sd_handles()["clip"], weights, 1.0, False, logging.getLogger("test"))


def test_the_lora_type_serializes_with_its_digest(files, tmp_path: Path) -> None:
    weights = layouts.load(files["diffusers"])
    LORA.serializer.save(weights, str(tmp_path / "v.safetensors"))
    again = LORA.serializer.load(str(tmp_path / "v.safetensors"))
    assert again.digest == weights.digest and again.summary() == weights.summary()


def test_trainable_refuses_targets_that_match_nothing(tmp_path: Path) -> None:
    with pytest.raises(NodeInputError, match="match none"):
        nodes.trainable_lora.fn(NodeCallContext(tmp_path), model=tiny.sd_handles()["model"], rank=2, alpha=2.0,
                                targets="nothing_here", seed=0)
