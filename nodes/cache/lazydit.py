"""LazyDiT for diffusion transformers: learned gates that reuse a module's output of the previous step.

LazyDiT (Shen et al., "LazyDiT: Lazy Learning for the Acceleration of Diffusion Transformers",
AAAI 2025) observes that the outputs of a transformer block's attention and MLP change little
between consecutive sampling steps, and *learns* where they can be reused. Every block gets two
**lazy gates**, one in front of the self-attention module (``attn1``) and one in front of the
feed-forward module (``ff``) of a diffusers ``BasicTransformerBlock``. A gate reads what enters
its module — the *modulated input*, after the adaLN shift/scale that carries the timestep and
conditioning, so the gate's decision depends on the step through its input — averages it over
the tokens and scores it with a linear layer and a sigmoid::

    s = sigmoid(w · mean_tokens(x) + b)        # one score per batch row: how lazy to be

``s`` near 1 means "this module's output is almost the one of the previous step: reuse it".
The reused value is the module's raw output (before the block multiplies it by its adaLN gate
and adds it to the residual stream), as in the reference implementation, so the current step's
adaLN gate still applies to it.

Modes (what a gated ``attn1``/``ff`` does; chosen per call by a :class:`LazySession`):

- ``"off"`` — run the module (the plain model; also when no session is active);
- ``"fill"`` — run it and remember its output (the "previous step" for ``"soft"``);
- ``"soft"`` (training) — ``s · previous + (1 − s) · current``: differentiable in ``s``; the
  scores are collected for the laziness penalty;
- ``"hard"`` (sampling) — per batch row, reuse the previous output where ``s`` is above the
  step's threshold and compute the module only for the other rows (not at all when every row is
  lazy). Step 0 — and every step before ``start_step`` — always computes.

The threshold comes from one of two rules: ``"threshold"`` (a fixed score, 0.5 in the paper)
or ``"laziness"`` (a target fraction ``L`` of lazy modules: at each step the threshold is the
``1 − L`` quantile of all gate scores of the previous step, so about a fraction ``L`` of the
modules score above it; ``L = 0`` never skips, ``L = 1`` skips every module after the start
step). The fraction actually skipped is measured and reported.

Pieces:

- :class:`LazyGates` — the patch (``ModelPatch``). It owns the gate parameters (a
  ``torch.nn.ModuleDict`` ``{"attn": [Linear(dim, 1)] * L, "mlp": [...]}``) and offers them
  through ``trainable_parameters()`` (names ``attn.<i>.weight`` … ; the training loop stores
  them as ``@patch<k>.attn.<i>.weight``), so ``dagfusion.train.Train`` with ``trainable:
  patches`` trains only the gates through the unchanged loop. ``apply(module)`` swaps the
  ``forward`` of every block's ``attn1`` and ``ff`` for a gated one (an instance attribute,
  deleted again on exit, so the shared module is exactly as before) and registers a
  :class:`LazyController` for the module. ``begin(run)`` returns a :class:`LazyDiTHook` (the
  per-run state: cached outputs, scores, counters) when the patch is configured to skip.
- :func:`controller` — how an objective reaches the gates: ``controller(model_call.module)``
  returns the active :class:`LazyController` of the module the patch was applied to, and
  ``with ctl.session() as session:`` / ``with session.using("fill"):`` switch modes (see
  :mod:`~dagfusion.nodes.cache.lazydit_objective`, the gate-training objective).
- Nodes: ``dagfusion.cache.LazyDiTGates`` (fresh gates on a DiT/PixArt model),
  ``dagfusion.train.LazyGateLoss`` (the objective), ``dagfusion.cache.SaveLazyGates`` /
  ``dagfusion.cache.LoadLazyGates`` (safetensors with the architecture in the metadata),
  ``dagfusion.cache.LazyDiT`` (turn skipping on) and ``dagfusion.cache.LazyDiTStats`` (what a
  lazy run skipped).

Differences from the reference code: one gate pair per block rather than one per block *and*
sampling step (the step enters through the modulated input, as the paper describes); the gate
averages over tokens instead of summing (so it does not depend on the resolution; a bias is
added); and the ``"laziness"`` rule, which the reference does not have (it uses a fixed 0.5).

The statistics of each run are what its hook's ``end()`` returns: the sampler puts them into
the run's report (the Sample node's ``report`` output) under the patch's key, and
``LazyDiTStats`` reads them from there — so they travel with the run's result, also when the
run is served from a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from dagfusion import FLOAT, INT, PATH, SEED, STRING, Input, Output, RunContext, node
from dagfusion.nodes.cache.lazydit_objective import lazy_gate_loss
from dagfusion.model import (
    DenoiserCall,
    Forward,
    ModelPatch,
    SamplingRun,
    StepHook,
    applied_patch,
    unwrap_compiled,
)
from dagfusion.nodes.diffusion.types import MODEL, RUN_REPORT

KINDS = ("attn", "mlp")
"""The gated modules of a block: ``attn`` = ``attn1`` (self-attention), ``mlp`` = ``ff``."""
MODES = ("off", "fill", "soft", "hard")
RULES = ("laziness", "threshold")
NORM_TYPES = ("ada_norm_zero", "ada_norm_single")
"""adaLN blocks: DiT (``ada_norm_zero``) and PixArt (``ada_norm_single``)."""
FILE_FORMAT = "dagfusion.lazydit-gates"
FILE_VERSION = "1"

# --- the transformer ----------------------------------------------------------------------------


def transformer_of(module: Any) -> Any:
    """The diffusion transformer behind ``module`` (looking through ``torch.compile``).

    :raises TypeError: for UNets (pointing to DeepCache) and for denoisers without adaLN
        ``BasicTransformerBlock``\\ s (DiT, PixArt).
    """
    inner = unwrap_compiled(module)
    names = {cls.__name__ for cls in type(inner).__mro__}
    if any("UNet" in name for name in names):
        raise TypeError(
            f"LazyDiT gates the attention and MLP modules of diffusion transformers (DiT, PixArt); this model's "
            f"denoiser is a {type(inner).__name__}, a UNet. For UNets use dagfusion.cache.DeepCache"
        )
    blocks = getattr(inner, "transformer_blocks", None)
    norms = {getattr(b, "norm_type", None) for b in blocks} if blocks is not None else set()
    if not blocks or not norms <= set(NORM_TYPES) or not all(_gateable(b) for b in blocks):
        raise TypeError(
            f"LazyDiT works on DiT and PixArt transformers (diffusers transformer_blocks of BasicTransformerBlock "
            f"with adaLN: norm_type {' or '.join(NORM_TYPES)}); this model's denoiser is a {type(inner).__name__}"
            + (f" with norm_type {sorted(str(n) for n in norms)}" if norms else "")
        )
    return inner


def _gateable(block: Any) -> bool:
    return "BasicTransformerBlock" in {c.__name__ for c in type(block).__mro__} and hasattr(block, "attn1") and hasattr(block, "ff")


def _in_features(module: Any) -> int:
    dim = getattr(module, "query_dim", None)
    if isinstance(dim, int):
        return dim
    for sub in module.modules():  # the first projection (duck-typed: quantized linears count too)
        width = getattr(sub, "in_features", None)
        if isinstance(width, int):
            return width
    raise TypeError(f"cannot tell the input width of {type(module).__name__}")  # pragma: no cover


def architecture(module: Any) -> dict[str, Any]:
    """What gates are shaped by: the transformer class, its norm type, its blocks and their widths."""
    inner = transformer_of(module)
    blocks = inner.transformer_blocks
    attn = [_in_features(b.attn1) for b in blocks]
    mlp = [_in_features(b.ff) for b in blocks]
    uniform = len(set(attn + mlp)) == 1
    return {
        "denoiser": type(inner).__name__,
        "norm_type": str(blocks[0].norm_type),
        "blocks": len(blocks),
        "dim": attn[0] if uniform else {"attn": attn, "mlp": mlp},
    }


def describe_architecture(arch: dict[str, Any]) -> str:
    width = arch["dim"] if isinstance(arch["dim"], int) else "mixed widths"
    return f"a {arch['denoiser']} with {arch['blocks']} blocks of width {width} (norm {arch['norm_type']})"


def _widths(arch: dict[str, Any], kind: str) -> list[int]:
    dim = arch["dim"]
    return [int(dim)] * int(arch["blocks"]) if isinstance(dim, int) else [int(d) for d in dim[kind]]


def check_architecture(expected: dict[str, Any], module: Any, what: str = "these gates") -> None:
    """:raises ValueError: naming both, when ``module``'s architecture is not ``expected``."""
    actual = architecture(module)
    if actual != expected:
        raise ValueError(
            f"{what} were made for {describe_architecture(expected)}, but this model is "
            f"{describe_architecture(actual)}; gates only fit the architecture they were made (and trained) for"
        )


