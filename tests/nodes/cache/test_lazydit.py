"""LazyDiT: learned lazy gates on the tiny DiT and PixArt models.

Skipping is checked against the plain sampler (exact when nothing may skip), the counted
module computations (forward hooks on each attention's query projection and each MLP's first
projection, which run only when the module really computes, once per batch row), and across
runs (state per run, the module restored). Training goes through the real Train node with
``trainable: patches``; files round-trip; wrong models are refused with clear errors. Per-step
gates (one row per sampling step) skip at the steps their rows say, round-trip through files,
train toward the penalty's target, and keep the laziness rule's fraction; ``max_reuse`` caps
consecutive reuse.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from dagfusion import NodeInputError  # noqa: E402
from dagfusion.context import CancelToken, RunContext
from dagfusion.model import FunctionPatch, apply_patches
from dagfusion.nodes.cache import lazydit as ld
from dagfusion.nodes.cache.lazydit import LazyGates, architecture, new_gates
from dagfusion.nodes.cache.lazydit.objective import LazyGateObjective
from dagfusion.nodes.diffusion.sampling import run_sampling, sample

STEPS = 6


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[Any, Any, Any]]:
    """kind -> (model handle, conditioning, latent) over the shared tiny pipelines."""
    from dagfusion.testing import models as tiny
    from dagfusion.nodes.diffusion.conditioning import class_conditioning
    from dagfusion.nodes.diffusion.data import Latent

    pixart = tiny.pixart_handles()
    dit = tiny.dit_model()
    return {
        "pixart": (pixart["model"], pixart["conditioning"], pixart["latent"]),
        "dit": (dit, class_conditioning([1]), Latent(torch.zeros(1, 4, 8, 8))),
    }


def run(model: Any, conditioning: Any, latent: Any, **options: Any) -> Any:
    options = {"steps": STEPS, "guidance_scale": 4.0, "sampler": "euler", "seed": 3, **options}
    out, report = run_sampling(model, conditioning, latent, **options)
    REPORTS.update(report.patches)
    return out.samples


REPORTS: dict[str, Any] = {}


def stats_of(patch: Any) -> dict[str, Any]:
    """What ``patch``'s hook reported in the last run of a handle carrying it (from the run report)."""
    return REPORTS[patch.key]


def gates_for(model: Any, seed: int = 0, **settings: Any) -> LazyGates:
    arch = architecture(model.denoiser)
    return LazyGates(new_gates(arch, seed=seed), arch, **settings)


def relative(a: Any, b: Any) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


@contextlib.contextmanager
def counting(module: Any):  # type: ignore[no-untyped-def]
    """Rows each gated module kind really computed (hooks inside attn1 and ff)."""
    counts = {"attn": 0, "mlp": 0}
    handles = []

    def counter(kind: str) -> Any:
        def hook(mod: Any, args: Any, out: Any) -> None:
            counts[kind] += int(args[0].shape[0])

        return hook

    for block in module.transformer_blocks:
        handles.append(block.attn1.to_q.register_forward_hook(counter("attn")))
        handles.append(block.ff.net[0].register_forward_hook(counter("mlp")))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def assert_clean(module: Any) -> None:
    """No LazyDiT leftovers: no instance forward, no hooks, no registered controller."""
    for block in module.transformer_blocks:
        for sub in (block.attn1, block.ff):
            assert "forward" not in sub.__dict__
            assert not sub._forward_hooks and not sub._forward_pre_hooks
    with pytest.raises(ValueError, match="no LazyDiT gates"):
        ld.controller(module)


def context(settings: Any, tmp_path: Path) -> RunContext:
    return RunContext("test", "run", settings, tmp_path / "outputs", CancelToken())


# --- sampling -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_nothing_skipped_reproduces_the_plain_sampler_exactly(models: Any, kind: str) -> None:
    model, conditioning, latent = models[kind]
    plain = run(model, conditioning, latent)
    gates = gates_for(model)
    assert torch.equal(run(model.with_patch(gates), conditioning, latent), plain)  # gates present, rule off
    for settings in ({"rule": "laziness", "laziness": 0.0}, {"rule": "threshold", "threshold": 1.0}):
        patch = gates.configured(**settings)
        with counting(model.denoiser) as counts:
            out = run(model.with_patch(patch), conditioning, latent)
        assert torch.equal(out, plain), settings
        stats = stats_of(patch)
        assert stats["skipped"] == 0 and stats["skip_fraction"] == 0.0
        assert stats["evaluated"] == counts["attn"] + counts["mlp"] == STEPS * len(stats_slots(model)) * 2


