"""The LoRA patch against diffusers' load_lora_weights + fuse_lora (SD) and peft (DiT, PixArt)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from dagfusion.model import ModelHandle, TextEncoderBundle, apply_patches
from dagfusion.nodes.lora import attach, layouts
from dagfusion.testing import models as tiny

from .lora_files import DIT_TARGETS, peft_state_dict, write_sd_lora

pytest.importorskip("peft")
LOG = logging.getLogger("test")
ATOL = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sd_lora(tmp_path_factory.mktemp("lora"))


def _unet_inputs() -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g)


def _unet_out(unet: Any, patches: tuple[Any, ...] = ()) -> Any:
    x, t, ctx = _unet_inputs()
    with torch.no_grad(), apply_patches(patches, unet):
        return unet(x, t, encoder_hidden_states=ctx).sample


def _te_out(te: Any, patches: tuple[Any, ...] = ()) -> Any:
    ids = torch.tensor([[0, 5, 9, 17, 33, 1, 1]])
    with torch.no_grad(), apply_patches(patches, te):
        return te(ids)[0]


@pytest.fixture(scope="module")
def reference(files: dict[str, Path]) -> dict[float, tuple[Any, Any]]:
    """diffusers' outputs with the LoRA loaded and fused at each scale."""
    out = {}
    for scale in (1.0, 0.6):
        pipe = tiny.build_sd(0)
        pipe.load_lora_weights(str(files["diffusers"].parent), weight_name=files["diffusers"].name)
        pipe.fuse_lora(lora_scale=scale)
        out[scale] = (_unet_out(pipe.unet), _te_out(pipe.text_encoder))
    return out


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "kohya_ldm"])
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_equals_diffusers_fused_lora(files, reference, layout: str, fuse: bool, scale: float) -> None:
    pipe = tiny.build_sd(0)
    model = ModelHandle.from_module(pipe.unet)
    clip = TextEncoderBundle.from_modules("clip", [pipe.text_encoder], [pipe.tokenizer])
    weights = layouts.load(files[layout])
    model = attach.on_model(model, weights, scale, fuse, LOG)
    clip = attach.on_clip(clip, weights, scale, fuse, LOG)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    unet_out, te_out = _unet_out(pipe.unet, model.patches), _te_out(pipe.text_encoder, clip.patches)
    ref_unet, ref_te = reference[scale]
    unet_diff = (unet_out - ref_unet).abs().max().item()
    te_diff = (te_out - ref_te).abs().max().item()
    print(f"{layout} fuse={fuse} scale={scale}: unet max|diff| {unet_diff:.2e}, text encoder {te_diff:.2e}")
    assert unet_diff < ATOL and te_diff < ATOL
    # The LoRA changes the output, and the shared weights are bit for bit what they were.
    assert (unet_out - _unet_out(pipe.unet)).abs().max() > 1e-3
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_kohya_and_diffusers_files_are_the_same_lora(files) -> None:
    a, b = layouts.load(files["diffusers"]), layouts.load(files["kohya"])
    assert a.layout == "peft" and b.layout == "kohya"
    assert a.summary()["layers"] == b.summary()["layers"]
    assert a.summary()["alphas"] == b.summary()["alphas"] == [2.0, 8.0]


def _dit_out(transformer: Any, patches: tuple[Any, ...] = ()) -> Any:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad(), apply_patches(patches, transformer):
        return transformer(x, timestep=torch.tensor([3, 700]), class_labels=torch.tensor([1, 7])).sample


def _pixart_out(transformer: Any, patches: tuple[Any, ...] = ()) -> Any:
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    with torch.no_grad(), apply_patches(patches, transformer):
        return transformer(x, encoder_hidden_states=ctx, timestep=torch.tensor([3, 700]),
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


@pytest.mark.parametrize("kind", ["dit", "pixart"])
@pytest.mark.parametrize("fuse", [False, True])
def test_transformers_equal_peft(kind: str, fuse: bool, tmp_path: Path) -> None:
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    run = _dit_out if kind == "dit" else _pixart_out
    state, config = peft_state_dict(tiny.build_pixart(0).transformer if kind == "pixart" else tiny.build_dit(0).transformer,
                                    DIT_TARGETS, 4, 6.0, seed=3)
    ref_module = getattr(tiny, f"build_{kind}")(0).transformer
    inject_adapter_in_model(config, ref_module)
    set_peft_model_state_dict(ref_module, state)
    expected = run(ref_module)

    from safetensors.torch import save_file

    alphas = {f"transformer.{k.rsplit('.lora_', 1)[0]}.alpha": torch.tensor(6.0) for k in state}
    save_file({**{f"transformer.{k}": v.contiguous() for k, v in state.items()}, **alphas},
              str(tmp_path / "t.safetensors"))
    weights = layouts.load(tmp_path / "t.safetensors")
    module = getattr(tiny, f"build_{kind}")(0).transformer
    model = attach.on_model(ModelHandle.from_module(module), weights, 1.0, fuse, LOG)
    got = run(module, model.patches)
    diff = (got - expected).abs().max().item()
    print(f"{kind} fuse={fuse}: max|diff| vs peft {diff:.2e}")
    assert diff < ATOL
    assert (got - run(module)).abs().max() > 1e-3
