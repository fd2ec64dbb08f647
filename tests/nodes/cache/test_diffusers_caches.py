"""dagfusion.cache.DiffusersCache: diffusers' own cache hooks on the tiny UNet, DiT and PixArt models.

Every supported (model, method) pair samples close to the uncached run, computes fewer attention
layers (counted with forward hooks on the attention query projections, which only run when an
attention layer really computes), gives identical results when sampled twice, and leaves the
module exactly as it was: no diffusers hook registry, no instance ``forward``, same output.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from dagfusion import NodeInputError  # noqa: E402
from dagfusion.nodes.cache import diffusers_caches as dc  # noqa: E402
from dagfusion.nodes.cache.diffusers_caches import (  # noqa: E402
    METHODS,
    CacheSettings,
    DiffusersCachePatch,
    calibrate_mag_ratios,
    hooked_modules,
    supported_methods,
)
from dagfusion.nodes.diffusion.sampling import sample  # noqa: E402

# diffusers' FasterCache calls torch.meshgrid without indexing=, which torch warns about.
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")

STEPS = 6
SUPPORTED = {
    "sd": ("pyramid_attention_broadcast", "taylorseer"),
    "dit": ("first_block_cache", "pyramid_attention_broadcast", "taylorseer", "mag_cache"),
    "pixart": METHODS,
}
CLASSES = {"sd": "UNet2DConditionModel", "dit": "DiTTransformer2DModel", "pixart": "PixArtTransformer2DModel"}
# Settings that make the tiny random models skip within 6 steps (the defaults stay for the rest).
OVERRIDES = {"first_block_cache": {"threshold": 0.3}, "mag_cache": {"mag_threshold": 0.3}}


@pytest.fixture(autouse=True)
def _quiet_diffusers() -> Any:
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # FasterCache warns that it is experimental on every apply
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[Any, Any, Any]]:
    """kind -> (model handle, conditioning, latent) over the shared tiny pipelines."""
    from dagfusion.testing import models as tiny
    from dagfusion.nodes.diffusion.conditioning import class_conditioning
    from dagfusion.nodes.diffusion.data import Latent

    sd = tiny.sd_handles()
    pixart = tiny.pixart_handles()
    dit = tiny.dit_model()
    return {
        "sd": (sd["model"], sd["conditioning"], sd["latent"]),
        "pixart": (pixart["model"], pixart["conditioning"], pixart["latent"]),
        "dit": (dit, class_conditioning([1]), Latent(torch.zeros(1, 4, 8, 8))),
    }


def run(model: Any, conditioning: Any, latent: Any, **options: Any) -> Any:
    options = {"steps": STEPS, "guidance_scale": 4.0, "sampler": "euler", "seed": 3, **options}
    return sample(model, conditioning, latent, **options).samples


@contextlib.contextmanager
def count_attention(module: Any) -> Any:
    """Count attention layers that really compute (their query projection runs)."""
    counter = {"calls": 0}

    def hit(*_: Any) -> None:
        counter["calls"] += 1

    handles = [m.register_forward_hook(hit) for name, m in module.named_modules() if name.endswith(".to_q")]
    assert handles
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def plain(models: dict[str, Any]) -> dict[str, tuple[Any, int]]:
    """kind -> (uncached latents, attention computations), computed once per kind when first asked."""
    class Lazy(dict):
        def __missing__(self, kind: str) -> tuple[Any, int]:
            model, cond, latent = models[kind]
            with count_attention(model.denoiser) as counter:
                out = run(model, cond, latent)
            self[kind] = (out, counter["calls"])
            return self[kind]

    return Lazy()


def probe(kind: str, module: Any) -> Any:
    """The module's raw output on fixed inputs (to compare before and after sampling)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if kind == "sd":
            x = torch.randn(2, 4, 16, 16, generator=generator)
            return module(x, torch.tensor(500), encoder_hidden_states=torch.randn(2, 77, 32, generator=generator),
                          return_dict=False)[0]
        x = torch.randn(2, 4, 8, 8, generator=generator)
        t = torch.tensor([500, 500])
        if kind == "dit":
            return module(x, timestep=t, class_labels=torch.tensor([1, 2]), return_dict=False)[0]
        return module(x, timestep=t, encoder_hidden_states=torch.randn(2, 5, 32, generator=generator),
                      encoder_attention_mask=torch.ones(2, 5), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                      return_dict=False)[0]


