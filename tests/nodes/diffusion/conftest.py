"""Fixtures for the diffusion pack: tiny models written to disk once per session, and an engine.

Tiny models come from :mod:`dagfusion.testing.models` (random weights from fixed seeds,
tokenizers from a small vocabulary written there; nothing is downloaded). Tests load them
through the real loader nodes and run workflows through the real engine.
"""

from __future__ import annotations

import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")



@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def _model_fixture(kind: str) -> Callable[..., Path]:
    @pytest.fixture(scope="session")
    def folder(models_dir: Path) -> Path:
        from dagfusion.testing import models as tiny

        return tiny.write_model(kind, models_dir / f"tiny-{kind}")

    return folder


sd_folder = _model_fixture("sd")
sdxl_folder = _model_fixture("sdxl")
dit_folder = _model_fixture("dit")
pixart_folder = _model_fixture("pixart")


@pytest.fixture
def settings(tmp_path: Path, models_dir: Path) -> Any:
    from dagfusion import Settings

    return Settings(
        output_dir=tmp_path / "outputs",
        cache_dir=tmp_path / "cache",
        read_dirs=(models_dir, tmp_path),
        device="cpu",
        source="tests",
    )


@pytest.fixture(scope="session")
def registry() -> Any:
    from dagfusion.registry import Registry

    return Registry.from_plugins(load_entrypoints=False, environ={})


@pytest.fixture
def engine(registry: Any, settings: Any) -> Any:
    from dagfusion import Engine

    return Engine(registry, settings)


def workflow(text: str) -> Any:
    """A Workflow from (dedented) YAML text."""
    from dagfusion.workflow import load_workflow

    body = textwrap.dedent(text).strip("\n")
    if not body.startswith("format_version"):
        body = "format_version: 1\n" + body
    return load_workflow(body + "\n", text=True)


def run_ok(engine: Any, text_or_workflow: Any, out: Path, **options: Any) -> Any:
    """Run a workflow and fail the test with every node's traceback unless it succeeded."""
    wf = workflow(text_or_workflow) if isinstance(text_or_workflow, str) else text_or_workflow
    result = engine.run(wf, out=out, **options)
    if result.status != "ok":
        details = "\n".join(
            "".join(traceback.format_exception(e.original)) for e in result.errors.values()
        )
        pytest.fail(f"run {result.status}: {list(result.errors)}\n{details}")
    return result


def txt2img(folder: Path, *, prompt: str = "a red fox", negative: str = "", width: int = 32, height: int = 32,
            batch: int = 1, sampler: str = "default", steps: int = 3, guidance: float = 5.0, seed: int = 0,
            extra_sample: str = "", decode: bool = True) -> str:
    """YAML of load -> encode -> empty latent -> sample (-> decode) for a text-to-image model."""
    text = f"""
    nodes:
      load: {{type: dagfusion.models.LoadDiffusers, inputs: {{path: "{folder}", dtype: fp32}}}}
      text: {{type: dagfusion.text.Encode, inputs: {{clip: {{from: load.clip}}, prompt: "{prompt}", negative_prompt: "{negative}"}}}}
      latent: {{type: dagfusion.latent.EmptyLatent, inputs: {{model: {{from: load.model}}, width: {width}, height: {height}, batch_size: {batch}}}}}
      sample:
        type: dagfusion.sampling.Sample
        inputs: {{model: {{from: load.model}}, conditioning: {{from: text.conditioning}}, latent: {{from: latent.latent}}, sampler: {sampler}, steps: {steps}, guidance_scale: {guidance}, seed: {seed}{extra_sample}}}
    """
    if decode:
        text += """
      decode: {type: dagfusion.vae.Decode, inputs: {vae: {from: load.vae}, latent: {from: sample.latent}}}
    """
    return text


def generator(seed: int = 0) -> Any:
    return torch.Generator("cpu").manual_seed(seed)


def assert_close(ours: Any, reference: Any, atol: float = 1e-5) -> None:
    ours, reference = ours.detach().float().cpu(), reference.detach().float().cpu()
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} != reference {tuple(reference.shape)}"
    diff = (ours - reference).abs().max().item()
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol:g} (reference mean |x| {reference.abs().mean():.3g})"


@pytest.fixture(scope="session")
def helpers() -> Any:
    """The helper functions above (test modules cannot import conftest under importlib mode)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        workflow=workflow, run_ok=run_ok, txt2img=txt2img, generator=generator, assert_close=assert_close
    )


@pytest.fixture(scope="session")
def reference() -> Callable[..., Any]:
    """``reference(PipelineClass, folder, sampler)``: a diffusers pipeline loaded from ``folder``,
    with its scheduler switched to dagfusion's ``sampler`` (``"default"`` keeps it)."""
    import diffusers

    from dagfusion.nodes.diffusion.schedulers import SAMPLERS

    def load(pipeline_class: Any, folder: Path, sampler: str = "default", **kwargs: Any) -> Any:
        pipe = pipeline_class.from_pretrained(str(folder), **kwargs)
        if sampler != "default":
            name, overrides = SAMPLERS[sampler]
            pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load
