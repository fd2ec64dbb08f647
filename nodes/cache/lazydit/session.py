"""The LazyDiT controller: what applying the gates installs, and the sessions that drive them.

:func:`installed` swaps every gated module's ``forward`` for one that asks the module's
:class:`LazyController` for its active :class:`LazySession`; :func:`controller` is how an
objective finds the controller of the module it trains.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dagfusion.model import unwrap_compiled
from dagfusion.nodes.cache.lazydit.gates import KINDS, MODES, check_architecture, pool, transformer_of

if TYPE_CHECKING:
    from dagfusion.nodes.cache.lazydit.patch import LazyGates

_CONTROLLERS: weakref.WeakKeyDictionary[Any, LazyController] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def controller(module: Any) -> LazyController:
    """The :class:`LazyController` of ``module`` while a :class:`LazyGates` patch is applied to it.

    :raises ValueError: the module carries no applied gates (explaining how to add them).
    """
    for candidate in (module, unwrap_compiled(module)):
        with contextlib.suppress(TypeError):
            found = _CONTROLLERS.get(candidate)
            if found is not None:
                return found
    raise ValueError(
        "this denoiser has no LazyDiT gates applied: add them with dagfusion.cache.LazyDiTGates (or "
        "LoadLazyGates) before training or sampling with LazyDiT"
    )


class LazyController:
    """The gates of one applied :class:`LazyGates` patch, and which session drives them.

    Attributes:
        patch: The patch (its ``gates`` hold the parameters).
        slots: ``[(block index, kind)]`` in the order the modules run.
    """

    def __init__(self, patch: LazyGates, blocks: Any) -> None:
        self.patch = patch
        self.slots = [(i, kind) for i in range(len(blocks)) for kind in KINDS]
        self._session: LazySession | None = None
        self._owner: int | None = None
        self._moved: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    @contextlib.contextmanager
    def session(self, session: LazySession | None = None) -> Iterator[LazySession]:
        """Make ``session`` (a new one by default) drive the gates on this thread for the block.

        Other threads calling the module meanwhile see the plain model.
        """
        session = session if session is not None else LazySession()
        previous = (self._session, self._owner)
        self._session, self._owner = session, threading.get_ident()
        try:
            yield session
        finally:
            self._session, self._owner = previous

    def active(self) -> LazySession | None:
        """The session driving the gates, if one does on this thread."""
        session = self._session
        if session is None or self._owner != threading.get_ident():
            return None
        return session

    def score(self, slot: tuple[int, str], hidden: Any, step: Any = None) -> Any:
        """The lazy score ``(B,)`` of ``slot`` for the module input ``hidden`` (float32; differentiable
        in the gate parameters when they live on ``hidden``'s device).

        :param step: Which gate row scores (per-step gates): ``None`` or an int for every batch
            row, or a ``(B,)`` integer tensor, one per row. ``None`` is row 0 (step-independent gates).
        """
        return self.score_pooled(slot, pool(hidden), step)

    def score_pooled(self, slot: tuple[int, str], pooled: Any, step: Any = None) -> Any:
        """:meth:`score` of an input already pooled over its tokens (``(B, D)`` float32)."""
        import torch

        index, kind = slot
        layer = self.patch.gates[kind][index]
        weight, bias = layer.weight, layer.bias
        if weight.device != pooled.device:
            key = (index, kind, str(pooled.device))
            moved = self._moved.get(key)
            if moved is None:
                moved = self._moved[key] = (weight.detach().to(pooled.device), bias.detach().to(pooled.device))
            weight, bias = moved
        with torch.autocast(pooled.device.type, enabled=False):
            if isinstance(step, torch.Tensor):
                rows = step.to(weight.device).long()
                logits = (pooled * weight[rows].float()).sum(-1) + bias[rows].float()
            else:
                row = 0 if step is None else int(step)
                logits = torch.nn.functional.linear(pooled, weight[row:row + 1].float(), bias[row:row + 1].float()).squeeze(-1)
        return torch.sigmoid(logits)


def input_layout(hidden: Any) -> tuple[Any, ...]:
    """Shape, dtype and device of a module input: a cached output is reused only for the same layout."""
    return (tuple(hidden.shape), str(hidden.dtype), str(hidden.device))


def take_rows(value: Any, keep: Any, rows: int) -> Any:
    """``value[keep]`` when ``value`` is a tensor with ``rows`` batch rows, else ``value`` unchanged."""
    import torch

    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows:
        return value[keep]
    return value


class LazySession:
    """What the gated modules do, and what they remember, for one training step or sampling run.

    Attributes:
        mode: One of :data:`MODES` (set with :meth:`using`).
        cache: ``{slot: (input layout, output)}``: the last output of each module.
        soft: The scores ``(B,)`` of the ``"soft"`` calls, in call order (with gradients).
        gate_step: Which row of per-step gates scores: ``None`` (row 0), an int, or a ``(B,)``
            integer tensor (one per batch row; see :meth:`LazyController.score`).
    """

    def __init__(self) -> None:
        self.mode = "off"
        self.gate_step: Any = None
        self.cache: dict[tuple[int, str], tuple[Any, Any]] = {}
        self.soft: list[Any] = []

    @contextlib.contextmanager
    def using(self, mode: str) -> Iterator[LazySession]:
        """Run the block with the gated modules in ``mode`` (one of :data:`MODES`)."""
        if mode not in MODES:
            raise ValueError(f"unknown LazyDiT mode {mode!r}; expected one of {list(MODES)}")
        previous = self.mode
        self.mode = mode
        try:
            yield self
        finally:
            self.mode = previous

    def soft_scores(self) -> Any:
        """The ``"soft"`` calls' scores stacked: ``(modules, B)``.

        :raises RuntimeError: no module ran in ``"soft"`` mode.
        """
        import torch

        if not self.soft:
            raise RuntimeError("no gated module ran in 'soft' mode in this session")
        return torch.stack(self.soft)

    def run(self, ctl: LazyController, slot: tuple[int, str], original: Any, hidden: Any, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> Any:
        """The output of the module at ``slot`` for this call, in the session's mode."""
        mode = self.mode
        if mode == "fill":
            out = original(hidden, *args, **kwargs)
            self.cache[slot] = (input_layout(hidden), out.detach())
            return out
        if mode == "soft":
            entry = self.cache.get(slot)
            if entry is None or entry[0] != input_layout(hidden):
                raise RuntimeError(
                    "LazyDiT 'soft' mode mixes with the previous step's outputs: run the model in 'fill' mode on a "
                    "batch of the same shape first, in the same session"
                )
            score = ctl.score(slot, hidden, self.gate_step)
            self.soft.append(score)
            out = original(hidden, *args, **kwargs)
            s = score.to(out.dtype).reshape(-1, *([1] * (out.ndim - 1)))
            return s * entry[1] + (1 - s) * out
        if mode == "hard":
            return self.hard(ctl, slot, original, hidden, args, kwargs)
        return original(hidden, *args, **kwargs)

    def hard(self, ctl: LazyController, slot: tuple[int, str], original: Any, hidden: Any, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        """``"hard"`` mode: computed here for sessions without a skipping rule (see :class:`LazyDiTHook`)."""
        out = original(hidden, *args, **kwargs)
        self.cache[slot] = (input_layout(hidden), out)
        return out


def _gated_forward(ctl: LazyController, slot: tuple[int, str], original: Any) -> Any:
    def forward(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        session = ctl.active()
        if session is None or session.mode == "off":
            return original(hidden_states, *args, **kwargs)
        return session.run(ctl, slot, original, hidden_states, args, kwargs)

    forward.__dagfusion_lazydit__ = slot  # type: ignore[attr-defined]
    return forward


@contextlib.contextmanager
def installed(patch: LazyGates, module: Any) -> Iterator[LazyController]:
    """Gate ``module``'s blocks with ``patch`` for the block; restore every ``forward`` on exit."""
    inner = transformer_of(module)
    check_architecture(patch.arch, module)
    blocks = list(inner.transformer_blocks)
    chunked = [i for i, b in enumerate(blocks) if getattr(b, "_chunk_size", None) is not None]
    if chunked:
        raise ValueError(
            f"feed-forward chunking is enabled on blocks {chunked}; LazyDiT gates whole feed-forward calls: "
            "disable it (module.disable_forward_chunking()) to use LazyDiT"
        )
    ctl = LazyController(patch, blocks)
    keys = [m for m in dict.fromkeys((module, inner))]
    with _REGISTRY_LOCK:
        if any(k in _CONTROLLERS for k in keys):
            raise RuntimeError(
                "this denoiser already has LazyDiT gates applied (a run is using it, or the model carries two "
                "gate sets); a model takes one LazyDiT gate set at a time"
            )
        for k in keys:
            _CONTROLLERS[k] = ctl
    saved: list[tuple[Any, bool, Any]] = []
    try:
        for index, block in enumerate(blocks):
            for kind, sub in (("attn", block.attn1), ("mlp", block.ff)):
                had = "forward" in sub.__dict__
                saved.append((sub, had, sub.__dict__.get("forward")))
                object.__setattr__(sub, "forward", _gated_forward(ctl, (index, kind), sub.forward))
        yield ctl
    finally:
        for sub, had, previous in reversed(saved):
            if had:
                object.__setattr__(sub, "forward", previous)
            else:
                sub.__dict__.pop("forward", None)
        with _REGISTRY_LOCK:
            for k in keys:
                if _CONTROLLERS.get(k) is ctl:
                    del _CONTROLLERS[k]
