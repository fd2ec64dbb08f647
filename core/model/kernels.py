"""Faster CPU kernels for layers whose arithmetic a cheaper operator computes exactly.

Video models (SVD's UNet and temporal decoder, AnimateDiff-style blocks) mix frames with
``Conv3d`` layers whose kernel spans time only, ``(k, 1, 1)``. On the CPU PyTorch runs such a
convolution through its generic ``slow_conv3d`` path, while the same sums are a ``Conv2d`` with a
``(k, 1)`` kernel over ``(frames, height·width)``, which oneDNN runs two to three times faster.

:func:`use_time_only_convs` gives those layers that faster CPU path in place. Parameters, their
names and the state dict are unchanged (the layer stays a ``Conv3d``: saving, loading, LoRA,
quantizers and MAC counting see the same layer); inputs on other devices take ``Conv3d``'s own path.
The outputs equal the original ones up to float rounding (the same products, summed in another
order).

Importing this module does not import torch; the functions import it when they run.
"""

from __future__ import annotations

from typing import Any

_TIME_ONLY_CLASS: Any = None


def time_only_conv_class() -> Any:
    """The ``Conv3d`` subclass :func:`use_time_only_convs` gives matching layers (made once)."""
    global _TIME_ONLY_CLASS
    if _TIME_ONLY_CLASS is None:
        from torch.nn import functional
        from torch import nn

        class TimeOnlyConv3d(nn.Conv3d):
            """A ``Conv3d`` with a ``(k, 1, 1)`` kernel that computes CPU inputs as a ``Conv2d``
            over ``(frames, height·width)``; any other input takes ``Conv3d``'s own path."""

            def forward(self, input: Any) -> Any:
                if input.device.type != "cpu" or input.dim() != 5:
                    return super().forward(input)
                batch, channels, frames, height, width = input.shape
                out = functional.conv2d(input.reshape(batch, channels, frames, height * width), self.weight[..., 0],
                                        self.bias, padding=(self.padding[0], 0), groups=self.groups)
                return out.reshape(batch, out.shape[1], out.shape[2], height, width)

        TimeOnlyConv3d.__qualname__ = "TimeOnlyConv3d"  # importable as dagfusion.model.kernels.TimeOnlyConv3d
        _TIME_ONLY_CLASS = TimeOnlyConv3d
    return _TIME_ONLY_CLASS


def __getattr__(name: str) -> Any:
    """``TimeOnlyConv3d`` made on first use (so that pickled layers load); nothing else."""
    if name == "TimeOnlyConv3d":
        return time_only_conv_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_time_only_conv(layer: Any) -> bool:
    """Whether ``layer`` is a plain ``Conv3d`` whose sums a ``Conv2d`` computes: kernel ``(k, 1, 1)``,
    stride 1, dilation 1, no spatial padding, zero padding mode."""
    from torch import nn

    return (type(layer) is nn.Conv3d and tuple(layer.kernel_size[1:]) == (1, 1) and tuple(layer.stride) == (1, 1, 1)
            and tuple(layer.dilation) == (1, 1, 1) and not isinstance(layer.padding, str)
            and tuple(layer.padding[1:]) == (0, 0) and layer.padding_mode == "zeros")


def use_time_only_convs(module: Any) -> int:
    """Give every time-only ``Conv3d`` in ``module`` (see :func:`is_time_only_conv`) the faster CPU
    path, in place; returns how many layers changed. Idempotent; any other layer is left alone."""
    cls = time_only_conv_class()
    changed = 0
    for layer in module.modules():
        if is_time_only_conv(layer):
            layer.__class__ = cls
            changed += 1
    return changed
