"""Loader nodes and the model cache: diffusers folders, the HF cache, single files, pickle refusal."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dagfusion import UnsafeOperationError  # noqa: E402
from dagfusion.model import ModelCache, ModelHandle, TextEncoderBundle, VAEHandle, default_cache  # noqa: E402
from dagfusion.nodes.diffusion.loading import load_diffusers_folder, resolve_hf_snapshot  # noqa: E402
from dagfusion.testing import models as tiny  # noqa: E402


def _load_yaml(node_type: str, **inputs: Any) -> str:
    body = ", ".join(f"{k}: {json.dumps(v)}" for k, v in inputs.items())
    return f"""
    nodes:
      load: {{type: {node_type}, inputs: {{{body}}}}}
    """


def test_load_diffusers_outputs_four_handles(sd_folder, engine, tmp_path, helpers):
    result = helpers.run_ok(engine, _load_yaml("dagfusion.models.LoadDiffusers", path=str(sd_folder), dtype="fp32"),
                            tmp_path / "run", check_mutation=True)
    model, clip, vae, scheduler = (result.output(f"load.{n}") for n in ("model", "clip", "vae", "scheduler"))
    assert isinstance(model, ModelHandle) and type(model.denoiser).__name__ == "UNet2DConditionModel"
    assert isinstance(clip, TextEncoderBundle) and clip.kind == "clip"
    assert isinstance(vae, VAEHandle) and type(vae.module).__name__ == "AutoencoderKL"
    assert scheduler.class_name == "PNDMScheduler" and model.scheduler is scheduler
    assert model.info["vae_scale_factor"] == 2 and model.info["fingerprint"]
    assert model.denoiser.dtype == torch.float32 and str(model.denoiser.device) == "cpu"


def test_kinds_of_text_encoders(sdxl_folder, dit_folder, pixart_folder):
    assert load_diffusers_folder(sdxl_folder).clip.kind == "sdxl"
    assert load_diffusers_folder(dit_folder).clip.kind == "none"
    pixart = load_diffusers_folder(pixart_folder).clip
    assert pixart.kind == "t5" and pixart.options["max_length"] == 120 and pixart.options["lowercase"]


def test_dtype_input_loads_half_precision(sd_folder):
    loaded = load_diffusers_folder(sd_folder, dtype="bf16")
    assert loaded.model.denoiser.dtype == torch.bfloat16
    assert loaded.vae.module.dtype == torch.bfloat16
    assert load_diffusers_folder(sd_folder, dtype="fp32").model.denoiser is not loaded.model.denoiser


def test_same_folder_is_loaded_once_across_nodes_and_runs(models_dir, engine, tmp_path, helpers):
    folder = tiny.write_model("sd", models_dir / "once-sd", seed=1)
    cache = default_cache()
    loads = cache.stats.loads
    text = f"""
    nodes:
      a: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", dtype: fp32}}}}
      b: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", dtype: fp32, offload: false}}}}
    """
    first = helpers.run_ok(engine, text, tmp_path / "one", use_cache=False)
    helpers.run_ok(engine, text, tmp_path / "two", use_cache=False)
    assert cache.stats.loads - loads == 4  # unet, vae, text encoder, tokenizer: once each
    assert first.output("a.model").denoiser is first.output("b.model").denoiser


def test_eviction_frees_memory_and_handles_reload(models_dir):
    folder = tiny.write_model("sd", models_dir / "evict-sd", seed=2)
    cache = ModelCache(budget_bytes=0)
    loaded = load_diffusers_folder(folder, cache=cache)
    unet = weakref.ref(loaded.model.denoiser)
    assert unet() is not None and len(cache) == 4
    one_model = max(cache.used_bytes // 2, 1)
    cache.set_budget(one_model)  # too small for everything: least recently used go first
    assert len(cache) < 4 and cache.stats.evictions > 0
    cache.clear()
    gc.collect()
    assert unet() is None, "an evicted model must not stay in memory"
    reloaded = loaded.model.denoiser  # the handle reloads through its reference
    assert type(reloaded).__name__ == "UNet2DConditionModel" and cache.stats.loads == 5


def test_hf_cache_loader_reads_only_the_local_cache(engine, tmp_path, helpers, monkeypatch):
    cache = tiny.write_hf_cache("sd", tmp_path / "hub", "owner/tiny-sd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = helpers.run_ok(engine, _load_yaml("dagfusion.models.LoadFromHFCache", repo_id="owner/tiny-sd", dtype="fp32"),
                            tmp_path / "run")
    model = result.output("load.model")
    assert model.info["source"] == "hf:owner/tiny-sd@main"
    assert type(model.denoiser).__name__ == "UNet2DConditionModel"
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*never downloads"):
        resolve_hf_snapshot("owner/absent", "main", cache)
    with pytest.raises(FileNotFoundError, match="revision 'v2'"):
        resolve_hf_snapshot("owner/tiny-sd", "v2", cache)
    for bad in ("../etc", "owner/../x", "just-a-name"):
        with pytest.raises(ValueError, match="owner/name"):
            resolve_hf_snapshot(bad, "main", cache)


def _pickle_copy(folder: Path, target: Path) -> Path:
    """``folder`` with the UNet weights stored as a pickle ``.bin`` instead of safetensors."""
    shutil.copytree(folder, target)
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    for f in (target / "unet").glob("*.safetensors"):
        f.unlink()
    unet.save_pretrained(str(target / "unet"), safe_serialization=False)
    assert list((target / "unet").glob("*.bin"))
    return target


def test_pickle_weights_are_refused_unless_settings_allow(sd_folder, engine, registry, settings, tmp_path, helpers):
    from dagfusion import Engine

    folder = _pickle_copy(sd_folder, tmp_path / "pickled")
    result = engine.run(helpers.workflow(_load_yaml("dagfusion.models.LoadDiffusers", path=str(folder), dtype="fp32")),
                        out=tmp_path / "refused")
    error = result.errors["load"].original
    assert isinstance(error, UnsafeOperationError)
    assert "pickle" in str(error) and "allow_pickle" in str(error) and "DAGFUSION_ALLOW_PICKLE" in str(error)
    allowed = Engine(registry, settings.with_overrides(allow_pickle=True))
    result = helpers.run_ok(allowed, _load_yaml("dagfusion.models.LoadDiffusers", path=str(folder), dtype="fp32"),
                            tmp_path / "allowed")
    assert type(result.output("load.model").denoiser).__name__ == "UNet2DConditionModel"


def test_paths_outside_read_folders_are_refused(engine, tmp_path_factory, helpers, tmp_path):
    from dagfusion import ValidationError

    outside = tiny.write_model("sd", tmp_path_factory.mktemp("elsewhere") / "sd")
    with pytest.raises(ValidationError, match="outside the allowed read folders"):
        engine.run(helpers.workflow(_load_yaml("dagfusion.models.LoadDiffusers", path=str(outside))), out=tmp_path / "run")
    with pytest.raises(UnsafeOperationError):  # the node checks too, for callers that skip validation
        from dagfusion.nodes.diffusion.loaders import load_diffusers

        load_diffusers.fn(_Context(engine.settings), path=str(outside), device="cpu", dtype="fp32", offload=False)


class _Context:
    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.device = "cpu"

    def input_path(self, path: str) -> Path:
        return self.settings.check_readable(path)


def test_model_index_cannot_name_arbitrary_classes(sd_folder, tmp_path):
    folder = shutil.copytree(sd_folder, tmp_path / "evil")
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["os", "system"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="os.system.*dagfusion loads no other classes"):
        load_diffusers_folder(folder, cache=ModelCache())


def test_known_classes_are_the_classes_the_libraries_name():
    import importlib

    from dagfusion.nodes.diffusion.loading import KNOWN_CLASSES, _component_class

    for (library, class_name), module in KNOWN_CLASSES.items():
        assert module.startswith(library + ".")
        top_level = getattr(importlib.import_module(library), class_name)
        assert getattr(importlib.import_module(module), class_name) is top_level, (library, class_name)
        cls, kind = _component_class(library, class_name)
        assert cls is top_level and kind in ("diffusers-model", "transformers-model", "tokenizer", "processor")


def test_classes_outside_the_table_are_found_through_the_top_level(monkeypatch):
    from dagfusion.nodes.diffusion import loading

    assert ("diffusers", "UNet2DModel") not in loading.KNOWN_CLASSES
    assert loading._component_class("diffusers", "UNet2DModel") == (diffusers.UNet2DModel, "diffusers-model")
    # a table entry whose module moved in another library version falls back too
    monkeypatch.setitem(loading.KNOWN_CLASSES, ("diffusers", "AutoencoderKL"), "diffusers.models.moved_away")
    assert loading._component_class("diffusers", "AutoencoderKL") == (diffusers.AutoencoderKL, "diffusers-model")


@pytest.mark.parametrize(("library", "class_name"), [
    ("diffusers", "DDIMScheduler"), ("diffusers", "StableDiffusionPipeline"), ("transformers", "pipeline"),
    ("transformers", "CLIPTextConfig"), ("diffusers", "NoSuchModel"), ("torch", "load"),
])
def test_only_models_and_tokenizers_are_instantiable(library, class_name):
    from dagfusion.nodes.diffusion.loading import _component_class

    with pytest.raises(ValueError, match="dagfusion loads no other classes"):
        _component_class(library, class_name)


def test_missing_model_index_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_diffusers_folder(tmp_path)


# --- single files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_file(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny.write_single_file("sd", tmp_path_factory.mktemp("single"))


def test_single_file_equals_the_diffusers_folder(single_file, sd_folder, registry, settings, tmp_path, helpers):
    from dagfusion import Engine

    engine = Engine(registry, settings.with_overrides(read_dirs=[*settings.read_dirs, single_file["checkpoint"].parent]))
    text = helpers.txt2img(sd_folder, sampler="euler", steps=2, decode=True)
    single = text.replace(
        f'type: dagfusion.models.LoadDiffusers, inputs: {{path: "{sd_folder}", dtype: fp32}}',
        f'type: dagfusion.models.LoadSingleFile, inputs: {{path: "{single_file["checkpoint"]}", '
        f'config: "{single_file["config"]}", dtype: fp32}}',
    )
    assert single != text
    from_folder = helpers.run_ok(engine, text, tmp_path / "folder")
    from_file = helpers.run_ok(engine, single, tmp_path / "file")
    assert from_file.output("load.model").info["architecture"] == "sd1"
    helpers.assert_close(from_file.output("sample.latent").samples, from_folder.output("sample.latent").samples, 1e-6)
    helpers.assert_close(from_file.output("decode.image"), from_folder.output("decode.image"), 1e-6)


def test_single_file_tokenizers_from_model_dirs(single_file, tmp_path):
    from dagfusion.nodes.diffusion.single_file import find_tokenizers

    model_dir = tmp_path / "models"
    shutil.copytree(single_file["config"] / "tokenizer", model_dir / "tokenizers" / "sd1" / "tokenizer")
    assert find_tokenizers("sd1", None, None, (tmp_path / "nothing", model_dir)) == model_dir / "tokenizers" / "sd1"
    with pytest.raises(FileNotFoundError, match="carry no tokenizer.*tokenizers/sdxl"):
        find_tokenizers("sdxl", None, None, (model_dir,))


def test_single_file_architecture_detection(single_file):
    from dagfusion.nodes.diffusion.single_file import checkpoint_keys, detect_architecture

    assert detect_architecture(checkpoint_keys(single_file["checkpoint"])) == "sd1"
    assert detect_architecture(["conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    assert detect_architecture(["cond_stage_model.model.token_embedding.weight"]) == "sd2"
    with pytest.raises(ValueError, match="cannot tell the architecture"):
        detect_architecture(["model.diffusion_model.out.2.weight"])


def test_pickle_checkpoints_are_refused(tmp_path):
    from dagfusion.nodes.diffusion.single_file import load_single_file

    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not even read")
    with pytest.raises(UnsafeOperationError, match="pickle checkpoint.*allow_pickle"):
        load_single_file(checkpoint)


@pytest.mark.parametrize(
    ("arch", "unet", "vae", "text"),
    [
        ("sd1", 859_520_964, 83_653_863, [123_060_480]),
        ("sd2", 865_910_724, 83_653_863, [340_387_840]),
        ("sdxl", 2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
    ],
)
def test_shipped_configs_describe_the_real_architectures(arch, unet, vae, text):
    """The shipped configs build models with the published parameter counts (on the meta device)."""
    import transformers

    from dagfusion.nodes.diffusion.single_file import CONFIGS

    folder = CONFIGS / arch
    index = json.loads((folder / "model_index.json").read_text())

    def count(module: Any) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        assert count(diffusers.UNet2DConditionModel.from_config(diffusers.UNet2DConditionModel.load_config(folder / "unet"))) == unet
        assert count(diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(folder / "vae"))) == vae
        counts = []
        for name in ("text_encoder", "text_encoder_2"):
            if name in index:
                cls = getattr(transformers, index[name][1])
                counts.append(count(cls(transformers.CLIPTextConfig.from_pretrained(folder / name))))
    assert counts == text
    assert (folder / "scheduler" / "scheduler_config.json").is_file()


def test_device_and_cache_budget_settings_are_checked(monkeypatch):
    from dagfusion.model import DEFAULT_BUDGET_BYTES
    from dagfusion.nodes.diffusion.loading import resolve_device

    assert resolve_device("auto", "cpu") == "cpu" and resolve_device("cpu", "cuda") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda", "cpu")
    monkeypatch.delenv("DAGFUSION_MODEL_CACHE_BYTES", raising=False)
    assert ModelCache().budget_bytes == DEFAULT_BUDGET_BYTES
    monkeypatch.setenv("DAGFUSION_MODEL_CACHE_BYTES", "1000")
    assert ModelCache().budget_bytes == 1000
    monkeypatch.setenv("DAGFUSION_MODEL_CACHE_BYTES", "lots")
    with pytest.raises(ValueError, match="DAGFUSION_MODEL_CACHE_BYTES"):
        ModelCache()


def test_values_report_their_size_to_the_output_cache():
    from dagfusion.cache import estimate_nbytes
    from dagfusion.nodes.diffusion.data import Conditioning, Latent

    assert estimate_nbytes(Latent(torch.zeros(2, 4, 8, 8))) == 2 * 4 * 8 * 8 * 4
    cond = Conditioning("clip", {"encoder_hidden_states": torch.zeros(1, 77, 32)},
                        {"encoder_hidden_states": torch.zeros(1, 77, 32)})
    assert estimate_nbytes(cond) == 2 * 77 * 32 * 4


def test_a_scheduler_spec_keeps_settings_only_and_fingerprints_the_same_in_every_order() -> None:
    """diffusers' private keys are not settings; ``_use_default_values`` lists a set in hash order, so
    keeping it would give the same scheduler another fingerprint in another process."""
    from dagfusion.fingerprint import fingerprint
    from dagfusion.nodes.diffusion.data import SchedulerSpec

    a = SchedulerSpec("EulerDiscreteScheduler", {"sigma_max": 700.0, "_use_default_values": ["a", "b"],
                                                 "_class_name": "EulerDiscreteScheduler"})
    b = SchedulerSpec("EulerDiscreteScheduler", {"sigma_max": 700.0, "_use_default_values": ["b", "a"]})
    assert dict(a.config) == {"sigma_max": 700.0}
    assert fingerprint(a) == fingerprint(b)
    assert a.create().config.sigma_max == 700.0


def test_a_scheduler_spec_makes_independent_schedulers_of_its_configuration() -> None:
    """Each ``create()`` is a scheduler of its own: stepping one changes no other."""
    from dagfusion.nodes.diffusion.data import SchedulerSpec

    spec = SchedulerSpec("EulerDiscreteScheduler", {"sigma_max": 700.0, "timestep_type": "continuous",
                                                    "prediction_type": "v_prediction"})
    first, second = spec.create(), spec.create()
    assert first is not second and first.sigmas is not second.sigmas
    first.set_timesteps(4)
    first.step(torch.zeros(1, 4, 2, 2), first.timesteps[0], torch.ones(1, 4, 2, 2))
    assert first.num_inference_steps == 4 and second.num_inference_steps is None
    assert second.step_index is None and len(second.sigmas) == 1001
    other = SchedulerSpec("EulerDiscreteScheduler", {"sigma_max": 80.0}).create()
    assert other.config.sigma_max == 80.0 and spec.create().config.sigma_max == 700.0
