"""The Gradio app around the canvas: component, served files, launch settings, CLI entry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dagfusion.cli import main as cli_main
from dagfusion.errors import UnsafeOperationError, ValidationError
from dagfusion.ui.handlers import CanvasBackend

pytest.importorskip("gradio", reason="the canvas needs the ui extra: pip install 'dagfusion[ui]'")

from dagfusion.ui import app  # noqa: E402  (after the skip: imports Gradio)

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "workflows" / "blurred_noise.yaml"


def test_importing_the_cli_or_validating_never_imports_gradio() -> None:
    code = (
        "import sys\n"
        "from dagfusion.cli import main\n"
        f"assert main(['validate', {str(QUICKSTART)!r}]) == 0\n"
        "assert 'gradio' not in sys.modules and 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr


def test_analytics_are_off_and_only_loopback_is_served_without_the_opt_in() -> None:
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert app.HOST == "127.0.0.1"
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        app.check_bind(host, allow_remote=False)
    for host in ("0.0.0.0", "::", "", "192.168.1.5", "example.com"):
        with pytest.raises(UnsafeOperationError, match="allow_remote"):
            app.check_bind(host, allow_remote=False)
        app.check_bind(host, allow_remote=True)


def test_dagfusion_ui_refuses_a_network_address_before_serving(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "empty.toml").write_text("", encoding="utf-8")
    monkeypatch.delenv("DAGFUSION_ALLOW_REMOTE", raising=False)
    monkeypatch.setenv("DAGFUSION_CONFIG", str(tmp_path / "empty.toml"))  # no settings file opts in
    assert cli_main(["ui", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve the canvas on '0.0.0.0'" in err and "DAGFUSION_ALLOW_REMOTE" in err


def test_importing_the_app_writes_nothing_into_the_package() -> None:
    stub = app.PACKAGE_DIR / "app.pyi"
    if stub.exists():
        pytest.skip(f"{stub} was left by an older version; remove it to run this test")
    code = "import dagfusion.ui.app\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert not stub.exists()


def test_vendored_assets_are_built_from_the_lock_file() -> None:
    from dagfusion.ui import build_assets

    assert build_assets.check() == [], "run `make setup` (npm ci in ui/ and python ui/build_assets.py)"
    assert app.vendor_problem() is None
    assert build_assets.locked_versions()["litegraph.js"] == "0.7.18"


def test_the_page_loads_only_files_this_package_serves(backend: CanvasBackend) -> None:
    head = app.head_html()
    assert "http" not in head and "//" not in head.replace("/gradio_api/file=", "")
    for ref in ("litegraph.core.js", "litegraph.css", *app.OWN_FILES):
        assert ref in head
    for path in (app.VENDOR_DIR / "litegraph.core.js", app.STATIC_DIR / "canvas.js"):
        assert f"file={path.as_posix()}?v=" in head


def test_the_component_exposes_its_server_functions(backend: CanvasBackend) -> None:
    demo = app.build_app(backend)
    (canvas,) = [b for b in demo.blocks.values() if isinstance(b, app.WorkflowCanvas)]
    config = canvas.get_config()
    assert set(config["server_fns"]) == {
        "df_catalog", "df_check", "df_save", "df_open", "df_submit", "df_poll", "df_cancel", "df_paths", "df_results",
    }
    assert config["value"]["nodes"] == [] and config["props"]["notice"] == ""
    assert "backend" not in config  # the backend object stays on the server
    assert canvas.df_catalog(None) is backend.catalog()
    assert canvas.df_poll({"run": "nope"}) == {"run": None, "queue": []}
    assert canvas.df_paths(None)


def test_the_canvas_opens_with_a_file_or_refuses_it(backend: CanvasBackend, tmp_path: Path) -> None:
    graph, notice = app.initial_graph(backend, QUICKSTART)
    assert len(graph["nodes"]) == 7 and notice == ""
    draft = tmp_path / "draft.yaml"
    draft.write_text("format_version: 1\nnodes: {save: {type: dagfusion.io.SaveTensorPNG}}\n", encoding="utf-8")
    graph, notice = app.initial_graph(backend, draft)
    assert notice == "draft.yaml: 1 problem marked on the nodes"
    newer = tmp_path / "newer.yaml"
    newer.write_text("format_version: 5\nnodes: {a: {type: dagfusion.util.Number}}\n", encoding="utf-8")
    with pytest.raises(ValidationError, match="reads up to 1"):
        app.initial_graph(backend, newer)
    with pytest.raises(ValidationError, match="cannot read"):
        app.initial_graph(backend, tmp_path / "missing.yaml")


def test_dagfusion_ui_refuses_a_bad_file_before_serving(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    newer = tmp_path / "newer.yaml"
    newer.write_text("format_version: 5\nnodes: {a: {type: dagfusion.util.Number}}\n", encoding="utf-8")
    assert cli_main(["ui", str(newer)]) == 2
    assert "reads up to 1" in capsys.readouterr().err
