"""Stable Video Diffusion from one Stability-layout file: names, round trip, sampling, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dagfusion import UnsafeOperationError
from dagfusion.model import ModelCache
from dagfusion.nodes.diffusion.loading import load_diffusers_folder
from dagfusion.nodes.diffusion.sampling import run_sampling
from dagfusion.nodes.video.single_file import (
    CONFIGS,
    frames_from_name,
    load_svd_single_file,
    write_tiny,
)
from dagfusion.nodes.video.svd import decode_video, svd_conditioning

SIZE, FRAMES = 32, 3
CLIP = "conditioner.embedders.0.open_clip.model.visual."

# Names Stability's generative-models code gives the tiny model's weights (two levels, one res-block each;
# cross-attention on the first level), written out by hand from its VideoUNet / VideoDecoder / OpenCLIP modules.
ORIGINAL_NAMES = [
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.label_emb.0.2.bias",
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "model.diffusion_model.input_blocks.1.0.time_stack.in_layers.2.weight",
    "model.diffusion_model.input_blocks.1.0.time_stack.emb_layers.1.weight",
    "model.diffusion_model.input_blocks.1.0.time_mixer.mix_factor",
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.1.1.time_stack.0.ff_in.net.0.proj.weight",
    "model.diffusion_model.input_blocks.1.1.time_stack.0.norm_in.weight",
    "model.diffusion_model.input_blocks.1.1.time_pos_embed.2.weight",
    "model.diffusion_model.input_blocks.1.1.time_mixer.mix_factor",
    "model.diffusion_model.input_blocks.2.0.op.weight",
    "model.diffusion_model.input_blocks.3.0.skip_connection.weight",
    "model.diffusion_model.middle_block.0.time_stack.out_layers.3.weight",
    "model.diffusion_model.middle_block.1.time_stack.0.attn1.to_q.weight",
    "model.diffusion_model.middle_block.2.out_layers.0.weight",
    "model.diffusion_model.output_blocks.1.1.conv.weight",
    "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.ff.net.2.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.0.block.0.conv1.weight",
    "first_stage_model.encoder.down.0.downsample.conv.weight",
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.encoder.norm_out.weight",
    "first_stage_model.decoder.mid.block_1.time_stack.in_layers.2.weight",
    "first_stage_model.decoder.mid.block_1.mix_factor",
    "first_stage_model.decoder.mid.attn_1.proj_out.weight",
    "first_stage_model.decoder.up.1.block.0.time_stack.out_layers.3.weight",
    "first_stage_model.decoder.up.1.upsample.conv.weight",
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
    "first_stage_model.decoder.conv_out.weight",
    "first_stage_model.decoder.conv_out.time_mix_conv.weight",
    CLIP + "class_embedding",
    CLIP + "conv1.weight",
    CLIP + "positional_embedding",
    CLIP + "ln_pre.weight",
    CLIP + "transformer.resblocks.1.attn.in_proj_weight",
    CLIP + "transformer.resblocks.1.attn.in_proj_bias",
    CLIP + "transformer.resblocks.1.attn.out_proj.weight",
    CLIP + "transformer.resblocks.0.mlp.c_fc.weight",
    CLIP + "transformer.resblocks.0.ln_2.bias",
    CLIP + "ln_post.weight",
    CLIP + "proj",
]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny(tmp_path_factory.mktemp("svd-single"))


@pytest.fixture(scope="module")
def folder_loaded(tiny_files: dict[str, Path]) -> Any:
    return load_diffusers_folder(tiny_files["folder"], cache=ModelCache())


@pytest.fixture(scope="module")
def file_loaded(tiny_files: dict[str, Path]) -> dict[str, Any]:
    return load_svd_single_file(tiny_files["checkpoint"], config=tiny_files["config"], num_frames=14,
                                cache=ModelCache(), read_roots=[tiny_files["checkpoint"].parent])


def _keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return set(fh.keys())


def test_the_written_file_has_stabilitys_names(tiny_files: dict[str, Path]) -> None:
    keys = _keys(tiny_files["checkpoint"])
    missing = [n for n in ORIGINAL_NAMES if n not in keys]
    assert not missing, missing
    assert not any("quant_conv" in k for k in keys)  # the original VAE has none
    assert not any(k.startswith(("unet.", "vae.", "down_blocks.", "vision_model.")) for k in keys)


def test_every_tensor_equals_the_folder_models(folder_loaded: Any, file_loaded: dict[str, Any]) -> None:
    pairs = [(folder_loaded.model.denoiser, file_loaded["model"].denoiser),
             (folder_loaded.vae.module, file_loaded["vae"].module),
             (folder_loaded.image_encoder.module, file_loaded["clip_vision"].module)]
    for original, loaded in pairs:
        assert type(original) is type(loaded)
        expected, got = original.state_dict(), loaded.state_dict()
        assert set(expected) == set(got), type(original).__name__
        for name, tensor in expected.items():
            assert got[name].device.type == "cpu" and got[name].dtype == tensor.dtype, name
            assert torch.equal(got[name], tensor), name
    assert file_loaded["model"].denoiser.config.num_frames == 14
    assert file_loaded["scheduler"].class_name == folder_loaded.scheduler.class_name
    assert file_loaded["scheduler"].config == folder_loaded.scheduler.config


def _frames(parts: dict[str, Any]) -> torch.Tensor:
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    cond, latent = svd_conditioning(parts["clip_vision"], parts["vae"], image, width=SIZE, height=SIZE,
                                    frames=FRAMES, fps=7, motion_bucket_id=127, noise_aug_strength=0.02, seed=1)
    out, _ = run_sampling(parts["model"], cond, latent, steps=2, guidance_scale=2.0, min_guidance_scale=1.0, seed=2,
                          count_macs=False)
    return decode_video(parts["vae"], out.samples, 2)


def test_samples_like_the_folder_for_a_seed(folder_loaded: Any, file_loaded: dict[str, Any]) -> None:
    from_folder = _frames({"model": folder_loaded.model, "clip_vision": folder_loaded.image_encoder,
                           "vae": folder_loaded.vae})
    from_file = _frames(file_loaded)
    assert torch.allclose(from_file, from_folder, atol=1e-5), float((from_file - from_folder).abs().max())


def test_an_image_encoder_folder_supplies_a_missing_encoder(tiny_files: dict[str, Path], tmp_path: Path,
                                                             folder_loaded: Any) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_files["checkpoint"]))
    stripped = tmp_path / "svd_xt_unet_vae.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("conditioner.")}, str(stripped))
    with pytest.raises(ValueError, match="image_encoder_folder"):
        load_svd_single_file(stripped, config=tiny_files["config"], cache=ModelCache())
    loaded = load_svd_single_file(stripped, config=tiny_files["config"], image_encoder_folder=tiny_files["folder"],
                                  cache=ModelCache())
    assert loaded["model"].denoiser.config.num_frames == 25  # "xt" in the name
    for name, tensor in folder_loaded.image_encoder.module.state_dict().items():
        assert torch.equal(loaded["clip_vision"].module.state_dict()[name], tensor), name


def test_a_non_svd_file_is_refused_naming_the_missing_part(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match=r"no model\.diffusion_model\.\* keys.*not a Stable Video Diffusion"):
        load_svd_single_file(other, cache=ModelCache())
    state = load_file(str(tiny_files["checkpoint"]))
    no_vae = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("first_stage_model.")}, str(no_vae))
    with pytest.raises(ValueError, match=r"no first_stage_model\.\* keys"):
        load_svd_single_file(no_vae, cache=ModelCache())
    image_decoder = tmp_path / "svd_image_decoder.safetensors"
    save_file({k: v for k, v in state.items() if "mix_factor" not in k or not k.startswith("first_stage_model.")},
              str(image_decoder))
    with pytest.raises(ValueError, match="image_decoder"):
        load_svd_single_file(image_decoder, cache=ModelCache())


def test_a_file_of_another_architecture_names_the_mismatch(tiny_files: dict[str, Path]) -> None:
    # the tiny file against the shipped (full-size) configs
    with pytest.raises(ValueError, match="incomplete or another architecture.*config folder"):
        load_svd_single_file(tiny_files["checkpoint"], cache=ModelCache())


def test_pickle_is_refused_without_the_setting(tmp_path: Path) -> None:
    ckpt = tmp_path / "svd.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(UnsafeOperationError, match="allow_pickle"):
        load_svd_single_file(ckpt, cache=ModelCache())


def test_a_pickle_checkpoint_loads_with_the_setting(tiny_files: dict[str, Path], tmp_path: Path,
                                                     folder_loaded: Any) -> None:
    from safetensors.torch import load_file

    ckpt = tmp_path / "svd.ckpt"
    torch.save({"state_dict": load_file(str(tiny_files["checkpoint"]))}, str(ckpt))
    loaded = load_svd_single_file(ckpt, config=tiny_files["config"], allow_pickle=True, cache=ModelCache())
    for name, tensor in folder_loaded.model.denoiser.state_dict().items():
        assert torch.equal(loaded["model"].denoiser.state_dict()[name], tensor), name


def test_a_file_outside_the_read_folders_is_refused(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UnsafeOperationError):
        load_svd_single_file(tiny_files["checkpoint"], config=tiny_files["config"], cache=ModelCache(),
                             read_roots=[tmp_path])


def test_frames_from_the_file_name_and_shipped_configs() -> None:
    assert frames_from_name(Path("svd_xt.safetensors")) == 25
    assert frames_from_name(Path("svd_xt_1_1.safetensors")) == 25
    assert frames_from_name(Path("svd.safetensors")) == 14
    assert frames_from_name(Path("next_frames.safetensors")) == 14
    for part in ("unet", "vae", "image_encoder"):
        assert (CONFIGS / part / "config.json").is_file()
    assert (CONFIGS / "feature_extractor" / "preprocessor_config.json").is_file()
