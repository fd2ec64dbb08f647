"""The LazyDiT nodes: fresh gates, turning skipping on, statistics, and saving/loading gates.

The gate-training objective's node (``dagfusion.cache.LazyGateLoss``) lives in
:mod:`~dagfusion.nodes.cache.lazydit.objective`.
"""

from __future__ import annotations

import json
from typing import Any

from dagfusion import FLOAT, INT, PATH, SEED, STRING, Input, NodeInputError, Output, RunContext, node
from dagfusion.model import applied_patch
from dagfusion.nodes.cache.lazydit.gates import RULES, architecture, check_architecture, new_gates, transformer_of
from dagfusion.nodes.cache.lazydit.patch import KEY_PREFIX, LazyGates, find_gates, replace_patch
from dagfusion.nodes.diffusion.types import MODEL, RUN_REPORT

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

    return {"model": tiny.pixart_handles()["model"], "seed": 2, "init_bias": 0.0, "sampling_steps": 6}


@node(
    "dagfusion.cache.LazyDiTGates",
    version="1.1.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="A DiT or PixArt model (diffusion transformer)."),
        Input("seed", SEED, 0, min=0, max=2**63 - 1, description="Seeds the gates' small random weights."),
        Input("init_bias", FLOAT, 0.0, min=-20.0, max=20.0,
              description="Initial gate bias: 0 starts every lazy score near 0.5; positive starts lazier."),
        Input("sampling_steps", INT, 0, min=0, max=10000,
              description="0: one gate per module shared by every step; N: one gate per module and sampling step "
                          "of an N-step sampler (the paper's; train with LazyGateLoss sampling_steps N)."),
    ],
    outputs=[Output("model", MODEL, "The model with fresh LazyDiT gates (sampling is unchanged until LazyDiT turns skipping on).")],
    examples=[_gates_example, _gates_example_other],
    ui={"color": "#26a69a"},
)
def lazydit_gates(ctx: RunContext, model: Any, seed: int, init_bias: float, sampling_steps: int = 0) -> Any:
    """Add fresh LazyDiT gates to a diffusion transformer: one linear gate per attention and MLP module.

    Each gate scores the module's modulated input (after adaLN), averaged over tokens, for how
    much its output may be reused from the previous step. With sampling_steps N every module has
    one gate per step of an N-step sampler, as in the paper's code (a run with another step count
    uses the gate of the same fraction of the run). Train them with dagfusion.train.Train
    (trainable: patches) and the dagfusion.cache.LazyGateLoss objective; the transformer itself
    stays frozen. Sampling this model is exactly the plain model until dagfusion.cache.LazyDiT
    turns skipping on.
    """
    arch = architecture(model.denoiser)
    if applied_patch(model, LazyGates) is not None:
        raise NodeInputError("model", "this model already has LazyDiT gates; a model takes one gate set")
    gates = new_gates(arch, seed=seed, init_bias=init_bias, steps=max(1, sampling_steps))
    return model.with_patch(LazyGates(gates, arch))


def _lazydit_example() -> dict[str, Any]:
    return {"model": _gated_pixart(), "laziness": 0.4}


def _threshold_example() -> dict[str, Any]:
    return {"model": _gated_pixart(), "rule": "threshold", "threshold": 0.5, "start_step": 2, "max_reuse": 1}


@node(
    "dagfusion.cache.LazyDiT",
    version="1.2.0",
    category="cache",
    inputs=[
        Input("model", MODEL, link_only=True, description="A DiT/PixArt model carrying LazyDiT gates (trained or loaded)."),
        Input("rule", STRING, "laziness", choices=RULES,
              description="'laziness': skip about the given fraction of modules per step (the threshold is the "
                          "previous step's score quantile, rescored by this step's gates for per-step gates); 'threshold': skip "
                          "where the lazy score exceeds a fixed value."),
        Input("laziness", FLOAT, 0.5, min=0.0, max=1.0,
              description="Rule 'laziness': target fraction of attention/MLP modules to reuse (0 = none, exact plain output)."),
        Input("threshold", FLOAT, 0.5, min=0.0, max=1.0,
              description="Rule 'threshold': reuse a module where its lazy score is above this (0.5 in the paper; 1 = never)."),
        Input("start_step", INT, 1, min=1, max=10000, description="Steps before this one always compute every module (step 0 always does)."),
        Input("max_reuse", INT, 0, min=0, max=10000,
              description="A module's output is reused at most this many steps in a row before it is computed again "
                          "(0 = no limit, the paper's; 1 = never twice in a row)."),
    ],
    outputs=[Output("model", MODEL, "The model with LazyDiT skipping while sampling.")],
    examples=[_lazydit_example, _threshold_example],
    ui={"color": "#26a69a"},
)
def lazydit(ctx: RunContext, model: Any, rule: str, laziness: float, threshold: float, start_step: int,
            max_reuse: int = 0) -> Any:
    """Speed up a diffusion transformer by reusing attention/MLP outputs where its LazyDiT gates say so.

    Per sampling step and module, the gate scores the module's input; where the score is above the
    step's threshold the module's output of the previous step is reused instead of computed (per
    batch row); max_reuse caps how many steps in a row one output may stand in. Each run's statistics — the fraction of modules skipped — are in the Sample
    node's report and come out of dagfusion.cache.LazyDiTStats.
    """
    index, gates = find_gates(model)
    transformer_of(model.denoiser)
    return replace_patch(model, index, gates.configured(rule=rule, laziness=laziness, threshold=threshold,
                                                        start_step=start_step, max_reuse=max_reuse))


def _stats_example() -> dict[str, Any]:
    from dagfusion.nodes.diffusion.sampling import run_sampling
    from dagfusion.testing import models as tiny

    parts = tiny.pixart_handles()
    _, gates = find_gates(_gated_pixart())
    model = parts["model"].with_patch(gates.configured(rule="laziness", laziness=0.5))
    _, report = run_sampling(model, parts["conditioning"], parts["latent"], steps=3, guidance_scale=1.0, seed=0,
                             sampler="ddim")
    return {"report": report}


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


NODES = (lazydit_gates, lazydit, lazydit_stats, save_lazy_gates, load_lazy_gates)
"""The nodes of this module (the gate objective's node lives in :mod:`~dagfusion.nodes.cache.lazydit.objective`)."""
