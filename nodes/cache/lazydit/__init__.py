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

**Per-step gates** (``LazyDiTGates`` with ``sampling_steps = N``), as in the reference code
(shawnricecake/lazydit, where every block holds one linear gate per sampling step for attention
and one for the MLP, picked by the step the timestep maps to): each gate is a
``Linear(dim, N)`` whose row ``k`` scores step ``k``, ``s = sigmoid(w_k · mean_tokens(x) + b_k)``.
Sampling picks row ``k`` for step ``k`` of an ``N``-step run (for a run of another length, the row
of the same fraction of the run); :class:`~dagfusion.nodes.cache.lazydit.objective.LazyGateObjective`
trains row ``k`` on the sampler's timestep of step ``k``. ``N = 0`` (the default) is one gate per
module shared by every step, where the step enters only through the modulated input.

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
  lazy). Step 0 — and every step before ``start_step`` — always computes. With ``max_reuse = R``
  a row that reused a module's output ``R`` steps in a row computes it at the next step (0: no
  limit, as in the reference, where a reused output may stand in for any number of steps).

The threshold comes from one of two rules: ``"threshold"`` (a fixed score, 0.5 in the paper)
or ``"laziness"`` (a target fraction ``L`` of lazy modules: at each step the threshold is the
``1 − L`` quantile of all gate scores of the previous step — for per-step gates, the previous
step's module inputs scored by *this* step's gate row — so about a fraction ``L`` of the
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
  :mod:`~dagfusion.nodes.cache.lazydit.objective`, the gate-training objective).
- Nodes: ``dagfusion.cache.LazyDiTGates`` (fresh gates on a DiT/PixArt model),
  ``dagfusion.cache.LazyGateLoss`` (the objective), ``dagfusion.cache.SaveLazyGates`` /
  ``dagfusion.cache.LoadLazyGates`` (safetensors with the architecture in the metadata),
  ``dagfusion.cache.LazyDiT`` (turn skipping on) and ``dagfusion.cache.LazyDiTStats`` (what a
  lazy run skipped).

Differences from the reference code: by default one gate pair per block rather than one per
block *and* sampling step (``sampling_steps = N`` gives the reference's per-step gates); the
gate averages over tokens instead of summing (so it does not depend on the resolution; a bias is
added, one per step); the penalty may stop at a target mean laziness (``target_laziness < 1``;
``1`` is the reference's always-pushing penalty); and the ``"laziness"`` rule and ``max_reuse``,
which the reference does not have (it skips where the score passes a fixed 0.5, with no limit).

The statistics of each run are what its hook's ``end()`` returns: the sampler puts them into
the run's report (the Sample node's ``report`` output) under the patch's key, and
``LazyDiTStats`` reads them from there — so they travel with the run's result, also when the
run is served from a cache.

Modules: :mod:`~dagfusion.nodes.cache.lazydit.gates` (the transformer, gate weights),
:mod:`~dagfusion.nodes.cache.lazydit.session` (controller, sessions, installing the gated
forwards), :mod:`~dagfusion.nodes.cache.lazydit.patch` (the patch and its skipping hook),
:mod:`~dagfusion.nodes.cache.lazydit.objective` (the gate-training objective) and
:mod:`~dagfusion.nodes.cache.lazydit.nodes` (the nodes).
"""

from __future__ import annotations

from dagfusion.nodes.cache.lazydit.gates import (
    FILE_FORMAT,
    FILE_VERSION,
    KINDS,
    MODES,
    NORM_TYPES,
    RULES,
    architecture,
    check_architecture,
    describe_architecture,
    gate_index,
    gate_steps,
    new_gates,
    pool,
    transformer_of,
)
from dagfusion.nodes.cache.lazydit.nodes import (
    KEY_PREFIX,
    lazydit,
    lazydit_gates,
    lazydit_report,
    lazydit_stats,
    load_lazy_gates,
    save_lazy_gates,
)
from dagfusion.nodes.cache.lazydit.objective import LazyGateObjective, lazy_gate_loss
from dagfusion.nodes.cache.lazydit.patch import LazyDiTHook, LazyGates, SkippingSession, find_gates, replace_patch
from dagfusion.nodes.cache.lazydit.session import LazyController, LazySession, controller, installed

NODES = (lazydit_gates, lazy_gate_loss, lazydit, lazydit_stats, save_lazy_gates, load_lazy_gates)
"""The nodes of LazyDiT, in palette order."""

__all__ = [
    "FILE_FORMAT", "FILE_VERSION", "KEY_PREFIX", "KINDS", "MODES", "NODES", "NORM_TYPES", "RULES", "LazyController",
    "LazyDiTHook", "LazyGateObjective", "LazyGates", "LazySession", "SkippingSession", "architecture",
    "check_architecture", "controller", "describe_architecture", "find_gates", "gate_index", "gate_steps", "installed", "lazy_gate_loss",
    "lazydit", "lazydit_gates", "lazydit_report", "lazydit_stats", "load_lazy_gates", "new_gates", "pool",
    "replace_patch", "save_lazy_gates", "transformer_of",
]
