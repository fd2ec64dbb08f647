"""Baking weight patches: a merged or fused-LoRA model becomes an unpatched private copy that samples
the same and exports; hooks, replaced layers and step hooks are refused; shared weights untouched."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from dagfusion import NodeInputError
from dagfusion.nodes.diffusion.sampling import sample
from dagfusion.nodes.everyday.bake import bake, bake_node
from dagfusion.nodes.everyday.merge import merged


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return tiny.sd_handles()


def _other(model: Any) -> Any:
    other = model.with_denoiser(copy.deepcopy(model.denoiser))
    g = torch.Generator().manual_seed(3)
    for p in other.denoiser.parameters():
        p.data.add_(torch.randn(p.shape, generator=g) * 0.05)
    return other


def _run(model: Any, parts: dict[str, Any]) -> torch.Tensor:
    return sample(model, parts["conditioning"], parts["latent"], steps=3, guidance_scale=3.0, seed=1).samples


def test_a_baked_merge_samples_like_the_patched_model(parts: dict[str, Any]) -> None:
    model = parts["model"]
    shared = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    patched = merged(model, _other(model), 0.3)
    baked = bake(patched)
    assert baked.patches == () and baked.denoiser is not model.denoiser
    assert torch.allclose(_run(baked, parts), _run(patched, parts), atol=1e-6)
    assert not torch.allclose(_run(baked, parts), _run(model, parts), atol=1e-4)
    assert all(torch.equal(v, shared[k]) for k, v in model.denoiser.state_dict().items())  # never written
    assert baked.__dagfusion_fingerprint__() != model.__dagfusion_fingerprint__()


def test_a_fused_lora_bakes_and_a_side_branch_is_refused(parts: dict[str, Any]) -> None:
    from dagfusion.nodes.lora import attach
    from dagfusion.nodes.lora.nodes import _tiny_lora

    lora = _tiny_lora()
    fused = attach.on_model(parts["model"], lora, 1.0, True, None)
    assert torch.allclose(_run(bake(fused), parts), _run(fused, parts), atol=1e-6)
    branch = attach.on_model(parts["model"], lora, 1.0, False, None)
    with pytest.raises(ValueError, match="more than the weights"):
        bake(branch)


def test_step_hooks_are_refused_by_the_node(parts: dict[str, Any]) -> None:
    from dagfusion.nodes.cache.deepcache import DeepCacheConfig, DeepCachePatch

    cached = parts["model"].with_patch(DeepCachePatch(DeepCacheConfig(interval=2)))
    with pytest.raises(NodeInputError, match="DeepCachePatch") as info:
        bake_node.fn(None, cached)
    assert info.value.input == "model"
    assert bake_node.fn(None, parts["model"])["model"] is parts["model"]  # nothing to bake


def test_a_baked_merge_exports_as_a_diffusers_folder(parts: dict[str, Any], tmp_path: Path) -> None:
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.training.export import export

    patched = merged(parts["model"], _other(parts["model"]), 0.5)
    with pytest.raises(ValueError, match="patches"):
        export(patched, parts["clip"], parts["vae"], None, tmp_path / "refused")
    folder = export(bake(patched), parts["clip"], parts["vae"], None, tmp_path / "merged")
    loaded = load_diffusers_folder(folder, read_roots=[tmp_path])
    reloaded = {k: v for k, v in loaded.model.denoiser.state_dict().items()}
    expected = bake(patched).denoiser.state_dict()
    assert all(torch.equal(reloaded[k], expected[k]) for k in expected)
