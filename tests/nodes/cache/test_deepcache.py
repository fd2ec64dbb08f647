"""DeepCache: schedules, the partial UNet forward, sampling behaviour, state isolation and errors."""

from __future__ import annotations

import itertools
import traceback
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dagfusion.nodes.cache import deepcache
from dagfusion import NodeInputError
from dagfusion.nodes.cache.deepcache import (
    DeepCacheConfig,
    DeepCacheHook,
    DeepCachePatch,
    capture_deep_feature,
    unet_partial_forward,
)
from dagfusion.model import count_macs
from dagfusion.nodes.cache.schedules import full_steps, parse_steps, power_center_steps
from dagfusion.nodes.diffusion.sampling import run_sampling, sample

# --- schedules ---------------------------------------------------------------------------------


def test_uniform_schedule_runs_every_interval_th_step() -> None:
    assert full_steps("uniform", 7, 3) == [True, False, False, True, False, False, True]
    assert full_steps("uniform", 4, 1) == [True] * 4
    assert full_steps("uniform", 3, 10) == [True, False, False]


def test_non_uniform_schedule_matches_the_reference_implementation() -> None:
    # Values of DeepCache's sample_from_quad_center (numpy complex arithmetic) for these settings.
    assert power_center_steps(50, 10, 15, 1.4) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert power_center_steps(50, 17, 15, 1.4) == [0, 3, 6, 8, 11, 13, 15, 17, 20, 22, 25, 28, 32, 35, 38, 42, 46]
    assert power_center_steps(20, 7, 15, 1.4) == [0, 4, 8, 11, 14, 15, 17]
    plan = full_steps("non-uniform", 50, 5, pow=1.4, center=15)
    assert [i for i, f in enumerate(plan) if f] == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    # Denser around the center than at the end.
    chosen = [i for i, f in enumerate(plan) if f]
    gaps = [b - a for a, b in itertools.pairwise(chosen)]
    assert min(gaps) < max(gaps)
    assert full_steps("non-uniform", 6, 1, center=3) == [True] * 6
    assert full_steps("non-uniform", 6, 10, center=3) == [True] + [False] * 5


def test_non_uniform_schedule_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="center"):
        full_steps("non-uniform", 10, 3, center=15)
    with pytest.raises(ValueError, match="pow"):
        power_center_steps(50, 10, 15, pow=1.0)


def test_explicit_schedule_and_parsing() -> None:
    assert parse_steps("0,3, 5 5,,9") == [0, 3, 5, 9]
    assert full_steps("explicit", 6, explicit=[0, 3, 5]) == [True, False, False, True, False, True]
    assert full_steps("explicit", 4, explicit=[2])[0] is True  # step 0 is always full
    with pytest.raises(ValueError, match="full_steps.*'x'"):
        parse_steps("0,x,3")
    with pytest.raises(ValueError, match="full_steps"):
        parse_steps("0,-2")
    with pytest.raises(ValueError, match=r"full_steps lists step\(s\) \[7\].*6 steps"):
        full_steps("explicit", 6, explicit=[0, 7])
    with pytest.raises(ValueError, match="unknown cache schedule"):
        full_steps("sometimes", 6, 2)


def test_start_and_end_step_force_full_steps() -> None:
    plan = full_steps("uniform", 10, 100, start_step=2, end_step=8)
    assert plan == [True, True, False, False, False, False, False, False, True, True]


# --- the partial forward -----------------------------------------------------------------------


def _sd_inputs(unet: Any, batch: int = 2, size: tuple[int, int] = (16, 16), seed: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    kwargs: dict[str, Any] = {
        "encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    }
    if unet.config.addition_embed_type == "text_time":
        width = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, width, generator=g),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(batch, 1),
        }
    return x, torch.tensor(601), kwargs


