"""The LazyDiT patch (:class:`LazyGates`) and its per-run skipping hook (:class:`LazyDiTHook`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

from dagfusion.model import DenoiserCall, Forward, ModelPatch, SamplingRun, StepHook
from dagfusion.nodes.cache.lazydit.gates import (
    FILE_FORMAT,
    FILE_VERSION,
    KINDS,
    RULES,
    gate_index,
    gate_steps,
    new_gates,
    pool,
)
from dagfusion.nodes.cache.lazydit.session import LazyController, LazySession, input_layout, take_rows, controller, installed

KEY_PREFIX = "dagfusion.cache.LazyDiT:"
"""How every :class:`LazyGates` key starts (how a run report's LazyDiT entry is found)."""

# --- the patch ----------------------------------------------------------------------------------------


class LazyGates(ModelPatch):
    """LazyDiT gates attached to a DiT/PixArt model handle (see the module docstring).

    Attributes:
        gates: ``torch.nn.ModuleDict`` ``{"attn": ModuleList[Linear(dim, steps)], "mlp": …}``, one
            per block (shared between the patches :meth:`configured` makes); ``steps`` rows for
            per-step gates (:attr:`steps`), one for step-independent ones.
        arch: The architecture the gates fit (:func:`architecture`).
        rule: ``"off"`` (gates present, nothing skipped: sampling equals the plain model),
            ``"laziness"`` or ``"threshold"``.
        laziness, threshold, start_step: The skipping rule's settings.
        max_reuse: At most this many consecutive steps may reuse a module's output before it is
            computed again (per batch row); 0: no limit (the paper's).

    A skipping run's hook reports :meth:`SkippingSession.stats` from ``end()``; the sampler puts
    it into the run's report under this patch's key (what ``LazyDiTStats`` reads).
    """

    def __init__(
        self, gates: Any, arch: dict[str, Any], *, rule: str = "off", laziness: float = 0.5, threshold: float = 0.5,
        start_step: int = 1, max_reuse: int = 0,
    ) -> None:
        if rule not in ("off", *RULES):
            raise ValueError(f"unknown LazyDiT rule {rule!r}; expected one of {['off', *RULES]}")
        if not 0.0 <= laziness <= 1.0:
            raise ValueError(f"laziness must be a fraction in [0, 1], got {laziness}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a score in [0, 1], got {threshold}")
        if start_step < 1:
            raise ValueError(f"start_step must be at least 1 (step 0 always computes), got {start_step}")
        if max_reuse < 0:
            raise ValueError(f"max_reuse must be 0 (no limit) or more, got {max_reuse}")
        self.gates = gates
        self.arch = dict(arch)
        self.rule = rule
        self.laziness = float(laziness)
        self.threshold = float(threshold)
        self.start_step = int(start_step)
        self.max_reuse = int(max_reuse)

    def settings(self) -> dict[str, Any]:
        """The skipping rule as plain data."""
        settings: dict[str, Any] = {"rule": self.rule}
        if self.rule == "laziness":
            settings["laziness"] = self.laziness
        if self.rule == "threshold":
            settings["threshold"] = self.threshold
        if self.rule != "off":
            settings["start_step"] = self.start_step
        if self.rule != "off" and self.max_reuse:
            settings["max_reuse"] = self.max_reuse
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

    @property
    def steps(self) -> int:
        """Sampling steps the gates have their own parameters for (1: one gate for every step)."""
        return gate_steps(self.gates)

    def trainable_parameters(self) -> dict[str, Any]:
        """``{"attn.<i>.weight": Parameter, …}``: the gates (``trainable: patches`` trains these)."""
        return dict(self.gates.named_parameters())

    def configured(self, **changes: Any) -> LazyGates:
        """A patch over the same gates with other settings (``rule``, ``laziness``, ``threshold``,
        ``start_step``, ``max_reuse``)."""
        settings = {"rule": self.rule, "laziness": self.laziness, "threshold": self.threshold,
                    "start_step": self.start_step, "max_reuse": self.max_reuse, **changes}
        return LazyGates(self.gates, self.arch, **settings)

    def with_gates(self, gates: Any, arch: dict[str, Any]) -> LazyGates:
        """A patch with other gates and these settings."""
        return LazyGates(gates, arch, rule=self.rule, laziness=self.laziness, threshold=self.threshold,
                         start_step=self.start_step, max_reuse=self.max_reuse)

    def apply(self, module: Any) -> contextlib.AbstractContextManager[Any]:
        return installed(self, module)

    def begin(self, run: SamplingRun) -> StepHook | None:
        if self.rule == "off":
            return None
        ctl = controller(run.module)
        session = SkippingSession(rule=self.rule, laziness=self.laziness, threshold=self.threshold,
                                  start_step=self.start_step, settings=self.settings(), modules=len(ctl.slots),
                                  gate_steps=self.steps, max_reuse=self.max_reuse)
        return LazyDiTHook(ctl, session)

    # --- files ---

    def state_dict(self) -> dict[str, Any]:
        """The gate tensors (float32, CPU, contiguous), named like :meth:`trainable_parameters`."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.gates.state_dict().items()}

    def save(self, path: Any, **metadata: str) -> None:
        """Write the gates as safetensors with the architecture, the gates' step count (and
        ``metadata``) in the header."""
        from safetensors.torch import save_file

        meta = {"format": FILE_FORMAT, "format_version": FILE_VERSION, "architecture": json.dumps(self.arch, sort_keys=True),
                "steps": str(self.steps),
                **{k: str(v) for k, v in metadata.items()}}
        save_file(self.state_dict(), str(path), metadata=meta)

    @staticmethod
    def read(path: Any) -> tuple[dict[str, Any], Any]:
        """``(architecture, gates module)`` from a file :meth:`save` wrote (per-step or
        step-independent gates: the step count is the rows of the gate tensors).

        :raises ValueError: the file is not a LazyDiT gate file, or its tensors do not fit its architecture.
        """
        import torch
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FILE_FORMAT:
                raise ValueError(f"{path} is not a LazyDiT gate file (no '{FILE_FORMAT}' format in its metadata)")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
        rows = {int(v.shape[0]) for k, v in tensors.items() if v.ndim >= 1}
        try:
            arch = json.loads(meta["architecture"])
            gates = new_gates(arch, steps=max(rows) if rows else 1)
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
            "dagfusion.train.Train, trainable: patches, objective dagfusion.cache.LazyGateLoss) or load trained ones "
            "with dagfusion.cache.LoadLazyGates"
        )
    if len(found) > 1:
        raise ValueError(f"this model carries {len(found)} LazyDiT gate sets; a model takes one")
    return found[0]


def replace_patch(model: Any, index: int, patch: Any) -> Any:
    """A clone of ``model`` with its ``index``-th patch replaced by ``patch`` (order kept)."""
    patches = list(model.patches)
    patches[index] = patch
    return model.with_patches(patches)


# --- the per-run hook ------------------------------------------------------------------------------------


class SkippingSession(LazySession):
    """A session whose ``"hard"`` mode skips: cached outputs, scores and counters of one sampling run.

    :param settings: The patch's skipping rule (:meth:`LazyGates.settings`), reported as is.
    :param modules: Gated modules per denoiser call.
    :param gate_steps: Steps the gates have rows for (:func:`gate_index` maps run steps to rows).
    :param max_reuse: Consecutive reuses of a module's output allowed per batch row (0: no limit).
    """

    def __init__(self, *, rule: str, laziness: float, threshold: float, start_step: int, settings: dict[str, Any],
                 modules: int, gate_steps: int = 1, max_reuse: int = 0) -> None:
        super().__init__()
        self.rule = rule
        self.laziness = laziness
        self.fixed = threshold
        self.start_step = start_step
        self.settings = dict(settings)
        self.modules = modules
        self.gate_steps = int(gate_steps)
        self.max_reuse = int(max_reuse)
        self.reused: dict[tuple[int, str], Any] = {}  # per slot: consecutive reuses per batch row
        self.step = -1
        self.step_threshold: float | None = None
        self.scores: list[Any] = []  # this call's scores
        self.previous: list[Any] = []  # the previous call's (rescored with this call's gate row)
        self.inputs: list[tuple[tuple[int, str], Any]] = []  # this call's pooled module inputs (per-step gates)
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

    def begin_call(self, step: int, total: int = 0, ctl: LazyController | None = None) -> tuple[int, int]:
        """Start the denoiser call of ``step`` (of a ``total``-step run: picks the per-step gate row);
        returns the counters to pass to :meth:`end_call`.

        The ``"laziness"`` rule's threshold is a quantile of the previous call's scores; with
        per-step gates (and ``ctl`` given) those are rescored with this step's gate row, so the
        quantile is of the gates that decide now.
        """
        self.step = step
        self.gate_step = gate_index(step, total, self.gate_steps)
        if self.scores:
            self.previous = self.scores
            if self.gate_steps > 1 and ctl is not None and self.inputs:
                self.previous = [ctl.score_pooled(slot, pooled, self.gate_step).detach() for slot, pooled in self.inputs]
        self.scores, self.inputs = [], []
        self.step_threshold = self.threshold_for_call()
        return sum(self.skipped.values()), sum(self.total.values())

    def end_call(self, before: tuple[int, int]) -> None:
        """Record the call started by :meth:`begin_call`."""
        skipped, total = sum(self.skipped.values()) - before[0], sum(self.total.values()) - before[1]
        self.calls.append({"step": self.step, "threshold": self.step_threshold, "skipped": skipped, "total": total})

    def streak(self, slot: tuple[int, str], rows: int) -> Any:
        """How many steps in a row each batch row has reused ``slot``'s output (``(rows,)``, CPU)."""
        import torch

        streak = self.reused.get(slot)
        return streak if streak is not None and streak.shape[0] == rows else torch.zeros(rows, dtype=torch.long)

    def record_reuse(self, slot: tuple[int, str], rows: int, lazy: Any) -> None:
        """Count this call's reuse per row (``lazy`` ``None``: nothing reused, every streak ends)."""
        import torch

        fresh = torch.zeros(rows, dtype=torch.long)
        self.reused[slot] = fresh if lazy is None else torch.where(lazy.cpu(), self.streak(slot, rows) + 1, fresh)

    def hard(self, ctl: LazyController, slot: tuple[int, str], original: Any, hidden: Any, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        kind = slot[1]
        rows = int(hidden.shape[0])
        pooled = pool(hidden)
        score = ctl.score_pooled(slot, pooled, self.gate_step).detach()
        self.scores.append(score)
        if self.gate_steps > 1 and self.rule == "laziness":
            self.inputs.append((slot, pooled.detach()))
        layout = input_layout(hidden)
        entry = self.cache.get(slot)
        threshold = self.step_threshold
        lazy = None
        if threshold is not None and entry is not None and entry[0] == layout:
            lazy = score > threshold
            if self.max_reuse:
                lazy = lazy & (self.streak(slot, rows).to(lazy.device) < self.max_reuse)
        if self.max_reuse:
            self.record_reuse(slot, rows, lazy)
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
            part = original(take_rows(hidden, keep, rows), *(take_rows(a, keep, rows) for a in args),
                            **{k: take_rows(v, keep, rows) for k, v in kwargs.items()})
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
            "gate_steps": self.gate_steps,
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
        before = session.begin_call(call.step.index, call.step.total, self._ctl)
        with self._ctl.session(session), session.using("hard"):
            out = forward(call)
        session.end_call(before)
        return out

    def end(self) -> dict[str, Any]:
        session = self._session
        stats = session.stats()
        session.cache.clear()
        session.reused.clear()
        session.scores, session.previous, session.inputs = [], [], []
        return stats
