"""dagfusion.model is the public seam: cheap to import, complete, and the old import paths still
work for one minor release, with a DeprecationWarning, while nothing in the repository uses them."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

ALIASES = {
    "dagfusion.nodes.diffusion.hooks": ("ModelPatch", "StepHook", "DenoiserCall", "applied"),
    "dagfusion.nodes.diffusion.handle": ("ModelHandle", "VAEHandle", "TextEncoderBundle", "ComponentRef", "patch_key"),
    "dagfusion.nodes.diffusion.denoisers": ("Family", "register_family", "family_for", "UNetFamily"),
    "dagfusion.nodes.diffusion.model_cache": ("ModelCache", "default_cache", "DEFAULT_BUDGET_BYTES"),
    "dagfusion.nodes.cache.macs": ("count_macs", "MacCounter", "CallCosts"),
    "dagfusion.nodes.diffusion.tiny": ("write_model", "sd_handles", "build_sd"),
}


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=120)


def test_model_package_imports_without_torch_diffusers_or_the_node_packs() -> None:
    _run(
        """
        import sys
        import dagfusion.model
        heavy = [m for m in ("torch", "diffusers", "transformers", "dagfusion.nodes", "dagfusion.engine") if m in sys.modules]
        assert not heavy, heavy
        """
    )


def test_testing_package_imports_neither_torch_nor_its_models() -> None:
    _run(
        """
        import sys
        import dagfusion.testing
        assert "torch" not in sys.modules
        assert "dagfusion.testing.models" not in sys.modules
        from dagfusion.testing import make_registry, run_workflow, assert_node_contract  # the public names stay
        """
    )


def test_testing_models_loads_on_first_use() -> None:
    import dagfusion.testing

    assert dagfusion.testing.models.write_model is importlib.import_module("dagfusion.testing.models").write_model


def test_every_public_name_resolves() -> None:
    import dagfusion.model as model

    assert sorted(model.__all__) == sorted(set(model.__all__))
    for name in model.__all__:
        assert getattr(model, name) is not None, name


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_old_import_paths_warn_and_reexport(old: str) -> None:
    if old.endswith(".tiny"):
        pytest.importorskip("diffusers")
    saved = sys.modules.pop(old, None)
    try:
        with pytest.warns(DeprecationWarning, match=re.escape(old) + " is deprecated"):
            module = importlib.import_module(old)
    finally:
        if saved is not None:
            sys.modules[old] = saved
    target = importlib.import_module("dagfusion.testing.models" if old.endswith(".tiny") else "dagfusion.model")
    for name in ALIASES[old]:
        assert hasattr(module, name), name
        if hasattr(target, name):
            assert getattr(module, name) is getattr(target, name), name


def test_old_paths_warn_once_per_process() -> None:
    _run(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import dagfusion.nodes.diffusion.hooks
            import dagfusion.nodes.diffusion.hooks  # already imported: no second warning
        assert [str(w.message).split(" ")[0] for w in caught] == ["dagfusion.nodes.diffusion.hooks"], caught
        assert caught[0].category is DeprecationWarning
        """
    )


def test_loading_every_pack_raises_no_deprecation_warning() -> None:
    _run(
        """
        import warnings
        warnings.simplefilter("error", DeprecationWarning)
        from dagfusion.registry import Registry
        Registry.from_plugins(load_entrypoints=False)
        from dagfusion.model import default_families
        assert default_families().names()[-4:] == ["unet", "dit", "pixart", "svd"]
        """
    )


_OLD = re.compile(
    r"dagfusion\.nodes\.diffusion\.(hooks|handle|denoisers|model_cache|tiny)\b"
    r"|from dagfusion\.nodes\.diffusion import [^\n]*\b(hooks|handle|denoisers|model_cache|tiny)\b"
    r"|dagfusion\.nodes\.cache\.macs\b"
    r"|from dagfusion\.nodes\.cache import [^\n]*\bmacs\b"
)
_ALIAS_FILES = {
    "nodes/diffusion/hooks.py", "nodes/diffusion/handle.py", "nodes/diffusion/denoisers.py",
    "nodes/diffusion/model_cache.py", "nodes/diffusion/tiny.py", "nodes/cache/macs.py",
}


def test_nothing_in_the_repository_uses_the_old_paths() -> None:
    roots = ["nodes", "core", "tests", "benchmarks", "plugins", "docs", "workflows", "ui"]
    offenders = []
    for root in roots:
        for path in (REPO / root).rglob("*"):
            if path.suffix not in {".py", ".md", ".yaml", ".toml"} or "node_modules" in path.parts:
                continue
            rel = path.relative_to(REPO).as_posix()
            if rel in _ALIAS_FILES or rel == "tests/model/test_surface.py":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if _OLD.search(line):
                    offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("page", ["accelerators.md", "plugins.md"])
def test_guides_import_only_the_public_surface(page: str) -> None:
    text = (REPO / "docs" / page).read_text(encoding="utf-8")
    allowed = {"dagfusion", "dagfusion.model", "dagfusion.testing", "dagfusion.testing.models"}
    used = set()
    for block in re.findall(r"```(?:python|text)\n(.*?)```", text, flags=re.DOTALL):
        used |= set(re.findall(r"^\s*from (dagfusion[\w.]*) import", block, flags=re.MULTILINE))
        used |= set(re.findall(r"^\s*import (dagfusion[\w.]*)", block, flags=re.MULTILINE))
    assert used and used <= allowed, sorted(used - allowed)


def test_pytest_does_not_turn_the_alias_warning_into_an_error() -> None:
    import tomllib

    filters = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"].get("filterwarnings", [])
    assert not [f for f in filters if f.startswith("error") and "DeprecationWarning" in f and "dagfusion" not in f], filters