def stats_slots(model: Any) -> list[Any]:
    return [(i, k) for i in range(len(model.denoiser.transformer_blocks)) for k in ld.KINDS]


@pytest.mark.parametrize("kind", ["pixart", "dit"])
@pytest.mark.parametrize("laziness", [0.25, 0.5, 1.0])
def test_laziness_skips_about_its_fraction_and_counts_exactly(models: Any, kind: str, laziness: float) -> None:
    model, conditioning, latent = models[kind]
    plain = run(model, conditioning, latent)
    other_seed = run(model, conditioning, latent, seed=4)
    patch = gates_for(model, seed=1, rule="laziness", laziness=laziness)
    with counting(model.denoiser) as counts:
        out = run(model.with_patch(patch), conditioning, latent)
    stats = stats_of(patch)
    assert torch.isfinite(out).all()
    # Much closer to the plain run than another seed's plain run is.
    assert relative(out, plain) < 0.1 * relative(other_seed, plain)
    # What was computed is exactly what was not skipped, per kind.
    rows = 2  # both guidance halves
    blocks = len(model.denoiser.transformer_blocks)
    for name in ld.KINDS:
        evaluated = STEPS * blocks * rows
        assert counts[name] == evaluated - round(stats[f"{name}_skip_fraction"] * evaluated)
    assert stats["evaluated"] - stats["skipped"] == counts["attn"] + counts["mlp"]
    assert stats["skip_fraction"] == stats["skipped"] / stats["evaluated"]
    # Step 0 computes everything; how close later steps come to the target fraction is the next test.
    assert stats["steps"][0]["skipped"] == 0 and stats["steps"][0]["threshold"] is None
    assert stats["calls"] == STEPS and stats["rule"] == "laziness" and stats["laziness"] == laziness
    later = stats["steps"][1:]
    assert 0 < sum(s["skipped"] for s in later) <= sum(s["total"] for s in later)
    if laziness == 1.0:
        assert stats["skipped_calls"] == (STEPS - 1) * blocks * 2
        assert all(s["skipped"] == s["total"] for s in later)


def _batch_of(conditioning: Any, latent: Any, rows: int) -> tuple[Any, Any]:
    """``rows`` copies of a one-row conditioning and latent (more gated slots per step)."""
    from dagfusion.nodes.diffusion.data import Conditioning, Latent

    def repeat(values: Any) -> Any:
        if values is None:
            return None
        return {k: v.repeat(rows, *([1] * (v.dim() - 1))) if hasattr(v, "dim") and v.dim() > 0 else v for k, v in values.items()}

    return (Conditioning(conditioning.kind, repeat(conditioning.positive), repeat(conditioning.negative)),
            Latent(latent.samples.repeat(rows, *([1] * (latent.samples.dim() - 1)))))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pixart", "dit"])
@pytest.mark.parametrize("laziness", [0.25, 0.5])
def test_laziness_skips_its_fraction_within_five_points(models: Any, kind: str, laziness: float) -> None:
    """The laziness rule skips the asked fraction of modules on the steps after the first (the
    documented behaviour: the threshold is the previous step's 1 − L score quantile). Measured at
    25 steps over 8 rows (64 gated slots a step; the first test's 6 steps of one row leave only 8
    slots a step and large timestep jumps): pixart 0.2331 / 0.4824, dit 0.2428 / 0.5020 for
    laziness 0.25 / 0.5 — within ±0.05 of the target, the bound asserted."""
    model, conditioning, latent = models[kind]
    if kind == "dit":
        from dagfusion.nodes.diffusion.conditioning import class_conditioning

        conditioning, latent = class_conditioning(list(range(1, 9))), _batch_of(conditioning, latent, 8)[1]
    else:
        conditioning, latent = _batch_of(conditioning, latent, 8)
    patch = gates_for(model, seed=1, rule="laziness", laziness=laziness)
    run(model.with_patch(patch), conditioning, latent, steps=25)
    later = stats_of(patch)["steps"][1:]
    assert later[0]["total"] == 64
    fraction = sum(s["skipped"] for s in later) / sum(s["total"] for s in later)
    print(f"LazyDiT {kind} laziness {laziness}: skipped fraction after the first step {fraction:.4f}")
    assert abs(fraction - laziness) <= 0.05


