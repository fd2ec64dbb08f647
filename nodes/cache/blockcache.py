"""Block caching for diffusion transformers: reuse the residual of a span of transformer blocks.

The transformer counterpart of DeepCache. A DiT or PixArt denoiser is a stack of blocks on a
residual stream; the *change* a span of blocks ``start … end-1`` makes to that stream,
``Δ = h_end - h_start``, varies slowly from one sampling step to the next (Δ-DiT, Chen et al.
2024, caches exactly this deviation rather than the blocks' output). So:

- on a **full** step every block runs and ``Δ`` of the span is cached;
- on a **partial** step the blocks before the span run, the span is replaced by
  ``h_start + Δ_cached`` (optionally corrected, ``a ⊙ Δ + b`` per channel, by CacheQuant's
  decoupled error correction), and the blocks after it run.

Which span is cached may depend on the step: Δ-DiT caches the *back* blocks in the early steps
(which shape the outline) and the *front* blocks in the late steps (which refine details),
switching at a boundary step. :func:`spans_for` builds such a per-step span list.

Mechanics: nothing changes on the module outside a denoiser call. For each call the hook swaps
the ``forward`` of the span's blocks for the capturing or the reusing version (instance
attributes, removed right after the call, also after an error), calls the rest of the chain
(inner hooks and the denoiser, which runs its own ``forward`` code unchanged), and keeps the
captured ``Δ``. The swapped forwards act only for calls from the sampling thread. Inner hooks run
on every step (the denoiser is called every step; only the span's blocks are skipped). A call
whose batch layout differs from the cached one runs in full.

The settings are one frozen :class:`BlockCacheConfig` (its fields form the patch's key). MACs
of one full and one partial call per batch layout are counted
(:func:`~dagfusion.model.count_macs`) and the hook's ``end()`` returns the run's statistics,
which the sampler puts into the run's report under the patch's key.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from dagfusion import INT, STRING, Input, NodeInputError, Output, Problem, RunContext, node
from dagfusion.model import CallCosts, DenoiserCall, Forward, ModelPatch, SamplingRun, StepHook, call_layout, unwrap_compiled
from dagfusion.nodes.cache import schedules
from dagfusion.nodes.cache.checks import enforce
from dagfusion.nodes.cache.stats import FeatureCacheStats, call_stats
from dagfusion.nodes.diffusion.types import MODEL

Span = tuple[int, int]
"""``(start, end)``: blocks ``start … end - 1`` of ``transformer_blocks``."""


def blocks_of(module: Any) -> Any:
    """The ``transformer_blocks`` of the DiT/PixArt denoiser behind ``module`` (through ``torch.compile``).

    :raises TypeError: naming the class, for UNets and denoisers without ``transformer_blocks``.
    """
    inner = unwrap_compiled(module)
    names = {cls.__name__ for cls in type(inner).__mro__}
    if any("UNet" in name for name in names):
        raise TypeError(
            f"block caching works on diffusion transformers (DiT, PixArt); this model's denoiser is a "
            f"{type(inner).__name__}, a UNet: use dagfusion.cache.DeepCache"
        )
    blocks = getattr(inner, "transformer_blocks", None)
    if blocks is None or len(blocks) < 2:
        raise TypeError(
            f"block caching needs a transformer denoiser with at least 2 transformer_blocks (DiT, PixArt); "
            f"this model's denoiser is a {type(inner).__name__}"
        )
    return blocks


def check_span(span: Span, count: int) -> None:
    """:raises ValueError: unless ``0 <= start < end <= count`` and the span leaves at least one block to run."""
    start, end = span
    if not 0 <= start < end <= count:
        raise ValueError(
            f"block span {start}-{end} is out of range: this transformer has {count} blocks, so a span is "
            f"start-end with 0 <= start < end <= {count}"
        )
    if end - start >= count:
        raise ValueError(f"block span {start}-{end} covers all {count} blocks: keep at least one block computing")


def parse_span(text: str, count: int | None = None, what: str = "span") -> Span:
    """``"1-7"`` -> ``(1, 7)`` (end exclusive); ``"1:7"`` also works.

    :raises ValueError: naming ``what``, on text that is not two integers.
    """
    cleaned = text.replace(":", "-").replace(" ", "")
    parts = cleaned.split("-")
    try:
        if len(parts) != 2:
            raise ValueError
        span = (int(parts[0]), int(parts[1]))
    except ValueError:
        raise ValueError(f"{what}: expected 'start-end' block indices like '1-7' (end exclusive), got {text!r}") from None
    if count is not None:
        check_span(span, count)
    return span


def spans_for(steps: int, early: Span, late: Span | None = None, boundary: int | None = None) -> list[Span]:
    """The cached span of each of ``steps`` steps: ``early`` before ``boundary``, ``late`` from it on."""
    if late is None or boundary is None:
        return [early] * steps
    return [early if index < boundary else late for index in range(steps)]


# --- swapping the span's forwards ---------------------------------------------------------------


@contextlib.contextmanager
def _swapped(blocks: Any, forwards: dict[int, Callable[..., Any]]) -> Iterator[None]:
    """Install ``forwards`` as instance ``forward`` of the given blocks; restore exactly on exit."""
    saved: list[tuple[Any, Any]] = []
    try:
        for index, fn in forwards.items():
            block = blocks[index]
            saved.append((block, block.__dict__.get("forward")))
            block.forward = fn
        yield
    finally:
        for block, previous in reversed(saved):
            if previous is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = previous


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs["hidden_states"]


def capturing(blocks: Any, span: Span, into: dict[str, Any], transform: Callable[[Any], Any] | None = None
              ) -> contextlib.AbstractContextManager[None]:
    """Blocks that record the span's input (``into["input"]``) and output (``into["output"]``)
    when called from this thread, computing as usual — or, with ``transform``, continuing from
    ``input + transform(output - input)`` (CacheQuant's quantization-error correction; the
    recorded output stays the computed one)."""
    start, end = span
    owner = threading.get_ident()
    first, last = blocks[start], blocks[end - 1]
    first_forward, last_forward = first.forward, last.forward  # what runs now (another patch's, or the class's)

    def finish(out: Any) -> Any:
        into["output"] = out
        if transform is None or "input" not in into:
            return out
        return into["input"] + transform(out - into["input"])

    def first_fn(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == owner:
            into["input"] = _hidden(args, kwargs)
        out = first_forward(*args, **kwargs)
        if start == end - 1 and threading.get_ident() == owner:
            return finish(out)
        return out

    def last_fn(*args: Any, **kwargs: Any) -> Any:
        out = last_forward(*args, **kwargs)
        if threading.get_ident() == owner:
            return finish(out)
        return out

    forwards = {start: first_fn}
    if end - 1 != start:
        forwards[end - 1] = last_fn
    return _swapped(blocks, forwards)


def capture_delta(blocks: Any, span: Span, run: Callable[[], Any], transform: Callable[[Any], Any] | None = None
                  ) -> tuple[Any, Any]:
    """``run()`` with the change the span makes to the residual stream captured (the transformer
    twin of :func:`~dagfusion.nodes.cache.deepcache.capture_deep_feature`).

    :param transform: As for :func:`capturing`; the *untransformed* change is returned.
    :returns: ``(what run() returned, Δ = output - input of the span, or None when the span did not run)``.
    """
    into: dict[str, Any] = {}
    with capturing(blocks, span, into, transform):
        out = run()
    if "input" not in into or "output" not in into:
        return out, None
    return out, into["output"] - into["input"]


def reusing(blocks: Any, span: Span, delta: Any) -> contextlib.AbstractContextManager[None]:
    """Blocks whose span returns ``input + delta`` without computing (for calls from this thread)."""
    start, end = span
    owner = threading.get_ident()
    forwards: dict[int, Callable[..., Any]] = {}
    for index in range(start, end):
        block = blocks[index]
        original = block.forward

        def fn(*args: Any, _original: Any = original, _first: bool = index == start, **kwargs: Any) -> Any:
            if threading.get_ident() != owner:
                return _original(*args, **kwargs)
            hidden = _hidden(args, kwargs)
            return hidden + delta.to(hidden.dtype) if _first else hidden

        forwards[index] = fn
    return _swapped(blocks, forwards)


# --- the patch and its per-run hook -------------------------------------------------------------

Correction = Callable[[int, Any], Any]
"""``correct(step index, cached Δ) -> the Δ to use`` on a partial step."""


@dataclass(frozen=True)
class BlockCacheConfig:
    """Block-cache settings (see the module docstring); the fields form the patch's key.

    Attributes:
        span: The cached span ``(start, end)``.
        interval: A full step every ``interval`` steps (uniform schedule; unused with ``full_steps``).
        late_span, boundary: From step ``boundary`` on, ``late_span`` is cached (Δ-DiT's
            stage-dependent caching); ``None``: ``span`` throughout.
        full_steps: Full-step indices (explicit schedule; empty: uniform).

    :raises ValueError: ``interval`` below 1, or ``late_span`` without a ``boundary``.
    """

    span: Span
    interval: int = 2
    late_span: Span | None = None
    boundary: int | None = None
    full_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval must be at least 1, got {self.interval}")
        set_ = object.__setattr__
        set_(self, "span", (int(self.span[0]), int(self.span[1])))
        late = None if self.late_span is None else (int(self.late_span[0]), int(self.late_span[1]))
        set_(self, "late_span", late)
        set_(self, "boundary", None if self.boundary is None or late is None else int(self.boundary))
        set_(self, "full_steps", tuple(sorted({int(i) for i in self.full_steps})))
        if late is not None and self.boundary is None:
            raise ValueError("late_span needs a boundary: the step where it takes over")

    def plan(self, steps: int) -> list[bool]:
        """Which of ``steps`` steps run in full."""
        if self.full_steps:
            return schedules.full_steps("explicit", steps, explicit=self.full_steps)
        return schedules.full_steps("uniform", steps, self.interval)

    def spans(self, steps: int) -> list[Span]:
        """The cached span of each step."""
        return spans_for(steps, self.span, self.late_span, self.boundary)


class BlockCachePatch(ModelPatch):
    """Block caching attached to a model handle (see the module docstring).

    Subclasses change :meth:`plan` and :meth:`corrections` (CacheQuant).

    Attributes:
        config: The settings (:class:`BlockCacheConfig`; the key is made of its fields).
        measure: Count MACs (reporting only, not part of the key).
    """

    def __init__(self, config: BlockCacheConfig, *, measure: bool = True) -> None:
        if not isinstance(config, BlockCacheConfig):
            raise TypeError(f"BlockCachePatch takes a BlockCacheConfig, got {type(config).__name__}")
        self.config = config
        self.measure = bool(measure)

    def plan(self, steps: int) -> list[bool]:
        """Which of ``steps`` steps run in full."""
        return self.config.plan(steps)

    def spans(self, steps: int) -> list[Span]:
        """The cached span of each step."""
        return self.config.spans(steps)

    def corrections(self, run: SamplingRun) -> tuple[Correction | None, Correction | None]:
        """``(correct, correct_full)`` for :class:`BlockCacheHook`: how a cached Δ is corrected before
        reuse, and how the span's Δ is corrected on *every* step (after ``correct`` on reused ones);
        ``None``: not at all (CacheQuant's patch gives its calibrated corrections)."""
        return None, None

    def begin(self, run: SamplingRun) -> BlockCacheHook:
        blocks = blocks_of(run.module)
        spans = self.spans(run.steps)
        for span in set(spans):
            check_span(span, len(blocks))
        inner = unwrap_compiled(run.module)
        correct, correct_full = self.corrections(run)
        return BlockCacheHook(blocks, self.plan(run.steps), spans, CallCosts(inner, self.measure and inner is run.module),
                              correct=correct, correct_full=correct_full)


class BlockCacheHook(StepHook):
    """The per-run state of a :class:`BlockCachePatch`: the cached Δ and the run's statistics.

    :param correct: ``correct(step, cached Δ) -> Δ to use`` on reused steps, or ``None``.
    :param correct_full: ``correct_full(step, Δ) -> Δ`` on every step (after ``correct``), or ``None``.
    """

    def __init__(self, blocks: Any, plan: list[bool], spans: list[Span], costs: CallCosts, *,
                 correct: Correction | None = None, correct_full: Correction | None = None) -> None:
        self._blocks = blocks
        self._plan = plan
        self._spans = spans
        self._correct = correct
        self._correct_full = correct_full
        self._costs = costs
        self._cache: tuple[Any, Span, Any] | None = None  # (batch layout, span, Δ)
        self._calls: list[tuple[int, str, Any]] = []

    def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
        index = call.step.index
        inside = 0 <= index < len(self._plan)
        full = self._plan[index] if inside else True
        span = self._spans[index] if inside else self._spans[-1]
        layout = call_layout(call)
        fix, fix_full = self._correct, self._correct_full
        if not full and self._cache is not None and self._cache[0] == layout and self._cache[1] == span:
            delta = self._cache[2]
            if fix is not None:
                delta = fix(index, delta)
            if fix_full is not None:
                delta = fix_full(index, delta)

            def partial() -> Any:
                with reusing(self._blocks, span, delta):
                    return forward(call)

            out = self._costs.run("partial", layout, partial)
            self._calls.append((index, "partial", layout))
            return out
        transform = None if fix_full is None else (lambda d: fix_full(index, d))
        out, delta = self._costs.run(
            "full", layout, lambda: capture_delta(self._blocks, span, lambda: forward(call), transform)
        )
        # A change of another batch (an inner hook changed the call) cannot be reused.
        self._cache = (layout, span, delta.detach()) if delta is not None and delta.shape[0] == call.sample.shape[0] else None
        self._calls.append((index, "full", layout))
        return out

    def end(self) -> FeatureCacheStats:
        """This run's :class:`~dagfusion.nodes.cache.stats.FeatureCacheStats`; frees the cached Δ."""
        self._cache = None
        return call_stats(self._calls, self._plan, self._costs)


# --- the node -----------------------------------------------------------------------------------


def _example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.pixart_handles()["model"], "interval": 2, "span": "0-1"}


