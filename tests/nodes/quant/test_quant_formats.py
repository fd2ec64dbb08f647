"""Quantization formats: error bounds, bit packing, fp8 exactness and byte counts (pure tensor maths)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from dagfusion.nodes.quant.formats import (
    FP8_E4M3_MAX,
    QuantizedTensor,
    QuantSpec,
    dequantize,
    expected_nbytes,
    fp16_at_least,
    pack_bits,
    packed_size,
    quantize,
    unpack_bits,
)


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def _per_element_scale(qt: QuantizedTensor) -> torch.Tensor:
    """Each element's scale, shaped like the (rows, cols) matrix."""
    scales = qt.scales.float().repeat_interleave(qt.group, dim=1)
    return scales[:, : qt.cols]


def _bound_ok(weight: torch.Tensor, qt: QuantizedTensor) -> bool:
    error = (dequantize(qt, dtype=torch.float32).reshape(qt.rows, -1) - weight.reshape(qt.rows, -1)).abs()
    bound = _per_element_scale(qt) / 2
    return bool((error <= bound * (1 + 1e-5) + 1e-12).all())


# --- integer formats ---------------------------------------------------------------------------


def test_int8_is_symmetric_per_channel_within_half_a_step() -> None:
    weight = _weight(24, 70)
    weight[3] *= 40  # rows with very different ranges get their own scales
    qt = quantize(weight, "int8")
    assert qt.spec == QuantSpec("int", 8, 0, True)
    assert qt.scales.dtype == torch.float16 and tuple(qt.scales.shape) == (24, 1)
    assert qt.zeros is None and qt.codes.dtype == torch.uint8 and qt.codes.numel() == 24 * 70
    assert _bound_ok(weight, qt)
    # The scale is max|w| / 127, rounded up to float16 (never down: nothing is clipped).
    exact = weight.abs().amax(dim=1) / 127
    assert (qt.scales.float().squeeze(1) >= exact).all()
    assert (qt.scales.float().squeeze(1) <= exact * (1 + 2**-10)).all()
    restored = qt.dequantize()
    assert restored.dtype == weight.dtype and restored.shape == weight.shape


def test_int4_groups_are_asymmetric_and_within_half_a_step() -> None:
    weight = _weight(10, 50) + 0.02  # off-centre rows: the zero-point helps
    qt = quantize(weight, "int4", group_size=16)  # 50 inputs: groups of 16, 16, 16 and 2
    assert qt.spec == QuantSpec("int", 4, 16, False)
    assert tuple(qt.scales.shape) == (10, 4) and qt.group == 16
    assert qt.zeros is not None and qt.zeros.numel() == packed_size(40, 4)
    assert qt.codes.numel() == packed_size(500, 4) == 250
    assert _bound_ok(weight, qt)
    # Per-group scales beat one scale per row.
    per_row = quantize(weight, "int4", group_size=0)
    assert per_row.groups == 1
    err_group = (qt.dequantize() - weight).abs().mean()
    err_row = (per_row.dequantize() - weight).abs().mean()
    assert err_group < err_row


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_every_bit_width_is_within_half_a_step(bits: int, symmetric: bool) -> None:
    if symmetric and bits == 1:
        with pytest.raises(ValueError, match="at least 2 bits"):
            QuantSpec("int", 1, 8, True)
        return
    weight = _weight(7, 45, seed=bits)
    qt = quantize(weight, QuantSpec("int", bits, 8, symmetric))
    assert _bound_ok(weight, qt)
    assert qt.nbytes == expected_nbytes(qt.shape, qt.spec)


def test_zero_rows_and_exact_zeros_survive() -> None:
    weight = _weight(4, 64)
    weight[1] = 0
    weight[2, :10] = 0
    for name in ("int8", "int4", "int2", "fp8_e4m3"):
        restored = quantize(weight, name).dequantize()
        assert (restored[1] == 0).all(), name
        assert (restored[2, :10] == 0).all(), name
        assert torch.isfinite(restored).all()


def test_conv_weights_are_quantized_per_output_channel() -> None:
    weight = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    qt = quantize(weight, "int4", group_size=9)
    assert qt.shape == (6, 3, 3, 3) and (qt.rows, qt.cols) == (6, 27)
    assert tuple(qt.scales.shape) == (6, 3)
    assert qt.dequantize().shape == weight.shape
    assert _bound_ok(weight, qt)
    per_channel = quantize(weight, "int8")
    assert tuple(per_channel.scales.shape) == (6, 1)


def test_vectors_are_one_row_and_empty_weights_are_refused() -> None:
    vector = torch.randn(100, generator=torch.Generator().manual_seed(2))
    qt = quantize(vector, "int4", group_size=16)
    assert (qt.rows, qt.cols, qt.groups) == (1, 100, 7)
    assert qt.dequantize().shape == (100,) and _bound_ok(vector, qt)
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.zeros(0, 4), "int8")


def test_quantize_does_not_touch_its_input_and_keeps_dtype() -> None:
    weight = _weight(8, 32).to(torch.bfloat16)
    before = weight.clone()
    qt = quantize(weight, "int4", group_size=8)
    assert torch.equal(weight, before)
    assert qt.dtype == torch.bfloat16 and qt.dequantize().dtype == torch.bfloat16
    assert qt.dequantize(dtype=torch.float16).dtype == torch.float16