def test_fixed_threshold_skips_where_the_score_is_above_it(models: Any) -> None:
    model, conditioning, latent = models["pixart"]
    low = gates_for(model, rule="threshold", threshold=0.0)  # every score is above 0
    with counting(model.denoiser) as counts:
        run(model.with_patch(low), conditioning, latent)
    blocks = len(model.denoiser.transformer_blocks)
    assert counts == {"attn": blocks * 2, "mlp": blocks * 2}  # step 0 only
    late = gates_for(model, rule="threshold", threshold=0.0, start_step=4)
    run(model.with_patch(late), conditioning, latent)
    assert [c["skipped"] for c in stats_of(late)["steps"]] == [0, 0, 0, 0, blocks * 4, blocks * 4]
    mid = gates_for(model, rule="threshold", threshold=0.5)
    run(model.with_patch(mid), conditioning, latent)
    assert 0 < stats_of(mid)["skip_fraction"] < 1


def test_sampling_twice_gives_identical_results_and_leaves_the_module_unchanged(models: Any) -> None:
    model, conditioning, latent = models["pixart"]
    before = run(model, conditioning, latent)
    patch = gates_for(model, seed=2, rule="laziness", laziness=0.5)
    lazy = model.with_patch(patch)
    first = run(lazy, conditioning, latent)
    stats = stats_of(patch)
    second = run(lazy, conditioning, latent)
    assert torch.equal(first, second)
    assert stats_of(patch) == stats
    assert_clean(model.denoiser)
    assert torch.equal(run(model, conditioning, latent), before)

    def boom(call: Any, forward: Any) -> Any:
        if call.step.index == 2:
            raise RuntimeError("boom")
        return forward(call)

    with pytest.raises(RuntimeError, match="boom"):
        run(lazy.with_patch(FunctionPatch(boom, key="test.boom")), conditioning, latent)
    assert_clean(model.denoiser)
    assert torch.equal(run(lazy, conditioning, latent), first)


def test_stats_node_reads_the_report_of_the_run(models: Any, settings: Any, tmp_path: Path) -> None:
    model, conditioning, latent = models["pixart"]
    patch = gates_for(model, rule="laziness", laziness=0.5)
    lazy = model.with_patch(patch)
    options = {"guidance_scale": 4.0, "sampler": "euler"}
    _, report = run_sampling(lazy, conditioning, latent, steps=STEPS, seed=3, **options)
    _, later = run_sampling(lazy, conditioning, latent, steps=3, seed=5, **options)  # a later run changes nothing
    fraction, text = ld.lazydit_stats.fn(context(settings, tmp_path), report=report)
    assert json.loads(text)["calls"] == STEPS and fraction == json.loads(text)["skip_fraction"] > 0
    assert json.loads(text) == report.patch(patch.key)
    assert later.patch(patch.key)["calls"] == 3
    assert not hasattr(patch, "last_stats") and not hasattr(patch, "runs")
    _, plain = run_sampling(model.with_patch(gates_for(model)), conditioning, latent, steps=2, seed=3, **options)
    with pytest.raises(ValueError, match="no LazyDiT skipping"):
        ld.lazydit_stats.fn(context(settings, tmp_path), report=plain)