def _check_partial_equals_full(unet: Any, x: Any, t: Any, kwargs: dict[str, Any], atol: float = 1e-5) -> None:
    with torch.no_grad():
        plain = unet(x, t, **kwargs).sample
        for branch in range(len(unet.up_blocks)):
            (full,), deep = capture_deep_feature(unet, branch, lambda: unet(x, t, **kwargs, return_dict=False))
            assert torch.equal(full, plain)  # capturing changes nothing
            assert deep is not None and deep.shape[0] == x.shape[0]
            partial = unet_partial_forward(unet, x, t, kwargs, branch, deep)
            diff = (partial - plain).abs().max().item()
            assert diff <= atol, f"branch {branch}: partial forward differs from the full output by {diff:.3g}"
    assert not any(m._forward_pre_hooks for m in unet.modules())


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_partial_forward_with_a_fresh_cache_reproduces_the_full_output(kind: str) -> None:
    from dagfusion.testing import models as tiny

    unet = tiny._cached_pipeline(kind, 0).unet
    x, t, kwargs = _sd_inputs(unet)
    _check_partial_equals_full(unet, x, t, kwargs)


def test_partial_forward_handles_odd_sizes_masks_embeddings_and_residuals() -> None:
    """A three-level UNet, odd latent size (upsample sizes), class + LCM embeddings, masks, ControlNet and T2I-Adapter residuals."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
        attention_head_dim=4, norm_num_groups=4, time_cond_proj_dim=6, class_embed_type="timestep",
    ).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 13, 11, generator=g)
    t = torch.tensor(321)
    kwargs = {
        "encoder_hidden_states": torch.randn(2, 5, 12, generator=g),
        "timestep_cond": torch.randn(2, 6, generator=g),
        "class_labels": torch.tensor([3, 700]),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    }
    _check_partial_equals_full(unet, x, t, kwargs)

    # Shapes of the skip features and of the adapter residuals, read off one forward.
    skips: list[Any] = []
    intra: list[Any] = []
    handles = [unet.conv_in.register_forward_hook(lambda m, a, o: skips.append(o.shape))]
    for block in unet.down_blocks:
        def grab(m: Any, a: Any, o: Any, block: Any = block) -> None:
            out, res = o
            skips.extend(r.shape for r in res)
            intra.append(res[len(block.resnets) - 1].shape if getattr(block, "has_cross_attention", False) else out.shape)
        handles.append(block.register_forward_hook(grab))
    with torch.no_grad():
        unet(x, t, **kwargs)
    for handle in handles:
        handle.remove()
    controlnet = {
        "down_block_additional_residuals": tuple(torch.randn(s, generator=g) for s in skips),
        "mid_block_additional_residual": torch.randn(2, 16, 4, 3, generator=g),
    }
    _check_partial_equals_full(unet, x, t, {**kwargs, **controlnet})
    residuals = [torch.randn(s, generator=g) for s in intra]
    with torch.no_grad():
        plain = unet(x, t, **kwargs, down_intrablock_additional_residuals=list(residuals)).sample
        for branch in range(3):
            call = {**kwargs, "down_intrablock_additional_residuals": list(residuals)}
            _, deep = capture_deep_feature(unet, branch, lambda call=call: unet(x, t, **call))
            adapter = {**kwargs, "down_intrablock_additional_residuals": residuals}
            assert torch.allclose(unet_partial_forward(unet, x, t, adapter, branch, deep), plain, atol=1e-5)
            assert len(residuals) == 3  # the caller's list is not consumed


def test_partial_forward_rejects_unknown_inputs() -> None:
    from dagfusion.testing import models as tiny

    unet = tiny._cached_pipeline("sd", 0).unet
    x, t, kwargs = _sd_inputs(unet, batch=1)
    with pytest.raises(TypeError, match="surprise"):
        unet_partial_forward(unet, x, t, {**kwargs, "surprise": 1}, 0, None)


# --- sampling ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return tiny.sd_handles()


@pytest.fixture(scope="module")
def sdxl() -> dict[str, Any]:
    from dagfusion.model import ModelHandle, TextEncoderBundle
    from dagfusion.nodes.diffusion.data import Latent, SchedulerSpec
    from dagfusion.nodes.diffusion.text import encode_prompt
    from dagfusion.testing import models as tiny

    pipe = tiny._cached_pipeline("sdxl", 0)
    scheduler = SchedulerSpec(type(pipe.scheduler).__name__, dict(pipe.scheduler.config))
    clip = TextEncoderBundle.from_modules(
        "sdxl", [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    )
    return {
        "model": ModelHandle.from_module(pipe.unet, scheduler=scheduler, vae_scale_factor=2),
        "conditioning": encode_prompt(clip, "a tiny red fox", ""),
        "latent": Latent(torch.zeros(2, 4, 16, 16)),
    }


LAST: dict[str, Any] = {}


def run(parts: dict[str, Any], model: Any = None, **options: Any) -> Any:
    """The latents of one run; its report is kept for :func:`stats_of`."""
    options = {"steps": 6, "guidance_scale": 5.0, "seed": 1, "sampler": "euler", **options}
    latent, LAST["report"] = run_sampling(model or parts["model"], parts["conditioning"], parts["latent"], **options)
    return latent.samples


def stats_of(patch: Any) -> dict[str, Any]:
    """What ``patch``'s hook reported in the last :func:`run`."""
    return LAST["report"].patch(patch.key)


