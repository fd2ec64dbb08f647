"""Count the multiply-accumulates (MACs) a module actually computes while code runs.

::

    from dagfusion.model import count_macs

    with count_macs(unet) as counter:
        unet(sample, t, encoder_hidden_states=text)
    print(counter.total, counter.by_kind())

Counting is done by forward hooks registered on entry and removed on exit, so only the layers
that really run are counted (a cache scheduler that skips half the network counts half). What
is counted, per call:

- ``nn.Linear``: ``output elements × in_features``;
- ``nn.Conv1d/2d/3d``: ``output elements × in_channels / groups × kernel volume``
  (``nn.ConvTranspose*``: ``input elements × out_channels / groups × kernel volume``);
- diffusers ``Attention``: the two matrix products of scaled-dot-product attention,
  ``Q·Kᵀ`` and ``softmax·V``: ``2 × B × heads × Lq × Lk × head_dim`` (its projections are
  ``nn.Linear`` layers, counted on their own).

Not counted: normalisations, activations, element-wise ops, ``nn.MultiheadAttention`` (it
calls its weights functionally) and attention computed outside diffusers ``Attention``
modules. Biases are not MACs. Only calls from the thread that opened the counter are counted,
so another thread sampling with the same (shared) module does not leak into the numbers.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MacRecord:
    """One counted call: the module's qualified name, its kind and the MACs it computed."""

    name: str
    kind: str
    macs: int


class MacCounter:
    """MACs counted by :func:`count_macs`.

    Attributes:
        total: All MACs so far.
        records: One :class:`MacRecord` per counted module call, in call order (empty when
            the counter was opened with ``records=False``).
        calls: Number of counted module calls.
    """

    def __init__(self, keep_records: bool = True) -> None:
        self.total = 0
        self.calls = 0
        self.records: list[MacRecord] = []
        self.keep_records = keep_records
        self._by_kind: dict[str, int] = {}
        self._by_module: dict[str, int] = {}

    def add(self, name: str, kind: str, macs: int) -> None:
        macs = int(macs)
        self.total += macs
        self.calls += 1
        self._by_kind[kind] = self._by_kind.get(kind, 0) + macs
        self._by_module[name] = self._by_module.get(name, 0) + macs
        if self.keep_records:
            self.records.append(MacRecord(name, kind, macs))

    def by_kind(self) -> dict[str, int]:
        """MACs per layer kind (``"linear"``, ``"conv"``, ``"conv_transpose"``, ``"attention"``)."""
        return dict(self._by_kind)

    def by_module(self) -> dict[str, int]:
        """MACs per module name (``""`` is the root module)."""
        return dict(self._by_module)

    def reset(self) -> None:
        """Forget everything counted so far (the hooks stay in place)."""
        self.total = 0
        self.calls = 0
        self.records.clear()
        self._by_kind.clear()
        self._by_module.clear()

    def __repr__(self) -> str:
        return f"MacCounter(total={self.total:,}, calls={self.calls})"


def _attention_class() -> Any:
    try:
        from diffusers.models.attention_processor import Attention
    except Exception:  # noqa: BLE001 - diffusers missing or reorganised: count no attention
        return None
    return Attention


def linear_macs(module: Any, inputs: Any, output: Any) -> int:
    return int(output.numel()) * int(module.in_features)


