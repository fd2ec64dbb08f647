"""The command line, run as a user runs it: a subprocess of the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dagfusion.cli import EXIT_CANCELLED, EXIT_FAILED, EXIT_INVALID, EXIT_OK, main

BLURRED_NOISE = Path(__file__).resolve().parents[1] / "workflows" / "blurred_noise.yaml"


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "DAGFUSION_OUTPUT_DIR": str(cwd / "outputs"), "DAGFUSION_CACHE_DIR": str(cwd / "cache"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dagfusion.cli", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def test_help_and_validate_do_not_import_torch(tmp_path: Path) -> None:
    probe = (
        "import sys; from dagfusion.cli import main; rc = main(['validate', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(BLURRED_NOISE)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "valid (7 nodes)" in done.stdout
    done = subprocess.run(
        [sys.executable, "-c", "import sys; import dagfusion.cli; assert 'torch' not in sys.modules"], capture_output=True
    )
    assert done.returncode == 0


def test_run_writes_outputs_and_record(tmp_path: Path) -> None:
    done = cli("run", str(BLURRED_NOISE), "--out", "run1", "--set", "noise.seed=3", cwd=tmp_path)
    assert done.returncode == EXIT_OK, done.stderr
    out = tmp_path / "run1"
    for name in ("blurred_noise.png", "report.txt", "workflow.yaml", "events.jsonl", "manifest.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "manifest.json").read_text())["seeds"]["noise.seed"] == 3
    assert (out / "report.txt").read_text().startswith("blurred noise: mean=")


@pytest.mark.slow
def test_quickstart_draws_its_prompt_with_the_embedded_model(tmp_path: Path) -> None:
    workflow = Path(__file__).resolve().parents[1] / "workflows" / "quickstart.yaml"
    # one thread: tiny models gain nothing from more, and OpenMP spins badly when a core is busy
    done = cli("run", str(workflow), "--out", "qs", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == EXIT_OK, done.stderr
    out = tmp_path / "qs"
    assert (out / "quickstart_00000.png").is_file()
    # ShapeEval reads the picture as the prompt: a large red circle on the left on a black background
    assert "'all_correct': 1.0" in (out / "report.txt").read_text()


@pytest.mark.slow
def test_the_readmes_prompt_override_changes_what_is_drawn_and_scored(tmp_path: Path) -> None:
    workflow = Path(__file__).resolve().parents[1] / "workflows" / "quickstart.yaml"
    prompt = "a small blue square at the top on a white background"
    done = cli(
        "run", str(workflow), "--set", "sample.seed=3", "--set", f"prompt.text={prompt}", "--out", "blue",
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == EXIT_OK, done.stderr
    record = (tmp_path / "blue" / "workflow.yaml").read_text()
    nodes = record.split("\nnodes:")[1]
    assert nodes.count(prompt) == 1 and "red circle" not in nodes
    # the scorer reads the picture against the new prompt: every attribute of the blue square is right
    assert "'all_correct': 1.0" in (tmp_path / "blue" / "report.txt").read_text()


def test_json_events(tmp_path: Path) -> None:
    done = cli("run", str(BLURRED_NOISE), "--out", "r", "--json-events", cwd=tmp_path)
    assert done.returncode == EXIT_OK
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[0]["event"] == "RunStarted" and events[-1]["event"] == "RunFinished"
    assert {e["event"] for e in events} >= {"NodeStarted", "NodeFinished", "NodePreview"}


def test_invalid_workflow_exit_code_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """\
            format_version: 1
            nodes:
              a: {type: dagfusion.math.Add, inputs: {a: "x", c: 1}}
              b: {type: dagfusion.math.Ad}
            """
        )
    )
    done = cli("validate", str(bad), cwd=tmp_path)
    assert done.returncode == EXIT_INVALID
    assert "3 problems" in done.stderr
    assert "line 3, node 'a', input 'a': expected FLOAT, got STRING" in done.stderr
    done = cli("run", str(bad), cwd=tmp_path)
    assert done.returncode == EXIT_INVALID and not (tmp_path / "outputs").exists()
    done = cli("validate", str(bad), "--json", cwd=tmp_path)
    report = json.loads(done.stdout)
    assert report["valid"] is False and len(report["problems"]) == 3


def test_failed_node_exit_code(tmp_path: Path) -> None:
    wf = tmp_path / "fail.yaml"
    wf.write_text(
        "format_version: 1\nnodes:\n  c: {type: dagfusion.math.Clamp, inputs: {value: 1, low: 2, high: 1}}\n"
    )
    done = cli("run", str(wf), "--out", "o", cwd=tmp_path)
    assert done.returncode == EXIT_FAILED
    assert "low (2) is greater than high (1)" in done.stderr


def test_ctrl_c_cancels_cleanly(tmp_path: Path) -> None:
    wf = tmp_path / "slow.yaml"
    # a 4096x4096 blur with a wide kernel takes long enough to interrupt mid-run
    wf.write_text(
        textwrap.dedent(
            """\
            format_version: 1
            nodes:
              n: {type: dagfusion.tensor.Noise, inputs: {height: 2048, width: 2048, channels: 3}}
              b1: {type: dagfusion.tensor.Blur, inputs: {tensor: {from: n.tensor}, sigma: 20}}
              b2: {type: dagfusion.tensor.Blur, inputs: {tensor: {from: b1.tensor}, sigma: 20}}
              b3: {type: dagfusion.tensor.Blur, inputs: {tensor: {from: b2.tensor}, sigma: 20}}
              b4: {type: dagfusion.tensor.Blur, inputs: {tensor: {from: b3.tensor}, sigma: 20}}
            """
        )
    )
    env = {**os.environ, "DAGFUSION_OUTPUT_DIR": str(tmp_path / "o"), "DAGFUSION_CACHE_DIR": str(tmp_path / "c")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagfusion.cli", "run", str(wf), "--json-events", "--out", "o"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until the run is under way
        if '"NodeStarted"' in line:
            break
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CANCELLED, err
    assert '"RunCancelled"' in rest
    assert (tmp_path / "o" / "events.jsonl").is_file()


def test_nodes_plugins_schema(tmp_path: Path, capsys) -> None:
    assert main(["nodes", "--json"]) == EXIT_OK
    nodes = json.loads(capsys.readouterr().out)
    add = next(n for n in nodes if n["type"] == "dagfusion.math.Add")
    assert add["inputs"][0] == {
        "name": "a", "type": "FLOAT", "required": False, "default": 0.0, "min": None, "max": None,
        "exclusive_min": None, "exclusive_max": None,
        "choices": None, "optional": False, "link_only": False, "description": "", "ui": {},
    }
    assert main(["plugins"]) in (EXIT_OK, EXIT_FAILED)
    assert "dagfusion.builtin.basic" in capsys.readouterr().out
    assert main(["schema"]) == EXIT_OK
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"].startswith("https://json-schema.org/")


def test_run_from_png_and_inspect(tmp_path: Path) -> None:
    from dagfusion.pngmeta import png_info
    from PIL import Image

    picture = tmp_path / "pic.png"
    Image.new("RGB", (4, 4)).save(picture, pnginfo=png_info(BLURRED_NOISE.read_text(), {"seeds": {"noise.seed": 7}}))
    done = cli("inspect", str(picture), cwd=tmp_path)
    assert done.returncode == EXIT_OK and "dagfusion.tensor.Noise" in done.stdout and '"noise.seed": 7' in done.stdout
    done = cli("run", str(picture), "--out", "again", cwd=tmp_path)
    assert done.returncode == EXIT_OK, done.stderr
    assert (tmp_path / "again" / "blurred_noise.png").is_file()
    plain = tmp_path / "plain.png"
    Image.new("RGB", (2, 2)).save(plain)
    assert cli("run", str(plain), cwd=tmp_path).returncode == EXIT_INVALID


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = shutil.which("dagfusion", path=str(Path(sys.executable).parent)) or shutil.which("dagfusion")
    assert script is not None, "the dagfusion console script is not installed"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and "validate" in done.stdout


def test_threads_flag_sets_the_thread_policy_and_refuses_bad_counts(tmp_path: Path, monkeypatch, capsys) -> None:
    from dagfusion import cli as cli_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DAGFUSION_THREADS", raising=False)
    for flag, expected in (("3", 3), ("auto", "auto")):
        args = cli_module._parser().parse_args(["run", str(BLURRED_NOISE), "--threads", flag])
        assert cli_module._settings(args).threads == expected
    assert main(["validate", str(BLURRED_NOISE), "--threads", "0"]) == EXIT_INVALID
    assert "threads must be an integer ≥ 1 or 'auto'" in capsys.readouterr().err


def test_a_run_can_read_its_own_out_folder_wherever_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node may read a file an earlier node of the same run saved, wherever --out points."""
    import argparse

    from dagfusion.cli import _run_settings
    from dagfusion.errors import UnsafeOperationError

    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    args = argparse.Namespace(out=str(elsewhere), read_dir=None, model_dir=None, allow_pickle=False, device=None,
                              threads=None)
    assert _run_settings(args).check_readable(elsewhere / "lora.safetensors") == (elsewhere / "lora.safetensors").resolve()
    args = argparse.Namespace(out=None, read_dir=None, model_dir=None, allow_pickle=False, device=None, threads=None)
    with pytest.raises(UnsafeOperationError):
        _run_settings(args).check_readable(elsewhere / "lora.safetensors")