def test_the_stats_node_works_on_a_run_served_from_the_cache(engine: Any, tmp_path: Path) -> None:
    from dagfusion.testing import models as tiny
    from dagfusion.validation import validate
    from dagfusion.workflow import load_workflow, parse_workflow

    folder = tiny.write_model("pixart", tmp_path / "pixart", seed=0)
    head = f"""
format_version: 1
nodes:
  load: {{{{type: dagfusion.models.LoadDiffusers, inputs: {{{{path: "{folder}", dtype: fp32}}}}}}}}
  text: {{{{type: dagfusion.text.Encode, inputs: {{{{clip: {{{{from: load.clip}}}}, prompt: a red circle}}}}}}}}
  latent: {{{{type: dagfusion.latent.EmptyLatent, inputs: {{{{model: {{{{from: load.model}}}}, width: 32, height: 32}}}}}}}}
  gates: {{{{type: dagfusion.cache.LazyDiTGates, inputs: {{{{model: {{{{from: load.model}}}}, seed: 1, init_bias: 0.5}}}}}}}}
  lazy: {{{{type: dagfusion.cache.LazyDiT, inputs: {{{{model: {{{{from: gates.model}}}}, laziness: 0.5}}}}}}}}
  sample: {{{{type: dagfusion.sampling.Sample, inputs: {{{{model: {{{{from: lazy.model}}}}, conditioning: {{{{from: text.conditioning}}}},
           latent: {{{{from: latent.latent}}}}, steps: 4, guidance_scale: 4.0, sampler: euler}}}}}}}}
"""
    first = engine.run(load_workflow(head.format(), text=True), out=tmp_path / "one")
    assert first.ok, first.errors
    stats = "  stats: {type: dagfusion.cache.LazyDiTStats, inputs: {report: {from: sample.report}}}\n"
    second = engine.run(load_workflow(head.format() + stats, text=True), out=tmp_path / "two")
    assert second.ok, second.errors
    assert "sample" in second.cached and "stats" in second.executed
    data = json.loads(second.output("stats.stats"))
    assert data["calls"] == 4 and second.output("stats.skip_fraction") == data["skip_fraction"] > 0
    # A file written for LazyDiTStats 1.x (model and latent) is migrated to read the report.
    old = "  stats: {type: dagfusion.cache.LazyDiTStats, version: 1.0.0, inputs: {model: {from: lazy.model}, latent: {from: sample.latent}}}\n"
    workflow, problems = parse_workflow(head.format() + old)
    assert problems == []
    migrated = validate(workflow, engine.registry).workflow.nodes["stats"]
    assert set(migrated.inputs) == {"report"} and str(migrated.inputs["report"]) == "sample.report"


# --- training -----------------------------------------------------------------------------------------


def fixed_batch_loss(module: Any, patch: LazyGates, objective: LazyGateObjective, clip: Any) -> tuple[float, dict[str, float]]:
    """The gate loss on a fixed batch and timesteps, with ``patch`` applied to ``module``."""
    from dagfusion.model import family_for
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.training.objectives import ModelCall, TrainBatch, TrainStep

    family = family_for(module)
    x0 = torch.randn((4, 4, 16, 16), generator=torch.Generator().manual_seed(0)) * 0.8
    cond = encode_prompt(clip, "a large red circle on the left on a black background", "")
    prepared = family.prepare(module, cond, batch=4, cfg=False, device=torch.device("cpu"), dtype=torch.float32,
                              latent_shape=tuple(x0.shape), scale=2, guidance_scale=1.0)
    call = ModelCall(module, family, prepared.kwargs, contextlib.nullcontext)
    with apply_patches([patch], module), torch.no_grad():
        loss, values = objective.loss(call, TrainBatch(x0, ("",) * 4), TrainStep(0, 1), torch.Generator().manual_seed(1))
    return float(loss), values


def test_training_through_the_train_node_changes_only_the_gates(engine: Any, tmp_path: Path) -> None:
    from dagfusion.testing import models as tiny
    from dagfusion.workflow import load_workflow

    folder = tiny.write_model("pixart", tmp_path / "pixart", seed=0)
    workflow = load_workflow(f"""
format_version: 1
nodes:
  load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", dtype: fp32}}}}
  data: {{type: dagfusion.shapes.Dataset, inputs: {{resolution: 32}}}}
  gates: {{type: dagfusion.cache.LazyDiTGates, inputs: {{model: {{from: load.model}}, seed: 0}}}}
  objective:
    type: dagfusion.cache.LazyGateLoss
    inputs: {{sampling_steps: 10, target_laziness: 0.5, laziness_weight: 1.0, beta_schedule: linear,
              beta_start: 0.0001, beta_end: 0.02}}
  train:
    type: dagfusion.train.Train
    inputs: {{model: {{from: gates.model}}, data: {{from: data.dataset}}, clip: {{from: load.clip}},
              vae: {{from: load.vae}}, objective: {{from: objective.objective}}, trainable: patches, steps: 12,
              batch_size: 2, learning_rate: 0.01, weight_decay: 0.0, caption_dropout: 0.0, checkpoint_every: 0}}
""", text=True)
    result = engine.run(workflow, out=tmp_path / "out")
    assert result.ok, result.errors
    loaded, gated, trained = (result.output(f"{n}.model") for n in ("load", "gates", "train"))
    objective = result.output("objective.objective")
    assert isinstance(objective, LazyGateObjective)
    assert objective.stride == 100

    # The transformer is bit-identical; its scheduler is unchanged.
    original = loaded.denoiser.state_dict()
    after = trained.denoiser.state_dict()
    assert original.keys() == after.keys()
    assert all(torch.equal(original[k], after[k]) for k in original)
    assert trained.scheduler == loaded.scheduler
    # Only the gates changed (the input handle's gates are untouched copies).
    (_, fresh), (_, learnt) = ld.find_gates(gated), ld.find_gates(trained)
    assert learnt.arch == fresh.arch and learnt.gates is not fresh.gates
    assert fresh.digest() == ld.find_gates(gated)[1].digest() != learnt.digest()
    changed = [k for k, v in fresh.state_dict().items() if not torch.equal(v, learnt.state_dict()[k])]
    assert changed and all(k.split(".")[0] in ld.KINDS for k in changed)
    assert torch.isfinite(torch.tensor(result.output("train.final_loss")))

    # The gate loss on a fixed batch is lower with the trained gates than with the fresh ones.
    clip = result.output("load.clip")
    start, start_values = fixed_batch_loss(trained.denoiser, fresh, objective, clip)
    end, end_values = fixed_batch_loss(trained.denoiser, learnt, objective, clip)
    assert start_values["penalty"] > 0
    assert end < start
    assert end_values["laziness"] > start_values["laziness"]