def assert_clean(module: Any) -> None:
    """No diffusers hook registry and no instance ``forward`` anywhere in the module tree."""
    assert hooked_modules(module) == []
    left = [name for name, m in module.named_modules() if "_diffusers_hook" in vars(m) or "forward" in vars(m)]
    assert left == []
    assert "_cache_config" not in vars(module)


def node_inputs(**overrides: Any) -> dict[str, Any]:
    """Every input of DiffusersCache at its default, with ``overrides``."""
    values = {spec.name: spec.default for spec in dc.diffusers_cache.inputs if spec.name != "model"}
    values.update(overrides)
    return values


def make(model: Any, method: str, **overrides: Any) -> Any:
    return dc.diffusers_cache.fn(None, model=model, **node_inputs(method=method, **overrides))


def test_supported_methods_per_model_class(models: dict[str, Any]) -> None:
    for kind, methods in SUPPORTED.items():
        module = models[kind][0].denoiser
        assert type(module).__name__ == CLASSES[kind]
        assert supported_methods(module) == methods


CASES = [(kind, method) for kind, methods in SUPPORTED.items() for method in methods]


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_cache_is_close_skips_work_repeats_and_leaves_the_module_as_it_was(kind, method, models, plain) -> None:
    model, cond, latent = models[kind]
    module = model.denoiser
    reference, full_calls = plain[kind]
    before = probe(kind, module)
    overrides = dict(OVERRIDES.get(method, {}))
    if method == "mag_cache":
        ratios = calibrate_mag_ratios(model, cond, latent, steps=STEPS, guidance_scale=4.0, sampler="euler", seed=3)
        assert len(ratios) == STEPS and ratios[0] == 1.0
        assert_clean(module)
        overrides["mag_ratios"] = ", ".join(str(r) for r in ratios)
    patched = make(model, method, **overrides)
    assert model.patches == () and patched.denoiser is module and len(patched.patches) == 1

    with count_attention(module) as counter:
        first = run(patched, cond, latent)
    assert counter["calls"] < full_calls, f"{method} skipped no attention layer"
    assert torch.isfinite(first).all()
    relative_l1 = ((first - reference).abs().mean() / reference.abs().mean()).item()
    assert relative_l1 < 0.05
    assert_clean(module)

    second = run(patched, cond, latent)
    assert torch.equal(first, second)
    assert_clean(module)
    assert torch.equal(probe(kind, module), before)
    assert torch.equal(run(model, cond, latent), reference)  # the unpatched handle is unaffected


@pytest.mark.parametrize(
    ("kind", "method"),
    [("sd", "first_block_cache"), ("sd", "faster_cache"), ("sd", "mag_cache"), ("dit", "faster_cache")],
)
def test_unsupported_combinations_name_method_class_and_alternatives(kind, method, models) -> None:
    model = models[kind][0]
    with pytest.raises(NodeInputError) as info:
        make(model, method, mag_ratios="1, 1, 1")
    assert info.value.input == "model"
    message = str(info.value)
    assert method in message and CLASSES[kind] in message
    assert ", ".join(SUPPORTED[kind]) in message
    assert model.patches == ()


def test_faster_cache_needs_guidance_and_cleans_up_after_the_failure(models) -> None:
    model, cond, latent = models["pixart"]
    patched = make(model, "faster_cache")
    with pytest.raises(ValueError, match="guidance"):
        run(patched, cond, latent, guidance_scale=1.0)
    assert_clean(model.denoiser)


