"""Security and reliability findings, each tried as an attacker or a careless user would.

The canvas's HTTP checks are in ``tests/ui/test_http_security.py``, the verified disk cache in
``tests/test_cache.py``, symlinks and special files in fingerprints in ``tests/test_fingerprint.py``,
loader confinement in ``tests/nodes/diffusion/test_confinement.py`` and image bombs in
``tests/test_pngmeta.py`` / ``tests/nodes/test_image_limits.py``. Extend these modules whenever a
new loader, template, server route or file writer appears.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dagfusion import Engine, NodeInputError, Settings, UnsafeOperationError, ValidationError
from dagfusion.outdir import OutputFolderBusy, OutputLock
from dagfusion.settings import SettingsError
from dagfusion.templates import TemplateError, render_template, template_problems
from dagfusion.workflow import parse_workflow, sweep_points

SECRET = "s3cr3t-value-that-must-not-leak"
NESTED = "{a:{b.__init__.__globals__[dataclass].__globals__[sys].modules[os].environ[DF_TEST_SECRET]}}"


def _workflow(text: str):
    workflow, problems = parse_workflow(textwrap.dedent(text), "test.yaml")
    assert workflow is not None and problems == [], problems
    return workflow


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "DAGFUSION_OUTPUT_DIR": str(cwd / "outputs"), "DAGFUSION_CACHE_DIR": str(cwd / "cache"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dagfusion.cli", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120
    )


# --- 2. templates evaluate nothing ---------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        NESTED,
        "{a.__class__}",
        "{a[0]}",
        "{b.__init__.__globals__}",
        "{0}",
        "{}",
        "{e}",
        "{a:{b}}",
        "{a!x}",
        "{a",
    ],
)
def test_format_refuses_anything_but_plain_fields(template: str) -> None:
    assert template_problems(template, {"a", "b", "c", "d"})
    with pytest.raises(TemplateError):
        render_template(template, {"a": 1, "b": 2, "c": 3, "d": 4})


def test_format_keeps_plain_fields_conversions_and_literal_specs() -> None:
    values = {"a": 3.14159, "b": "x", "c": 7, "d": None}
    assert render_template("{a:.2f}|{b!r}|{c:>4}|{d}|{{literal}}", values) == "3.14|'x'|   7|None|{literal}"


def test_nested_field_is_a_validation_problem_and_the_secret_never_appears(engine: Engine, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DF_TEST_SECRET", SECRET)
    workflow = _workflow(
        f"""\
        format_version: 1
        nodes:
          t: {{type: dagfusion.text.Format, inputs: {{template: "{NESTED}", a: 1, b: 2}}}}
          save: {{type: dagfusion.io.SaveText, inputs: {{text: {{from: t.text}}}}}}
        """
    )
    validated, problems, _ = engine.check_source(workflow)
    assert validated is None
    (problem,) = problems
    assert (problem.code, problem.node, problem.input, problem.line) == ("bad-template", "t", "template", 3)
    assert "format spec" in problem.message
    with pytest.raises(ValidationError) as info:
        engine.run(workflow, out=tmp_path / "run")
    assert SECRET not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_linked_template_is_checked_when_the_node_runs(engine: Engine, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DF_TEST_SECRET", SECRET)
    workflow = _workflow(
        f"""\
        format_version: 1
        nodes:
          src: {{type: dagfusion.util.Text, inputs: {{text: "{NESTED}"}}}}
          t: {{type: dagfusion.text.Format, inputs: {{template: {{from: src.text}}, a: 1, b: 2}}}}
          save: {{type: dagfusion.io.SaveText, inputs: {{text: {{from: t.text}}}}}}
        """
    )
    result = engine.run(workflow, out=tmp_path / "run")
    assert result.status == "failed"
    error = result.errors["t"]
    assert isinstance(error.original, NodeInputError) and error.original.input == "template"
    record = (tmp_path / "run" / "events.jsonl").read_text()
    assert SECRET not in record and SECRET not in str(error)


# --- 3. the run record is the engine's -----------------------------------------------------


@pytest.mark.parametrize("name", ["workflow.yaml", "manifest.json", "events.jsonl", "MANIFEST.JSON", ".dagfusion-run.lock"])
def test_a_workflow_cannot_forge_its_own_record(engine: Engine, tmp_path: Path, name: str) -> None:
    workflow = _workflow(
        f"""\
        format_version: 1
        nodes:
          save: {{type: dagfusion.io.SaveText, inputs: {{text: "forged", filename: "{name}"}}}}
        """
    )
    out = tmp_path / "run"
    result = engine.run(workflow, out=out)
    assert result.status == "failed"
    assert isinstance(result.errors["save"].original, UnsafeOperationError)
    assert "reserved for the run record" in str(result.errors["save"])
    assert (out / "workflow.yaml").read_text().startswith("format_version: 1")
    assert json.loads((out / "manifest.json").read_text())["run_id"] == result.run_id


def test_record_names_in_subfolders_are_ordinary_files(engine: Engine, tmp_path: Path) -> None:
    workflow = _workflow(
        """\
        format_version: 1
        nodes:
          save: {type: dagfusion.io.SaveText, inputs: {text: "notes", filename: "notes/manifest.json"}}
        """
    )
    assert engine.run(workflow, out=tmp_path / "run").status == "ok"
    assert (tmp_path / "run" / "notes" / "manifest.json").read_text() == "notes"


@pytest.mark.parametrize("where", [".", "..", "/"])
def test_out_may_not_be_the_working_folder_or_an_ancestor(tmp_path: Path, where: str) -> None:
    workflow = tmp_path / "w.yaml"
    workflow.write_text(
        'format_version: 1\nnodes:\n  save: {type: dagfusion.io.SaveText, inputs: {text: "allow_pickle = true", filename: dagfusion.toml}}\n'
    )
    work = tmp_path / "work"
    work.mkdir()
    done = _cli("run", str(workflow), "--out", where, cwd=work)
    assert done.returncode == 2, done.stderr
    assert "whose files dagfusion reads" in done.stderr
    assert not (work / "dagfusion.toml").exists() and not (tmp_path / "dagfusion.toml").exists()


def test_out_may_not_be_a_settings_or_cache_folder(engine: Engine, tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "conf" / "dagfusion.toml"
    config.parent.mkdir()
    config.write_text("")
    monkeypatch.setenv("DAGFUSION_CONFIG", str(config))
    workflow = _workflow('format_version: 1\nnodes:\n  t: {type: dagfusion.util.Text, inputs: {text: "x"}}\n')
    for folder in (config.parent, tmp_path, engine.settings.cache_dir, engine.settings.cache_dir / "outputs"):
        with pytest.raises(UnsafeOperationError, match="whose files dagfusion reads"):
            engine.run(workflow, out=folder)
    assert engine.run(workflow, out=tmp_path / "fine").status == "ok"


def test_a_run_cannot_write_into_the_cache_folder(engine: Engine, tmp_path: Path) -> None:
    cache = engine.settings.cache_dir
    assert cache.parent == tmp_path
    workflow = _workflow(
        """\
        format_version: 1
        nodes:
          save: {type: dagfusion.io.SaveText, inputs: {text: "{}", filename: "cache/outputs/ab/abcd/index.json"}}
        """
    )
    result = engine.run(workflow, out=tmp_path)
    assert result.status == "failed" and "whose files dagfusion trusts" in str(result.errors["save"])
    assert not (cache / "outputs").exists()


def test_a_second_run_into_a_busy_folder_is_refused_and_a_later_one_replaces_the_record(engine: Engine, tmp_path: Path) -> None:
    workflow = _workflow('format_version: 1\nnodes:\n  t: {type: dagfusion.util.Text, inputs: {text: "x"}}\n')
    out = tmp_path / "run"
    with OutputLock(out):  # another run holds the folder
        with pytest.raises(OutputFolderBusy, match="in use by another run"):
            engine.run(workflow, out=out)
    assert not (out / "events.jsonl").exists()
    first = engine.run(workflow, out=out)
    second = engine.run(workflow, out=out)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert {e["run_id"] for e in events} == {second.run_id} != {first.run_id}


def test_two_processes_cannot_share_an_output_folder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dagfusion.outdir import OutputLock\n"
         "with OutputLock(__import__('pathlib').Path(sys.argv[1])):\n print('held', flush=True); time.sleep(60)", str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        workflow = tmp_path / "w.yaml"
        workflow.write_text('format_version: 1\nnodes:\n  t: {type: dagfusion.util.Text, inputs: {text: "x"}}\n')
        done = _cli("run", str(workflow), "--out", "run", cwd=tmp_path)
        assert done.returncode == 2 and "in use by another run" in done.stderr
    finally:
        holder.kill()
        holder.wait()
    assert _cli("run", str(tmp_path / "w.yaml"), "--out", "run", cwd=tmp_path).returncode == 0


# --- 7. sweeps are bounded before anything is expanded -----------------------------------


def test_huge_sweeps_are_refused_at_validation_without_expanding(engine: Engine, tmp_path: Path) -> None:
    values = list(range(1000))
    workflow = _workflow(
        f"""\
        format_version: 1
        nodes:
          n: {{type: dagfusion.util.Number, inputs: {{value: 1}}}}
        sweep:
          - {{n.value: {values}}}
          - {{n.value: {values}}}
          - {{n.value: {values}}}
        """
    )
    assert sweep_points(workflow) == 10**9
    started = time.perf_counter()
    with pytest.raises(ValidationError) as info:
        engine.run_sweep(workflow, out=tmp_path / "sweep")
    assert time.perf_counter() - started < 5
    (problem,) = info.value.problems
    assert problem.code == "sweep-too-large" and "1,000,000,000 runs" in problem.message and problem.line == 4
    assert not (tmp_path / "sweep").exists()


def test_sweep_limit_is_a_setting(registry, settings: Settings, tmp_path: Path) -> None:
    workflow = _workflow(
        """\
        format_version: 1
        nodes:
          n: {type: dagfusion.util.Number, inputs: {value: 1}}
        sweep:
          - {n.value: [1, 2, 3]}
        """
    )
    small = Engine(registry, settings.with_overrides(max_sweep_points=2))
    with pytest.raises(ValidationError, match="at most 2 are allowed"):
        small.run_sweep(workflow)
    assert len(Engine(registry, settings).run_sweep(workflow, out=tmp_path / "s")) == 3


# --- 9. smaller findings -------------------------------------------------------------------


def test_events_survive_kill_9(tmp_path: Path) -> None:
    wf = tmp_path / "slow.yaml"
    wf.write_text(
        textwrap.dedent(
            """\
            format_version: 1
            nodes:
              n: {type: dagfusion.tensor.Noise, inputs: {height: 2048, width: 2048, channels: 3}}
              b1: {type: dagfusion.tensor.Blur, inputs: {tensor: {from: n.tensor}, sigma: 20}}
              b2: {type: dagfusion.tensor.Blur, inputs: {tensor: {from: b1.tensor}, sigma: 20}}
              b3: {type: dagfusion.tensor.Blur, inputs: {tensor: {from: b2.tensor}, sigma: 20}}
            """
        )
    )
    env = {**os.environ, "DAGFUSION_OUTPUT_DIR": str(tmp_path / "o"), "DAGFUSION_CACHE_DIR": str(tmp_path / "c")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagfusion.cli", "run", str(wf), "--json-events", "--out", "o"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    printed = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        printed += 1
        if '"NodeStarted"' in line and '"b1"' in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    recorded = (tmp_path / "o" / "events.jsonl").read_text().splitlines()
    assert len(recorded) >= printed >= 3
    assert all(json.loads(line)["event"] for line in recorded)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DAGFUSION_CACHE_BYTES", "-5"),
        ("DAGFUSION_MODEL_CACHE_BYTES", "-1"),
        ("DAGFUSION_MAX_SWEEP_POINTS", "0"),
        ("DAGFUSION_MAX_IMAGE_PIXELS", "lots"),
        ("DAGFUSION_ALLOW_REMOTE", "maybe"),
    ],
)
def test_environment_budgets_are_checked_like_the_settings_file(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.load(environ={name: value})


def test_a_fifo_path_input_is_refused_at_validation(engine: Engine, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    workflow = _workflow(
        f"""\
        format_version: 1
        nodes:
          load: {{type: dagfusion.io.LoadTensor, inputs: {{path: "{fifo}"}}}}
        """
    )
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(engine.check_source(workflow)), daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert outcome, "validating a FIFO input hung"
    validated, problems, _ = outcome[0]  # type: ignore[misc]
    assert validated is None
    assert [(p.code, p.input) for p in problems] == [("path-not-allowed", "path")]
    assert "FIFO" in problems[0].message


def test_inspect_reports_a_manifest_that_is_not_json(tmp_path: Path) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("dagfusion.workflow", "format_version: 1\nnodes: {}\n")
    info.add_itxt("dagfusion.manifest", "{not json")
    picture = tmp_path / "p.png"
    Image.new("RGB", (2, 2)).save(picture, pnginfo=info)
    done = _cli("inspect", str(picture), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "not valid JSON" in done.stderr and "Traceback" not in done.stderr


# --- 6. image bombs through the command line -----------------------------------------------


def _bomb_png(workflow: str, manifest: str) -> bytes:
    """A ~1 KB PNG declaring 50000×50000 pixels, carrying a workflow and a manifest."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    texts = b"".join(
        chunk(b"iTXt", key.encode() + b"\0\0\0\0\0" + value.encode())
        for key, value in (("dagfusion.workflow", workflow), ("dagfusion.manifest", manifest))
    )
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + texts
        + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_inspect_and_run_read_the_workflow_of_an_image_bomb_without_decoding_it(tmp_path: Path) -> None:
    workflow = 'format_version: 1\nnodes:\n  save: {type: dagfusion.io.SaveText, inputs: {text: "hi", filename: note.txt}}\n'
    picture = tmp_path / "bomb.png"
    picture.write_bytes(_bomb_png(workflow, '{"seeds": {}}'))
    done = _cli("inspect", str(picture), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "dagfusion.io.SaveText" in done.stdout and "Traceback" not in done.stderr
    done = _cli("run", str(picture), "--out", "again", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "again" / "note.txt").read_text() == "hi"


# --- 5. symlinks: a PATH input whose tree leads outside the read folders ------------------


def test_a_path_input_linking_outside_the_read_folders_is_refused_before_anything_is_read(
    engine: Engine, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "weights.safetensors").write_bytes(b"secret")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "unet").symlink_to(outside, target_is_directory=True)
    opened: list[str] = []
    from dagfusion import fingerprint as fingerprint_module

    monkeypatch.setattr(fingerprint_module, "_file_digest", lambda path, *a, **k: opened.append(str(path)) or "x")
    workflow = _workflow(
        f"""\
        format_version: 1
        nodes:
          load: {{type: dagfusion.io.LoadTensor, inputs: {{path: "{folder}"}}}}
        """
    )
    with pytest.raises(ValidationError) as info:
        engine.run(workflow, out=tmp_path / "run")
    (problem,) = info.value.problems
    assert problem.code == "path-not-allowed" and "is a link to" in problem.message
    assert opened == []