def _delta_dit_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.dit_model(), "interval": 2, "span": "1-2", "late_span": "0-1", "boundary": 2}


def check_inputs(values: Mapping[str, Any]) -> Iterator[Problem]:
    """The spans are ``'start-end'`` with ``start < end`` (the model's block count is checked when the
    node runs), and a ``late_span`` comes with a ``boundary`` of at least 1."""
    for name in ("span", "late_span"):
        text = values.get(name)
        if not isinstance(text, str) or not text.strip():
            continue
        try:
            start, end = parse_span(text, None, name)
        except ValueError as exc:
            yield Problem("bad-span", str(exc), input=name)
            continue
        if not 0 <= start < end:
            yield Problem("bad-span", f"{name}: block span {start}-{end} needs 0 <= start < end", input=name)
    late, boundary = values.get("late_span"), values.get("boundary")
    if isinstance(late, str) and late.strip() and isinstance(boundary, int) and boundary < 1:
        yield Problem(
            "missing-boundary",
            "boundary must be at least 1 when late_span is given (the step where late_span takes over)",
            input="boundary",
        )


@node(
    "dagfusion.cache.BlockCache",
    version="1.1.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="A diffusion transformer (DiT, PixArt)."),
        Input("interval", INT, 2, min=1, max=1000, description="A full step every N steps; the span is reused in between."),
        Input("span", STRING, "", description="Blocks whose residual is cached, 'start-end' (end exclusive), e.g. '1-27'; "
                                              "empty: all but the first and the last block."),
        Input("late_span", STRING, "", description="Δ-DiT: the span cached from 'boundary' on (e.g. the front blocks); "
                                                   "empty: 'span' throughout."),
        Input("boundary", INT, 0, min=0, max=10000, description="Δ-DiT: the step where 'late_span' takes over."),
    ],
    outputs=[Output("model", MODEL, "The model with block caching applied while sampling.")],
    examples=[_example, _delta_dit_example],
    ui={"color": "#26a69a"},
    check=check_inputs,
)
def block_cache(ctx: RunContext, model: Any, interval: int, span: str, late_span: str, boundary: int) -> Any:
    """Speed up a DiT/PixArt by reusing the residual of a span of transformer blocks between full steps.

    On full steps every block runs and the change the span makes to the residual stream is
    cached; in between, the span is replaced by that cached change (Δ-DiT's block caching). With
    'late_span' and 'boundary', the back blocks can be cached in the early steps and the front
    blocks in the late ones, as Δ-DiT does. Compare against the plain model with the same seed
    (dagfusion.metrics.Fidelity).
    """
    enforce(check_inputs, {"span": span, "late_span": late_span, "boundary": boundary})
    try:
        count = len(blocks_of(model.denoiser))
    except TypeError as exc:
        raise NodeInputError("model", str(exc)) from None
    try:
        early = parse_span(span, count, "span") if span.strip() else (1, count - 1)
        if not span.strip():
            check_span(early, count)
    except ValueError as exc:
        raise NodeInputError("span", str(exc)) from None
    try:
        late = parse_span(late_span, count, "late_span") if late_span.strip() else None
    except ValueError as exc:
        raise NodeInputError("late_span", str(exc)) from None
    config = BlockCacheConfig(span=early, interval=interval, late_span=late, boundary=boundary if late is not None else None)
    return model.with_patch(BlockCachePatch(config))


NODES = (block_cache,)
"""The nodes of this module."""
