"""Resize, crop, pad and composite images; latent upscale; the size limit."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from dagfusion import NodeInputError
from dagfusion.nodes.diffusion.data import Latent
from dagfusion.nodes.everyday import resize
from dagfusion.nodes.everyday.upscale import upscale_node, upscale_size


def images(batch: int = 2, size: tuple[int, int] = (8, 12)) -> Any:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0))


def ctx(limit: int) -> Any:
    return SimpleNamespace(settings=SimpleNamespace(max_image_pixels=limit))


@pytest.mark.parametrize("method", resize.METHODS)
def test_resize_sizes_keep_aspect_and_stay_in_range(method: str) -> None:
    source = images()
    out = resize.resize_node.fn(None, images=source, width=24, height=0, scale=1.0, method=method)
    assert out.shape == (2, 3, 16, 24) and 0 <= float(out.min()) and float(out.max()) <= 1
    half = resize.resize_node.fn(None, images=source, width=0, height=0, scale=0.5, method=method)
    assert half.shape == (2, 3, 4, 6)
    flat = torch.full((1, 3, 8, 8), 0.25)
    assert torch.allclose(resize.resize_images(flat, 5, 13, method), torch.full((1, 3, 13, 5), 0.25), atol=1e-5)
    assert torch.equal(resize.resize_images(source, 12, 8, method), source)


def test_nearest_doubling_repeats_pixels_and_lanczos_matches_pil() -> None:
    from PIL import Image

    source = images(1)
    doubled = resize.resize_images(source, 24, 16, "nearest")
    assert torch.equal(doubled, source.repeat_interleave(2, -1).repeat_interleave(2, -2))
    plane = Image.fromarray(source[0, 1].numpy(), mode="F").resize((7, 5), Image.Resampling.LANCZOS)
    import numpy as np

    assert np.allclose(resize.resize_images(source, 7, 5, "lanczos")[0, 1].numpy(), np.clip(np.asarray(plane), 0, 1))


def test_size_limit_is_checked_before_allocating() -> None:
    with pytest.raises(NodeInputError, match="at most 100 pixels.*20×10") as info:
        resize.resize_node.fn(ctx(100), images=images(), width=20, height=10, scale=1.0, method="bilinear")
    assert info.value.input == "width"
    with pytest.raises(NodeInputError, match="max_image_pixels"):
        resize.pad_node.fn(ctx(100), images=images(), left=1, top=0, right=0, bottom=0, mode="constant", value=0.0)
    big = Latent(torch.zeros(1, 4, 8, 8))
    with pytest.raises(NodeInputError, match="max_image_pixels") as info:
        upscale_node.fn(ctx(64 * 64), latent=big, method="bilinear", scale_by=2.0, width=0, height=0)
    assert info.value.input == "scale_by"


def test_crop_cuts_the_region_and_refuses_one_past_the_edge() -> None:
    source = images()
    out = resize.crop_node.fn(None, images=source, x=2, y=1, width=5, height=4)
    assert torch.equal(out, source[..., 1:5, 2:7])
    with pytest.raises(NodeInputError, match=r"inside the 12×8 image, got 5×4 at \(8, 1\)") as info:
        resize.crop_node.fn(None, images=source, x=8, y=1, width=5, height=4)
    assert info.value.input == "width"


@pytest.mark.parametrize("mode", resize.PAD_MODES)
def test_pad_adds_a_border_and_a_mask_of_it(mode: str) -> None:
    source = images()
    out, mask = resize.pad_node.fn(None, images=source, left=3, top=1, right=2, bottom=4, mode=mode, value=1.0)
    assert out.shape == (2, 3, 13, 17) and mask.shape == (2, 1, 13, 17)
    assert torch.equal(out[..., 1:9, 3:15], source)
    assert float(mask.sum()) == 2 * (13 * 17 - 8 * 12) and float(mask[..., 1:9, 3:15].sum()) == 0
    if mode == "constant":
        assert float(out[..., 0, :].min()) == 1.0
    if mode == "edge":
        assert torch.equal(out[..., 1:9, 0], source[..., :, 0])
    with pytest.raises(NodeInputError, match="reflect"):
        resize.pad_images(source, 12, 0, 0, 0, "reflect", 0.0)


def test_composite_pastes_clips_and_blends_through_the_mask() -> None:
    a, b = torch.zeros(2, 3, 8, 8), torch.ones(1, 3, 4, 4)
    out = resize.composite_node.fn(None, destination=a, source=b, x=6, y=-1)
    assert out.shape == (2, 3, 8, 8) and float(out.sum()) == 2 * 3 * 2 * 3
    assert torch.equal(out[..., 0:3, 6:8], torch.ones(2, 3, 3, 2))
    mask = torch.zeros(4, 4)
    mask[:, :2] = 0.5
    blended = resize.composite(a, b, 0, 0, mask)
    assert torch.equal(blended[..., :4, :2], torch.full((2, 3, 4, 2), 0.5)) and float(blended[..., :, 2:].sum()) == 0
    assert torch.equal(resize.composite(a, b, 20, 20), a) and float(a.sum()) == 0  # input unchanged
    with pytest.raises(NodeInputError, match="mask"):
        resize.composite(a, b, 0, 0, torch.zeros(3, 3))
    with pytest.raises(NodeInputError, match=r"channels.*\(1, 1, 4, 4\)"):
        resize.composite(a, torch.ones(1, 1, 4, 4), 0, 0)


def test_latent_upscale_aligns_pixel_sizes_to_eight() -> None:
    assert upscale_size(16, 16, 2, 1.5) == (24, 24)  # 32 px → 48 px → 24 cells at factor 2
    assert upscale_size(8, 8, 8, 1.3) == (10, 10)  # 64 px × 1.3 = 83.2 → 80 px
    assert upscale_size(16, 8, 2, 1.0, width=40) == (40, 20)  # 40 px wide keeps 2:1 → 80 px high
    assert upscale_size(8, 8, 8, 1.0, width=100, height=30) == (4, 12)


@pytest.mark.parametrize("method", ["nearest", "bilinear", "bicubic"])
def test_latent_upscale_interpolates_images_and_videos(method: str) -> None:
    latent = Latent(torch.randn(2, 4, 8, 8), {"seed": 1})
    out = upscale_node.fn(None, latent=latent, method=method, scale_by=2.0, width=0, height=0)
    assert out.samples.shape == (2, 4, 16, 16) and out.lineage["seed"] == 1
    assert out.lineage["upscaled"] == {"method": method, "from": [8, 8], "to": [16, 16]}
    if method == "nearest":
        assert torch.equal(out.samples, latent.samples.repeat_interleave(2, -1).repeat_interleave(2, -2))
    video = Latent(torch.randn(1, 3, 4, 8, 8))
    assert upscale_node.fn(None, latent=video, method=method, scale_by=1.0, width=128, height=0).samples.shape == (1, 3, 4, 16, 16)
    with pytest.raises(NodeInputError, match="LATENT"):
        upscale_node.fn(None, latent=torch.zeros(4), method=method, scale_by=2.0, width=0, height=0)


def test_latent_upscale_uses_the_models_vae_factor() -> None:
    from dagfusion.testing import models as tiny

    model = tiny.sd_handles()["model"]
    out = upscale_node.fn(None, latent=Latent(torch.zeros(1, 4, 16, 16)), model=model, method="bilinear",
                          scale_by=1.5, width=0, height=0)
    assert out.samples.shape == (1, 4, 24, 24)
