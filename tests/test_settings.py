from __future__ import annotations

from pathlib import Path

import pytest

from dagfusion import Settings, UnsafeOperationError
from dagfusion.context import confine
from dagfusion.settings import SettingsError


def test_precedence_file_then_environment_then_overrides(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "dagfusion.toml"
    config.write_text('output_dir = "from-file"\ncache_bytes = 123\nmodel_dirs = ["/models/a"]\n')
    env = {"DAGFUSION_CONFIG": str(config), "DAGFUSION_CACHE_BYTES": "456", "DAGFUSION_MODEL_CACHE_BYTES": "789"}
    settings = Settings.load(environ=env)
    assert settings.model_cache_bytes == 789
    assert settings.output_dir == Path("from-file")
    assert settings.cache_bytes == 456
    assert settings.model_dirs == (Path("/models/a"),)
    assert Settings.load({"cache_bytes": 7}, environ=env).cache_bytes == 7
    assert "environment" in settings.source


@pytest.mark.parametrize(
    "env",
    [
        {"DAGFUSION_CACHE_BYTES": "lots"},
        {"DAGFUSION_ALLOW_PICKLE": "maybe"},
        {"DAGFUSION_CONFIG": "/nonexistent/dagfusion.toml"},
    ],
)
def test_bad_environment_is_a_clear_error(env) -> None:
    with pytest.raises(SettingsError):
        Settings.load(environ=env)


def test_unknown_keys_in_file_are_errors(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("alow_pickle = true\n")
    with pytest.raises(SettingsError, match="unknown setting 'alow_pickle'"):
        Settings.load(environ={"DAGFUSION_CONFIG": str(config)})


def test_pickle_opt_in_only_from_settings(tmp_path: Path) -> None:
    assert Settings.load(environ={}).allow_pickle is False
    assert Settings.load(environ={"DAGFUSION_ALLOW_PICKLE": "1"}).allow_pickle is True


def test_reads_confined_to_allowed_folders(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    allowed = tmp_path / "data"
    allowed.mkdir()
    settings = Settings.load(environ={})
    assert settings.check_readable("data") == allowed
    with pytest.raises(UnsafeOperationError, match="outside the allowed read folders"):
        settings.check_readable("/etc/hostname")
    with pytest.raises(UnsafeOperationError):
        settings.check_readable("../escape")
    outside = tmp_path.parent
    extended = settings.with_overrides(read_dirs=[str(outside)])
    assert extended.check_readable(outside) == outside.resolve()


@pytest.mark.parametrize("bad", ["../x.png", "/tmp/x.png", "a/../../x.png"])
def test_outputs_confined_to_output_dir(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UnsafeOperationError):
        confine(tmp_path, bad)


def test_symlink_escape_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path.parent)
    with pytest.raises(UnsafeOperationError, match="escapes"):
        confine(out, "link/evil.txt")
    assert confine(out, "sub/ok.txt") == (out / "sub" / "ok.txt").resolve()


def test_a_workflow_cannot_switch_settings_on(engine, tmp_path: Path) -> None:
    from dagfusion.workflow import parse_workflow

    _, problems = parse_workflow("format_version: 1\nsettings: {allow_pickle: true}\nnodes: {a: {type: dagfusion.math.Add}}\n")
    assert [p.code for p in problems] == ["unknown-key"]