# --- the gates -------------------------------------------------------------------------------------


def new_gates(arch: dict[str, Any], *, seed: int = 0, init_bias: float = 0.0, init_std: float = 0.01) -> Any:
    """Fresh gates for ``arch``: weights ``N(0, init_std²)`` from a CPU generator seeded with
    ``seed``, biases ``init_bias`` (0: every score starts near 0.5)."""
    import torch

    generator = torch.Generator("cpu").manual_seed(int(seed))
    parts = {}
    for kind in KINDS:
        layers = []
        for width in _widths(arch, kind):
            layer = torch.nn.Linear(width, 1)
            with torch.no_grad():
                layer.weight.copy_(torch.randn((1, width), generator=generator) * init_std)
                layer.bias.fill_(float(init_bias))
            layer.requires_grad_(False)
            layers.append(layer)
        parts[kind] = torch.nn.ModuleList(layers)
    return torch.nn.ModuleDict(parts)


def pool(hidden: Any) -> Any:
    """``(B, tokens…, D)`` -> ``(B, D)``: the mean over the tokens, in float32."""
    x = hidden.float()
    return x.flatten(1, -2).mean(1) if x.ndim >= 3 else x


# --- the controller: what apply installs, and the switch objectives use ----------------------------

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

    def score(self, slot: tuple[int, str], hidden: Any) -> Any:
        """The lazy score ``(B,)`` of ``slot`` for the module input ``hidden`` (float32; differentiable
        in the gate parameters when they live on ``hidden``'s device)."""
        import torch

        index, kind = slot
        layer = self.patch.gates[kind][index]
        weight, bias = layer.weight, layer.bias
        if weight.device != hidden.device:
            key = (index, kind, str(hidden.device))
            moved = self._moved.get(key)
            if moved is None:
                moved = self._moved[key] = (weight.detach().to(hidden.device), bias.detach().to(hidden.device))
            weight, bias = moved
        with torch.autocast(hidden.device.type, enabled=False):
            logits = torch.nn.functional.linear(pool(hidden), weight.float(), bias.float())
        return torch.sigmoid(logits).squeeze(-1)