def test_interval_one_equals_the_plain_sampler(sd: dict[str, Any]) -> None:
    plain = run(sd)
    patch = DeepCachePatch(DeepCacheConfig(interval=1))
    cached = run(sd, sd["model"].with_patch(patch))
    assert torch.equal(cached, plain)
    assert stats_of(patch)["full_calls"] == 6 and stats_of(patch)["partial_calls"] == 0
    assert stats_of(patch)["mac_fraction"] == 1.0


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("interval", [2, 3])
def test_caching_stays_close_and_computes_fewer_macs(kind: str, interval: int, request: pytest.FixtureRequest) -> None:
    parts = request.getfixturevalue(kind)
    guidance = 5.0 if kind == "sd" else 1.0  # SDXL without guidance: single-half batches
    plain = run(parts, guidance_scale=guidance)
    patch = DeepCachePatch(DeepCacheConfig(interval=interval))
    cached = run(parts, parts["model"].with_patch(patch), guidance_scale=guidance)
    assert torch.isfinite(cached).all()
    assert not torch.equal(cached, plain)
    relative_l1 = ((cached - plain).abs().sum() / plain.abs().sum()).item()
    assert relative_l1 < 0.1, relative_l1

    stats = stats_of(patch)
    plan = full_steps("uniform", 6, interval)
    assert stats["plan"] == plan
    assert stats["modes"] == [[i, "full" if f else "partial"] for i, f in enumerate(plan)]
    full, partial = sum(plan), 6 - sum(plan)
    assert (stats["full_calls"], stats["partial_calls"]) == (full, partial)
    assert stats["full_fraction"] == full / 6
    per_full, per_partial = stats["macs_full_call"], stats["macs_partial_call"]
    assert 0 < per_partial < per_full
    assert stats["macs"] == full * per_full + partial * per_partial
    assert stats["macs_uncached"] == 6 * per_full
    assert stats["mac_fraction"] == pytest.approx((full + partial * per_partial / per_full) / 6)
    assert stats["mac_fraction"] < 1.0


def test_full_call_macs_match_an_uncached_forward(sd: dict[str, Any]) -> None:
    patch = DeepCachePatch(DeepCacheConfig(interval=2))
    run(sd, sd["model"].with_patch(patch), steps=2)
    unet = sd["model"].denoiser
    x, t, kwargs = _sd_inputs(unet, batch=2)
    with torch.no_grad(), count_macs(unet) as counter:
        unet(x, t, **kwargs)
    assert stats_of(patch)["macs_full_call"] == counter.total


def test_deeper_branches_compute_more(sd: dict[str, Any]) -> None:
    plain = run(sd)
    fractions = []
    for branch in (0, 1):
        patch = DeepCachePatch(DeepCacheConfig(interval=3, branch=branch))
        cached = run(sd, sd["model"].with_patch(patch))
        assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
        fractions.append(stats_of(patch)["mac_fraction"])
    assert fractions[0] < fractions[1] < 1.0


