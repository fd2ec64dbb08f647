"""Activation quantization of diffusion denoisers with DGQ's distribution-aware group quantization.

DGQ ("Distribution-aware Group Quantization for Text-to-Image Diffusion Models", Ryu et al.,
ICLR 2025) quantizes the activations of a text-to-image denoiser in two ways:

- **Outlier-aware group quantization of layer inputs.** The input of every selected
  Linear/Conv layer is fake-quantized (asymmetric, ``bits`` bits, static ranges). During
  calibration each layer records, per *channel* (the input features) and per *token* (sequence
  position, or spatial position of a Conv input), the minimum and maximum it sees over all
  calibration calls. The axis whose ranges spread more (``spread = (max of maxima − min of
  maxima) + (max of minima − min of minima)``) is grouped: the ``(min, max)`` pairs of its
  indices are clustered by k-means into ``groups`` clusters (DGQ uses 8 or 16), and each cluster
  gets one scale and zero-point from the smallest minimum and largest maximum of its members. A
  few outlier channels (or the outlier start token of the text embeddings) so land in groups of
  their own instead of stretching one per-tensor range. ``groups=1`` is plain static per-tensor
  quantization, the baseline DGQ improves on. If a token-grouped layer sees another token count
  than it was calibrated on (another resolution), it falls back to the union range of its groups.
  Values beyond a group's calibrated range are clipped; ``margin`` widens every range by that
  fraction of its width at both ends (0, as DGQ, by default).
- **Prompt-specific logarithmic quantization of attention probabilities.** The softmax output
  of each attention module is quantized to powers of two below a scale, ``p̂ = δ·2^-q`` with
  ``q = clamp(round(-log2(p/δ)), 0, 2^bits - 1)``, where ``δ`` is the maximum of the
  probabilities *of this prompt* (each batch row), computed while sampling rather than
  calibrated. In cross-attention the column of the first key (the ``<bos>``/start token),
  which can take a large, prompt-independent share of every query's attention, is kept exact,
  and its key row is left unquantized; the other columns are quantized. Whether a
  model has such a start-token peak is decided at calibration (``start_token="auto"``: the mean
  probability of key 0 is more than :data:`START_PEAK_RATIO` times that of any other key),
  so the exception is made only where the calibration data show such a peak. Queries, keys and
  values are quantized per tensor with calibrated static ranges. The per-tensor baseline
  (``method="per_tensor"``) quantizes the probabilities uniformly on ``[0, calibrated max]``
  with no start-token exception.

- **Time-step-aware ranges** (``intervals``; DGQ's reference takes this from TFMQ-DM, one set
  of activation quantizer parameters per sampling step). Activation ranges drift with the noise
  level, so the calibration calls' distinct timesteps are split, in sampling order, into
  ``intervals`` contiguous runs of near-equal length, and every run gets its own layer-input
  ranges and attention quantizers, fitted on its calls only. While sampling, each denoiser call
  uses the interval whose timesteps are nearest its own (the boundaries lie halfway between
  neighbouring runs), so a run with other step counts still finds one. ``intervals=1`` (the
  default) is one set for all steps; ``intervals`` equal to the number of recorded steps is the
  reference's one set per step. A call made outside a sampling run (no step known) uses the
  ranges fitted on all calls.

The layers are those :func:`~dagfusion.nodes.quant.patch.plan_layers` selects for weight
quantization (``keep``/``min_params``, :data:`~dagfusion.nodes.quant.patch.DEFAULT_KEEP` by
default): the first and last layers, the time/caption embeddings and the adaLN modulations keep
full-precision inputs. The attention modules are diffusers ``Attention`` modules with a standard
processor and no query/key norms; others keep theirs.

:class:`ActivationQuantPatch` applies all this while sampling (forward pre-hooks and attention
processors installed on entry, removed on exit: the module is unchanged afterwards); it composes
with :class:`~dagfusion.nodes.quant.patch.WeightQuantPatch` (W8A8 = int8 weights + 8-bit
activations; W4A8 = grouped int4 weights + 8-bit activations) and with cache patches. It is a
simulation (fake quantization in the model's dtype): real int8 kernels are torchao's
(:func:`~dagfusion.nodes.quant.backend.torchao_w8a8`, CUDA).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagfusion.model import ModelPatch, StepHook, unwrap_compiled
from dagfusion.nodes.quant.patch import DEFAULT_KEEP, DEFAULT_MIN_PARAMS, plan_layers

METHODS = ("dgq", "per_tensor")
ATTENTION_CHOICES = ("log", "uniform", "off")
START_TOKEN_CHOICES = ("auto", "on", "off")
START_PEAK_RATIO = 2.0
"""``start_token="auto"``: a cross-attention module has a start-token peak when key 0's mean
probability (over the calibration calls' queries and heads) exceeds this many times that of
every other key."""
KEY_PREFIX = "dagfusion.quant.ActivationQuant:"


# --- the maths --------------------------------------------------------------------------------


def kmeans_labels(points: Any, groups: int, iterations: int = 50) -> Any:
    """Labels ``(N,)`` of k-means with ``groups`` clusters over ``points`` ``(N, D)`` (deterministic).

    Centres start at the points of evenly spaced ranks by their summed coordinates; Lloyd
    iterations follow. Fewer distinct points than ``groups`` give fewer non-empty clusters.
    """
    import torch

    n = points.shape[0]
    k = max(1, min(int(groups), n))
    if k == 1:
        return torch.zeros(n, dtype=torch.long, device=points.device)
    order = torch.argsort(points.sum(dim=1))
    picks = order[torch.linspace(0, n - 1, k, device=points.device).round().long()]
    centres = points[picks].clone()
    labels = torch.zeros(n, dtype=torch.long, device=points.device)
    for _ in range(iterations):
        new = torch.cdist(points, centres).argmin(dim=1)
        if torch.equal(new, labels) and _ > 0:
            break
        labels = new
        for j in range(k):
            members = points[labels == j]
            if members.numel():
                centres[j] = members.mean(dim=0)
    return labels


@dataclass
class GroupRanges:
    """Static asymmetric ranges of one activation: one ``(low, high)`` per group.

    Attributes:
        axis: ``"channel"`` (input features), ``"token"`` (positions) or ``"tensor"`` (one group).
        labels: The group of each index along ``axis`` (``None`` for ``"tensor"``).
        low: Lowest value of each group ``(G,)``.
        high: Highest value of each group ``(G,)``.
    """

    axis: str
    labels: Any
    low: Any
    high: Any

    @property
    def groups(self) -> int:
        return int(self.low.numel())


def fit_groups(channel_min: Any, channel_max: Any, groups: int, token_min: Any = None, token_max: Any = None) -> GroupRanges:
    """DGQ's grouping: pick the axis whose ranges spread more, cluster its ``(min, max)`` pairs
    into ``groups`` k-means clusters, one range per cluster (its lowest min, highest max).
    ``groups <= 1``: one per-tensor range."""
    import torch

    if groups <= 1:
        return GroupRanges("tensor", None, channel_min.min().reshape(1), channel_max.max().reshape(1))

    def spread(lo: Any, hi: Any) -> float:
        return float(hi.max() - hi.min() + lo.max() - lo.min())

    axis, lo, hi = "channel", channel_min, channel_max
    if token_min is not None and token_min.numel() > 1 and spread(token_min, token_max) > spread(channel_min, channel_max):
        axis, lo, hi = "token", token_min, token_max
    points = torch.stack([lo, hi], dim=1).float()
    labels = kmeans_labels(points, groups)
    used = sorted(set(labels.tolist()))
    remap = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    for index, label in enumerate(used):
        remap[label] = index
    labels = remap[labels]
    low = torch.stack([torch.minimum(lo[labels == g].min(), hi[labels == g].min()) for g in range(len(used))])
    high = torch.stack([torch.maximum(lo[labels == g].max(), hi[labels == g].max()) for g in range(len(used))])
    return GroupRanges(axis, labels, low.float(), high.float())


def fake_quant_uniform(x: Any, low: Any, high: Any, bits: int) -> Any:
    """Asymmetric uniform fake quantization of ``x`` on ``[low, high]`` (broadcastable), ``bits`` bits."""
    import torch

    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp_min(1e-8)
    zero = torch.round(-low / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, levels)
    return (q - zero) * scale


def quantize_grouped(x: Any, ranges: GroupRanges, bits: int, channel_dim: int) -> Any:
    """Fake-quantize ``x`` with ``ranges`` (``channel_dim``: its feature axis; tokens are the
    positions between the batch axis and the features, or after the channels of a Conv input)."""
    low, high = ranges.low.to(x.device, x.dtype), ranges.high.to(x.device, x.dtype)
    if ranges.axis == "tensor":
        return fake_quant_uniform(x, low[0], high[0], bits)
    labels = ranges.labels.to(x.device)
    shape = [1] * x.ndim
    if ranges.axis == "channel":
        if x.shape[channel_dim] != labels.numel():
            return fake_quant_uniform(x, low.min(), high.max(), bits)
        shape[channel_dim] = -1
        return fake_quant_uniform(x, low[labels].reshape(shape), high[labels].reshape(shape), bits)
    # token axis
    if channel_dim == 1:  # Conv input (B, C, *spatial): the flattened spatial positions
        positions = x[0, 0].numel()
        if positions != labels.numel():
            return fake_quant_uniform(x, low.min(), high.max(), bits)
        lo, hi = low[labels].reshape(1, 1, *x.shape[2:]), high[labels].reshape(1, 1, *x.shape[2:])
        return fake_quant_uniform(x, lo, hi, bits)
    if x.ndim < 3 or x.shape[-2] != labels.numel():
        return fake_quant_uniform(x, low.min(), high.max(), bits)
    shape[-2] = -1
    return fake_quant_uniform(x, low[labels].reshape(shape), high[labels].reshape(shape), bits)


def log_quantize(probs: Any, bits: int, *, keep_first: bool = False) -> Any:
    """DGQ's prompt-specific logarithmic quantizer of attention probabilities ``(B, ..., keys)``.

    ``δ`` is the maximum of each batch row (over heads, queries and the quantized keys);
    ``p̂ = δ·2^-clamp(round(-log2(p/δ)), 0, 2^bits - 1)``. ``keep_first``: key 0 (the start
    token) is returned exact and left out of ``δ``.
    """
    import torch

    rest = probs[..., 1:] if keep_first else probs
    flat = rest.reshape(rest.shape[0], -1)
    delta = flat.amax(dim=1).clamp_min(1e-30).reshape(-1, *([1] * (rest.ndim - 1)))
    ratio = (rest / delta).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.clamp(torch.round(-torch.log2(ratio)), 0, 2**bits - 1)
    out = delta * torch.pow(2.0, -q)
    out = torch.where(rest > 0, out, torch.zeros_like(out))
    if keep_first:
        return torch.cat([probs[..., :1], out.to(probs.dtype)], dim=-1)
    return out.to(probs.dtype)


# --- calibration statistics -------------------------------------------------------------------


@dataclass
class _Stats:
    """Running per-channel and per-token minima and maxima of one activation site."""

    channel_min: Any = None
    channel_max: Any = None
    token_min: Any = None
    token_max: Any = None
    tokens_ok: bool = True

    def update(self, x: Any, channel_dim: int) -> None:
        import torch

        x = x.detach().float()
        cd = channel_dim % x.ndim
        dims = [d for d in range(x.ndim) if d != cd]
        cmin, cmax = x.amin(dim=dims), x.amax(dim=dims)
        self.channel_min = cmin if self.channel_min is None else torch.minimum(self.channel_min, cmin)
        self.channel_max = cmax if self.channel_max is None else torch.maximum(self.channel_max, cmax)
        if cd == 1 and x.ndim >= 3:  # Conv: (B, C, *spatial) → positions
            t = x.transpose(0, 1).reshape(x.shape[1], x.shape[0], -1)
            tmin, tmax = t.amin(dim=(0, 1)), t.amax(dim=(0, 1))
        elif cd == x.ndim - 1 and x.ndim >= 3:  # Linear: (B, tokens, C)
            t = x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1]) if x.ndim > 3 else x
            tmin, tmax = t.amin(dim=(0, -1)), t.amax(dim=(0, -1))
            if tmin.ndim > 1:
                tmin, tmax = tmin.amin(dim=0), tmax.amax(dim=0)
        else:
            self.tokens_ok = False
            return
        if self.token_min is not None and self.token_min.shape != tmin.shape:
            self.tokens_ok = False
        if not self.tokens_ok:
            return
        self.token_min = tmin if self.token_min is None else torch.minimum(self.token_min, tmin)
        self.token_max = tmax if self.token_max is None else torch.maximum(self.token_max, tmax)

    def fit(self, groups: int) -> GroupRanges:
        tokens = self.tokens_ok and self.token_min is not None
        return fit_groups(self.channel_min.cpu(), self.channel_max.cpu(), groups,
                          self.token_min.cpu() if tokens else None, self.token_max.cpu() if tokens else None)


@dataclass
class _AttnStats:
    """Calibration statistics of one attention module."""

    cross: bool = False
    q: _Stats = field(default_factory=_Stats)
    k: _Stats = field(default_factory=_Stats)
    k_rest: _Stats = field(default_factory=_Stats)
    v: _Stats = field(default_factory=_Stats)
    prob_max: float = 0.0
    key_mass: Any = None
    calls: int = 0


def widened(ranges: GroupRanges, margin: float) -> GroupRanges:
    """``ranges`` with every group widened by ``margin`` times its width at both ends (0: as calibrated)."""
    if margin <= 0:
        return ranges
    width = ranges.high - ranges.low
    return GroupRanges(ranges.axis, ranges.labels, ranges.low - margin * width, ranges.high + margin * width)


# --- the specification ------------------------------------------------------------------------


@dataclass
class AttentionRanges:
    """Quantization of one attention module: static per-tensor q/k/v ranges, the probability
    quantizer and whether the start token is kept exact."""

    cross: bool
    start_token: bool
    q: GroupRanges
    k: GroupRanges
    v: GroupRanges
    prob_max: float
    start_ratio: float


@dataclass
class TimestepInterval:
    """The ranges of one run of sampling timesteps (``intervals`` > 1).

    Attributes:
        timesteps: The calibration calls' distinct timesteps in this interval, in sampling order.
        layers: ``{module name: GroupRanges}`` fitted on these calls; a layer not run in them uses
            the spec's all-step ranges.
        attention: ``{module name: AttentionRanges}`` fitted on these calls (likewise).
    """

    timesteps: tuple[float, ...]
    layers: dict[str, GroupRanges]
    attention: dict[str, AttentionRanges]


def split_timesteps(values: Iterable[float], intervals: int) -> tuple[tuple[float, ...], ...]:
    """The distinct ``values`` in sampling order (highest first), split into ``intervals``
    contiguous runs of near-equal length (fewer when there are fewer distinct values).

    :raises ValueError: ``intervals`` < 1.
    """
    if int(intervals) < 1:
        raise ValueError(f"input 'intervals': expected at least 1, got {intervals}")
    ordered = sorted({float(v) for v in values}, reverse=True)
    count = min(int(intervals), len(ordered))
    if count == 0:
        return ()
    base, extra = divmod(len(ordered), count)
    runs, first = [], 0
    for index in range(count):
        size = base + (1 if index < extra else 0)
        runs.append(tuple(ordered[first:first + size]))
        first += size
    return tuple(runs)


def interval_bounds(runs: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """The timesteps halfway between neighbouring runs (descending): a timestep ``t`` belongs to
    run ``sum(t < b for b in bounds)``."""
    return tuple((runs[i][-1] + runs[i + 1][0]) / 2 for i in range(len(runs) - 1))


def interval_of(timestep: float, bounds: Sequence[float]) -> int:
    """The index of the interval of ``timestep`` given :func:`interval_bounds`."""
    return sum(1 for b in bounds if float(timestep) < b)


@dataclass
class ActivationSpec:
    """Calibrated activation quantization of one denoiser.

    Attributes:
        bits: Activation bit width.
        method: ``"dgq"`` (grouped layer inputs) or ``"per_tensor"`` (one range per input, the baseline).
        groups: Clusters per layer input (1 for ``per_tensor``).
        attention: ``"log"`` (DGQ's prompt-specific log quantizer of the probabilities),
            ``"uniform"`` (uniform on ``[0, calibrated max]``) or ``"off"`` (attention unquantized).
        layers: ``{module name: GroupRanges}`` of the quantized layer inputs.
        attention: ``{module name: AttentionRanges}`` of the quantized attention modules.
        kept: ``{module name: reason}`` of the Linear/Conv layers whose inputs stay unquantized.
        calibration: How it was calibrated (plain data).
        intervals: Time-step intervals with ranges of their own, in sampling order (empty: the
            ``layers``/``attention`` ranges, fitted on all calls, serve every step).
    """

    bits: int
    method: str
    groups: int
    attention_quant: str
    layers: dict[str, GroupRanges]
    attention: dict[str, AttentionRanges]
    kept: dict[str, str]
    calibration: dict[str, Any]
    intervals: tuple[TimestepInterval, ...] = ()

    @property
    def bounds(self) -> tuple[float, ...]:
        """The timesteps between neighbouring intervals (:func:`interval_bounds`)."""
        return interval_bounds([i.timesteps for i in self.intervals])

    def layer_ranges(self, interval: int | None) -> dict[str, GroupRanges]:
        """The layer-input ranges of ``interval`` (``None``: no step known), completed by the all-step ones."""
        if interval is None or not self.intervals:
            return self.layers
        return {**self.layers, **self.intervals[interval].layers}

    def attention_ranges(self, interval: int | None) -> dict[str, AttentionRanges]:
        """The attention quantizers of ``interval`` (``None``: no step known), completed by the all-step ones."""
        if interval is None or not self.intervals:
            return self.attention
        return {**self.attention, **self.intervals[interval].attention}

    def digest(self) -> str:
        """A content hash of the settings and every range."""
        from dagfusion.fingerprint import new_hasher

        h = new_hasher()
        h.update(json.dumps({"bits": self.bits, "method": self.method, "groups": self.groups,
                             "attention": self.attention_quant,
                             "calibration": self.calibration}, sort_keys=True, default=str).encode())

        def ranges(layers: Mapping[str, GroupRanges], attention: Mapping[str, AttentionRanges]) -> None:
            for name in sorted(layers):
                r = layers[name]
                h.update(f"{name}:{r.axis}:{r.low.tolist()}:{r.high.tolist()}\0".encode())
                if r.labels is not None:
                    h.update(str(r.labels.tolist()).encode())
            for name in sorted(attention):
                a = attention[name]
                h.update(f"{name}:{a.cross}:{a.start_token}:{a.prob_max}:{a.q.high.tolist()}:{a.k.low.tolist()}:{a.v.high.tolist()}\0".encode())

        ranges(self.layers, self.attention)
        for interval in self.intervals:  # absent without intervals: earlier specs keep their digests
            h.update(f"interval:{list(interval.timesteps)}\0".encode())
            ranges(interval.layers, interval.attention)
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        """Plain data: settings, counts, how many layer inputs were grouped by channel/token, the
        cross-attention modules with a start-token exception."""
        axes: dict[str, int] = {}
        for r in self.layers.values():
            axes[r.axis] = axes.get(r.axis, 0) + 1
        return {
            "bits": self.bits, "method": self.method, "groups": self.groups,
            "attention": self.attention_quant, "quantized_inputs": len(self.layers), "grouped_by": dict(sorted(axes.items())),
            "attention_modules": len(self.attention),
            "cross_attention_start_token_exact": sorted(n for n, a in self.attention.items() if a.start_token),
            "start_token_ratio": {n: round(a.start_ratio, 2) for n, a in sorted(self.attention.items()) if a.cross},
            "kept_inputs": dict(sorted(self.kept.items())), "calibration": self.calibration,
            "timestep_intervals": [[min(i.timesteps), max(i.timesteps)] for i in self.intervals] or "one set for all steps",
        }


# --- hooks shared by calibration and sampling -------------------------------------------------


def _channel_dim(layer: Any) -> int:
    import torch

    return 1 if isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) else -1


def attention_modules(module: Any) -> dict[str, Any]:
    """``{name: diffusers Attention}`` whose processor this module can replace (standard
    processors, no query/key norms, no added key/value projections)."""
    try:
        from diffusers.models.attention_processor import (
            Attention,
            AttnProcessor,
            AttnProcessor2_0,
        )
    except ImportError:  # pragma: no cover
        return {}
    found = {}
    for name, layer in unwrap_compiled(module).named_modules():
        if not isinstance(layer, Attention):
            continue
        if not isinstance(getattr(layer, "processor", None), (AttnProcessor, AttnProcessor2_0)):
            continue
        if getattr(layer, "norm_q", None) is not None or getattr(layer, "add_k_proj", None) is not None:
            continue
        found[name] = layer
    return found


class _Processor:
    """An attention processor with explicit probabilities: observes (calibration) or quantizes
    with the ranges ``select()`` returns for the current call."""

    def __init__(self, name: str, observe: _AttnStats | None, select: Callable[[], AttentionRanges | None] | None,
                 spec: ActivationSpec | None) -> None:
        self.name, self.observe, self.select, self.spec = name, observe, select, spec

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None,
                 temb: Any = None, *args: Any, **kwargs: Any) -> Any:
        import torch

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        rows = query.shape[0]
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        ranges = self.select() if self.select is not None else None
        if self.observe is not None:
            s = self.observe
            s.cross = s.cross or cross
            s.q.update(query, -1)
            s.k.update(key, -1)
            if key.shape[1] > 1:
                s.k_rest.update(key[:, 1:], -1)
            s.v.update(value, -1)
        elif ranges is not None and self.spec is not None:
            r, bits = ranges, self.spec.bits
            query = quantize_grouped(query, r.q, bits, -1)
            if r.start_token and key.shape[1] > 1:
                key = torch.cat([key[:, :1], quantize_grouped(key[:, 1:], r.k, bits, -1)], dim=1)
            else:
                key = quantize_grouped(key, r.k, bits, -1)
            value = quantize_grouped(value, r.v, bits, -1)
        probs = attn.get_attention_scores(query, key, attention_mask)
        if self.observe is not None:
            s = self.observe
            s.prob_max = max(s.prob_max, float(probs.max()))
            if cross and probs.shape[-1] > 1:
                mass = probs.float().reshape(-1, probs.shape[-1]).mean(dim=0)
                if s.key_mass is None or s.key_mass.shape != mass.shape:
                    s.key_mass = mass if s.key_mass is None else s.key_mass
                else:
                    s.key_mass = s.key_mass + mass
                s.calls += 1
        elif ranges is not None and self.spec is not None:
            r, bits = ranges, self.spec.bits
            grouped = probs.reshape(rows, -1, *probs.shape[1:])
            if self.spec.attention_quant == "log":
                grouped = log_quantize(grouped.float(), bits, keep_first=r.start_token and probs.shape[-1] > 1)
            else:
                top = torch.tensor(max(r.prob_max, 1e-8), device=probs.device)
                grouped = fake_quant_uniform(grouped.float(), torch.zeros_like(top), top, bits)
            probs = grouped.reshape(probs.shape).to(value.dtype)
        out = torch.bmm(probs, value)
        out = attn.batch_to_head_dim(out)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def _installed(module: Any, hooks: Mapping[str, Callable[..., Any]], processors: Mapping[str, Any]) -> Iterator[Any]:
    """Forward pre-hooks on the named layers and attention processors, removed/restored on exit."""
    inner = unwrap_compiled(module)
    handles = []
    saved: dict[str, Any] = {}
    try:
        for name, hook in hooks.items():
            handles.append(inner.get_submodule(name).register_forward_pre_hook(hook))
        for name, processor in processors.items():
            attn = inner.get_submodule(name)
            saved[name] = attn.processor
            attn.processor = processor
        yield module
    finally:
        for handle in handles:
            handle.remove()
        for name, processor in saved.items():
            inner.get_submodule(name).processor = processor


def _input_hook(fn: Callable[[Any], Any]) -> Callable[..., Any]:
    def hook(layer: Any, args: tuple[Any, ...]) -> Any:
        if not args:
            return None
        return (fn(args[0]), *args[1:])

    return hook


# --- calibration ------------------------------------------------------------------------------


def calibrate_activations(
    module: Any,
    calls: Sequence[Any],
    *,
    bits: int = 8,
    method: str = "dgq",
    groups: int = 8,
    attention: str | None = None,
    start_token: str = "auto",
    keep: Iterable[str] = DEFAULT_KEEP,
    min_params: int = DEFAULT_MIN_PARAMS,
    margin: float = 0.0,
    calibration: Mapping[str, Any] | None = None,
    intervals: int = 1,
) -> ActivationSpec:
    """Run ``calls`` (recorded denoiser calls, :func:`~dagfusion.nodes.quant.calibration.record_calls`)
    through ``module`` as it is now (apply any weight quantization around this call) and fit the
    ranges. Never changes ``module``.

    :param attention: ``"log"``, ``"uniform"`` or ``"off"`` (see :class:`ActivationSpec`);
        ``None``: ``"log"`` for ``dgq``, ``"uniform"`` for ``per_tensor``.
    :param intervals: Time-step intervals with ranges of their own (see the module docstring);
        fewer when the calls have fewer distinct timesteps; 1: one set for all steps.
    :raises ValueError: an unknown ``method``/``attention``/``start_token``, ``bits`` outside 2..16,
        ``groups`` < 1, ``intervals`` < 1, or no calls.
    """
    if method not in METHODS:
        raise ValueError(f"input 'method': expected one of {list(METHODS)}, got {method!r}")
    if attention is None:
        attention = "log" if method == "dgq" else "uniform"
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"input 'attention': expected one of {list(ATTENTION_CHOICES)}, got {attention!r}")
    if start_token not in START_TOKEN_CHOICES:
        raise ValueError(f"input 'start_token': expected one of {list(START_TOKEN_CHOICES)}, got {start_token!r}")
    if not 2 <= int(bits) <= 16:
        raise ValueError(f"input 'bits': expected 2 to 16, got {bits}")
    if int(groups) < 1:
        raise ValueError(f"input 'groups': expected at least 1, got {groups}")
    if not calls:
        raise ValueError("input 'conditioning': the calibration run recorded no denoiser calls")
    runs = split_timesteps((call.timestep_value for call in calls), intervals)  # refuses intervals < 1
    patterns = tuple(keep)
    plan = plan_layers(module, patterns, min_params)
    effective = 1 if method == "per_tensor" else int(groups)

    def fitted(subset: Sequence[Any]) -> tuple[dict[str, GroupRanges], dict[str, AttentionRanges]]:
        stats, attn_stats = _observe(module, subset, plan.quantize, attention != "off")
        return ({name: widened(s.fit(effective), margin) for name, s in stats.items() if s.channel_min is not None},
                _fit_attention(attn_stats, attention, start_token))

    layers, modules = fitted(calls)
    kept = dict(plan.kept)
    for name in plan.quantize:
        if name not in layers:
            kept[name] = "not run during calibration"
    parts: list[TimestepInterval] = []
    if len(runs) > 1:
        for run in runs:
            members = set(run)
            parts.append(TimestepInterval(run, *fitted([c for c in calls if float(c.timestep_value) in members])))
    return ActivationSpec(int(bits), method, effective, attention, layers, modules, kept, dict(calibration or {}),
                          tuple(parts))


def _observe(module: Any, calls: Sequence[Any], names: Iterable[str], attention: bool) -> tuple[dict[str, _Stats], dict[str, _AttnStats]]:
    """Run ``calls`` through ``module`` and collect the statistics of the named layer inputs and
    (``attention``) of the replaceable attention modules."""
    import torch
    from dagfusion.model import family_for

    inner = unwrap_compiled(module)
    stats = {name: _Stats() for name in names}
    dims = {name: _channel_dim(inner.get_submodule(name)) for name in stats}
    attn_stats = {name: _AttnStats() for name in attention_modules(module)} if attention else {}

    def observer(name: str) -> Callable[[Any], Any]:
        def fn(x: Any) -> Any:
            stats[name].update(x, dims[name])
            return x

        return fn

    hooks = {name: _input_hook(observer(name)) for name in stats}
    processors = {name: _Processor(name, s, None, None) for name, s in attn_stats.items()}
    family = family_for(module)
    with torch.no_grad(), _installed(module, hooks, processors):
        for call in calls:
            family.call(module, call.sample, call.timestep, dict(call.kwargs))
    return stats, attn_stats


def _fit_attention(attn_stats: Mapping[str, _AttnStats], attention: str, start_token: str) -> dict[str, AttentionRanges]:
    modules: dict[str, AttentionRanges] = {}
    for name, s in attn_stats.items():
        if s.q.channel_min is None:
            continue
        ratio = 0.0
        if s.key_mass is not None and float(s.key_mass[1:].max()) > 0:
            ratio = float(s.key_mass[0] / s.key_mass[1:].max())
        peak = s.cross and attention == "log" and (start_token == "on" or (start_token == "auto" and ratio > START_PEAK_RATIO))
        k = s.k_rest if peak and s.k_rest.channel_min is not None else s.k
        modules[name] = AttentionRanges(s.cross, bool(peak), s.q.fit(1), k.fit(1), s.v.fit(1), s.prob_max, ratio)
    return modules


# --- the patch --------------------------------------------------------------------------------


_CALL_TIMESTEP: contextvars.ContextVar[float | None] = contextvars.ContextVar("dagfusion_activation_timestep", default=None)
"""The timestep of the denoiser call running now, set by :class:`_StepClock` while sampling."""


class _StepClock(StepHook):
    """Makes each denoiser call's timestep known to the quantizers of a spec with intervals."""

    def denoise(self, call: Any, forward: Any) -> Any:
        token = _CALL_TIMESTEP.set(call.step.timestep_value)
        try:
            return forward(call)
        finally:
            _CALL_TIMESTEP.reset(token)


class ActivationQuantPatch(ModelPatch):
    """Fake-quantizes the selected layers' inputs and the attention of a denoiser while sampling.

    ``apply(module)`` installs forward pre-hooks and attention processors and removes them on
    exit (also after an error): the module is the same objects with the same values afterwards.
    Place it on a handle after the weight-quantization patch (either order works: this patch
    changes no parameter). With time-step intervals, ``begin`` returns a step hook that tells the
    quantizers each call's timestep; a call outside a sampling run uses the all-step ranges.
    """

    def __init__(self, spec: ActivationSpec) -> None:
        self.spec = spec
        self.key = KEY_PREFIX + spec.digest()

    def begin(self, run: Any) -> StepHook | None:
        return _StepClock() if self.spec.intervals else None

    def apply(self, module: Any) -> contextlib.AbstractContextManager[Any]:
        inner = unwrap_compiled(module)
        spec = self.spec
        bounds = spec.bounds
        layer_sets = [spec.layer_ranges(i) for i in range(len(spec.intervals))]
        attention_sets = [spec.attention_ranges(i) for i in range(len(spec.intervals))]

        def interval() -> int | None:
            timestep = _CALL_TIMESTEP.get()
            return None if timestep is None or not spec.intervals else interval_of(timestep, bounds)

        def quantizer(name: str, dim: int) -> Callable[[Any], Any]:
            def fn(x: Any) -> Any:
                index = interval()
                ranges = spec.layers[name] if index is None else layer_sets[index][name]
                return quantize_grouped(x, ranges, spec.bits, dim)

            return fn

        def selector(name: str) -> Callable[[], AttentionRanges | None]:
            def select() -> AttentionRanges | None:
                index = interval()
                return spec.attention[name] if index is None else attention_sets[index][name]

            return select

        hooks = {name: _input_hook(quantizer(name, _channel_dim(inner.get_submodule(name)))) for name in spec.layers}
        processors = {name: _Processor(name, None, selector(name), spec) for name in spec.attention}
        return _installed(module, hooks, processors)

    def __repr__(self) -> str:
        intervals = f", {len(self.spec.intervals)} timestep intervals" if self.spec.intervals else ""
        return (f"ActivationQuantPatch({self.spec.method}, A{self.spec.bits}, {len(self.spec.layers)} inputs, "
                f"{len(self.spec.attention)} attention{intervals})")