def test_spec_parsing_and_errors() -> None:
    assert QuantSpec.parse("int8") == QuantSpec("int", 8, 0, True)
    assert QuantSpec.parse("int4") == QuantSpec("int", 4, 64, False)
    assert QuantSpec.parse("int3", group_size=32, symmetric=True) == QuantSpec("int", 3, 32, True)
    assert QuantSpec.parse("fp8_e4m3") == QuantSpec("fp8_e4m3", 8, 0, True)
    assert QuantSpec.from_dict(QuantSpec.parse("int4").to_dict()) == QuantSpec.parse("int4")
    with pytest.raises(ValueError, match="unknown weight format 'int9'"):
        QuantSpec.parse("int9")
    with pytest.raises(ValueError, match="per output channel"):
        QuantSpec.parse("fp8_e4m3", group_size=64)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize(torch.tensor([[1.0, float("nan")]]), "int8")
    with pytest.raises(TypeError, match="float"):
        quantize(torch.ones(2, 2, dtype=torch.int32), "int8")


def test_scales_round_up_to_float16() -> None:
    values = torch.tensor([1e-3, 0.1, 1 / 3, 7.0, 1e-9])
    half = fp16_at_least(values)
    assert half.dtype == torch.float16
    assert (half.float() >= values).all()
    assert (half > 0).all()
    with pytest.raises(ValueError, match="float16 range"):
        fp16_at_least(torch.tensor([1e6]))


# --- fp8 ----------------------------------------------------------------------------------------


def _fp8_values() -> torch.Tensor:
    """Every finite float8_e4m3fn value."""
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).float()
    return values[torch.isfinite(values)]


@pytest.mark.parametrize("power", [0, -6, 3])
def test_fp8_representable_values_are_exact(power: int) -> None:
    values = _fp8_values() * 2.0**power
    assert values.abs().max() == FP8_E4M3_MAX * 2.0**power
    weight = torch.stack([values, values.flip(0)])
    qt = quantize(weight, "fp8_e4m3")
    assert qt.codes.dtype == torch.uint8 and qt.codes.numel() == weight.numel()
    assert (qt.scales.float() == 2.0**power).all()
    assert torch.equal(qt.dequantize(), weight)


def test_fp8_error_is_within_half_an_fp8_step() -> None:
    weight = _weight(16, 40)
    qt = quantize(weight, "fp8_e4m3")
    scale = qt.scales.float()
    scaled = weight / scale
    # e4m3: 3 mantissa bits, so the spacing at |x| is at most 2^(floor(log2|x|) - 3); subnormals 2^-9.
    exponent = torch.floor(torch.log2(scaled.abs().clamp(min=2.0**-6)))
    step = 2.0 ** (exponent - 3)
    error = (qt.dequantize() - weight).abs() / scale
    assert (error <= step / 2 * (1 + 1e-5)).all()


# --- bit packing --------------------------------------------------------------------------------


def test_packing_layout_is_little_endian() -> None:
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 4).tolist() == [0x21, 0x03]
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b1101, 1]
    assert pack_bits(torch.tensor([3, 0, 2], dtype=torch.uint8), 2).tolist() == [0b100011]
    assert pack_bits(torch.tensor([7, 1], dtype=torch.uint8), 3).tolist() == [0b1111]
    assert pack_bits(torch.tensor([200, 7], dtype=torch.uint8), 8).tolist() == [200, 7]


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 8), count=st.integers(0, 301), seed=st.integers(0, 2**31 - 1))
def test_packing_round_trips_for_every_width(bits: int, count: int, seed: int) -> None:
    codes = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, count), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_round_trips_odd_sizes(bits: int) -> None:
    for count in (1, 3, 7, 9, 13, 1001):
        codes = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(count), dtype=torch.uint8)
        assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, count), codes)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(5, dtype=torch.uint8), bits, 1000)


# --- byte counts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "name", "group", "expected"),
    [
        ((37, 100), "int8", None, 37 * 100 + 37 * 2),
        ((37, 100), "int4", 64, 3700 // 2 + 37 * 2 * 2 + math.ceil(37 * 2 * 4 / 8)),
        ((64, 64), "int4", 64, 64 * 64 // 2 + 64 * 2 + 64 // 2),
        ((8, 3, 3, 3), "int4", 9, math.ceil(216 * 4 / 8) + 8 * 3 * 2 + math.ceil(24 * 4 / 8)),
        ((33, 7), "int3", 4, math.ceil(231 * 3 / 8) + 33 * 2 * 2 + math.ceil(66 * 3 / 8)),
        ((5, 11), "fp8_e4m3", None, 55 + 5 * 2),
    ],
)
def test_nbytes_matches_the_formula(shape: tuple[int, ...], name: str, group: int | None, expected: int) -> None:
    qt = quantize(torch.randn(shape, generator=torch.Generator().manual_seed(0)), name, group_size=group)
    assert qt.nbytes == expected == expected_nbytes(shape, qt.spec)
    stored = qt.codes.numel() + 2 * qt.scales.numel() + (0 if qt.zeros is None else qt.zeros.numel())
    assert qt.nbytes == stored
    assert qt.bits_per_weight == pytest.approx(expected * 8 / math.prod(shape))


def test_int4_g64_costs_about_four_and_a_third_bits() -> None:
    qt = quantize(_weight(128, 256), "int4", group_size=64)
    assert qt.bits_per_weight == pytest.approx(4 + 16 / 64 + 4 / 64)
    assert quantize(_weight(128, 256), "int8").bits_per_weight == pytest.approx(8 + 16 / 256)
