"""The packed safetensors format: bit-exact round trips, sizes that follow the bits, clear errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dagfusion.testing import models as tiny
from dagfusion.nodes.quant import storage
from dagfusion.nodes.quant.formats import QuantSpec
from dagfusion.nodes.quant.patch import quantize_module


@pytest.fixture(scope="module")
def unet() -> Any:
    return tiny.sd_handles()["model"].denoiser


@pytest.fixture(scope="module")
def inputs() -> tuple[Any, Any, Any]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor([300]), torch.randn(1, 5, 32, generator=g)


def _forward(unet: Any, inputs: Any) -> Any:
    x, t, context = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=context).sample


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as fh:
        size = struct.unpack("<Q", fh.read(8))[0]
        return size, json.loads(fh.read(size))


@pytest.mark.parametrize("name", ["int8", "int4", "fp8_e4m3", "int3"])
def test_save_load_gives_the_same_outputs_bit_for_bit(unet: Any, inputs: Any, tmp_path: Path, name: str) -> None:
    spec = QuantSpec.parse(name, group_size=32 if name == "int3" else None)
    patch = quantize_module(unet, spec, min_params=0 if name == "int3" else 1024)
    with patch.apply(unet):
        expected = _forward(unet, inputs)
    path = storage.save(patch, tmp_path / f"{name}.safetensors")
    loaded = storage.load(path, unet)
    assert loaded.key == patch.key  # same settings, same content
    assert loaded.errors == patch.errors and loaded.kept_layers == patch.kept_layers
    with loaded.apply(unet):
        assert torch.equal(_forward(unet, inputs), expected)
    for layer, qt in patch.layers.items():
        other = loaded.layers[layer]
        assert other.spec == qt.spec and other.shape == qt.shape and other.dtype == qt.dtype
        assert torch.equal(other.codes, qt.codes) and torch.equal(other.scales, qt.scales)


def test_loading_needs_only_the_architecture(unet: Any, inputs: Any, tmp_path: Path) -> None:
    """Every parameter comes from the file: a model with other weights gives the same outputs."""
    patch = quantize_module(unet, "int4")
    with patch.apply(unet):
        expected = _forward(unet, inputs)
    path = storage.save(patch, tmp_path / "q.safetensors")
    other = type(unet).from_config(unet.config).eval()  # same architecture, fresh random weights
    torch.nn.init.normal_(other.conv_in.weight)
    with storage.load(path, other).apply(other):
        assert torch.equal(_forward(other, inputs), expected)


def test_file_size_follows_the_bits(unet: Any, tmp_path: Path) -> None:
    params = sum(p.numel() for p in unet.parameters())
    sizes = {}
    for name in ("int8", "int4"):
        patch = quantize_module(unet, name)
        path = storage.save(patch, tmp_path / f"{name}.safetensors")
        header, tensors = _header(path)
        data = path.stat().st_size - 8 - header
        assert data == patch.nbytes  # exactly the codes, scales, zero-points and 16-bit tensors
        meta = tensors["__metadata__"]
        assert meta["architecture"] == "UNet2DConditionModel" and meta["format_version"] == "1"
        codes = tensors["quant.down_blocks.1.resnets.0.conv2.codes"]
        assert codes["dtype"] == "U8"
        width = 64 * 64 * 9 * (8 if name == "int8" else 4) // 8
        assert codes["data_offsets"][1] - codes["data_offsets"][0] == width
        assert tensors["kept.conv_in.weight"]["dtype"] == "F16"
        sizes[name] = data
    fp16 = params * 2
    assert sizes["int8"] < 0.6 * fp16
    assert sizes["int4"] < 0.35 * fp16
    quantized = sum(qt.numel for qt in quantize_module(unet, "int4").layers.values())
    # The int4 file is ~ a quarter of the fp16 size of the quantized weights (plus scales) + the kept ones.
    assert sizes["int4"] == pytest.approx(quantized * (4 + 16 / 64 + 4 / 64) / 8 + (params - quantized) * 2, rel=0.02)


def test_loading_onto_another_architecture_fails_clearly(unet: Any, tmp_path: Path) -> None:
    path = storage.save(quantize_module(unet, "int8"), tmp_path / "unet.safetensors")
    pixart = tiny._cached_pipeline("pixart", 0).transformer
    with pytest.raises(ValueError, match="holds a quantized UNet2DConditionModel.*is a PixArtTransformer2DModel"):
        storage.load(path, pixart)
    wider = type(unet).from_config({**unet.config, "block_out_channels": (32, 32)})
    with pytest.raises(ValueError, match="different configuration.*block_out_channels"):
        storage.load(path, wider)


def test_other_files_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a dagfusion quantized-weights file"):
        storage.load(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        storage.load(junk)
