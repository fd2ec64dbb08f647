"""Every handle — denoiser, VAE, text encoders — carries an immutable tuple of patches; adding one
copies no weights, changes the fingerprint, and the patches apply only while the module is used."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from dagfusion.fingerprint import fingerprint  # noqa: E402
from dagfusion.model import (  # noqa: E402
    Handle,
    ModelHandle,
    ModelPatch,
    TextEncoderBundle,
    VAEHandle,
    applied_patch,
)


class Scale(ModelPatch):
    """Multiplies the module's first weight by ``factor`` while applied (restored on exit)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.key = f"test.scale:{factor}"
        self.entered = 0

    @contextlib.contextmanager
    def apply(self, module: Any):  # type: ignore[no-untyped-def]
        self.entered += 1
        weight = module.weight
        original = weight.detach().clone()
        with torch.no_grad():
            weight.mul_(self.factor)
        try:
            yield module
        finally:
            with torch.no_grad():
                weight.copy_(original)


class _Tokenizer:
    def get_vocab(self) -> dict[str, int]:
        return {"a": 0}


def _handles() -> list[Handle]:
    linear = torch.nn.Linear(2, 2)
    return [
        ModelHandle.from_module(linear),
        VAEHandle.from_module(torch.nn.Linear(2, 2)),
        TextEncoderBundle.from_modules("clip", [torch.nn.Linear(2, 2)], [_Tokenizer()]),
    ]


@pytest.mark.parametrize("handle", _handles(), ids=lambda h: type(h).__name__)
def test_with_patch_shares_weights_and_leaves_the_original_alone(handle: Handle) -> None:
    patch = Scale(2.0)
    patched = handle.with_patch(patch)
    assert type(patched) is type(handle)
    assert handle.patches == () and patched.patches == (patch,)
    refs = lambda h: (getattr(h, "ref", None), getattr(h, "encoders", None))  # noqa: E731
    assert refs(patched) == refs(handle)  # the same references: no weight was copied
    assert fingerprint(patched) != fingerprint(handle)
    assert fingerprint(handle.with_patch(Scale(2.0))) == fingerprint(patched)  # equal keys, equal handles
    assert fingerprint(handle.with_patch(Scale(3.0))) != fingerprint(patched)
    assert patched.without_patches().patches == () and fingerprint(patched.without_patches()) == fingerprint(handle)
    assert applied_patch(patched, Scale) is patch and applied_patch(handle, Scale) is None
    assert "Scale" in repr(patched)


@pytest.mark.parametrize("handle", _handles(), ids=lambda h: type(h).__name__)
def test_with_patch_refuses_non_patches(handle: Handle) -> None:
    with pytest.raises(TypeError, match="expected a model patch"):
        handle.with_patch(object())


@pytest.mark.parametrize("handle", _handles(), ids=lambda h: type(h).__name__)
def test_with_patches_sets_exactly_those_patches_in_order(handle: Handle) -> None:
    first, second = Scale(2.0), Scale(3.0)
    stacked = handle.with_patch(first).with_patch(second)
    replaced = stacked.with_patches([second, first])
    assert replaced.patches == (second, first) and stacked.patches == (first, second)
    assert fingerprint(handle.with_patches([first, second])) == fingerprint(stacked)
    assert fingerprint(stacked.with_patches([])) == fingerprint(handle)
    with pytest.raises(TypeError, match="expected a model patch"):
        handle.with_patches([first, object()])


def test_unpatched_vae_and_text_fingerprints_are_unchanged_by_the_patch_field() -> None:
    # Handles without patches fingerprint as before patches existed on them (disk caches stay valid).
    vae = VAEHandle.from_module(torch.nn.Linear(2, 2))
    assert "patches" not in repr(vae)
    assert fingerprint(vae) == fingerprint(VAEHandle(vae.ref, info=vae.info))


def test_patched_applies_in_order_and_restores_even_on_error() -> None:
    module = torch.nn.Linear(2, 2, bias=False)
    before = module.weight.detach().clone()
    vae = VAEHandle.from_module(module).with_patch(Scale(2.0)).with_patch(Scale(3.0))
    with vae.patched(vae.module) as inside:
        assert inside is module
        assert torch.allclose(module.weight, before * 6)
        assert applied_patch(module, Scale) is vae.patches[1]  # the innermost one
    assert torch.equal(module.weight, before)
    assert applied_patch(module, Scale) is None
    with pytest.raises(RuntimeError, match="boom"), vae.patched(module):
        raise RuntimeError("boom")
    assert torch.equal(module.weight, before)


def test_vae_decode_and_text_encoding_apply_their_patches() -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.diffusion.vae import decode
    from dagfusion.testing.models import sd_handles

    parts = sd_handles()
    latent = parts["latent"]
    vae, clip = parts["vae"], parts["clip"]

    class ZeroConvOut(ModelPatch):
        key = "test.zero-conv-out"

        def apply(self, module: Any) -> Any:
            from dagfusion.model import swap_parameters

            return swap_parameters(module, {"decoder.conv_out.weight": torch.zeros_like(module.decoder.conv_out.weight)})

    plain = decode(vae, latent)
    zeroed = decode(vae.with_patch(ZeroConvOut()), latent)
    assert not torch.equal(plain, zeroed)
    assert torch.equal(decode(vae, latent), plain)  # the shared VAE is unchanged

    scale = Scale(0.0)

    class ZeroFinalNorm(ModelPatch):
        key = "test.zero-final-norm"

        def apply(self, module: Any) -> Any:
            (norm,) = [m for name, m in module.named_modules() if name.endswith("final_layer_norm")]
            return scale.apply(norm)

    base = encode_prompt(clip, "a red fox").positive["encoder_hidden_states"]
    patched = encode_prompt(clip.with_patch(ZeroFinalNorm()), "a red fox").positive["encoder_hidden_states"]
    assert scale.entered == 1  # once around the (one) encoder for the whole encoding
    assert not torch.equal(base, patched)
    assert torch.equal(encode_prompt(clip, "a red fox").positive["encoder_hidden_states"], base)


def test_export_refuses_patched_vae_or_text_encoders(tmp_path: Any) -> None:
    pytest.importorskip("diffusers")
    from dagfusion.nodes.training.export import export
    from dagfusion.testing.models import sd_handles

    parts = sd_handles()
    with pytest.raises(ValueError, match="the VAE carries patches \\(Scale\\)"):
        export(parts["model"], parts["clip"], parts["vae"].with_patch(Scale(1.0)), None, tmp_path / "out")
    with pytest.raises(ValueError, match="the text encoder carries patches"):
        export(parts["model"], parts["clip"].with_patch(Scale(1.0)), parts["vae"], None, tmp_path / "out")
