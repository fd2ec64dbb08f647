"""End to end: plugin packages installed with pip are discovered through their entry points.

The example plugin (``plugins/examples/dagfusion-imagefilters``) and the template
(``plugins/template``) are pip-installed (no network, no build isolation) into a temporary
target folder; subprocesses with that folder on ``PYTHONPATH`` then see them exactly as a user's
environment would: the registry and the CLI list them, their workflows run, the allow/block
variables apply, a plugin that fails to import is disabled and reported while the others load,
a distribution claiming another one's node type is disabled with a reason naming both (and
``plugins_strict`` makes that exit 2), and each package's own test suite passes against the
installed copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "imagefilters": REPO / "plugins" / "examples" / "dagfusion-imagefilters",
    "template": REPO / "plugins" / "template",
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``site/`` (both packages pip-installed) and ``src/`` (their source copies)."""
    root = tmp_path_factory.mktemp("plugin-packages")
    sources = []
    for src in PACKAGES.values():
        # Build from a copy, so setuptools' build/ and *.egg-info never land in the repository.
        dst = root / "src" / src.name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"))
        sources.append(str(dst))
    proc = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
            "--disable-pip-version-check", "--quiet", "--target", str(root / "site"), *sources,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    return root


def run_python(
    args: list[str], paths: list[Path], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` with ``paths`` as PYTHONPATH and no DAGFUSION_* from the caller."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DAGFUSION_") and k != "PYTHONPATH"}
    environ.update(
        PYTHONPATH=os.pathsep.join(str(p) for p in paths),
        PYTHONDONTWRITEBYTECODE="1",
        DAGFUSION_OUTPUT_DIR=str(cwd / "outputs"),
        DAGFUSION_CACHE_DIR=str(cwd / "cache"),
        **(env or {}),
    )
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=240
    )


def script(code: str, paths: list[Path], cwd: Path, env: dict[str, str] | None = None) -> dict:
    """Run a Python snippet that prints one JSON document; return it."""
    proc = run_python(["-c", textwrap.dedent(code)], paths, cwd, env)
    assert proc.returncode == 0, f"script failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli(args: list[str], paths: list[Path], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_python(["-m", "dagfusion.cli", *args], paths, cwd, env)


def plugin_lines(output: str) -> dict[str, str]:
    """``dagfusion plugins`` output as {plugin name: its line}."""
    return {line.split()[0]: line for line in output.splitlines() if line and not line.startswith(" ")}


def fake_distribution(site: Path, dist: str, entry_name: str, module: str, source: str) -> None:
    """A minimal installed distribution (what pip leaves behind): a module and its dist-info."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-0.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text(f"[dagfusion]\n{entry_name} = {module}\n")


def test_installed_plugins_are_discovered_and_run(installed: Path, tmp_path: Path) -> None:
    site = installed / "site"
    edges = installed / "src" / "dagfusion-imagefilters" / "workflows" / "edges.yaml"
    sharpen = installed / "src" / "template" / "workflows" / "sharpen.yaml"
    data = script(
        f"""
        import json, warnings
        warnings.simplefilter("error")  # a load failure would warn: fail instead
        import dagfusion
        from dagfusion.registry import Registry
        registry = Registry.from_plugins()
        edges = dagfusion.run({str(edges)!r})
        sharpen = dagfusion.run({str(sharpen)!r})
        print(json.dumps({{
            "nodes": registry.node_types(),
            "types": [t.name for t in registry.types],
            "origin": {{t: registry.origin_description(t) for t in ("imagefilters.Sobel", "template.Sharpen")}},
            "type_origin": registry.origin("EDGE_MAP"),
            "plugins": {{i.name: [i.distribution, i.version, i.status] for i in registry.plugin_manager.plugin_infos()}},
            "module": __import__("dagfusion_imagefilters").__file__,
            "edges": [edges.status, edges.output("mask.coverage"), edges.output("stats.max")],
            "sharpen": [sharpen.status, sharpen.output("before.std"), sharpen.output("after.std")],
        }}))
        """,
        [site],
        tmp_path,
    )
    assert {"imagefilters.Sobel", "imagefilters.Posterize", "imagefilters.EdgeMask", "template.Sharpen"} <= set(data["nodes"])
    assert "dagfusion.math.Add" in data["nodes"]
    assert "EDGE_MAP" in data["types"] and data["type_origin"] == "imagefilters"
    assert data["origin"] == {
        "imagefilters.Sobel": "plugin 'imagefilters' (dagfusion-imagefilters 0.2.0)",
        "template.Sharpen": "plugin 'template' (dagfusion-plugin-template 0.1.0)",
    }
    assert data["plugins"]["imagefilters"] == ["dagfusion-imagefilters", "0.2.0", "loaded"]
    assert data["plugins"]["template"] == ["dagfusion-plugin-template", "0.1.0", "loaded"]
    assert Path(data["module"]).is_relative_to(site)  # the installed copy, not the repository's source
    status, coverage, peak = data["edges"]
    assert status == "ok" and 0 < coverage < 0.5 and peak == pytest.approx(1.0)
    status, before, after = data["sharpen"]
    assert status == "ok" and after > before

    listed = cli(["nodes", "--json"], [site], tmp_path)
    assert listed.returncode == 0, listed.stderr
    by_type = {n["type"]: n for n in json.loads(listed.stdout)}
    assert by_type["imagefilters.Sobel"]["plugin"] == "imagefilters"
    assert by_type["template.Sharpen"]["plugin"] == "template"
    assert [i["name"] for i in by_type["template.Sharpen"]["inputs"]] == ["tensor", "amount", "sigma", "threshold"]
    plugins = cli(["plugins"], [site], tmp_path)
    assert plugins.returncode == 0, plugins.stdout + plugins.stderr
    lines = plugin_lines(plugins.stdout)
    assert "loaded" in lines["imagefilters"] and "dagfusion-imagefilters 0.2.0" in lines["imagefilters"]
    assert "3 nodes" in lines["imagefilters"] and "1 nodes" in lines["template"]


def test_allow_and_block_lists(installed: Path, tmp_path: Path) -> None:
    site = [installed / "site"]
    cases = [
        ("DAGFUSION_DISABLE_PLUGINS", "imagefilters", {"imagefilters": "blocked", "template": "loaded"}),
        # a distribution name blocks too
        ("DAGFUSION_DISABLE_PLUGINS", "dagfusion-plugin-template", {"imagefilters": "loaded", "template": "blocked"}),
        ("DAGFUSION_PLUGINS", "template", {"imagefilters": "blocked", "template": "loaded"}),
    ]
    for variable, value, expected in cases:
        proc = cli(["plugins"], site, tmp_path, {variable: value})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = plugin_lines(proc.stdout)
        for name, status in expected.items():
            assert lines[name].split()[1] == status, f"{variable}={value}:\n{proc.stdout}"
        assert "loaded" in lines["dagfusion.builtin.basic"]
    proc = cli(["nodes", "--json"], site, tmp_path, {"DAGFUSION_DISABLE_PLUGINS": "imagefilters"})
    types = {n["type"] for n in json.loads(proc.stdout)}
    assert "template.Sharpen" in types and not any(t.startswith("imagefilters.") for t in types)


def test_a_plugin_that_fails_to_import_is_disabled_and_the_others_load(installed: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken-site"
    fake_distribution(
        broken,
        "dagfusion-broken",
        "broken",
        "broken_plugin",
        """
        import dagfusion
        import a_dependency_nobody_installed  # noqa: F401
        """,
    )
    paths = [broken, installed / "site"]
    data = script(
        """
        import json, warnings
        from dagfusion.registry import Registry
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            registry = Registry.from_plugins()
        failures = registry.plugin_manager.load_failures
        print(json.dumps({
            "failures": [[f.name, f.distribution, f.version, f.reason, f.traceback] for f in failures],
            "warnings": [str(w.message) for w in caught],
            "sobel": "imagefilters.Sobel" in registry,
            "sharpen": "template.Sharpen" in registry,
        }))
        """,
        paths,
        tmp_path,
    )
    ((name, dist, version, reason, trace),) = data["failures"]
    assert (name, dist, version) == ("broken", "dagfusion-broken", "0.3.0")
    assert reason == "import failed: ModuleNotFoundError: No module named 'a_dependency_nobody_installed'"
    assert "Traceback (most recent call last)" in trace and "broken_plugin.py" in trace
    assert data["warnings"] == [f"plugin 'broken' (dagfusion-broken 0.3.0) disabled: {reason}"]
    assert data["sobel"] and data["sharpen"]

    proc = cli(["plugins"], paths, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # listing a failure is not a failure
    lines = plugin_lines(proc.stdout)
    assert lines["broken"].split()[1:4] == ["failed", "dagfusion-broken", "0.3.0"]
    assert f"    {reason}" in proc.stdout.splitlines()
    assert "broken_plugin.py" not in proc.stdout
    assert "loaded" in lines["imagefilters"] and "loaded" in lines["template"]
    verbose = cli(["plugins", "--verbose"], paths, tmp_path)
    assert verbose.returncode == 0 and "broken_plugin.py" in verbose.stdout

    listed = cli(["nodes", "--json"], paths, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "imagefilters.Sobel" in {n["type"] for n in json.loads(listed.stdout)}
    assert listed.stderr.strip() == (
        f"warning: plugin 'broken' (dagfusion-broken 0.3.0) disabled: {reason}; see `dagfusion plugins`"
    )


def test_a_distribution_claiming_another_ones_node_type_is_disabled(installed: Path, tmp_path: Path) -> None:
    clone = tmp_path / "clone-site"
    fake_distribution(
        clone,
        "dagfusion-sobel-clone",
        "sobelclone",
        "sobel_clone",
        """
        from dagfusion import TENSOR, Input, Output, hookimpl, node

        @node("sobelclone.Blur", version="1.0.0", category="image", inputs=[Input("tensor", TENSOR)],
              outputs=[Output("tensor", TENSOR)])
        def blur(ctx, tensor):
            '''Registered before the clash: must not stay registered.'''
            return tensor

        @node("imagefilters.Sobel", version="2.0.0", category="image", inputs=[Input("tensor", TENSOR)],
              outputs=[Output("edges", TENSOR)])
        def sobel(ctx, tensor):
            '''A clone that claims another package's node type.'''
            return tensor

        @hookimpl
        def register_nodes(register):
            register(blur)
            register(sobel)
        """,
    )
    paths = [installed / "site", clone]  # the real package is found first, so it keeps its node type
    edges = installed / "src" / "dagfusion-imagefilters" / "workflows" / "edges.yaml"
    data = script(
        f"""
        import json, warnings
        import dagfusion
        from dagfusion.registry import Registry
        warnings.simplefilter("ignore")
        registry = Registry.from_plugins()
        (failure,) = registry.plugin_manager.load_failures
        print(json.dumps({{
            "failure": [failure.name, failure.summary()],
            "sobel": [registry.origin("imagefilters.Sobel"), registry.get("imagefilters.Sobel").version],
            "blur": "sobelclone.Blur" in registry,
            "edges": dagfusion.run({str(edges)!r}).status,
        }}))
        """,
        paths,
        tmp_path,
    )
    assert data["failure"] == [
        "sobelclone",
        "plugin 'sobelclone' (dagfusion-sobel-clone 0.3.0) disabled: node type imagefilters.Sobel is already "
        "registered by plugin 'imagefilters' (dagfusion-imagefilters 0.2.0)",
    ]
    assert data["sobel"] == ["imagefilters", "1.0.0"]
    assert data["blur"] is False  # all or nothing: the node registered before the clash went too
    assert data["edges"] == "ok"

    proc = cli(["nodes"], paths, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "imagefilters.Sobel" in proc.stdout and "sobelclone.Blur" not in proc.stdout
    (warning,) = proc.stderr.strip().splitlines()
    assert "dagfusion-sobel-clone 0.3.0" in warning and "dagfusion-imagefilters 0.2.0" in warning
    strict = cli(["nodes"], paths, tmp_path, {"DAGFUSION_PLUGINS_STRICT": "1"})
    assert strict.returncode == 2
    assert "1 plugin failed:" in strict.stderr and "plugins_strict is on" in strict.stderr
    assert "dagfusion-sobel-clone" in strict.stderr and "imagefilters.Sobel" not in strict.stdout


def test_the_packages_own_test_suites_pass(installed: Path, tmp_path: Path) -> None:
    tests = [str(installed / "src" / src.name / "tests") for src in PACKAGES.values()]
    proc = run_python(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib", *tests],
        [installed / "site"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
