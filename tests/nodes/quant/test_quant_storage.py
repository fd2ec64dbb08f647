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
        index = tensors["index"]
        index_bytes = index["data_offsets"][1] - index["data_offsets"][0]
        errors = tensors["quant.errors"]
        # exactly the codes, scales, zero-points and 16-bit tensors, plus the index and the layers' errors
        assert data == patch.nbytes + index_bytes + 8 * len(patch.layers)
        assert index["dtype"] == "I32" and index["shape"][0] == len(patch.layers) + len(patch.kept)
        assert errors["dtype"] == "F64"
        meta = tensors["__metadata__"]
        assert meta["architecture"] == "UNet2DConditionModel" and meta["format_version"] == "2"
        codes = tensors["quant.codes"]
        assert codes["dtype"] == "U8"
        assert codes["data_offsets"][1] - codes["data_offsets"][0] == sum(qt.codes.numel() for qt in patch.layers.values())
        assert tensors["kept.float16"]["dtype"] == "F16"
        assert len(tensors) <= 8  # a few flat tensors, not one per layer
        assert path.stat().st_size == storage.file_nbytes(patch)
        sizes[name] = patch.nbytes  # the weights' bytes
    fp16 = params * 2
    assert sizes["int8"] < 0.6 * fp16
    assert sizes["int4"] < 0.35 * fp16
    quantized = sum(qt.numel for qt in quantize_module(unet, "int4").layers.values())
    # The int4 file is ~ a quarter of the fp16 size of the quantized weights (plus scales) + the kept ones.
    assert sizes["int4"] == pytest.approx(quantized * (4 + 16 / 64 + 4 / 64) / 8 + (params - quantized) * 2, rel=0.02)


@pytest.mark.parametrize("name", ["int8", "int4", "fp8_e4m3", "int2"])
def test_file_nbytes_is_the_size_written(unet: Any, tmp_path: Path, name: str) -> None:
    patch = quantize_module(unet, QuantSpec.parse(name), min_params=0 if name == "int2" else 1024)
    path = storage.save(patch, tmp_path / "q.safetensors")
    assert storage.file_nbytes(patch) == path.stat().st_size
    params = sum(p.numel() for p in unet.parameters())
    assert storage.file_bits(unet, patch) == path.stat().st_size * 8 / params