def _layout(hidden: Any) -> tuple[Any, ...]:
    return (tuple(hidden.shape), str(hidden.dtype), str(hidden.device))


def _take_rows(value: Any, keep: Any, rows: int) -> Any:
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
    """

    def __init__(self) -> None:
        self.mode = "off"
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
            self.cache[slot] = (_layout(hidden), out.detach())
            return out
        if mode == "soft":
            entry = self.cache.get(slot)
            if entry is None or entry[0] != _layout(hidden):
                raise RuntimeError(
                    "LazyDiT 'soft' mode mixes with the previous step's outputs: run the model in 'fill' mode on a "
                    "batch of the same shape first, in the same session"
                )
            score = ctl.score(slot, hidden)
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
        self.cache[slot] = (_layout(hidden), out)
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


# --- the patch ----------------------------------------------------------------------------------------


class LazyGates(ModelPatch):
    """LazyDiT gates attached to a DiT/PixArt model handle (see the module docstring).

    Attributes:
        gates: ``torch.nn.ModuleDict`` ``{"attn": ModuleList[Linear(dim, 1)], "mlp": …}``, one
            per block (shared between the patches :meth:`configured` makes).
        arch: The architecture the gates fit (:func:`architecture`).
        rule: ``"off"`` (gates present, nothing skipped: sampling equals the plain model),
            ``"laziness"`` or ``"threshold"``.
        laziness, threshold, start_step: The skipping rule's settings.

    A skipping run's hook reports :meth:`SkippingSession.stats` from ``end()``; the sampler puts
    it into the run's report under this patch's key (what ``LazyDiTStats`` reads).
    """

    def __init__(
        self, gates: Any, arch: dict[str, Any], *, rule: str = "off", laziness: float = 0.5, threshold: float = 0.5,
        start_step: int = 1,
    ) -> None:
        if rule not in ("off", *RULES):
            raise ValueError(f"unknown LazyDiT rule {rule!r}; expected one of {['off', *RULES]}")
        if not 0.0 <= laziness <= 1.0:
            raise ValueError(f"laziness must be a fraction in [0, 1], got {laziness}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a score in [0, 1], got {threshold}")
        if start_step < 1:
            raise ValueError(f"start_step must be at least 1 (step 0 always computes), got {start_step}")
        self.gates = gates
        self.arch = dict(arch)
        self.rule = rule
        self.laziness = float(laziness)
        self.threshold = float(threshold)
        self.start_step = int(start_step)

    def settings(self) -> dict[str, Any]:
        """The skipping rule as plain data."""
        settings: dict[str, Any] = {"rule": self.rule}
        if self.rule == "laziness":
            settings["laziness"] = self.laziness
        if self.rule == "threshold":
            settings["threshold"] = self.threshold
        if self.rule != "off":
            settings["start_step"] = self.start_step
        return settings

    def digest(self) -> str:
        """A content hash of the gate parameters."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.gates.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:24]

    @property
    def key(self) -> str:  # type: ignore[override]
        """Identity and settings: the architecture, the gate values' hash and the rule."""
        return KEY_PREFIX + json.dumps(
            {"arch": self.arch, "gates": self.digest(), **self.settings()}, sort_keys=True
        )

    def trainable_parameters(self) -> dict[str, Any]:
        """``{"attn.<i>.weight": Parameter, …}``: the gates (``trainable: patches`` trains these)."""
        return dict(self.gates.named_parameters())

    def configured(self, **changes: Any) -> LazyGates:
        """A patch over the same gates with other settings (``rule``, ``laziness``, ``threshold``, ``start_step``)."""
        settings = {"rule": self.rule, "laziness": self.laziness, "threshold": self.threshold,
                    "start_step": self.start_step, **changes}
        return LazyGates(self.gates, self.arch, **settings)

    def with_gates(self, gates: Any, arch: dict[str, Any]) -> LazyGates:
        """A patch with other gates and these settings."""
        return LazyGates(gates, arch, rule=self.rule, laziness=self.laziness, threshold=self.threshold,
                         start_step=self.start_step)

    def apply(self, module: Any) -> contextlib.AbstractContextManager[Any]:
        return installed(self, module)

    def begin(self, run: SamplingRun) -> StepHook | None:
        if self.rule == "off":
            return None
        ctl = controller(run.module)
        session = SkippingSession(rule=self.rule, laziness=self.laziness, threshold=self.threshold,
                                  start_step=self.start_step, settings=self.settings(), modules=len(ctl.slots))
        return LazyDiTHook(ctl, session)

    # --- files ---

    def state_dict(self) -> dict[str, Any]:
        """The gate tensors (float32, CPU, contiguous), named like :meth:`trainable_parameters`."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.gates.state_dict().items()}

    def save(self, path: Any, **metadata: str) -> None:
        """Write the gates as safetensors with the architecture (and ``metadata``) in the header."""
        from safetensors.torch import save_file

        meta = {"format": FILE_FORMAT, "format_version": FILE_VERSION, "architecture": json.dumps(self.arch, sort_keys=True),
                **{k: str(v) for k, v in metadata.items()}}
        save_file(self.state_dict(), str(path), metadata=meta)

    @staticmethod
    def read(path: Any) -> tuple[dict[str, Any], Any]:
        """``(architecture, gates module)`` from a file :meth:`save` wrote.

        :raises ValueError: the file is not a LazyDiT gate file, or its tensors do not fit its architecture.
        """
        import torch
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FILE_FORMAT:
                raise ValueError(f"{path} is not a LazyDiT gate file (no '{FILE_FORMAT}' format in its metadata)")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
        try:
            arch = json.loads(meta["architecture"])
            gates = new_gates(arch)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path} names no readable architecture in its metadata") from exc
        expected = {k: tuple(v.shape) for k, v in gates.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != got:
            raise ValueError(f"{path} holds gate tensors {got} but its architecture needs {expected}")
        with torch.no_grad():
            gates.load_state_dict({k: v.float() for k, v in tensors.items()})
        return arch, gates


def find_gates(model: Any) -> tuple[int, LazyGates]:
    """``(index, patch)`` of the model handle's :class:`LazyGates`.

    :raises ValueError: it has none, or several.
    """
    found = [(i, p) for i, p in enumerate(model.patches) if isinstance(p, LazyGates)]
    if not found:
        raise ValueError(
            "this model has no LazyDiT gates: add fresh ones with dagfusion.cache.LazyDiTGates (and train them with "
            "dagfusion.train.Train, trainable: patches, objective dagfusion.train.LazyGateLoss) or load trained ones "
            "with dagfusion.cache.LoadLazyGates"
        )
    if len(found) > 1:
        raise ValueError(f"this model carries {len(found)} LazyDiT gate sets; a model takes one")
    return found[0]


def replace_patch(model: Any, index: int, patch: Any) -> Any:
    """A clone of ``model`` with its ``index``-th patch replaced by ``patch`` (order kept)."""
    patches = list(model.patches)
    patches[index] = patch
    handle = model.without_patches()
    for p in patches:
        handle = handle.with_patch(p)
    return handle


# --- the per-run hook ------------------------------------------------------------------------------------


class SkippingSession(LazySession):
    """A session whose ``"hard"`` mode skips: cached outputs, scores and counters of one sampling run.

    :param settings: The patch's skipping rule (:meth:`LazyGates.settings`), reported as is.
    :param modules: Gated modules per denoiser call.
    """

    def __init__(self, *, rule: str, laziness: float, threshold: float, start_step: int, settings: dict[str, Any],
                 modules: int) -> None:
        super().__init__()
        self.rule = rule
        self.laziness = laziness
        self.fixed = threshold
        self.start_step = start_step
        self.settings = dict(settings)
        self.modules = modules
        self.step = -1
        self.step_threshold: float | None = None
        self.scores: list[Any] = []  # this call's scores
        self.previous: list[Any] = []  # the previous call's
        self.calls: list[dict[str, Any]] = []
        self.skipped = dict.fromkeys(KINDS, 0)
        self.total = dict.fromkeys(KINDS, 0)
        self.module_calls = 0
        self.skipped_calls = 0

    def threshold_for_call(self) -> float | None:
        """The threshold of this call (``None``: nothing may skip)."""
        if self.step < self.start_step:
            return None
        if self.rule == "threshold":
            return self.fixed
        if self.laziness <= 0.0:
            return None
        if self.laziness >= 1.0:
            return -1.0  # below every score: all lazy
        if not self.previous:
            return None
        import torch

        scores = torch.cat([s.flatten().float().cpu() for s in self.previous])
        return float(torch.quantile(scores, 1.0 - self.laziness))

    def begin_call(self, step: int) -> tuple[int, int]:
        """Start the denoiser call of ``step``; returns the counters to pass to :meth:`end_call`."""
        self.step = step
        if self.scores:
            self.previous = self.scores
        self.scores = []
        self.step_threshold = self.threshold_for_call()
        return sum(self.skipped.values()), sum(self.total.values())

    def end_call(self, before: tuple[int, int]) -> None:
        """Record the call started by :meth:`begin_call`."""
        skipped, total = sum(self.skipped.values()) - before[0], sum(self.total.values()) - before[1]
        self.calls.append({"step": self.step, "threshold": self.step_threshold, "skipped": skipped, "total": total})

    def hard(self, ctl: LazyController, slot: tuple[int, str], original: Any, hidden: Any, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        kind = slot[1]
        rows = int(hidden.shape[0])
        score = ctl.score(slot, hidden).detach()
        self.scores.append(score)
        layout = _layout(hidden)
        entry = self.cache.get(slot)
        threshold = self.step_threshold
        lazy = None
        if threshold is not None and entry is not None and entry[0] == layout:
            lazy = score > threshold
        count = int(lazy.sum()) if lazy is not None else 0
        self.total[kind] += rows
        self.skipped[kind] += count
        self.module_calls += 1
        if count == 0:
            out = original(hidden, *args, **kwargs)
        elif count == rows:
            out = entry[1]  # type: ignore[index]
            self.skipped_calls += 1
        else:
            keep = ~lazy  # type: ignore[operator]
            part = original(_take_rows(hidden, keep, rows), *(_take_rows(a, keep, rows) for a in args),
                            **{k: _take_rows(v, keep, rows) for k, v in kwargs.items()})
            out = entry[1].clone()  # type: ignore[index]
            out[keep] = part.to(out.dtype)
        self.cache[slot] = (layout, out)
        return out

    def stats(self) -> dict[str, Any]:
        """This run so far.

        Keys: ``rule`` and its setting, ``start_step``, ``calls`` (denoiser calls), ``modules``
        (gated modules per call), ``skipped`` / ``evaluated`` (module-row pairs reused / run
        through a gate), ``skip_fraction`` (their ratio: the fraction of modules skipped),
        ``attn_skip_fraction``, ``mlp_skip_fraction``, ``module_calls``, ``skipped_calls``
        (module calls skipped for the whole batch, which compute nothing), and ``steps``:
        ``[{step, threshold, skipped, total}]`` per call.
        """
        skipped, total = sum(self.skipped.values()), sum(self.total.values())
        stats: dict[str, Any] = {
            **self.settings,
            "calls": len(self.calls),
            "modules": self.modules,
            "skipped": skipped,
            "evaluated": total,
            "skip_fraction": skipped / total if total else 0.0,
            "module_calls": self.module_calls,
            "skipped_calls": self.skipped_calls,
            "steps": list(self.calls),
        }
        for kind in KINDS:
            stats[f"{kind}_skip_fraction"] = self.skipped[kind] / self.total[kind] if self.total[kind] else 0.0
        return stats


class LazyDiTHook(StepHook):
    """The per-run part of a skipping :class:`LazyGates`: each denoiser call runs the chain with a
    :class:`SkippingSession` driving the gates in ``"hard"`` mode; ``end()`` returns its
    statistics (:meth:`SkippingSession.stats`)."""

    def __init__(self, ctl: LazyController, session: SkippingSession) -> None:
        self._ctl = ctl
        self._session = session

    def denoise(self, call: DenoiserCall, forward: Forward) -> Any:
        session = self._session
        before = session.begin_call(call.step.index)
        with self._ctl.session(session), session.using("hard"):
            out = forward(call)
        session.end_call(before)
        return out

    def end(self) -> dict[str, Any]:
        session = self._session
        stats = session.stats()
        session.cache.clear()
        session.scores, session.previous = [], []
        return stats


# --- the nodes ------------------------------------------------------------------------------------------


def _gated_pixart(seed: int = 0) -> Any:
    from dagfusion.testing import models as tiny

    model = tiny.pixart_handles()["model"]
    arch = architecture(model.denoiser)
    return model.with_patch(LazyGates(new_gates(arch, seed=seed), arch))


def _gates_example() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.pixart_handles()["model"], "seed": 1, "init_bias": 0.5}


def _gates_example_other() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return {"model": tiny.pixart_handles()["model"], "seed": 2, "init_bias": 0.0}


@node(
    "dagfusion.cache.LazyDiTGates",
    version="1.0.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="A DiT or PixArt model (diffusion transformer)."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seeds the gates' small random weights."),
        Input("init_bias", FLOAT, 0.0, min=-20.0, max=20.0,
              description="Initial gate bias: 0 starts every lazy score near 0.5; positive starts lazier."),
    ],
    outputs=[Output("model", MODEL, "The model with fresh LazyDiT gates (sampling is unchanged until LazyDiT turns skipping on).")],
    examples=[_gates_example, _gates_example_other],
    ui={"color": "#26a69a"},
)
def lazydit_gates(ctx: RunContext, model: Any, seed: int, init_bias: float) -> Any:
    """Add fresh LazyDiT gates to a diffusion transformer: one linear gate per attention and MLP module.

    Each gate scores the module's modulated input (after adaLN), averaged over tokens, for how
    much its output may be reused from the previous step. Train them with dagfusion.train.Train
    (trainable: patches) and the dagfusion.train.LazyGateLoss objective; the transformer itself
    stays frozen. Sampling this model is exactly the plain model until dagfusion.cache.LazyDiT
    turns skipping on.
    """
    arch = architecture(model.denoiser)
    if applied_patch(model, LazyGates) is not None:
        raise ValueError("this model already has LazyDiT gates; a model takes one gate set")
    return model.with_patch(LazyGates(new_gates(arch, seed=seed, init_bias=init_bias), arch))


def _lazydit_example() -> dict[str, Any]:
    return {"model": _gated_pixart(), "laziness": 0.4}


def _threshold_example() -> dict[str, Any]:
    return {"model": _gated_pixart(), "rule": "threshold", "threshold": 0.5, "start_step": 2}


@node(
    "dagfusion.cache.LazyDiT",
    version="1.1.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="A DiT/PixArt model carrying LazyDiT gates (trained or loaded)."),
        Input("rule", STRING, "laziness", choices=RULES,
              description="'laziness': skip about the given fraction of modules per step (the threshold is the "
                          "previous step's score quantile); 'threshold': skip where the lazy score exceeds a fixed value."),
        Input("laziness", FLOAT, 0.5, min=0.0, max=1.0,
              description="Rule 'laziness': target fraction of attention/MLP modules to reuse (0 = none, exact plain output)."),
        Input("threshold", FLOAT, 0.5, min=0.0, max=1.0,
              description="Rule 'threshold': reuse a module where its lazy score is above this (0.5 in the paper; 1 = never)."),
        Input("start_step", INT, 1, min=1, max=10000, description="Steps before this one always compute every module (step 0 always does)."),
    ],
    outputs=[Output("model", MODEL, "The model with LazyDiT skipping while sampling.")],
    examples=[_lazydit_example, _threshold_example],
    ui={"color": "#26a69a"},
)
def lazydit(ctx: RunContext, model: Any, rule: str, laziness: float, threshold: float, start_step: int) -> Any:
    """Speed up a diffusion transformer by reusing attention/MLP outputs where its LazyDiT gates say so.

    Per sampling step and module, the gate scores the module's input; where the score is above the
    step's threshold the module's output of the previous step is reused instead of computed (per
    batch row). Each run's statistics — the fraction of modules skipped — are in the Sample
    node's report and come out of dagfusion.cache.LazyDiTStats.
    """
    index, gates = find_gates(model)
    transformer_of(model.denoiser)
    return replace_patch(model, index, gates.configured(rule=rule, laziness=laziness, threshold=threshold,
                                                        start_step=start_step))


def _stats_example() -> dict[str, Any]:
    from dagfusion.nodes.diffusion.sampling import run_sampling
    from dagfusion.testing import models as tiny

    parts = tiny.pixart_handles()
    _, gates = find_gates(_gated_pixart())
    model = parts["model"].with_patch(gates.configured(rule="laziness", laziness=0.5))
    _, report = run_sampling(model, parts["conditioning"], parts["latent"], steps=3, guidance_scale=1.0, seed=0,
                             sampler="ddim")
    return {"report": report}


KEY_PREFIX = "dagfusion.cache.LazyDiT:"
"""How every :class:`LazyGates` key starts (how a run report's LazyDiT entry is found)."""


def lazydit_report(report: Any) -> dict[str, Any]:
    """The LazyDiT statistics in a run report (:meth:`SkippingSession.stats`).

    :raises ValueError: the run had no skipping LazyDiT patch.
    """
    found = [value for key, value in report.patches.items() if key.startswith(KEY_PREFIX)]
    if not found:
        raise ValueError(
            "this sampling run had no LazyDiT skipping (no gates, or gates without dagfusion.cache.LazyDiT turning "
            "skipping on): link the report of the Sample node that sampled with the LazyDiT model"
        )
    return dict(found[0])


def _stats_upgrade_1(inputs: dict[str, Any]) -> dict[str, Any]:
    """1.x -> 2.0: the statistics come from the Sample node's ``report``, not from the model and latent."""
    import dataclasses

    inputs.pop("model", None)
    latent = inputs.pop("latent", None)
    if dataclasses.is_dataclass(latent) and getattr(latent, "output", None) == "latent":
        inputs["report"] = dataclasses.replace(latent, output="report")
    return inputs


@node(
    "dagfusion.cache.LazyDiTStats",
    version="2.0.0",
    category="cache",
    inputs=[
        Input("report", RUN_REPORT, link_only=True,
              description="The report of the Sample node that sampled with the LazyDiT model."),
    ],
    outputs=[
        Output("skip_fraction", FLOAT, "Fraction of attention/MLP module evaluations (per batch row) that reused the previous step."),
        Output("stats", STRING, "The run's statistics as JSON (per kind, per step, thresholds)."),
    ],
    examples=[_stats_example],
    migrations={1: _stats_upgrade_1},
)
def lazydit_stats(ctx: RunContext, report: Any) -> tuple[float, str]:
    """What a LazyDiT sampling run skipped: the fraction of modules reused, per kind and per step.

    Link the report output of the Sample node that sampled with the LazyDiT model; the
    statistics travel with that run's result, so this works when the run comes from a cache.
    """
    stats = lazydit_report(report)
    return float(stats["skip_fraction"]), json.dumps(stats, sort_keys=True)


def _save_example() -> dict[str, Any]:
    return {"model": _gated_pixart(), "filename": "gates/pixart.safetensors"}


@node(
    "dagfusion.cache.SaveLazyGates",
    version="1.0.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="A model carrying (trained) LazyDiT gates."),
        Input("filename", STRING, "lazydit_gates.safetensors", description="Name inside the run's output folder."),
    ],
    outputs=[Output("path", STRING, "Where the gates were written.")],
    examples=[_save_example],
    pure=False,
    output_node=True,
)
def save_lazy_gates(ctx: RunContext, model: Any, filename: str) -> str:
    """Save a model's LazyDiT gates as safetensors (the architecture they fit is in the metadata)."""
    _, gates = find_gates(model)
    path = ctx.output_path(filename)
    training = model.info.get("training")
    gates.save(path, source=str(model.info.get("source", "")),
               training=json.dumps(training, sort_keys=True, default=str) if training else "")
    return str(path)


