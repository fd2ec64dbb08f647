"""Weight-only quantization formats: pure tensor maths (no diffusers, no modules).

A weight is quantized as a matrix of ``rows`` output channels by ``cols`` inputs: a Linear
weight as it is, a Conv weight ``(out, in, kh, kw)`` as ``(out, in·kh·kw)``. The result is a
:class:`QuantizedTensor` holding

- ``codes``: one unsigned ``bits``-bit code per element, **bit-packed** into ``uint8`` bytes in
  row-major order (2 codes a byte at 4 bits, 4 at 2 bits, 8 codes in 3 bytes at 3 bits …; see
  :func:`pack_bits`), so the codes take ``ceil(numel · bits / 8)`` bytes;
- ``scales``: ``float16``, shape ``(rows, groups)``;
- ``zeros``: asymmetric formats only, one ``bits``-bit zero-point per scale, packed the same way;
- the original shape and dtype.

Formats (:class:`QuantSpec`):

- ``int8`` — symmetric, one scale per output channel: ``q = round(w / s)`` in ``[-127, 127]``,
  ``s = max|w| / 127``. Stored as the offset code ``q + 128`` (so every integer format has
  unsigned codes and one packing routine).
- ``intN`` (``N`` in 1..8, ``int4`` the usual one) with a **group size** along the input
  dimension: one scale (and zero-point) per ``group_size`` consecutive inputs of a row; the last
  group of a row may be shorter. ``group_size`` 0 (or ≥ ``cols``) is one group per row.
  *Choice:* ``N ≤ 4`` is **asymmetric** (min/max with a zero-point): at 4 bits and below a
  symmetric grid wastes a level on the unused side and half its range on groups that are not
  centred on 0, while the zero-point costs only ``N / group_size`` bits a weight (0.06 at int4
  g64). The range always includes 0 (``lo = min(w, 0)``, ``hi = max(w, 0)``), so 0 is exact and
  an all-zero group is exact. ``N > 4`` is symmetric (as int8). ``symmetric=`` overrides either.
- ``fp8_e4m3`` — ``torch.float8_e4m3fn`` codes (1 byte each, the raw bits as ``uint8``) with one
  scale per output channel: ``s = max|w| / 448``, codes ``= fp8(w / s)``.

Error bound: every scale is rounded **up** to the next ``float16`` (never down), so the grid
always covers the group's range and nothing is clipped; then each integer-format element is
within ``s / 2`` of its original (``s`` the stored fp16 scale, up to float32 rounding), and an
fp8 element within half an fp8 ulp of ``w / s``, times ``s``.

Dequantization (:func:`dequantize`) computes ``(code - zero) · scale`` in float32 and casts to
the requested dtype: the same codes and scales give the same bits on the same device, which
is what makes a saved model load bit-exactly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

FP8_E4M3_MAX = 448.0
"""Largest finite ``float8_e4m3fn`` value."""

_FP16_MAX = 65504.0
_INT_NAME = re.compile(r"^int([1-8])$")

FORMATS = ("int8", "int4", "fp8_e4m3")
"""The formats offered by the WeightOnly node (``intN`` for any N in 1..8 works in this module)."""


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a weight.

    Attributes:
        kind: ``"int"`` or ``"fp8_e4m3"``.
        bits: Bits per code (1..8 for ``int``; 8 for fp8).
        group_size: Inputs sharing one scale along a row; 0 = one scale per output channel.
        symmetric: Symmetric grid around 0 (no zero-points). ``int`` with ``bits ≤ 4`` defaults
            to asymmetric, wider formats to symmetric; fp8 is always symmetric.
    """

    kind: str = "int"
    bits: int = 8
    group_size: int = 0
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("int", "fp8_e4m3"):
            raise ValueError(f"unknown quantization kind {self.kind!r}; expected 'int' or 'fp8_e4m3'")
        if self.kind == "fp8_e4m3":
            if self.bits != 8 or not self.symmetric:
                raise ValueError("fp8_e4m3 is an 8-bit symmetric format")
        elif not 1 <= self.bits <= 8:
            raise ValueError(f"integer quantization needs 1 to 8 bits, got {self.bits}")
        elif self.symmetric and self.bits < 2:
            raise ValueError("a symmetric integer grid needs at least 2 bits; use symmetric=False for 1 bit")
        if self.group_size < 0:
            raise ValueError(f"group_size must be 0 (per output channel) or positive, got {self.group_size}")

    @classmethod
    def parse(cls, name: str, group_size: int | None = None, symmetric: bool | None = None) -> QuantSpec:
        """``"int8"``, ``"int4"``, ``"intN"`` (N in 1..8) or ``"fp8_e4m3"``.

        ``group_size`` defaults to 64 for ``N ≤ 4`` and to per-channel (0) otherwise; fp8 is always
        per channel. ``symmetric`` defaults to ``N > 4``.
        """
        if name == "fp8_e4m3":
            if group_size:
                raise ValueError("fp8_e4m3 uses one scale per output channel; group_size must be 0")
            return cls("fp8_e4m3", 8, 0, True)
        match = _INT_NAME.match(name)
        if not match:
            raise ValueError(f"unknown weight format {name!r}; expected one of {list(FORMATS)} or 'intN' with N in 1..8")
        bits = int(match.group(1))
        if group_size is None:
            group_size = 64 if bits <= 4 else 0
        return cls("int", bits, int(group_size), bits > 4 if symmetric is None else bool(symmetric))

    @property
    def name(self) -> str:
        """``"int4"``, ``"fp8_e4m3"`` …"""
        return "fp8_e4m3" if self.kind == "fp8_e4m3" else f"int{self.bits}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        return cls(str(data["kind"]), int(data["bits"]), int(data["group_size"]), bool(data["symmetric"]))


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized weight: packed codes, fp16 scales, packed zero-points, original shape and dtype.

    Attributes:
        spec: The format.
        codes: ``uint8``, ``ceil(numel · bits / 8)`` bytes (:func:`pack_bits` of the row-major codes).
        scales: ``float16``, ``(rows, groups)``.
        zeros: ``uint8``, the packed ``bits``-bit zero-points of the ``rows · groups`` scales;
            ``None`` for symmetric formats.
        shape: The original weight's shape.
        dtype: The original weight's dtype (what :meth:`dequantize` returns by default).
    """

    spec: QuantSpec
    codes: Any
    scales: Any
    zeros: Any
    shape: tuple[int, ...]
    dtype: Any

    @property
    def rows(self) -> int:
        return matrix_shape(self.shape)[0]

    @property
    def cols(self) -> int:
        return matrix_shape(self.shape)[1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def groups(self) -> int:
        return int(self.scales.shape[1])

    @property
    def group(self) -> int:
        """Inputs per group (``cols`` when there is one group per row)."""
        return group_width(self.cols, self.spec.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes of the codes, scales and zero-points (what storing this weight costs)."""
        total = self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            total += self.zeros.numel() * self.zeros.element_size()
        return int(total)

    @property
    def bits_per_weight(self) -> float:
        """``nbytes · 8 / numel``: the code bits plus the share of scales and zero-points."""
        return self.nbytes * 8 / self.numel if self.numel else 0.0

    @property
    def device(self) -> Any:
        return self.codes.device

    def to(self, device: Any) -> QuantizedTensor:
        """The same quantized tensor with its buffers on ``device``."""
        return QuantizedTensor(
            self.spec, self.codes.to(device), self.scales.to(device),
            None if self.zeros is None else self.zeros.to(device), self.shape, self.dtype,
        )

    def dequantize(self, dtype: Any = None, device: Any = None) -> Any:
        """The float weight (shape ``shape``, dtype ``dtype`` or the original), see :func:`dequantize`."""
        return dequantize(self, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.spec.name}, group={self.spec.group_size}, shape={self.shape}, {self.nbytes} bytes)"


