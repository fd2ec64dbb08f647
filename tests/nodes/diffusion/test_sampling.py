"""The sampling loop: step hooks, handle patch isolation, seeding, progress, cancel, previews, video seam."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from dagfusion import CancelToken, EventCollector, Input, NodePreview, NodeProgress, Output, hookimpl, node  # noqa: E402
from dagfusion.model import FunctionPatch, ModelHandle, ModelPatch, StepHook  # noqa: E402
from dagfusion.nodes.diffusion.data import Conditioning, Latent, SchedulerSpec  # noqa: E402
from dagfusion.nodes.diffusion.sampling import sample  # noqa: E402


class CountingPatch(ModelPatch):
    """Records (step index, timestep, input batch) of every denoiser call into a list the test owns."""

    def __init__(self, record: list[tuple[int, float, int]]) -> None:
        self.record = record
        self.key = f"tests.counting:{id(record)}"

    def begin(self, run: Any) -> StepHook:
        record = self.record

        class Hook(StepHook):
            def denoise(self, call: Any, forward: Any) -> Any:
                record.append((call.step.index, call.step.timestep_value, call.sample.shape[0]))
                return forward(call)

        return Hook()


class SkipOddSteps(ModelPatch):
    """A tiny cache scheduler: odd steps reuse the previous step's output instead of calling the denoiser."""

    key = "tests.skip-odd"

    def begin(self, run: Any) -> StepHook:
        class Hook(StepHook):
            def __init__(self) -> None:
                self.last = None
                self.ended = False

            def denoise(self, call: Any, forward: Any) -> Any:
                if call.step.index % 2 == 1 and self.last is not None:
                    return self.last
                self.last = forward(call)
                return self.last

            def end(self) -> None:
                self.ended = True
                self.last = None

        return Hook()


class ForwardCounter(ModelPatch):
    """A module-level patch: a forward pre-hook on the denoiser, removed when sampling ends."""

    def __init__(self, counter: list[int]) -> None:
        self.counter = counter
        self.key = f"tests.forward-counter:{id(counter)}"

    @contextlib.contextmanager
    def apply(self, module: Any):  # type: ignore[no-untyped-def]
        handle = module.register_forward_pre_hook(lambda *_: self.counter.append(1))
        try:
            yield
        finally:
            handle.remove()


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return tiny.sd_handles()


def run_sample(parts: dict[str, Any], model: ModelHandle | None = None, **options: Any) -> Any:
    options = {"steps": 4, "guidance_scale": 5.0, "seed": 1, "sampler": "euler", **options}
    return sample(model or parts["model"], parts["conditioning"], parts["latent"], **options).samples


def test_step_hook_sees_every_call_with_step_index_timestep_and_inputs(parts):
    record: list[tuple[int, float, int]] = []
    run_sample(parts, parts["model"].with_patch(CountingPatch(record)))
    assert [r[0] for r in record] == [0, 1, 2, 3]
    timesteps = [r[1] for r in record]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 4
    assert all(r[2] == 2 for r in record)  # both guidance halves in one call


def test_hook_can_replace_the_denoiser_call(parts):
    forwards: list[int] = []
    plain = run_sample(parts, parts["model"].with_patch(ForwardCounter(forwards)))
    assert len(forwards) == 4
    forwards.clear()
    skipping = parts["model"].with_patch(ForwardCounter(forwards)).with_patch(SkipOddSteps())
    skipped = run_sample(parts, skipping)
    assert len(forwards) == 2  # steps 1 and 3 reused the cached output
    assert not torch.equal(plain, skipped)
    zeros = FunctionPatch(lambda call, forward: torch.zeros_like(forward(call)), key="tests.zeros")
    assert not torch.equal(run_sample(parts, parts["model"].with_patch(zeros)), plain)


def test_clones_share_weights_but_never_patch_state(parts):
    base: ModelHandle = parts["model"]
    record: list[tuple[int, float, int]] = []
    patched = base.with_patch(CountingPatch(record))
    assert patched.denoiser is base.denoiser
    assert all(a is b for a, b in zip(patched.denoiser.parameters(), base.denoiser.parameters()))
    assert base.patches == () and len(patched.patches) == 1
    assert base.__dagfusion_fingerprint__() != patched.__dagfusion_fingerprint__()
    before = run_sample(parts, base)
    assert record == []
    run_sample(parts, patched)
    assert len(record) == 4
    module = base.denoiser
    assert not module._forward_pre_hooks and not module._forward_hooks
    after = run_sample(parts, base)
    assert torch.equal(before, after)
    assert len(record) == 4  # the clone's patch never ran for the base handle