def _save_v1(patch: Any, path: Path) -> Path:
    """The version-1 writer (one tensor per codes, scales, zero-points and kept parameter), as
    files already saved were written."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    layers: dict[str, Any] = {}
    for name, qt in patch.layers.items():
        tensors[f"quant.{name}.codes"] = qt.codes.detach().contiguous().cpu()
        tensors[f"quant.{name}.scales"] = qt.scales.detach().contiguous().cpu()
        if qt.zeros is not None:
            tensors[f"quant.{name}.zeros"] = qt.zeros.detach().contiguous().cpu()
        layers[name] = {"spec": qt.spec.to_dict(), "shape": list(qt.shape), "dtype": str(qt.dtype).replace("torch.", "")}
        if name in patch.errors:
            layers[name]["relative_error"] = patch.errors[name]
    for name, tensor in patch.kept.items():
        tensors[f"kept.{name}"] = tensor.detach().contiguous().cpu()
    metadata = {
        "dagfusion.format": "dagfusion.quant.weights",
        "format_version": "1",
        "architecture": str(patch.architecture.get("class", "")),
        "config": json.dumps(patch.architecture.get("config", {}), sort_keys=True, default=str),
        "layers": json.dumps(layers, sort_keys=True),
        "kept": json.dumps(sorted(patch.kept)),
        "kept_layers": json.dumps(patch.kept_layers, sort_keys=True),
        "settings": json.dumps(patch.settings, sort_keys=True, default=str),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def _mixed_patch(module: Any) -> Any:
    """Layers alternately at 2, 3, 8 bits (asymmetric, symmetric, per channel) with a layer_bits setting."""
    from dagfusion.nodes.quant.mixed import spec_for_bits
    from dagfusion.nodes.quant.patch import plan_layers

    names = plan_layers(module, min_params=0).quantize
    specs = {name: spec_for_bits((2, 3, 8)[i % 3], 32) for i, name in enumerate(names)}
    return quantize_module(module, "int4", min_params=0, layer_specs=specs)


@pytest.mark.parametrize("kind", ["int4", "mixed", "fp8_e4m3"])
def test_an_old_layout_file_still_loads_identically(unet: Any, inputs: Any, tmp_path: Path, kind: str) -> None:
    patch = _mixed_patch(unet) if kind == "mixed" else quantize_module(unet, kind)
    old = _save_v1(patch, tmp_path / "old.safetensors")
    new = storage.save(patch, tmp_path / "new.safetensors")
    assert _header(old)[1]["__metadata__"]["format_version"] == "1"
    assert storage.read_metadata(old) == {**storage.read_metadata(new), "format_version": 1}
    from_old, from_new = storage.load(old, unet), storage.load(new, unet)
    for loaded in (from_old, from_new):
        assert loaded.key == patch.key and loaded.settings == patch.settings
        assert loaded.errors == patch.errors and loaded.kept_layers == patch.kept_layers
        assert set(loaded.layers) == set(patch.layers) and set(loaded.kept) == set(patch.kept)
        for name, qt in patch.layers.items():
            other = loaded.layers[name]
            assert other.spec == qt.spec and other.shape == qt.shape and other.dtype == qt.dtype
            assert torch.equal(other.dequantize().view(torch.int32), qt.dequantize().view(torch.int32)), name
        for name, tensor in patch.kept.items():
            assert loaded.kept[name].dtype == tensor.dtype and torch.equal(loaded.kept[name], tensor), name
    with patch.apply(unet):
        expected = _forward(unet, inputs)
    for loaded in (from_old, from_new):
        with loaded.apply(unet):
            assert torch.equal(_forward(unet, inputs), expected)
    # The old layout pays a header entry per tensor: the new file is smaller by more than its index.
    assert new.stat().st_size < old.stat().st_size


def test_a_corrupt_index_is_refused(unet: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = storage.save(quantize_module(unet, "int4"), tmp_path / "q.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors["index"] = tensors["index"].clone()
    tensors["index"][0, 7] = 10**8  # the first layer's codes offset, past the end
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="outside 'quant.codes'"):
        storage.load(tmp_path / "bad.safetensors", unet)
    del tensors["index"]
    save_file(tensors, str(tmp_path / "noindex.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="missing tensor 'index'"):
        storage.load(tmp_path / "noindex.safetensors", unet)


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


@pytest.mark.slow
def test_the_header_of_a_two_bit_shapes_sd_file_is_under_two_percent(tmp_path: Path) -> None:
    """shapes-sd at 2.0 average bits (BitsFusion-style widths per layer): the header (names, config)
    takes at most 2 % of the file, so the file's bits stay close to the nominal ones."""
    from dagfusion.nodes.diffusion.loading import load_diffusers_folder
    from dagfusion.nodes.quant.mixed import allocate, quantize_allocation
    from dagfusion.nodes.quant.calibration import weight_error_sensitivity
    from dagfusion.nodes.quant.patch import average_bits
    from dagfusion.nodes.shapes.models import folder

    unet = load_diffusers_folder(folder("shapes-sd"), dtype="fp32", device="cpu").model.denoiser
    sensitivity = weight_error_sensitivity(unet, (1, 2, 3, 4, 8))  # weight errors stand in for measured ones
    patch = quantize_allocation(unet, sensitivity, allocate(unet, sensitivity, 2.0))
    path = storage.save(patch, tmp_path / "two-bit.safetensors")
    header, tensors = _header(path)
    size = path.stat().st_size
    nominal, on_disk = average_bits(unet, patch), storage.file_bits(unet, patch)
    print(f"shapes-sd 2-bit file: {size} bytes, header {header + 8} bytes ({100 * (header + 8) / size:.2f} %), "
          f"nominal {nominal:.3f} bits, file {on_disk:.3f} bits")
    assert nominal <= 2.0 and len(tensors) <= 8
    assert header + 8 <= 0.02 * size
    assert on_disk == size * 8 / sum(p.numel() for p in unet.parameters())
    assert nominal < on_disk < nominal + 0.1