# --- bit packing ------------------------------------------------------------------------------


def packed_size(count: int, bits: int) -> int:
    """Bytes that :func:`pack_bits` makes of ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack_bits(codes: Any, bits: int) -> Any:
    """Pack unsigned ``bits``-bit codes (any shape, flattened row-major) into a ``uint8`` tensor.

    Little-endian bit order: code ``i`` occupies bits ``i·bits … i·bits + bits - 1`` of the
    stream, and bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``. The result has
    ``ceil(count · bits / 8)`` bytes; codes must be in ``[0, 2**bits)``.
    """
    import torch

    _check_bits(bits)
    flat = codes.reshape(-1)
    count = flat.numel()
    if bits == 8:
        return flat.to(torch.uint8).clone()
    values = flat.to(torch.int64)
    pad = (-count) % 8
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    # Eight codes make exactly ``bits`` bytes: combine them into one word, then split it.
    code_shift = torch.arange(8, device=values.device, dtype=torch.int64) * bits
    words = (values.view(-1, 8) << code_shift).sum(dim=1)
    byte_shift = torch.arange(bits, device=values.device, dtype=torch.int64) * 8
    packed = ((words[:, None] >> byte_shift) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: packed_size(count, bits)].contiguous()


def unpack_bits(packed: Any, bits: int, count: int) -> Any:
    """The ``count`` codes that :func:`pack_bits` packed, as a flat ``uint8`` tensor."""
    import torch

    _check_bits(bits)
    if packed.numel() != packed_size(count, bits):
        raise ValueError(f"{count} codes of {bits} bits take {packed_size(count, bits)} bytes, got {packed.numel()}")
    flat = packed.reshape(-1)
    if bits == 8:
        return flat.to(torch.uint8)
    words_count = (count + 7) // 8
    values = flat.to(torch.int64)
    pad = words_count * bits - values.numel()
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    byte_shift = torch.arange(bits, device=values.device, dtype=torch.int64) * 8
    words = (values.view(-1, bits) << byte_shift).sum(dim=1)
    code_shift = torch.arange(8, device=values.device, dtype=torch.int64) * bits
    codes = (words[:, None] >> code_shift) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count].to(torch.uint8)


def _check_bits(bits: int) -> None:
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")


# --- quantize / dequantize --------------------------------------------------------------------


def group_width(cols: int, group_size: int) -> int:
    """Inputs per group: ``group_size``, or ``cols`` for per-channel (0) or oversized groups."""
    return cols if group_size <= 0 or group_size >= cols else group_size


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, cols)`` a weight of ``shape`` is quantized as: ``(out, in·k…)``; one row for 0-/1-D tensors."""
    numel = math.prod(shape)
    rows = int(shape[0]) if len(shape) >= 2 else 1
    return rows, (numel // rows if rows else 0)


def as_matrix(weight: Any) -> Any:
    """``weight`` as ``(out, in·k…)``: Linear weights as they are, Conv weights flattened per output channel."""
    return weight.reshape(matrix_shape(tuple(weight.shape)))


def fp16_at_least(values: Any) -> Any:
    """``values`` (positive float32) as ``float16``, rounded up: every result is ``>= values``.

    :raises ValueError: if a value exceeds the float16 range.
    """
    import torch

    if bool((values > _FP16_MAX).any()):
        raise ValueError(f"a quantization scale of {float(values.max()):.4g} exceeds the float16 range; the weights are too large")
    half = values.to(torch.float16)
    low = half.float() < values
    if bool(low.any()):
        # float16 bit patterns of positive numbers are ordered: +1 is the next representable value.
        half = torch.where(low, (half.view(torch.int16) + 1).view(torch.float16), half)
    return half


def _grouped(matrix: Any, group: int) -> Any:
    """``(rows, cols)`` → ``(rows, groups, group)``, padding the last group of each row with zeros."""
    import torch

    rows, cols = matrix.shape
    groups = -(-cols // group) if cols else 0
    pad = groups * group - cols
    if pad:
        matrix = torch.cat([matrix, matrix.new_zeros(rows, pad)], dim=1)
    return matrix.reshape(rows, groups, group)


def quantize(
    weight: Any,
    spec: QuantSpec | str = "int8",
    *,
    group_size: int | None = None,
    symmetric: bool | None = None,
) -> QuantizedTensor:
    """Quantize ``weight`` (any float tensor; Conv weights per output channel) with ``spec``.

    ``spec`` is a :class:`QuantSpec` or a format name for :meth:`QuantSpec.parse` (then
    ``group_size``/``symmetric`` are passed on). ``weight`` is only read. Computation is in
    float32 on ``weight``'s device; the result's buffers are on the same device.
    """
    import torch

    if isinstance(spec, str):
        spec = QuantSpec.parse(spec, group_size=group_size, symmetric=symmetric)
    elif group_size is not None or symmetric is not None:
        raise TypeError("group_size and symmetric go into the QuantSpec when one is given")
    if not weight.is_floating_point():
        raise TypeError(f"only float weights can be quantized, got {weight.dtype}")
    shape = tuple(int(d) for d in weight.shape)
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize an empty weight of shape {shape}")
    matrix = as_matrix(weight.detach()).to(torch.float32)
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"the weight of shape {shape} has inf or NaN values; it cannot be quantized")
    rows, cols = matrix.shape
    if spec.kind == "fp8_e4m3":
        return _quantize_fp8(matrix, spec, shape, weight.dtype)

    group = group_width(cols, spec.group_size)
    blocks = _grouped(matrix, group)  # (rows, groups, group)
    if spec.symmetric:
        qmax = (1 << (spec.bits - 1)) - 1
        offset = 1 << (spec.bits - 1)
        absmax = blocks.abs().amax(dim=-1)
        scale = fp16_at_least(torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax)))
        s = scale.float().unsqueeze(-1)
        q = torch.round(blocks / s).clamp_(-qmax, qmax) + offset
        zeros = None
    else:
        qmax = (1 << spec.bits) - 1
        lo = blocks.amin(dim=-1).clamp(max=0.0)
        hi = blocks.amax(dim=-1).clamp(min=0.0)
        span = hi - lo
        scale = fp16_at_least(torch.where(span > 0, span / qmax, torch.ones_like(span)))
        s = scale.float()
        zero = torch.round(-lo / s).clamp_(0, qmax)
        q = (torch.round(blocks / s.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp_(0, qmax)
        zeros = pack_bits(zero.to(torch.uint8), spec.bits)
    codes = q.to(torch.uint8).reshape(rows, -1)[:, :cols]
    return QuantizedTensor(spec, pack_bits(codes, spec.bits), scale, zeros, shape, weight.dtype)


def _quantize_fp8(matrix: Any, spec: QuantSpec, shape: tuple[int, ...], dtype: Any) -> QuantizedTensor:
    import torch

    fp8 = fp8_dtype()
    absmax = matrix.abs().amax(dim=1, keepdim=True)
    scale = fp16_at_least(torch.where(absmax > 0, absmax / FP8_E4M3_MAX, torch.ones_like(absmax)))
    scaled = (matrix / scale.float()).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    codes = scaled.to(fp8).view(torch.uint8).reshape(-1).clone()
    return QuantizedTensor(spec, codes, scale, None, shape, dtype)


def fp8_dtype() -> Any:
    """``torch.float8_e4m3fn``.

    :raises RuntimeError: naming the torch version when this torch has no float8 types.
    """
    import torch

    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:  # pragma: no cover - torch >= 2.1 has it
        raise RuntimeError(f"fp8_e4m3 needs torch.float8_e4m3fn (torch 2.1 or later); this is torch {torch.__version__}")
    return dtype


def zero_points(qt: QuantizedTensor) -> Any:
    """``(rows, groups)`` float32 zero-points of an integer-format ``qt`` on its device: the unpacked
    ``zeros``, or the code offset ``2^(bits-1)`` of a symmetric grid."""
    import torch

    rows, groups = qt.rows, qt.groups
    if qt.zeros is None:
        return torch.full((rows, groups), float(1 << (qt.spec.bits - 1)), device=qt.codes.device)
    return unpack_bits(qt.zeros, qt.spec.bits, rows * groups).reshape(rows, groups).to(torch.float32)


def dequantize(qt: QuantizedTensor, dtype: Any = None, device: Any = None) -> Any:
    """The float weight of ``qt``: ``(code - zero) · scale`` in float32, cast to ``dtype``.

    ``dtype`` defaults to the original weight's dtype, ``device`` to where ``qt``'s buffers are
    (they are moved there first, so the arithmetic runs on ``device``).
    """
    import torch

    if device is not None and torch.device(device) != qt.codes.device:
        qt = qt.to(device)
    dtype = qt.dtype if dtype is None else dtype
    rows, cols = qt.rows, qt.cols
    spec = qt.spec
    if spec.kind == "fp8_e4m3":
        values = qt.codes.view(fp8_dtype()).to(torch.float32).reshape(rows, cols) * qt.scales.to(torch.float32)
        return values.reshape(qt.shape).to(dtype)
    group = qt.group
    codes = unpack_bits(qt.codes, spec.bits, rows * cols).reshape(rows, cols).to(torch.float32)
    blocks = _grouped(codes, group)
    zero = zero_points(qt).unsqueeze(-1)
    values = (blocks - zero) * qt.scales.to(torch.float32).unsqueeze(-1)
    return values.reshape(rows, -1)[:, :cols].reshape(qt.shape).to(dtype)


def expected_nbytes(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """What :attr:`QuantizedTensor.nbytes` is for a weight of ``shape``, from the formula.

    ``ceil(numel · bits / 8)`` code bytes + 2 bytes per scale (``rows · groups`` scales) +
    ``ceil(rows · groups · bits / 8)`` zero-point bytes for asymmetric formats.
    """
    numel = math.prod(shape)
    rows, cols = matrix_shape(tuple(shape))
    groups = -(-cols // group_width(cols, spec.group_size)) if cols else 0
    total = packed_size(numel, spec.bits) + 2 * rows * groups
    if not spec.symmetric:
        total += packed_size(rows * groups, spec.bits)
    return total