def test_pixart_micro_conditions_rule_out_faster_cache() -> None:
    from diffusers import PixArtTransformer2DModel

    module = PixArtTransformer2DModel(
        sample_size=128, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False,
    )
    assert module.use_additional_conditions
    with pytest.raises(ValueError, match="micro-conditions"):
        dc.check_supported(module, "faster_cache")


def test_input_errors(models) -> None:
    pixart = models["pixart"][0]
    with pytest.raises(NodeInputError, match="MagCacheCalibrate") as info:
        make(pixart, "mag_cache")
    assert info.value.input == "mag_ratios"
    with pytest.raises(NodeInputError, match="positive"):
        make(pixart, "mag_cache", mag_ratios="1, -1")
    with pytest.raises(NodeInputError, match="timestep_skip_range") as info:
        make(pixart, "pyramid_attention_broadcast", timestep_skip_range="800, 100")
    assert info.value.input == "timestep_skip_range"
    with pytest.raises(NodeInputError, match="skip nothing"):
        make(pixart, "pyramid_attention_broadcast", spatial_attention_block_skip_range=0, cross_attention_block_skip_range=0)
    assert dc.parse_timestep_range("") is None
    assert dc.parse_timestep_range(" -1, 681 ") == (-1.0, 681.0)
    assert dc.parse_mag_ratios("[1.0, 0.98,1.02]") == (1.0, 0.98, 1.02)


def test_patch_key_holds_the_settings_of_the_chosen_method_only(models) -> None:
    pixart = models["pixart"][0]

    def key(**inputs: Any) -> str:
        return dc.diffusers_cache.fn(None, model=pixart, **node_inputs(**inputs)).patches[0].key

    fbc = key(method="first_block_cache", threshold=0.1)
    assert fbc == key(method="first_block_cache", threshold=0.1, cache_interval=2, max_order=3)
    assert fbc != key(method="first_block_cache", threshold=0.2)
    pab = key(method="pyramid_attention_broadcast")
    assert pab != key(method="pyramid_attention_broadcast", timestep_skip_range="0, 1000")
    assert pab == key(method="pyramid_attention_broadcast", timestep_skip_range="100, 800")  # the default, spelled out


def test_two_diffusers_caches_on_one_model_are_refused_and_leave_no_hooks(models) -> None:
    model, cond, latent = models["pixart"]
    twice = make(make(model, "pyramid_attention_broadcast"), "first_block_cache")
    with pytest.raises(RuntimeError, match="already enabled"):
        run(twice, cond, latent)
    assert_clean(model.denoiser)


def test_begin_without_apply_is_explained(models) -> None:
    model = models["pixart"][0]
    patch = DiffusersCachePatch(CacheSettings("first_block_cache"))

    class Run:
        module = model.denoiser
        steps = 2

    with pytest.raises(RuntimeError, match="without apply"):
        patch.begin(Run())  # type: ignore[arg-type]


