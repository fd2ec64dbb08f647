"""Choosing the backend, and the torchao path for CUDA.

- ``torch`` — :class:`~dagfusion.nodes.quant.patch.WeightQuantPatch`: pure PyTorch, any device,
  any format; dequantizes into the model's dtype for each sampling run (exact simulation, no
  speed-up).
- ``torchao`` — `torchao <https://github.com/pytorch/ao>`_'s ``quantize_`` with
  ``Int8WeightOnlyConfig`` / ``Float8WeightOnlyConfig`` on a **deep copy** of the denoiser (the
  shared module is never touched), for its weight-only kernels on CUDA. torchao converts Linear
  layers only: the selected Conv layers stay in the model's dtype there. The result is a new
  handle over the copy (``ModelHandle.with_denoiser``), not a patch, so it cannot be saved with
  ``dagfusion.quant.Save``.
- ``auto`` — torchao when the model computes on CUDA, torchao is importable and the format is
  one it offers here (int8, fp8_e4m3); otherwise torch.

Everything that names torchao's API is in :func:`torchao_config`, :func:`torchao_w8a8` (the
int8 dynamic-activation kernels of :mod:`~dagfusion.nodes.quant.activation`) and
:func:`_quantized_copy`, so a rename upstream is a one-line fix.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterable
from typing import Any

from dagfusion.model import unwrap_compiled
from dagfusion.nodes.quant.formats import QuantSpec

BACKENDS = ("auto", "torch", "torchao")
TORCHAO_FORMATS = ("int8", "fp8_e4m3")
INSTALL_HINT = "install it with: pip install dagfusion[gpu]  (or: pip install torchao)"


def torchao_available() -> bool:
    """Whether ``torchao`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("torchao") is not None
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        return False


def resolve_backend(backend: str, device: str, spec: QuantSpec) -> str:
    """``"torch"`` or ``"torchao"`` for the requested ``backend`` on ``device``.

    :raises ValueError: an unknown backend, or torchao asked for a format it is not used for.
    :raises ImportError: torchao asked for but not installed (the message says how to install it).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if backend == "torchao":
        if spec.name not in TORCHAO_FORMATS:
            raise ValueError(
                f"the torchao backend is used here for {list(TORCHAO_FORMATS)}, not {spec.name}; "
                "use backend 'torch' (or 'auto') for it"
            )
        if not torchao_available():
            raise ImportError(f"backend 'torchao' needs the torchao package, which is not installed; {INSTALL_HINT}")
        return "torchao"
    if str(device).startswith("cuda") and spec.name in TORCHAO_FORMATS and torchao_available():
        return "torchao"
    return "torch"


def torchao_config(spec: QuantSpec) -> Any:
    """The torchao config object for ``spec`` (torchao >= 0.10 public API)."""
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError as error:
        raise ImportError(
            f"this torchao has no Int8WeightOnlyConfig/Float8WeightOnlyConfig ({error}); dagfusion needs "
            f"torchao 0.10 or later: pip install -U 'torchao>=0.10'"
        ) from error
    if spec.name == "int8":
        return Int8WeightOnlyConfig()
    if spec.name == "fp8_e4m3":
        import torch

        return Float8WeightOnlyConfig(weight_dtype=torch.float8_e4m3fn)
    raise ValueError(f"no torchao weight-only config for {spec.name}; expected one of {list(TORCHAO_FORMATS)}")


def torchao_quantize(module: Any, spec: QuantSpec, layers: Iterable[str]) -> Any:
    """A deep copy of ``module`` with the Linear layers named in ``layers`` quantized by torchao."""
    return _quantized_copy(module, torchao_config(spec), layers)


def torchao_w8a8(module: Any, layers: Iterable[str]) -> Any:
    """A deep copy of ``module`` whose Linear layers named in ``layers`` run torchao's int8
    dynamic-activation (per token) + int8-weight (per channel) kernels."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return _quantized_copy(module, Int8DynamicActivationInt8WeightConfig(), layers)


def _quantized_copy(module: Any, config: Any, layers: Iterable[str]) -> Any:
    """torchao's ``quantize_`` with ``config`` on a deep copy of ``module``, its Linear layers in ``layers`` only."""
    import torch
    from torchao.quantization import quantize_

    wanted = set(layers)
    quantized = copy.deepcopy(unwrap_compiled(module))

    def selected(layer: Any, name: str) -> bool:
        return isinstance(layer, torch.nn.Linear) and name in wanted

    quantize_(quantized, config, filter_fn=selected)
    return quantized


def linear_layers(module: Any, names: Iterable[str]) -> list[str]:
    """Those of ``names`` that are ``nn.Linear`` modules of ``module`` (what torchao converts)."""
    import torch

    inner = unwrap_compiled(module)
    return [name for name in names if isinstance(inner.get_submodule(name), torch.nn.Linear)]