def conv_macs(module: Any, inputs: Any, output: Any) -> int:
    kernel = math.prod(int(k) for k in module.kernel_size)
    return int(output.numel()) * (int(module.in_channels) // int(module.groups)) * kernel


def conv_transpose_macs(module: Any, inputs: Any, output: Any) -> int:
    kernel = math.prod(int(k) for k in module.kernel_size)
    return int(inputs[0].numel()) * (int(module.out_channels) // int(module.groups)) * kernel


def attention_macs(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """``2 · B · heads · Lq · Lk · head_dim`` for a diffusers ``Attention`` call."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if hidden is None:
        return 0
    encoder = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    batch = int(hidden.shape[0])
    queries = _tokens(hidden)
    if encoder is None:
        keys = queries
    elif getattr(module, "added_kv_proj_dim", None) is not None:
        # Added key/value projections: the text tokens are joined to (or replace) the image ones.
        keys = _tokens(encoder) + (0 if getattr(module, "only_cross_attention", False) else queries)
    else:
        keys = _tokens(encoder)
    heads = int(module.heads)
    head_dim = int(module.inner_dim) // heads
    return 2 * batch * heads * queries * keys * head_dim


def _tokens(x: Any) -> int:
    """Sequence length of ``(B, L, C)`` or spatial size of ``(B, C, H, W)``."""
    if x.ndim == 4:
        return int(x.shape[2]) * int(x.shape[3])
    if x.ndim == 3:
        return int(x.shape[1])
    return int(x.shape[-2]) if x.ndim > 1 else 1


@contextlib.contextmanager
def count_macs(module: Any, *, records: bool = True) -> Iterator[MacCounter]:
    """Count the MACs computed by ``module``'s layers inside the ``with`` block (see the module docstring).

    The hooks are removed on exit, also after an exception; ``module`` is otherwise unchanged.

    :param records: Keep one :class:`MacRecord` per call (turn off for long runs of big models).
    """
    from torch import nn

    counter = MacCounter(records)
    owner = threading.get_ident()
    attention = _attention_class()
    handles = []

    def plain_hook(name: str, kind: str, fn: Any) -> Any:
        def hook(mod: Any, inputs: Any, output: Any) -> None:
            if threading.get_ident() == owner and hasattr(output, "numel"):
                counter.add(name, kind, fn(mod, inputs, output))

        return hook

    def attention_hook(name: str) -> Any:
        def hook(mod: Any, args: Any, kwargs: Any, output: Any) -> None:
            if threading.get_ident() == owner:
                counter.add(name, "attention", attention_macs(mod, args, kwargs))

        return hook

    try:
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear):
                handles.append(sub.register_forward_hook(plain_hook(name, "linear", linear_macs)))
            elif isinstance(sub, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                handles.append(sub.register_forward_hook(plain_hook(name, "conv_transpose", conv_transpose_macs)))
            elif isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                handles.append(sub.register_forward_hook(plain_hook(name, "conv", conv_macs)))
            elif attention is not None and isinstance(sub, attention):
                handles.append(sub.register_forward_hook(attention_hook(name), with_kwargs=True))
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def call_layout(call: Any) -> tuple[Any, ...]:
    """What must match between a cached denoiser call and a call reusing it (and what MACs depend
    on besides the mode): the batch shape, its classifier-free-guidance halves, dtype and device."""
    sample = call.sample
    return (tuple(sample.shape), tuple(call.batches), str(sample.dtype), str(sample.device))


class CallCosts:
    """MACs of one denoiser call per ``(mode, batch layout)`` — counted the first time each runs (MACs
    depend on shapes only) — and what a run of calls cost from them (cache schedulers' statistics).

    Attributes:
        measured: ``{(mode, layout): MACs of one call}``.
    """

    def __init__(self, module: Any, enabled: bool = True) -> None:
        self.module = module
        self.enabled = bool(enabled)
        self.measured: dict[tuple[str, Any], int] = {}

    def run(self, mode: str, layout: Any, fn: Any) -> Any:
        """``fn()``, counting its MACs when this ``(mode, layout)`` has not been counted yet."""
        if not self.enabled or (mode, layout) in self.measured:
            return fn()
        with count_macs(self.module, records=False) as counter:
            out = fn()
        self.measured[(mode, layout)] = counter.total
        return out

    def summary(self, calls: list[tuple[int, str, Any]]) -> dict[str, Any]:
        """For ``calls`` (``(step, mode, layout)``, the uncached mode being ``"full"``): ``macs``,
        ``macs_uncached`` (every call in full) and ``mac_fraction``; empty unless all were measured."""
        costs = [(self.measured.get((mode, layout)), self.measured.get(("full", layout))) for _, mode, layout in calls]
        if not calls or not all(a is not None and b is not None for a, b in costs):
            return {}
        macs = sum(a for a, _ in costs)
        uncached = sum(b for _, b in costs)
        return {"macs": macs, "macs_uncached": uncached, "mac_fraction": macs / uncached if uncached else 1.0}
