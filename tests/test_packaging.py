"""The built wheel holds the package, its data and entry points, and no generic top-level names."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("dagfusion-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_contains_package_data_and_no_generic_modules(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"dagfusion"}
    for required in (
        "dagfusion/__init__.py",
        "dagfusion/py.typed",
        "dagfusion/nodes/__init__.py",
        "dagfusion/ui/__init__.py",
        "dagfusion/workflows/quickstart.yaml",
        "dagfusion/nodes/metrics/weights/shapeeval.safetensors",
        "dagfusion/nodes/diffusion/configs/sdxl/unet/config.json",
        "dagfusion/ui/static/canvas.js",
        "dagfusion/ui/static/canvas.css",
        "dagfusion/ui/static/vendor/litegraph.core.js",
        "dagfusion/ui/static/vendor/litegraph.css",
        "dagfusion/ui/static/vendor/manifest.json",
    ):
        assert required in names, required
    shipped = {p.name for p in (REPO / "workflows").glob("*.yaml")}
    assert shipped <= {Path(n).name for n in names if n.startswith("dagfusion/workflows/")}
    assert not [n for n in names if "node_modules" in n or n.endswith(".pyi")], "build leftovers in the wheel"
    models = {f"dagfusion/nodes/{p.relative_to(REPO / 'nodes').as_posix()}"
              for folder in (REPO / "nodes" / "shapes" / "models", REPO / "nodes" / "video" / "models")
              for p in folder.rglob("*") if p.is_file()}
    assert any(n.endswith("shapes-sd/unet/diffusion_pytorch_model.safetensors") for n in models)
    assert any(n.endswith("shapes-video/unet/diffusion_pytorch_model.safetensors") for n in models)
    assert models <= names, f"embedded model files missing from the wheel: {sorted(models - names)}"
    sources = {f"dagfusion/nodes/{p.relative_to(REPO / 'nodes').as_posix()}" for p in (REPO / "nodes").rglob("*.py")}
    assert sources <= names, f"modules missing from the wheel: {sorted(sources - names)}"


def test_wheel_entry_points(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "dagfusion = dagfusion.cli:main" in text
    assert "[pytest11]" in text and "dagfusion.testing" in text