def test_the_objective_mixes_previous_and_current_outputs(models: Any) -> None:
    model, _, _ = models["pixart"]
    clip = _tiny_clip()
    module = model.denoiser
    objective = LazyGateObjective(laziness_weight=0.0, sampling_steps=10)
    arch = architecture(module)
    never = LazyGates(new_gates(arch, init_bias=-40.0, init_std=0.0), arch)  # s = 0: the full model
    always = LazyGates(new_gates(arch, init_bias=40.0, init_std=0.0), arch)  # s = 1: all previous outputs
    loss, values = fixed_batch_loss(module, never, objective, clip)
    assert loss < 1e-12 and values["laziness"] < 1e-12
    loss, values = fixed_batch_loss(module, always, objective, clip)
    assert loss > 1e-8 and values["laziness"] == pytest.approx(1.0)
    assert_clean(module)


def _tiny_clip() -> Any:
    from dagfusion.model import TextEncoderBundle
    from dagfusion.testing import models as tiny

    pipe = tiny._cached_pipeline("pixart", 0)
    return TextEncoderBundle.from_modules("t5", [pipe.text_encoder], [pipe.tokenizer],
                                          options={"max_length": 120, "lowercase": True})


def test_the_objective_refuses_models_it_cannot_train(models: Any) -> None:
    from dagfusion.model import family_for
    from dagfusion.nodes.training.objectives import ModelCall, TrainBatch, TrainStep

    model, _, _ = models["pixart"]
    module = model.denoiser
    objective = LazyGateObjective()
    call = ModelCall(module, family_for(module), {}, contextlib.nullcontext)
    batch = TrainBatch(torch.zeros(1, 4, 8, 8), ("",))
    with pytest.raises(ValueError, match="LazyDiTGates"):
        objective.loss(call, batch, TrainStep(0, 1), torch.Generator())
    weight = module.transformer_blocks[0].attn1.to_q.weight
    weight.requires_grad_(True)
    try:
        with apply_patches([gates_for(model)], module), pytest.raises(ValueError, match="trainable input to 'patches'"):
            objective.loss(call, batch, TrainStep(0, 1), torch.Generator())
    finally:
        weight.requires_grad_(False)
    assert objective.sampling_scheduler("base") == "base"
    with pytest.raises(ValueError, match="zero terminal SNR"):
        LazyGateObjective(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="sampling_steps"):
        LazyGateObjective(sampling_steps=1)


# --- files and errors -----------------------------------------------------------------------------------


