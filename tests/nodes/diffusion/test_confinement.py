"""Loaders read only files whose real path lies under the allowed read folders, links followed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dagfusion import UnsafeOperationError, ValidationError  # noqa: E402
from dagfusion.model import ModelCache  # noqa: E402
from dagfusion.nodes.diffusion.loading import check_tree_readable, load_diffusers_folder  # noqa: E402
from dagfusion.testing import models as tiny  # noqa: E402


def _load_yaml(node_type: str, **inputs: Any) -> str:
    body = ", ".join(f"{k}: {json.dumps(v)}" for k, v in inputs.items())
    return f"""
    nodes:
      load: {{type: {node_type}, inputs: {{{body}}}}}
    """


def _node_error(engine: Any, helpers: Any, text: str, out: Path) -> BaseException:
    """Why the load was refused: at validation (a ``PATH`` input's tree is checked there, so
    nothing outside is even hashed) or, for files found only while loading, by the node."""
    try:
        result = engine.run(helpers.workflow(text), out=out)
    except ValidationError as exc:
        (problem,) = exc.problems
        assert (problem.code, problem.node) == ("path-not-allowed", "load")
        assert not out.exists(), "nothing may run when validation refuses"
        return UnsafeOperationError(problem.message)
    assert result.status != "ok", "the load should have been refused"
    return result.errors["load"].original


def _move_out(folder: Path, name: str, elsewhere: Path) -> Path:
    """Move ``folder/name`` to ``elsewhere/name`` and leave a symbolic link to it in its place."""
    target = elsewhere / name
    shutil.move(str(folder / name), str(target))
    os.symlink(target, folder / name)
    return target


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside every read root of the ``settings`` fixture."""
    return tmp_path_factory.mktemp("outside")