def test_cache_mixin_models_use_enable_cache_cache_context_and_disable_cache() -> None:
    """Flux is a CacheMixin: the patch goes through enable_cache/cache_context/disable_cache."""
    from diffusers import FluxTransformer2DModel

    from dagfusion.model import DenoiserCall, SamplingRun, StepInfo

    torch.manual_seed(0)
    module = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()
    generator = torch.Generator().manual_seed(0)
    sample_in = torch.randn(1, 16, 4, generator=generator)
    kwargs = {"encoder_hidden_states": torch.randn(1, 8, 32, generator=generator),
              "pooled_projections": torch.randn(1, 32, generator=generator),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3), "return_dict": False}

    def real(call: Any) -> Any:
        return call.module(call.sample, timestep=call.timestep, **call.kwargs)[0]

    with torch.no_grad():
        before = real(DenoiserCall(StepInfo(0, 1, None, 0.0), module, sample_in, torch.tensor([0.5]), kwargs, ("cond",), "flux"))
        patch = DiffusersCachePatch(CacheSettings("first_block_cache", threshold=10.0))
        run_info = SamplingRun(handle=None, module=module, family="flux", scheduler=None, timesteps=(1.0, 0.5),
                               steps=2, guidance_scale=1.0, cfg=False, seed=0, shape=(1, 16, 4), device="cpu",
                               dtype=torch.float32)
        outputs = []
        for _ in range(2):  # two runs: the second starts from fresh state
            with patch.apply(module):
                assert module.is_cache_enabled and hooked_modules(module)
                hook = patch.begin(run_info)
                for index, t in enumerate((1.0, 0.5)):
                    call = DenoiserCall(StepInfo(index, 2, None, t), module, sample_in, torch.tensor([t]), kwargs,
                                        ("cond",), "flux")
                    outputs.append(hook.denoise(call, real))
                hook.end()
            assert not module.is_cache_enabled
            assert_clean(module)
        after = real(DenoiserCall(StepInfo(0, 1, None, 0.0), module, sample_in, torch.tensor([0.5]), kwargs, ("cond",), "flux"))
    assert torch.equal(outputs[0], outputs[2]) and torch.equal(outputs[1], outputs[3])
    assert torch.equal(before, after)


def test_calibrate_node_outputs_ratios_for_the_cache_node(models) -> None:
    model, cond, latent = models["dit"]
    text = dc.mag_cache_calibrate.fn(None, model=model, conditioning=cond, latent=latent, sampler="euler", steps=4,
                                     guidance_scale=4.0, seed=1)
    ratios = dc.parse_mag_ratios(text)
    assert len(ratios) == 4 and ratios[0] == 1.0
    assert make(model, "mag_cache", mag_ratios=text).patches[0].settings.mag_ratios == ratios
    assert model.patches == ()
    assert_clean(model.denoiser)


def test_workflow_run_twice_through_the_engine_gives_identical_results(engine, tmp_path) -> None:
    """The second run reuses the engine's cached handle (same patch object) and samples again."""
    from dagfusion.testing import models as tiny
    from dagfusion.workflow import load_workflow

    folder = tiny.write_model("pixart", tmp_path / "tiny-pixart")
    sample_inputs = ("{model: {from: cache.model}, conditioning: {from: text.conditioning}, latent: {from: latent.latent}, "
                     "sampler: euler, steps: 4, guidance_scale: 4.0, seed: 5")
    body = f"""format_version: 1
nodes:
  load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", dtype: fp32}}}}
  text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: a red fox}}}}
  latent: {{type: dagfusion.latent.EmptyLatent, inputs: {{model: {{from: load.model}}, width: 16, height: 16}}}}
  cache: {{type: dagfusion.cache.DiffusersCache, inputs: {{model: {{from: load.model}}, method: first_block_cache, threshold: 0.3}}}}
  sample: {{type: dagfusion.sampling.Sample, inputs: {sample_inputs}}}}}
"""
    first = engine.run(load_workflow(body, text=True), out=tmp_path / "a")
    assert first.ok, first.errors
    # preview_every changes the node's inputs (so the engine samples again) but not the latents.
    again = body + f"  again: {{type: dagfusion.sampling.Sample, inputs: {sample_inputs}, preview_every: 1}}}}\n"
    second = engine.run(load_workflow(again, text=True), out=tmp_path / "b")
    assert second.ok, second.errors
    assert second.output("cache.model") is first.output("cache.model")  # served from the engine's cache
    assert torch.equal(second.output("again.latent").samples, first.output("sample.latent").samples)
    assert first.output("load.model").patches == ()
    assert_clean(first.output("load.model").denoiser)