def test_state_never_leaks_between_runs_and_nothing_is_changed(sd: dict[str, Any]) -> None:
    base = sd["model"]
    unet = base.denoiser
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    patched = base.with_patch(DeepCachePatch(DeepCacheConfig(interval=3)))
    first = run(sd, patched)
    second = run(sd, patched)
    clone = run(sd, patched.clone())
    assert torch.equal(first, second) and torch.equal(first, clone)
    # A shorter run in between (different cache shapes and steps) changes nothing either.
    run(sd, patched, steps=2, guidance_scale=1.0)
    assert torch.equal(run(sd, patched), first)
    assert base.patches == () and len(patched.patches) == 1
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in unet.modules())


def test_a_changed_batch_layout_runs_in_full(sd: dict[str, Any]) -> None:
    from dagfusion.model import DenoiserCall, StepInfo

    unet = sd["model"].denoiser
    hook = DeepCachePatch(DeepCacheConfig(interval=4)).begin(_FakeRun(unet, steps=4))
    assert isinstance(hook, DeepCacheHook)
    outputs = []
    for index, batch in enumerate([2, 2, 1, 1]):
        x, t, kwargs = _sd_inputs(unet, batch=batch, seed=index)
        halves = ("uncond", "cond") if batch == 2 else ("cond",)
        call = DenoiserCall(StepInfo(index, 4, t, float(t)), unet, x, t, kwargs, halves, "unet")
        with torch.no_grad():
            outputs.append(hook.denoise(call, lambda c: unet(c.sample, c.timestep, **c.kwargs).sample))
    stats = hook.end()
    assert [m for _, m in stats["modes"]] == ["full", "partial", "full", "partial"]
    assert all(o.shape[0] == b for o, b in zip(outputs, [2, 2, 1, 1]))


class _FakeRun:
    def __init__(self, module: Any, steps: int) -> None:
        self.module = module
        self.steps = steps


# --- the node ------------------------------------------------------------------------------------


def _node(model: Any, **inputs: Any) -> Any:
    values = {"interval": 3, "branch": 0, "schedule": "uniform", "full_steps": "", "pow": 1.4, "center": 15,
              "start_step": 0, "end_step": None, **inputs}
    return deepcache.deep_cache.fn(None, model=model, **values)


def test_node_returns_a_patched_clone_with_a_settings_key(sd: dict[str, Any]) -> None:
    base = sd["model"]
    out = _node(base, interval=2)
    assert base.patches == () and len(out.patches) == 1
    assert out.denoiser is base.denoiser
    keys = {_node(base, interval=i).patches[0].key for i in (2, 3)}
    keys |= {_node(base, interval=2, branch=1).patches[0].key}
    keys |= {_node(base, schedule="explicit", full_steps="0,2").patches[0].key}
    keys |= {_node(base, schedule="non-uniform", interval=2).patches[0].key}
    assert len(keys) == 5
    # Settings the schedule does not use leave the key alone.
    assert _node(base, pow=2.0).patches[0].key == _node(base).patches[0].key


def test_node_errors_are_clear(sd: dict[str, Any]) -> None:
    with pytest.raises(NodeInputError, match=r"branch 2 is out of range.*2 up-blocks.*between 0 .* and 1") as info:
        _node(sd["model"], branch=2)
    assert info.value.input == "branch"
    with pytest.raises(NodeInputError, match="full_steps is required") as info:
        _node(sd["model"], schedule="explicit")
    assert info.value.input == "full_steps"
    with pytest.raises(NodeInputError, match="full_steps.*'three'"):
        _node(sd["model"], schedule="explicit", full_steps="0,three")
    with pytest.raises(NodeInputError, match=r"end_step \(5\) must be greater than start_step \(5\)") as info:
        _node(sd["model"], start_step=5, end_step=5)
    assert info.value.input == "end_step"
    # An explicit list made for more steps fails at sampling time, naming the input.
    model = _node(sd["model"], schedule="explicit", full_steps="0,8")
    with pytest.raises(ValueError, match="full_steps lists step"):
        run(sd, model, steps=4)
    # A deeper branch than the UNet has, attached without the node, fails when sampling starts.
    with pytest.raises(ValueError, match="out of range"):
        run(sd, sd["model"].with_patch(DeepCachePatch(DeepCacheConfig(branch=5))), steps=1)