@pytest.fixture
def model_copy(sd_folder: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny SD folder inside the read roots, free to rewire."""
    return Path(shutil.copytree(sd_folder, tmp_path / "model"))


# --- diffusers folders ---------------------------------------------------------------------------


def test_a_component_folder_linked_outside_is_refused(model_copy, outside, engine, helpers, tmp_path):
    _move_out(model_copy, "unet", outside)
    error = _node_error(engine, helpers, _load_yaml("dagfusion.models.LoadDiffusers", path=str(model_copy), dtype="fp32"),
                        tmp_path / "run")
    assert isinstance(error, UnsafeOperationError)
    message = str(error)
    assert str(model_copy / "unet") in message and str((outside / "unet").resolve()) in message
    assert "outside the allowed read folders" in message and str(tmp_path.resolve()) in message


def test_a_weights_file_linked_outside_is_refused_before_loading(model_copy, outside, engine, helpers, tmp_path,
                                                                 monkeypatch):
    import diffusers

    weights = next((model_copy / "unet").glob("*.safetensors"))
    _move_out(weights.parent, weights.name, outside)

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("from_pretrained must not run for a refused folder")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", never)
    error = _node_error(engine, helpers, _load_yaml("dagfusion.models.LoadDiffusers", path=str(model_copy), dtype="fp32"),
                        tmp_path / "run")
    assert isinstance(error, UnsafeOperationError) and weights.name in str(error)


def test_model_index_linked_outside_is_refused(model_copy, outside):
    _move_out(model_copy, "model_index.json", outside)
    with pytest.raises(UnsafeOperationError, match="model_index.json is a link to"):
        load_diffusers_folder(model_copy, cache=ModelCache(), read_roots=(model_copy,))


def test_links_that_stay_inside_the_read_roots_still_load(model_copy, engine, helpers, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    _move_out(model_copy, "unet", store)
    os.symlink(model_copy, model_copy / "loop")  # a link loop ends the walk, it does not hang it
    result = helpers.run_ok(engine, _load_yaml("dagfusion.models.LoadDiffusers", path=str(model_copy), dtype="fp32"),
                            tmp_path / "run")
    assert type(result.output("load.model").denoiser).__name__ == "UNet2DConditionModel"


def test_a_component_relinked_after_loading_is_checked_when_the_cache_reloads(model_copy, outside):
    cache = ModelCache()
    loaded = load_diffusers_folder(model_copy, cache=cache, read_roots=(model_copy,))
    _move_out(model_copy, "vae", outside)
    cache.clear()
    with pytest.raises(UnsafeOperationError, match="outside the allowed read folders"):
        loaded.vae.ref.get()


def test_without_read_roots_the_caller_is_trusted(model_copy, outside):
    _move_out(model_copy, "unet", outside)
    loaded = load_diffusers_folder(model_copy, cache=ModelCache())
    assert type(loaded.model.denoiser).__name__ == "UNet2DConditionModel"


# --- the Hugging Face cache ----------------------------------------------------------------------


def _as_blobs(cache: Path, repo_id: str) -> Path:
    """Rewrite a tiny hub cache the way the hub lays it out: snapshot files are links into blobs/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs = repo / "blobs"
    blobs.mkdir()
    for number, file in enumerate(sorted(p for p in (repo / "snapshots").rglob("*") if p.is_file())):
        blob = blobs / f"blob{number}"
        shutil.move(str(file), str(blob))
        os.symlink(os.path.relpath(blob, file.parent), file)
    return repo


def test_hf_cache_blob_links_load_and_links_out_of_the_repo_are_refused(engine, helpers, tmp_path, outside,
                                                                         monkeypatch):
    cache = tiny.write_hf_cache("sd", tmp_path / "hub", "owner/tiny-sd")
    repo = _as_blobs(cache, "owner/tiny-sd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = _load_yaml("dagfusion.models.LoadFromHFCache", repo_id="owner/tiny-sd", dtype="fp32")
    result = helpers.run_ok(engine, text, tmp_path / "ok")
    assert type(result.output("load.model").denoiser).__name__ == "UNet2DConditionModel"

    unet_config = next((repo / "snapshots").glob("*/unet/config.json"))
    secret = outside / "config.json"
    shutil.copy(unet_config, secret)
    unet_config.unlink()
    os.symlink(secret, unet_config)
    again = _load_yaml("dagfusion.models.LoadFromHFCache", repo_id="owner/tiny-sd", dtype="fp32", offload=True)
    error = _node_error(engine, helpers, again, tmp_path / "refused")  # another input: not an output-cache hit
    assert isinstance(error, UnsafeOperationError) and str(repo.resolve()) in str(error)


# --- single files ----------------------------------------------------------------------------------


@pytest.fixture
def single(tmp_path: Path) -> dict[str, Path]:
    return tiny.write_single_file("sd", tmp_path / "single")


def test_a_single_file_checkpoint_linked_outside_is_refused(single, outside, engine, helpers, tmp_path):
    from dagfusion.nodes.diffusion.single_file import load_single_file

    checkpoint = single["checkpoint"]
    _move_out(checkpoint.parent, checkpoint.name, outside)
    text = _load_yaml("dagfusion.models.LoadSingleFile", path=str(checkpoint), config=str(single["config"]), dtype="fp32")
    with pytest.raises(Exception, match="outside the allowed read folders"):  # validation already sees it
        engine.run(helpers.workflow(text), out=tmp_path / "run")
    with pytest.raises(UnsafeOperationError, match="is a link to"):
        load_single_file(checkpoint, config=single["config"], read_roots=(tmp_path,), cache=ModelCache())


def test_a_single_file_config_or_tokenizer_linked_outside_is_refused(single, outside, engine, helpers, tmp_path):
    _move_out(single["config"], "tokenizer", outside)
    text = _load_yaml("dagfusion.models.LoadSingleFile", path=str(single["checkpoint"]), config=str(single["config"]),
                      dtype="fp32")
    error = _node_error(engine, helpers, text, tmp_path / "run")
    assert isinstance(error, UnsafeOperationError) and "tokenizer" in str(error)


def test_a_single_file_with_links_inside_the_roots_loads(single, engine, helpers, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    _move_out(single["config"], "tokenizer", store)
    _move_out(single["checkpoint"].parent, single["checkpoint"].name, store)
    text = _load_yaml("dagfusion.models.LoadSingleFile", path=str(single["checkpoint"]), config=str(single["config"]),
                      dtype="fp32")
    result = helpers.run_ok(engine, text, tmp_path / "run")
    assert result.output("load.model").info["architecture"] == "sd1"


# --- training configs ------------------------------------------------------------------------------


def test_new_model_config_folder_linked_outside_is_refused(model_copy, outside, engine, helpers, tmp_path):
    _move_out(model_copy, "text_encoder", outside)
    text = _load_yaml("dagfusion.train.NewModel", config_folder=str(model_copy), device="cpu")
    error = _node_error(engine, helpers, text, tmp_path / "run")
    assert isinstance(error, UnsafeOperationError) and "text_encoder" in str(error)


# --- the walk itself -----------------------------------------------------------------------------


def test_check_tree_readable_returns_real_files_and_refuses_dangling_links_outside(tmp_path, outside):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.json").write_text("{}")
    os.symlink(tmp_path / "a", tmp_path / "b")  # the same real folder twice: walked once
    os.symlink(tmp_path, tmp_path / "a" / "up")  # a loop
    assert check_tree_readable(tmp_path, (tmp_path,)) == [(tmp_path / "a" / "x.json").resolve()]
    os.symlink(outside / "not-there", tmp_path / "a" / "dangling")
    with pytest.raises(UnsafeOperationError, match="dangling is a link to"):
        check_tree_readable(tmp_path, (tmp_path,))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_check_tree_readable_refuses_special_files(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(UnsafeOperationError, match="special file"):
        check_tree_readable(tmp_path, (tmp_path,))
