"""dagfusion.models.Merge: weighted sum and add-difference merges as a weight-swapping patch."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dagfusion import NodeInputError
from dagfusion.fingerprint import fingerprint
from dagfusion.model import ModelHandle, apply_patches
from dagfusion.nodes.everyday.merge import MergePatch, merge_node, merged
from dagfusion.testing import models as tiny


def handle(seed: int) -> ModelHandle:
    return ModelHandle.from_module(tiny._cached_pipeline("sd", seed).unet, vae_scale_factor=2)


@pytest.fixture(scope="module")
def models() -> dict[str, ModelHandle]:
    return {"a": handle(0), "b": handle(1), "c": handle(2)}


def run(model: ModelHandle) -> Any:
    """The denoiser's output on a fixed input, with the handle's patches applied."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 5, 32, generator=generator)
    module = model.denoiser
    with torch.no_grad(), apply_patches(model.patches, module):
        return module(x, torch.tensor([500]), encoder_hidden_states=context).sample


def snapshot(model: ModelHandle) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.denoiser.state_dict().items()}


def test_weighted_sum_ends_are_the_models_exactly(models: dict[str, ModelHandle]) -> None:
    a, b = models["a"], models["b"]
    assert not torch.equal(run(a), run(b))
    assert torch.equal(run(merge_node.fn(None, model=a, b=b, mode="weighted_sum", alpha=0.0)), run(a))
    assert torch.equal(run(merge_node.fn(None, model=a, b=b, mode="weighted_sum", alpha=1.0)), run(b))


def test_half_merge_matches_a_manual_merge_and_leaves_the_inputs_untouched(models: dict[str, ModelHandle]) -> None:
    a, b = models["a"], models["b"]
    before_a, before_b = snapshot(a), snapshot(b)
    params_a = dict(a.denoiser.named_parameters())
    out = run(merge_node.fn(None, model=a, b=b, mode="weighted_sum", alpha=0.5))

    manual = tiny.build_sd(0).unet
    state_b = b.denoiser.state_dict()
    with torch.no_grad():
        for name, param in manual.named_parameters():
            param.copy_(0.5 * before_a[name] + 0.5 * state_b[name])
    expected = run(ModelHandle.from_module(manual, vae_scale_factor=2))
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(out, run(a), atol=1e-4)

    for name, value in snapshot(a).items():
        assert torch.equal(value, before_a[name]), name
    for name, value in snapshot(b).items():
        assert torch.equal(value, before_b[name]), name
    assert all(p is params_a[n] for n, p in a.denoiser.named_parameters())  # the same Parameter objects are back


def test_add_difference_with_c_equal_to_a_is_b(models: dict[str, ModelHandle]) -> None:
    a, b, c = models["a"], models["b"], models["c"]
    same = merge_node.fn(None, model=a, b=b, c=a, mode="add_difference", alpha=1.0)
    assert torch.allclose(run(same), run(b), atol=1e-6, rtol=0)
    assert torch.equal(run(merge_node.fn(None, model=a, b=b, c=c, mode="add_difference", alpha=0.0)), run(a))
    out = run(merge_node.fn(None, model=a, b=b, c=c, mode="add_difference", alpha=0.5))
    assert not torch.allclose(out, run(a), atol=1e-4) and not torch.allclose(out, run(b), atol=1e-4)


def test_merged_weights_are_cached_and_refreshed_when_a_changes(models: dict[str, ModelHandle]) -> None:
    module = tiny.build_sd(0).unet
    a = ModelHandle.from_module(module, vae_scale_factor=2)
    model = merged(a, models["b"], 0.5)
    patch = model.patches[-1]
    first = run(model)
    cached = dict(patch._merged)
    assert torch.equal(run(model), first)
    assert all(patch._merged[n][4] is cached[n][4] for n in cached)  # reused, not recomputed
    with torch.no_grad():
        module.conv_in.bias.add_(1.0)
    assert not torch.equal(run(model), first)
    assert patch._merged["conv_in.bias"][4] is not cached["conv_in.bias"][4]


def test_mismatched_layouts_are_refused_naming_the_input(models: dict[str, ModelHandle]) -> None:
    other = ModelHandle.from_module(tiny._cached_pipeline("sdxl", 0).unet, vae_scale_factor=2)
    with pytest.raises(NodeInputError, match=r"84 extra key\(s\).*16 shape difference\(s\): 'down_blocks") as info:
        merge_node.fn(None, model=models["a"], b=other, mode="weighted_sum", alpha=0.5)
    assert info.value.input == "b"
    with pytest.raises(NodeInputError, match=r"84 missing key\(s\): 'add_embedding.*\(\+81 more\)") as info:
        merge_node.fn(None, model=other, b=models["a"], mode="weighted_sum", alpha=0.5)
    assert info.value.input == "b"
    with pytest.raises(NodeInputError) as info:
        merge_node.fn(None, model=models["a"], b=models["b"], c=other, mode="add_difference", alpha=0.5)
    assert info.value.input == "c"
    with pytest.raises(NodeInputError, match="add_difference") as info:
        merge_node.fn(None, model=models["a"], b=models["b"], mode="add_difference", alpha=0.5)
    assert info.value.input == "c"
    patched = merged(models["b"], models["c"], 0.5)
    with pytest.raises(NodeInputError, match="patches") as info:
        merge_node.fn(None, model=models["a"], b=patched, mode="weighted_sum", alpha=0.5)
    assert info.value.input == "b"


def test_fingerprints_tell_settings_apart(models: dict[str, ModelHandle]) -> None:
    a, b, c = models["a"], models["b"], models["c"]
    prints = {
        fingerprint(merged(a, b, 0.3)),
        fingerprint(merged(a, b, 0.4)),
        fingerprint(merged(a, c, 0.3)),
        fingerprint(merged(a, b, 0.3, "add_difference", c)),
        fingerprint(merged(a, b, 0.3, "add_difference", a)),
    }
    assert len(prints) == 5
    assert fingerprint(merged(a, b, 0.3)) == fingerprint(merged(a, b, 0.3))
    assert isinstance(merged(a, b, 0.3).patches[-1], MergePatch)