def test_module_patches_apply_only_while_sampling(parts):
    counter: list[int] = []
    patched = parts["model"].with_patch(ForwardCounter(counter))
    module = patched.denoiser
    assert not module._forward_pre_hooks
    run_sample(parts, patched, steps=2)
    assert len(counter) == 2 and not module._forward_pre_hooks
    x = torch.zeros(1, 4, 16, 16)
    with torch.no_grad():
        module(x, 1, encoder_hidden_states=torch.zeros(1, 77, 32))
    assert len(counter) == 2


def test_hook_state_is_fresh_every_run_and_end_is_called(parts):
    hooks: list[Any] = []

    class Tracking(SkipOddSteps):
        def begin(self, run: Any) -> StepHook:
            hook = super().begin(run)
            hooks.append(hook)
            return hook

    model = parts["model"].with_patch(Tracking())
    first = run_sample(parts, model)
    second = run_sample(parts, model)
    assert torch.equal(first, second)
    assert len(hooks) == 2 and hooks[0] is not hooks[1]
    assert all(h.ended for h in hooks)


def test_same_seed_same_result_other_seed_differs(parts):
    a = run_sample(parts, seed=5)
    b = run_sample(parts, seed=5)
    c = run_sample(parts, seed=6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_guidance_scale_one_makes_a_single_batch_call(parts):
    record: list[tuple[int, float, int]] = []
    run_sample(parts, parts["model"].with_patch(CountingPatch(record)), guidance_scale=1.0)
    assert [r[2] for r in record] == [1, 1, 1, 1]


def test_flow_matching_euler_runs_txt2img_and_img2img(parts):
    txt = run_sample(parts, sampler="flow_euler", steps=3)
    again = run_sample(parts, sampler="flow_euler", steps=3)
    assert torch.isfinite(txt).all() and torch.equal(txt, again)
    assert not torch.allclose(txt, run_sample(parts, sampler="euler", steps=3))
    init = Latent(torch.ones(1, 4, 16, 16))
    record: list[tuple[int, float, int]] = []
    out = sample(parts["model"].with_patch(CountingPatch(record)), parts["conditioning"], init, sampler="flow_euler",
                 steps=4, strength=0.5, seed=1).samples
    assert len(record) == 2 and torch.isfinite(out).all()


def test_img2img_strength_trims_steps_and_rejects_empty_runs(parts):
    record: list[tuple[int, float, int]] = []
    init = Latent(torch.ones(1, 4, 16, 16))
    model = parts["model"].with_patch(CountingPatch(record))
    sample(model, parts["conditioning"], init, sampler="ddim", steps=10, strength=0.3, seed=0)
    assert len(record) == 3
    with pytest.raises(ValueError, match="leaves no step"):
        sample(model, parts["conditioning"], init, sampler="ddim", steps=2, strength=0.2)


def test_user_errors_are_explained(parts):
    with pytest.raises(ValueError, match="4-channel latents"):
        sample(parts["model"], parts["conditioning"], Latent(torch.zeros(1, 3, 16, 16)), steps=1)
    with pytest.raises(ValueError, match="multiple of 2"):
        two = Conditioning("clip", {"encoder_hidden_states": torch.zeros(2, 77, 32)},
                           {"encoder_hidden_states": torch.zeros(2, 77, 32)})
        sample(parts["model"], two, Latent(torch.zeros(3, 4, 16, 16)), steps=1)
    with pytest.raises(ValueError, match="needs clip conditioning"):
        labels = Conditioning("class", {"class_labels": torch.tensor([1])})
        sample(parts["model"], labels, parts["latent"], steps=1)
    with pytest.raises(ValueError, match="karras"):
        from dagfusion.nodes.diffusion.schedulers import spec_for

        spec_for(parts["scheduler"], "ddim", {"use_karras_sigmas": True})


def test_video_unet_runs_through_the_step_hook():
    """Smoke test of the video seam: a tiny UNetSpatioTemporalConditionModel sampled with a hook."""
    from dagfusion.testing import models as tiny
    from dagfusion.nodes.diffusion.latents import empty_latent

    unet = tiny.build_svd_unet()
    spec = SchedulerSpec("EulerDiscreteScheduler", {**tiny.sd_scheduler_config(), "prediction_type": "v_prediction"})
    model = ModelHandle.from_module(unet, scheduler=spec, vae_scale_factor=8)
    latent = empty_latent(model, 64, 64, batch_size=1, frames=3)
    assert latent.shape == (1, 3, 4, 8, 8)
    generator = torch.Generator().manual_seed(0)
    cond = Conditioning(
        "svd",
        {"encoder_hidden_states": torch.randn(1, 1, 32, generator=generator),
         "image_latents": torch.randn(1, 1, 4, 8, 8, generator=generator),
         "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]])},
    )
    seen: list[tuple[tuple[int, ...], tuple[str, ...], str]] = []

    def look(call: Any, forward: Any) -> Any:
        seen.append((tuple(call.sample.shape), call.batches, call.family))
        return forward(call)

    out = sample(model.with_patch(FunctionPatch(look, key="tests.look")), cond, latent, steps=2, guidance_scale=2.5,
                 sampler="euler", seed=0).samples
    assert out.shape == (1, 3, 4, 8, 8) and torch.isfinite(out).all()
    assert seen == [((2, 3, 8, 8, 8), ("uncond", "cond"), "svd")] * 2


# --- through the engine ------------------------------------------------------------------------


@node(
    "tests_diffusion.CountCalls",
    version="1.0.0",
    category="tests",
    inputs=[Input("model", "MODEL", link_only=True, description="Model to patch.")],
    outputs=[Output("model", "MODEL")],
)
def count_calls(ctx: Any, model: ModelHandle) -> ModelHandle:
    """Add a patch that counts denoiser calls into ENGINE_RECORD."""
    return model.with_patch(CountingPatch(ENGINE_RECORD))


ENGINE_RECORD: list[tuple[int, float, int]] = []


class _TestPack:
    @hookimpl
    def register_nodes(self, register: Any) -> None:
        register(count_calls)


@pytest.fixture
def patched_engine(settings: Any) -> Any:
    from dagfusion import Engine
    from dagfusion.registry import Registry

    registry = Registry.from_plugins(load_entrypoints=False, extra_plugins=[("tests_diffusion", _TestPack())], environ={})
    return Engine(registry, settings)


def _patched_workflow(helpers: Any, folder: Any, steps: int = 4, preview_every: int = 0) -> Any:
    return helpers.workflow(f"""
    nodes:
      load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", dtype: fp32}}}}
      patch: {{type: tests_diffusion.CountCalls, inputs: {{model: {{from: load.model}}}}}}
      text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: "a fox"}}}}
      latent: {{type: dagfusion.latent.EmptyLatent, inputs: {{model: {{from: load.model}}, width: 32, height: 32}}}}
      sample:
        type: dagfusion.sampling.Sample
        inputs: {{model: {{from: patch.model}}, conditioning: {{from: text.conditioning}}, latent: {{from: latent.latent}},
                 sampler: euler, steps: {steps}, preview_every: {preview_every}}}
    """)


def test_patched_handles_flow_through_the_engine_and_reset_per_run(patched_engine, sd_folder, tmp_path, helpers):
    ENGINE_RECORD.clear()
    wf = _patched_workflow(helpers, sd_folder)
    helpers.run_ok(patched_engine, wf, tmp_path / "a", check_mutation=True)
    assert [r[0] for r in ENGINE_RECORD] == [0, 1, 2, 3]
    ENGINE_RECORD.clear()
    result = helpers.run_ok(patched_engine, wf, tmp_path / "b", use_cache=False)
    assert [r[0] for r in ENGINE_RECORD] == [0, 1, 2, 3]
    assert result.output("load.model").patches == ()


def test_progress_every_step_and_previews(patched_engine, sd_folder, tmp_path, helpers):
    events = EventCollector()
    helpers.run_ok(patched_engine, _patched_workflow(helpers, sd_folder, steps=3, preview_every=2), tmp_path / "run",
                   handler=events)
    progress = [e for e in events.events if isinstance(e, NodeProgress) and e.node_id == "sample"]
    assert [(e.step, e.total) for e in progress] == [(1, 3), (2, 3), (3, 3)]
    previews = [e for e in events.events if isinstance(e, NodePreview) and e.node_id == "sample"]
    assert [p.label for p in previews] == ["step 2/3", "step 3/3"]
    assert previews[0].preview.size == (16, 16)


def test_cancel_stops_the_loop_between_steps(patched_engine, sd_folder, tmp_path, helpers):
    ENGINE_RECORD.clear()
    token = CancelToken()

    class CancelAtStep2:
        def handle(self, event: Any) -> None:
            if isinstance(event, NodeProgress) and event.node_id == "sample" and event.step == 2:
                token.cancel()

    result = patched_engine.run(_patched_workflow(helpers, sd_folder, steps=6), out=tmp_path / "run",
                                handler=CancelAtStep2(), cancel_token=token, use_cache=False)
    assert result.status == "cancelled"
    assert len(ENGINE_RECORD) == 2