def test_node_rejects_transformer_denoisers() -> None:
    from dagfusion.model import ModelHandle
    from dagfusion.testing import models as tiny

    dit = ModelHandle.from_module(tiny._cached_pipeline("dit", 0).transformer)
    with pytest.raises(NodeInputError, match=r"DiTTransformer2DModel.*DiT cache") as info:
        _node(dit)
    assert info.value.input == "model"


# --- through the engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dagfusion.testing import models as tiny

    return tiny.write_model("sd", tmp_path_factory.mktemp("models") / "tiny-sd")


def test_handles_served_from_the_engine_cache_start_with_an_empty_cache(sd_folder: Path, tmp_path: Path) -> None:
    from dagfusion import Engine, Settings
    from dagfusion.registry import Registry
    from dagfusion.workflow import load_workflow

    registry = Registry.from_plugins(load_entrypoints=False, environ={})
    settings = Settings(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", read_dirs=(sd_folder, tmp_path),
                        device="cpu", source="tests")
    engine = Engine(registry, settings)

    def workflow(previews: tuple[int, int]) -> Any:
        sample = "{{model: {{from: fast.model}}, conditioning: {{from: text.conditioning}}, latent: {{from: latent.latent}}, " \
                 "sampler: euler, steps: 5, guidance_scale: 4.0, seed: 2, preview_every: {}}}"
        return load_workflow(f"""
format_version: 1
nodes:
  load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{sd_folder}", dtype: fp32}}}}
  text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: a red circle}}}}
  latent: {{type: dagfusion.latent.EmptyLatent, inputs: {{model: {{from: load.model}}, width: 32, height: 32, batch_size: 2}}}}
  fast: {{type: dagfusion.cache.DeepCache, inputs: {{model: {{from: load.model}}, interval: 3}}}}
  a: {{type: dagfusion.sampling.Sample, inputs: {sample.format(previews[0])}}}
  b: {{type: dagfusion.sampling.Sample, inputs: {sample.format(previews[1])}}}
  plain: {{type: dagfusion.sampling.Sample, inputs: {{model: {{from: load.model}}, conditioning: {{from: text.conditioning}}, latent: {{from: latent.latent}}, sampler: euler, steps: 5, guidance_scale: 4.0, seed: 2}}}}
""", text=True)

    def run_ok(wf: Any) -> Any:
        result = engine.run(wf, out=tmp_path / "runs")
        if not result.ok:
            pytest.fail("\n".join("".join(traceback.format_exception(e.original)) for e in result.errors.values()))
        return result

    first = run_ok(workflow((0, 100)))
    a, b = first.output("a.latent").samples, first.output("b.latent").samples
    assert torch.equal(a, b)  # the same handle, sampled twice in one run
    assert not torch.equal(a, first.output("plain.latent").samples)
    second = run_ok(workflow((50, 200)))  # DeepCache's handle now comes from the engine cache
    assert second.output("fast.model") is first.output("fast.model")
    assert torch.equal(second.output("a.latent").samples, a)
    assert torch.equal(second.output("b.latent").samples, a)
    assert first.output("load.model").patches == ()
    # Every run carries its statistics in its own report, also the run served from the cache.
    stats = first.output("a.report").patch(first.output("fast.model").patches[0].key)
    assert [m for _, m in stats["modes"]] == ["full", "partial", "partial", "full", "partial"]
    assert "plain" in second.cached and second.output("plain.report") == first.output("plain.report")
    assert second.output("a.report").patches == first.output("a.report").patches


def test_old_workflows_saying_end_step_10000_are_migrated() -> None:
    from dagfusion.registry import Registry
    from dagfusion.validation import validate
    from dagfusion.workflow import parse_workflow

    registry = Registry.from_plugins(load_entrypoints=False, environ={})
    text = """format_version: 1
nodes:
  load: {type: dagfusion.models.LoadEmbedded, inputs: {model: shapes-sd}}
  old: {type: dagfusion.cache.DeepCache, version: 1.0.0, inputs: {model: {from: load.model}, interval: 3, end_step: 10000}}
  kept: {type: dagfusion.cache.DeepCache, version: 1.0.0, inputs: {model: {from: load.model}, end_step: 8}}
  new: {type: dagfusion.cache.DeepCache, inputs: {model: {from: load.model}, interval: 3}}
"""
    workflow, problems = parse_workflow(text)
    assert problems == []
    validated = validate(workflow, registry)
    nodes = validated.workflow.nodes
    assert "end_step" not in nodes["old"].inputs and nodes["old"].version == "2.0.0"
    assert nodes["kept"].inputs["end_step"] == 8
    assert any("'old'" in w and "migrated" in w for w in validated.warnings)
    spec = registry.get("dagfusion.cache.DeepCache")
    assert spec.input("end_step").optional and not spec.input("end_step").required