def test_save_and_load_round_trip_gives_identical_outputs(models: Any, settings: Any, tmp_path: Path) -> None:
    model, conditioning, latent = models["pixart"]
    ctx = context(settings, tmp_path)
    gated = ld.lazydit_gates.fn(ctx, model=model, seed=5, init_bias=0.5)
    lazy = ld.lazydit.fn(ctx, model=gated, rule="laziness", laziness=0.5, threshold=0.5, start_step=1)
    expected = run(lazy, conditioning, latent)
    path = ld.save_lazy_gates.fn(ctx, model=lazy, filename="gates/pixart.safetensors")
    assert Path(path).is_file() and Path(path).is_relative_to(tmp_path / "outputs")

    loaded = ld.load_lazy_gates.fn(ctx, model=model, path=path)
    (_, original), (_, copy) = ld.find_gates(lazy), ld.find_gates(loaded)
    assert copy.rule == "off" and copy.digest() == original.digest()
    relazy = ld.lazydit.fn(ctx, model=loaded, rule="laziness", laziness=0.5, threshold=0.5, start_step=1)
    assert relazy.__dagfusion_fingerprint__() == lazy.__dagfusion_fingerprint__()
    assert torch.equal(run(relazy, conditioning, latent), expected)
    # Loading onto a model that already has gates replaces them and keeps their settings.
    replaced = ld.load_lazy_gates.fn(ctx, model=ld.lazydit_gates.fn(ctx, model=model, seed=9, init_bias=0.0), path=path)
    assert len(replaced.patches) == 1 and ld.find_gates(replaced)[1].digest() == original.digest()
    assert torch.equal(run(ld.lazydit.fn(ctx, model=replaced, rule="laziness", laziness=0.5, threshold=0.5,
                                         start_step=1), conditioning, latent), expected)
    assert model.patches == ()


def test_gates_refuse_another_architecture_and_unets(models: Any, settings: Any, tmp_path: Path) -> None:
    from dagfusion.testing import models as tiny

    pixart, dit = models["pixart"][0], models["dit"][0]
    ctx = context(settings, tmp_path)
    path = ld.save_lazy_gates.fn(ctx, model=ld.lazydit_gates.fn(ctx, model=pixart, seed=0, init_bias=0.0),
                                 filename="pixart.safetensors")
    with pytest.raises(ValueError, match=r"made for a PixArtTransformer2DModel with 2 blocks of width 24.*DiTTransformer2DModel"):
        ld.load_lazy_gates.fn(ctx, model=dit, path=path)
    with pytest.raises(ValueError, match="made for"):
        run(dit.with_patch(gates_for(pixart, rule="laziness")), *models["dit"][1:])
    assert_clean(dit.denoiser)

    from safetensors.torch import save_file

    other = tmp_path / "outputs" / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a LazyDiT gate file"):
        ld.load_lazy_gates.fn(ctx, model=pixart, path=str(other))

    unet = tiny.sd_handles()["model"]
    with pytest.raises(TypeError, match="DeepCache"):
        ld.lazydit_gates.fn(ctx, model=unet, seed=0, init_bias=0.0)
    with pytest.raises(ValueError, match="no LazyDiT gates"):
        ld.lazydit.fn(ctx, model=pixart, rule="laziness", laziness=0.5, threshold=0.5, start_step=1)
    with pytest.raises(NodeInputError, match="already has LazyDiT gates"):
        ld.lazydit_gates.fn(ctx, model=pixart.with_patch(gates_for(pixart)), seed=0, init_bias=0.0)


@pytest.mark.parametrize(
    ("inputs", "name", "code"),
    [("{sampling_steps: 600, train_timesteps: 1000}", "sampling_steps", "bad-range"),
     ("{prediction: epsilon, zero_terminal_snr: true}", "prediction", "bad-prediction")],
)
def test_gate_loss_validation_names_node_and_input(registry: Any, inputs: str, name: str, code: str) -> None:
    from dagfusion.validation import check
    from dagfusion.workflow import load_workflow

    text = f"format_version: 1\nnodes:\n  loss: {{type: dagfusion.cache.LazyGateLoss, inputs: {inputs}}}\n"
    _, problems, _ = check(load_workflow(text, text=True), registry)
    assert [(p.node, p.input, p.code) for p in problems] == [("loss", name, code)]


def test_gate_loss_linked_bad_value_raises_node_input_error(tmp_path: Path) -> None:
    from dagfusion import NodeInputError
    from dagfusion.testing import NodeCallContext

    with pytest.raises(NodeInputError) as info:
        ld.lazy_gate_loss.fn(NodeCallContext(tmp_path), laziness_weight=1.0, target_laziness=0.5, sampling_steps=600,
                             prediction="epsilon", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             train_timesteps=1000, zero_terminal_snr=False)
    assert info.value.input == "sampling_steps"


# --- per-step gates (one gate row per sampling step, as in the reference code) ---------------------------


