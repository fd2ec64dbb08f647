"""The thread policy: the ``threads`` setting, what ``auto`` means, and when torch gets it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from dagfusion import threads
from dagfusion.settings import Settings, SettingsError
from dagfusion.threads import AUTO_MAX_THREADS, ThreadPolicy, auto_threads, parse_threads, resolve_threads


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), (" AUTO ", "auto"), (1, 1), (3, 3), ("2", 2)])
def test_parse_threads_accepts_positive_integers_and_auto(value: object, expected: object) -> None:
    assert parse_threads(value, "here") == expected


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "", "two", "0", None])
def test_parse_threads_refuses_anything_else(value: object) -> None:
    with pytest.raises(ValueError, match="here: threads must be an integer ≥ 1 or 'auto'"):
        parse_threads(value, "here")


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (64, AUTO_MAX_THREADS)])
def test_auto_is_half_the_usable_cpus_between_one_and_the_cap(cpus: int, expected: int) -> None:
    assert auto_threads(environ={}, cpus=cpus) == expected


def test_auto_follows_omp_num_threads_when_the_environment_sets_it() -> None:
    assert auto_threads(environ={"OMP_NUM_THREADS": "6"}, cpus=2) == 6
    for ignored in ("0", "many", " "):
        assert auto_threads(environ={"OMP_NUM_THREADS": ignored}, cpus=8) == 4


def test_resolve_threads_keeps_explicit_counts() -> None:
    assert resolve_threads(3, environ={"OMP_NUM_THREADS": "1"}, cpus=2) == 3
    assert resolve_threads("auto", environ={}, cpus=4) == 2


def test_settings_read_threads_from_file_environment_and_overrides(tmp_path: Path) -> None:
    assert Settings.load(environ={}).threads == "auto"
    config = tmp_path / "config.toml"
    config.write_text("threads = 3\n", encoding="utf-8")
    assert Settings.load(environ={"DAGFUSION_CONFIG": str(config)}).threads == 3
    assert Settings.load(environ={"DAGFUSION_CONFIG": str(config), "DAGFUSION_THREADS": "2"}).threads == 2
    assert Settings.load(environ={"DAGFUSION_THREADS": "auto"}).threads == "auto"
    assert Settings.load({"threads": "4"}, environ={}).threads == 4
    assert Settings.load(environ={}).with_overrides(threads=1).threads == 1


@pytest.mark.parametrize(("environ", "where"), [({"DAGFUSION_THREADS": "0"}, "DAGFUSION_THREADS"), ({"DAGFUSION_THREADS": "x"}, "DAGFUSION_THREADS")])
def test_settings_refuse_bad_thread_counts(environ: dict[str, str], where: str) -> None:
    with pytest.raises(SettingsError, match=where):
        Settings.load(environ=environ)
    with pytest.raises(SettingsError, match="overrides"):
        Settings.load({"threads": 0}, environ={})


class FakeTorch(types.ModuleType):
    """Records what the policy asks of torch."""

    def __init__(self, intra: int = 8, interop: int = 8, interop_started: bool = False) -> None:
        super().__init__("torch")
        self.intra, self.interop, self.interop_started = intra, interop, interop_started
        self.calls: list[tuple[str, int]] = []

    def get_num_threads(self) -> int:
        return self.intra

    def set_num_threads(self, n: int) -> None:
        self.calls.append(("intra", n))
        self.intra = n

    def get_num_interop_threads(self) -> int:
        return self.interop

    def set_num_interop_threads(self, n: int) -> None:
        if self.interop_started:
            raise RuntimeError("Error: cannot set number of interop threads after parallel work has started")
        self.calls.append(("interop", n))
        self.interop = n


@pytest.fixture
def fresh_interop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_interop_settled", False)


def test_policy_waits_for_torch_then_applies_once(monkeypatch: pytest.MonkeyPatch, fresh_interop: None) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    policy = ThreadPolicy(2)
    assert policy.apply_if_imported() is False
    fake = FakeTorch()
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert policy.apply_if_imported() is True
    assert fake.calls == [("intra", 2), ("interop", 2)]
    fake.intra = 5  # a node changed it: the policy does not fight it within the run
    assert policy.apply_if_imported() is True
    assert fake.calls == [("intra", 2), ("interop", 2)]


def test_interop_threads_are_set_at_most_once_and_only_while_torch_allows(
    monkeypatch: pytest.MonkeyPatch, fresh_interop: None
) -> None:
    started = FakeTorch(interop_started=True)
    monkeypatch.setitem(sys.modules, "torch", started)
    assert ThreadPolicy(1).apply_if_imported() is True  # torch's refusal is not an error
    assert started.calls == [("intra", 1)]
    later = FakeTorch()
    monkeypatch.setitem(sys.modules, "torch", later)
    ThreadPolicy(3).apply_if_imported()
    assert later.calls == [("intra", 3)]  # torch accepts one inter-op setting per process


def test_a_run_gives_torch_the_settings_thread_count(tmp_path: Path) -> None:
    import torch

    from dagfusion import Engine

    workflow = tmp_path / "noise.yaml"
    workflow.write_text(
        "format_version: 1\nnodes:\n  noise: {type: dagfusion.tensor.Noise, inputs: {seed: 1}}\n", encoding="utf-8"
    )
    settings = Settings.load({"output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")}, environ={})
    try:
        result = Engine(settings=settings.with_overrides(threads=2)).run(workflow, record=False, use_cache=False)
        assert result.ok, result.errors
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_a_run_without_torch_never_imports_it(tmp_path: Path) -> None:
    workflow = tmp_path / "add.yaml"
    workflow.write_text("format_version: 1\nnodes:\n  a: {type: dagfusion.math.Add, inputs: {a: 1, b: 2}}\n", encoding="utf-8")
    probe = textwrap.dedent(
        """
        import sys
        from dagfusion.cli import main
        rc = main(["run", sys.argv[1], "--out", "out", "--threads", "2", "--json-events"])
        assert "torch" not in sys.modules, "torch was imported"
        sys.exit(rc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(workflow)], check=False, cwd=tmp_path, capture_output=True, text=True,
        env={"DAGFUSION_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