def test_each_method_node_takes_only_its_inputs_and_makes_the_legacy_patch(models) -> None:
    """The per-method nodes and the deprecated DiffusersCache build the same patch (same key, same settings)."""
    pixart = models["pixart"][0]
    cases = {
        "first_block_cache": {"threshold": 0.1},
        "pyramid_attention_broadcast": {"cross_attention_block_skip_range": 0, "timestep_skip_range": "0, 1000"},
        "faster_cache": {"unconditional_batch_skip_range": 3},
        "taylorseer": {"cache_interval": 2, "max_order": 2},
        "mag_cache": {"mag_ratios": "1.0, 0.9, 1.1", "max_skip_steps": 2},
    }
    for method, inputs in cases.items():
        spec = dc.METHOD_NODES[method]
        names = {i.name for i in spec.inputs} - {"model"}
        assert set(inputs) <= names and "method" not in names
        defaults = {i.name: i.default for i in spec.inputs if i.name != "model"}
        new = spec.fn(None, model=pixart, **{**defaults, **inputs}).patches[0]
        old = make(pixart, method, **inputs).patches[0]
        assert type(new) is DiffusersCachePatch and new.key == old.key and new.settings == old.settings


def test_an_old_diffusers_cache_workflow_still_loads_and_samples_like_the_method_node(engine, tmp_path) -> None:
    from dagfusion.testing import models as tiny
    from dagfusion.workflow import load_workflow

    folder = tiny.write_model("pixart", tmp_path / "tiny-pixart")
    head = f"""format_version: 1
nodes:
  load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", dtype: fp32}}}}
  text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: a red fox}}}}
  latent: {{type: dagfusion.latent.EmptyLatent, inputs: {{model: {{from: load.model}}, width: 16, height: 16}}}}
  sample: {{type: dagfusion.sampling.Sample, inputs: {{model: {{from: cache.model}}, conditioning: {{from: text.conditioning}}, latent: {{from: latent.latent}}, sampler: euler, steps: 4, guidance_scale: 4.0, seed: 5}}}}
"""
    old = head + "  cache: {type: dagfusion.cache.DiffusersCache, inputs: {model: {from: load.model}, method: first_block_cache, threshold: 0.3}}\n"
    new = head + "  cache: {type: dagfusion.cache.FirstBlockCache, inputs: {model: {from: load.model}, threshold: 0.3}}\n"
    first = engine.run(load_workflow(old, text=True), out=tmp_path / "old")
    second = engine.run(load_workflow(new, text=True), out=tmp_path / "new")
    assert first.ok and second.ok, (first.errors, second.errors)
    assert torch.equal(first.output("sample.latent").samples, second.output("sample.latent").samples)


@pytest.mark.parametrize(
    ("node_type", "inputs", "bad_input"),
    [
        ("dagfusion.cache.PyramidAttentionBroadcast",
         "spatial_attention_block_skip_range: 0, cross_attention_block_skip_range: 0", "spatial_attention_block_skip_range"),
        ("dagfusion.cache.PyramidAttentionBroadcast", "timestep_skip_range: '800, 100'", "timestep_skip_range"),
        ("dagfusion.cache.FasterCache", "timestep_skip_range: 'a, b'", "timestep_skip_range"),
        ("dagfusion.cache.MagCache", "mag_ratios: '1, -1'", "mag_ratios"),
        ("dagfusion.cache.MagCache", "mag_ratios: ''", "mag_ratios"),
        ("dagfusion.cache.DiffusersCache", "method: mag_cache, mag_ratios: ''", "mag_ratios"),
    ],
)
def test_validation_reports_bad_method_inputs_before_running(registry, node_type, inputs, bad_input) -> None:
    from dagfusion.validation import check
    from dagfusion.workflow import load_workflow

    text = f"""format_version: 1
nodes:
  load: {{type: dagfusion.models.LoadEmbedded, inputs: {{model: shapes-dit}}}}
  cache: {{type: {node_type}, inputs: {{model: {{from: load.model}}, {inputs}}}}}
"""
    _, problems, _ = check(load_workflow(text, text=True), registry)
    assert [(p.node, p.input) for p in problems] == [("cache", bad_input)], problems
    assert problems[0].line == 4
