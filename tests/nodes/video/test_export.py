"""Saving SVD-layout models as diffusers folders; one-step generators keep their mark."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from dagfusion import NodeInputError
from dagfusion.nodes.video.export import (
    MARKER,
    apply_marker,
    embedded_folder,
    read_marker,
    save_svd,
)
from dagfusion.nodes.video.sfv import OneStepPatch, one_step_patch
from dagfusion.nodes.video.svd import _tiny_cached

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return _tiny_cached()


def _one_step(model: Any, sigma: float = 700.0) -> Any:
    from dagfusion.nodes.video.sfv import one_step_scheduler

    return model.with_scheduler(one_step_scheduler(sigma)).with_patch(OneStepPatch(sigma))


def test_the_folder_loads_in_diffusers_with_equal_weights(parts: dict[str, Any], tmp_path: Path) -> None:
    from diffusers import StableVideoDiffusionPipeline

    folder = save_svd(parts["model"], parts["clip_vision"], parts["vae"], tmp_path / "svd")
    assert not (folder / MARKER).exists()
    assert all(p.suffix in {".json", ".safetensors", ".txt"} for p in folder.rglob("*") if p.is_file())
    pipe = StableVideoDiffusionPipeline.from_pretrained(str(folder))
    for name, module in (("unet", parts["model"].denoiser), ("vae", parts["vae"].module),
                         ("image_encoder", parts["clip_vision"].module)):
        saved = getattr(pipe, name).state_dict()
        assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items()), name


def test_a_one_step_generator_loads_marked(parts: dict[str, Any], tmp_path: Path) -> None:
    folder = save_svd(_one_step(parts["model"], 500.0), parts["clip_vision"], parts["vae"], tmp_path / "one", dtype="fp16")
    document = read_marker(folder)
    assert document["one_step"] == {"method": "sf-v", "sigma": 500.0}
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder

    loaded = load_diffusers_folder(folder, dtype="fp32", device="cpu", source="test")
    assert one_step_patch(loaded.model) is None
    marked = apply_marker(loaded.model, document)
    assert one_step_patch(marked).sigma == 500.0
    assert marked.scheduler.config["sigma_max"] == 500.0
    assert next(loaded.model.denoiser.parameters()).dtype == torch.float32


def test_loaded_video_models_take_the_fast_cpu_path_for_time_only_convs(parts: dict[str, Any], tmp_path: Path) -> None:
    from dagfusion.model import is_time_only_conv
    from dagfusion.model.kernels import time_only_conv_class
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder

    folder = save_svd(parts["model"], parts["clip_vision"], parts["vae"], tmp_path / "svd")
    loaded = load_diffusers_folder(folder, dtype="fp32", device="cpu", source="test")
    for module in (loaded.model.denoiser, loaded.vae.module):
        layers = list(module.modules())
        assert any(isinstance(layer, time_only_conv_class()) for layer in layers)
        assert not any(is_time_only_conv(layer) for layer in layers)  # none left on the slow path


def test_other_patches_are_refused(parts: dict[str, Any], tmp_path: Path) -> None:
    from dagfusion.model import ModelPatch

    class Other(ModelPatch):
        key = "other"

    with pytest.raises(ValueError, match="Other"):
        save_svd(_one_step(parts["model"]).with_patch(Other()), parts["clip_vision"], parts["vae"], tmp_path / "x")


def test_a_foreign_marker_is_an_error(tmp_path: Path) -> None:
    (tmp_path / MARKER).write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="dagfusion.svd"):
        read_marker(tmp_path)
    assert read_marker(tmp_path / "missing") == {}


def test_unknown_or_missing_embedded_models_are_named() -> None:
    with pytest.raises(ValueError, match="shapes-video"):
        embedded_folder("svd-xt")


def test_a_folder_without_an_image_encoder_is_named_as_the_nodes_input(tmp_path: Path) -> None:
    from dagfusion.nodes.video.export import SVDFolderError, load_svd_folder, read_svd_folder
    from dagfusion.testing import models as tiny

    folder = tiny.write_model("sd", tmp_path / "sd")
    with pytest.raises(SVDFolderError, match="no image_encoder"):
        read_svd_folder(folder, source="test")
    from dagfusion.model import default_cache

    ctx = SimpleNamespace(settings=SimpleNamespace(allow_pickle=False, model_cache_bytes=default_cache().budget_bytes), device="cpu")
    with pytest.raises(NodeInputError) as err:
        load_svd_folder(ctx, folder, "cpu", "fp32", input="model", source="test")
    assert err.value.input == "model"