def test_every_setting_is_in_the_key_and_plans_match_the_loose_settings(sd: dict[str, Any]) -> None:
    from dagfusion.fingerprint import fingerprint

    base = DeepCacheConfig(interval=3, schedule="non-uniform", center=2)
    changed = [DeepCacheConfig(interval=2, schedule="non-uniform", center=2),
               DeepCacheConfig(interval=3, schedule="non-uniform", center=3),
               DeepCacheConfig(interval=3, schedule="non-uniform", center=2, pow=2.0),
               DeepCacheConfig(interval=3, schedule="non-uniform", center=2, branch=1),
               DeepCacheConfig(interval=3, schedule="non-uniform", center=2, start_step=1),
               DeepCacheConfig(interval=3, schedule="non-uniform", center=2, end_step=5),
               DeepCacheConfig(schedule="explicit", full_steps=(0, 2))]
    handles = [sd["model"].with_patch(DeepCachePatch(c)) for c in (base, *changed)]
    assert len({fingerprint(h) for h in handles}) == len(handles)
    assert DeepCachePatch(base, measure=False).key == DeepCachePatch(base).key  # reporting is not a setting
    assert DeepCacheConfig(end_step=None).plan(6) == DeepCacheConfig(end_step=10000).plan(6)
    with pytest.raises(ValueError, match="end_step"):
        DeepCacheConfig(start_step=3, end_step=2)


def test_counting_for_the_report_changes_no_bit_of_the_result(sd: dict[str, Any]) -> None:
    model = sd["model"].with_patch(DeepCachePatch(DeepCacheConfig(interval=3, branch=1)))
    options = {"steps": 6, "guidance_scale": 5.0, "seed": 1, "sampler": "euler"}
    counted, report = run_sampling(model, sd["conditioning"], sd["latent"], **options)
    plain = sample(model, sd["conditioning"], sd["latent"], **options)
    assert torch.equal(counted.samples, plain.samples)
    assert [s.computed for s in report.steps] == [True, False, False, True, False, False]
    # The sampler's per-step count agrees with the MACs the cache measured for its calls.
    assert report.macs == report.patch(model.patches[0].key)["macs"]


def test_validation_reports_a_start_step_not_below_end_step_before_running(registry) -> None:
    from dagfusion.validation import check
    from dagfusion.workflow import load_workflow

    text = """format_version: 1
nodes:
  load: {type: dagfusion.models.LoadEmbedded, inputs: {model: shapes-sd}}
  cache:
    type: dagfusion.cache.DeepCache
    inputs: {model: {from: load.model}, start_step: 8, end_step: 8, schedule: explicit, full_steps: ''}
"""
    _, problems, _ = check(load_workflow(text, text=True), registry)
    found = sorted((p.node, p.input, p.code) for p in problems)
    assert found == [("cache", "end_step", "bad-range"), ("cache", "full_steps", "missing-full-steps")], problems
    assert all(p.line == 6 for p in problems)


def test_a_linked_bad_end_step_fails_the_run_naming_the_input(engine, tmp_path) -> None:
    from dagfusion.workflow import load_workflow

    text = """format_version: 1
nodes:
  load: {type: dagfusion.models.LoadEmbedded, inputs: {model: shapes-sd}}
  end: {type: dagfusion.util.Integer, inputs: {value: 2}}
  cache: {type: dagfusion.cache.DeepCache, inputs: {model: {from: load.model}, start_step: 4, end_step: {from: end.value}}}
"""
    result = engine.run(load_workflow(text, text=True), out=tmp_path / "runs", targets=["cache"])
    error = result.errors["cache"].original
    assert isinstance(error, NodeInputError) and error.input == "end_step"
