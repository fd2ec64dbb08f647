"""The quantization pack: weight-only quantization of diffusion denoisers, with a packed file format.

Nodes:

- ``dagfusion.quant.WeightOnly`` — int8 (per channel), int4 (grouped, with zero-points) or fp8
  e4m3 weights for a denoiser; outputs the model, its average bits per parameter and a per-layer
  report. Pure PyTorch on any device (a patch that swaps dequantized weights in while sampling),
  or torchao's kernels on CUDA (``pip install dagfusion[gpu]``).
- ``dagfusion.quant.Save`` — write a quantized model as one packed safetensors file.
- ``dagfusion.quant.Load`` — load such a file onto a model of the same architecture, bit-exactly.

Modules: :mod:`~dagfusion.nodes.quant.formats` (the tensor maths and bit packing),
:mod:`~dagfusion.nodes.quant.patch` (the patch, layer selection, average bits),
:mod:`~dagfusion.nodes.quant.storage` (the file format), :mod:`~dagfusion.nodes.quant.backend`
(torch or torchao).

Registering this pack imports neither torch nor diffusers: each node imports them when it runs.
"""

from __future__ import annotations

from typing import Any

from dagfusion import hookimpl
from dagfusion.nodes.quant import nodes

NODES = nodes.NODES
"""Every node of the pack, in palette order."""


@hookimpl
def register_nodes(register: Any) -> None:
    for spec in NODES:
        register(spec)