def step_pattern_gates(model: Any, lazy_steps: set[int], steps: int = STEPS, **settings: Any) -> LazyGates:
    """Per-step gates whose rows score 1 (lazy) at ``lazy_steps`` and 0 elsewhere, whatever the input."""
    arch = architecture(model.denoiser)
    gates = new_gates(arch, steps=steps, init_std=0.0, init_bias=-40.0)
    with torch.no_grad():
        for kind in ld.KINDS:
            for layer in gates[kind]:
                for step in lazy_steps:
                    layer.bias[step] = 40.0
    return LazyGates(gates, arch, **settings)


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_per_step_gates_skip_only_at_the_steps_their_rows_say(models: Any, kind: str) -> None:
    model, conditioning, latent = models[kind]
    patch = step_pattern_gates(model, {2, 3, 5}, rule="threshold", threshold=0.5)
    assert patch.steps == STEPS
    with counting(model.denoiser) as counts:
        out = run(model.with_patch(patch), conditioning, latent)
    stats = stats_of(patch)
    per_call = 2 * len(model.denoiser.transformer_blocks) * 2  # modules × guidance rows
    assert [s["skipped"] for s in stats["steps"]] == [0, 0, per_call, per_call, 0, per_call]
    assert counts["attn"] + counts["mlp"] == 3 * per_call and stats["gate_steps"] == STEPS
    assert torch.isfinite(out).all()
    # A run with another step count uses the gate row of the same fraction of the run.
    half = step_pattern_gates(model, {2, 4}, rule="threshold", threshold=0.5)
    run(model.with_patch(half), conditioning, latent, steps=STEPS // 2)
    assert [s["skipped"] for s in stats_of(half)["steps"]] == [0, per_call, per_call]
    assert_clean(model.denoiser)


def test_per_step_gate_file_round_trips_and_old_files_still_load(models: Any, settings: Any, tmp_path: Path) -> None:
    model, conditioning, latent = models["pixart"]
    ctx = context(settings, tmp_path)
    gated = ld.lazydit_gates.fn(ctx, model=model, seed=5, init_bias=0.3, sampling_steps=STEPS)
    lazy = ld.lazydit.fn(ctx, model=gated, rule="threshold", threshold=0.5, laziness=0.5, start_step=1)
    (_, original) = ld.find_gates(lazy)
    rows = {v.shape[0] for k, v in original.state_dict().items()}
    assert original.steps == STEPS and rows == {STEPS}
    expected = run(lazy, conditioning, latent)
    path = ld.save_lazy_gates.fn(ctx, model=lazy, filename="gates/steps.safetensors")
    loaded = ld.load_lazy_gates.fn(ctx, model=model, path=path)
    (_, copy) = ld.find_gates(loaded)
    assert copy.steps == STEPS and copy.digest() == original.digest()
    relazy = ld.lazydit.fn(ctx, model=loaded, rule="threshold", threshold=0.5, laziness=0.5, start_step=1)
    assert torch.equal(run(relazy, conditioning, latent), expected)
    # Step-independent gates (and files written before per-step gates) load as one row per module.
    single = ld.save_lazy_gates.fn(ctx, model=ld.lazydit_gates.fn(ctx, model=model, seed=5, init_bias=0.3),
                                   filename="gates/single.safetensors")
    arch, gates = LazyGates.read(single)
    assert LazyGates(gates, arch).steps == 1
    assert {tuple(v.shape) for k, v in gates.state_dict().items() if k.endswith("bias")} == {(1,)}


def train_gates(module: Any, patch: LazyGates, objective: LazyGateObjective, clip: Any, steps: int,
                lr: float = 0.05) -> list[dict[str, float]]:
    """``steps`` Adam steps of the gate objective on a fixed batch (new noise and timesteps each step)."""
    from dagfusion.model import family_for
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.nodes.training.objectives import ModelCall, TrainBatch, TrainStep

    family = family_for(module)
    x0 = torch.randn((4, 4, 16, 16), generator=torch.Generator().manual_seed(0)) * 0.8
    cond = encode_prompt(clip, "a large red circle on the left on a black background", "")
    prepared = family.prepare(module, cond, batch=4, cfg=False, device=torch.device("cpu"), dtype=torch.float32,
                              latent_shape=tuple(x0.shape), scale=2, guidance_scale=1.0)
    call = ModelCall(module, family, prepared.kwargs, contextlib.nullcontext)
    params = list(patch.trainable_parameters().values())
    frozen = [p for p in module.parameters() if p.requires_grad]  # the transformer stays frozen (as Train does)
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(1)
    history = []
    try:
        with apply_patches([patch], module):
            for step in range(steps):
                loss, values = objective.loss(call, TrainBatch(x0, ("",) * 4), TrainStep(step, steps), generator)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                history.append(values)
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
    return history


def test_the_penalty_drives_per_step_gates_toward_the_target_laziness(models: Any) -> None:
    model, _, _ = models["pixart"]
    module = model.denoiser
    arch = architecture(module)
    patch = LazyGates(new_gates(arch, steps=10, init_bias=-3.0), arch)
    before = {k: v.clone() for k, v in patch.state_dict().items()}
    objective = LazyGateObjective(laziness_weight=10.0, target_laziness=0.6, sampling_steps=10,
                                  beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    history = train_gates(module, patch, objective, _tiny_clip(), steps=30, lr=0.02)
    assert history[0]["laziness"] < 0.1 and history[0]["penalty"] > 0
    # Each step trains the rows of the steps it drew, so the mean wanders; it ends near the target.
    assert abs(sum(v["laziness"] for v in history[-5:]) / 5 - objective.target_laziness) < 0.15
    # Each row is a sampling step's gate: row 0 (step 0 always computes) is never trained, the others are.
    after = patch.state_dict()
    bias = next(k for k in after if k.endswith("bias"))
    assert after[bias][0] == before[bias][0] and (after[bias][1:] != before[bias][1:]).all()
    assert_clean(module)


def test_the_objective_refuses_per_step_gates_for_another_step_count(models: Any) -> None:
    model, _, _ = models["pixart"]
    module = model.denoiser
    arch = architecture(module)
    patch = LazyGates(new_gates(arch, steps=8), arch)
    objective = LazyGateObjective(sampling_steps=10, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    with pytest.raises(ValueError, match="sampling_steps to 8"):
        fixed_batch_loss(module, patch, objective, _tiny_clip())
    assert [int(t) for t in LazyGateObjective(sampling_steps=4).grid()] == [999, 749, 499, 249]
    assert [int(t) for t in LazyGateObjective(sampling_steps=4, timestep_spacing="leading").grid()] == [750, 500, 250, 0]


@pytest.mark.parametrize(("max_reuse", "pattern"), [(0, [0, 1, 1, 1, 1, 1]), (1, [0, 1, 0, 1, 0, 1]), (2, [0, 1, 1, 0, 1, 1])])
def test_max_reuse_caps_how_many_steps_in_a_row_an_output_stands_in(models: Any, max_reuse: int, pattern: list[int]) -> None:
    model, conditioning, latent = models["pixart"]
    always = gates_for(model, rule="threshold", threshold=0.0, max_reuse=max_reuse)  # every score is above 0
    with counting(model.denoiser) as counts:
        run(model.with_patch(always), conditioning, latent)
    per_call = 2 * len(model.denoiser.transformer_blocks) * 2
    stats = stats_of(always)
    assert [s["skipped"] for s in stats["steps"]] == [per_call * p for p in pattern]
    assert counts["attn"] + counts["mlp"] == per_call * (STEPS - sum(pattern))
    assert stats.get("max_reuse", 0) == max_reuse


def test_laziness_rule_with_per_step_gates_skips_about_its_fraction(models: Any) -> None:
    """With per-step gates the threshold is the quantile of the previous step's inputs scored by
    *this* step's gate row, so the asked fraction holds although every row scores differently."""
    model, conditioning, latent = models["pixart"]
    conditioning, latent = _batch_of(conditioning, latent, 4)
    arch = architecture(model.denoiser)
    gates = new_gates(arch, seed=1, steps=STEPS, init_std=0.01)
    with torch.no_grad():
        for kind in ld.KINDS:
            for layer in gates[kind]:
                layer.bias.copy_(torch.linspace(-4.0, 4.0, STEPS))  # step k's row: ever lazier
    patch = LazyGates(gates, arch, rule="laziness", laziness=0.5)
    run(model.with_patch(patch), conditioning, latent)
    later = stats_of(patch)["steps"][1:]
    fraction = sum(s["skipped"] for s in later) / sum(s["total"] for s in later)
    assert abs(fraction - 0.5) <= 0.1
    # Without rescoring the previous scores (lower biases) would put every later row above the threshold.
    assert all(s["skipped"] < s["total"] for s in later)