def _load_example(folder: Any) -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    path = folder / "gates.safetensors"
    _, gates = find_gates(_gated_pixart(seed=3))
    gates.save(path)
    return {"model": tiny.pixart_handles()["model"], "path": str(path)}


@node(
    "dagfusion.cache.LoadLazyGates",
    version="1.0.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="The DiT/PixArt model the gates were made for."),
        Input("path", PATH, description="A LazyDiT gate file (SaveLazyGates) under the allowed read folders."),
    ],
    outputs=[Output("model", MODEL, "The model with the loaded gates (replacing gates it already had, keeping their settings).")],
    examples=[_load_example],
)
def load_lazy_gates(ctx: RunContext, model: Any, path: str) -> Any:
    """Load LazyDiT gates from a safetensors file onto the model they were trained for.

    Refuses gates made for another architecture (transformer class, block count, width). The
    loaded gates do not skip until dagfusion.cache.LazyDiT turns skipping on (unless they replace
    gates whose LazyDiT settings are kept).
    """
    resolved = ctx.input_path(path)
    arch, gates = LazyGates.read(resolved)
    check_architecture(arch, model.denoiser, what=f"the gates in {resolved.name}")
    existing = [(i, p) for i, p in enumerate(model.patches) if isinstance(p, LazyGates)]
    if existing:
        index, old = existing[0]
        return replace_patch(model, index, old.with_gates(gates, arch))
    return model.with_patch(LazyGates(gates, arch))


NODES = (lazydit_gates, lazy_gate_loss, lazydit, lazydit_stats, save_lazy_gates, load_lazy_gates)
"""The nodes of this module (the gate objective's node lives in :mod:`~dagfusion.nodes.cache.lazydit_objective`)."""
