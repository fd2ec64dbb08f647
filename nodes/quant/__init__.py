"""The quantization pack: weight-only quantization of diffusion denoisers, with a packed file format.

Nodes:

- ``dagfusion.quant.WeightOnly`` — int8 (per channel), int4 (grouped, with zero-points) or fp8
  e4m3 weights for a denoiser; outputs the model, its nominal average bits per parameter (the
  stored tensors), the bits per parameter of its saved file (``file_bits``: header and index
  included) and a per-layer report. Pure PyTorch on any device (a patch that swaps dequantized weights in while sampling),
  or torchao's kernels on CUDA (``pip install dagfusion[gpu]``).
- ``dagfusion.quant.Save`` — write a quantized model as one packed safetensors file (a few flat
  tensors and one index; outputs its bytes, its bits per parameter and the nominal bits).
- ``dagfusion.quant.Load`` — load such a file onto a model of the same architecture, bit-exactly.
- ``dagfusion.quant.Sensitivity`` — per layer and candidate bit width, how much quantizing only
  that layer changes the denoiser output (BitsFusion's sensitivity), from recorded calibration
  calls.
- ``dagfusion.quant.MixedPrecision`` — bits per layer chosen from a sensitivity to meet an
  average-bits budget exactly as WeightOnly counts it (a knapsack), then quantized; savable
  with Save.
- ``dagfusion.quant.Trainable``, ``dagfusion.quant.DistillLoss``, ``dagfusion.quant.Freeze``,
  ``dagfusion.quant.ErrorProfile`` — BitsFusion's quantization-aware distillation through the
  ordinary training loop: latent weights and scales train through a straight-through estimator
  against the full-precision teacher (stage I: CFG-aware output distillation; stage II: the
  noise-prediction loss with timesteps weighted by the measured quantization error), then are
  packed again (:mod:`~dagfusion.nodes.quant.qat`, :mod:`~dagfusion.nodes.quant.distill`).
- ``dagfusion.quant.ActivationQuant`` — DGQ's activation quantization (W8A8 with WeightOnly's
  int8, W4A8 with its int4): outlier-aware groups of each layer input's channels or tokens and
  prompt-specific logarithmic attention probabilities, calibrated on a few prompts; fake
  quantization on any device, or torchao's int8 dynamic-activation + int8-weight kernels on CUDA
  (:mod:`~dagfusion.nodes.quant.activation`).

Types: ``QUANT_SENSITIVITY`` (:mod:`~dagfusion.nodes.quant.types`).

Modules: :mod:`~dagfusion.nodes.quant.formats` (the tensor maths and bit packing),
:mod:`~dagfusion.nodes.quant.patch` (the patch, layer selection, average bits),
:mod:`~dagfusion.nodes.quant.storage` (the file format), :mod:`~dagfusion.nodes.quant.backend`
(torch or torchao), :mod:`~dagfusion.nodes.quant.mixed` (sensitivity and bit allocation),
:mod:`~dagfusion.nodes.quant.sizes` (``python -m dagfusion.nodes.quant.sizes``: nominal and file
bits of shapes-sd's quantized files).

Registering this pack imports neither torch nor diffusers: each node imports them when it runs.
"""

from __future__ import annotations

from typing import Any

from dagfusion import hookimpl
from dagfusion.nodes.quant import activation_nodes, distill, nodes, qat_nodes
from dagfusion.nodes.quant.types import TYPES

NODES = (*nodes.NODES, *qat_nodes.NODES, *distill.NODES, *activation_nodes.NODES)
"""Every node of the pack, in palette order."""


@hookimpl
def register_types(register: Any) -> None:
    for socket_type in TYPES:
        register(socket_type)


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)
