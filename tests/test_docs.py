"""The documentation stays true: reference pages match the code, examples run, hooks are documented and tested."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from dagfusion.docsgen import hook_functions, render_all
from dagfusion.registry import Registry
from dagfusion.validation import check
from dagfusion.workflow import parse_workflow

DOCS = Path(__file__).resolve().parents[1] / "docs"
TESTS = Path(__file__).resolve().parent


def _blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", markdown, flags=re.DOTALL)


@pytest.mark.parametrize("name", ["nodes.md", "types.md", "hooks.md"])
def test_reference_pages_are_up_to_date(registry: Registry, name: str) -> None:
    expected = render_all(registry)[name]
    committed = (DOCS / "reference" / name).read_text(encoding="utf-8")
    assert committed == expected, f"docs/reference/{name} is stale: run `dagfusion docs`"


@pytest.mark.parametrize("name", sorted(hook_functions()))
def test_every_hook_is_documented(name: str) -> None:
    fn = hook_functions()[name]
    doc = inspect.getdoc(fn) or ""
    assert len(doc.splitlines()[0]) > 20, f"hook {name} needs a summary line"
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc, f"hook {name} does not document its argument {param!r}"


@pytest.mark.parametrize("name", sorted(hook_functions()))
def test_every_hook_is_tested(name: str) -> None:
    sources = [p.read_text(encoding="utf-8") for p in TESTS.rglob("test_*.py") if p.name != "test_docs.py"]
    pattern = re.compile(rf"def {name}\(")
    assert any(pattern.search(s) for s in sources), f"no test implements the hook {name}"


def test_plugin_guide_examples_run() -> None:
    namespace: dict[str, object] = {"__name__": "plugin_guide"}
    blocks = _blocks((DOCS / "plugins.md").read_text(encoding="utf-8"), "python")
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, "docs/plugins.md", "exec"), namespace)


def test_accelerator_guide_example_runs() -> None:
    namespace: dict[str, object] = {"__name__": "accelerator_guide"}
    blocks = _blocks((DOCS / "accelerators.md").read_text(encoding="utf-8"), "python")
    assert len(blocks) == 4
    for block in blocks:
        exec(compile(block, "docs/accelerators.md", "exec"), namespace)


def test_format_reference_example_is_valid(registry: Registry) -> None:
    blocks = _blocks((DOCS / "format.md").read_text(encoding="utf-8"), "yaml")
    (example,) = [b for b in blocks if "format_version:" in b]  # the one whole workflow; the rest are excerpts
    import yaml

    assert all(yaml.safe_load(b) is not None for b in blocks)  # excerpts are YAML too
    workflow, problems = parse_workflow(example)
    assert workflow is not None and problems == []
    validated, problems, _ = check(workflow, registry)
    assert problems == [] and validated is not None
    codes = re.findall(r"`([a-z-]+)`", (DOCS / "format.md").read_text().split("## Validation problems")[1].split("##")[0])
    import dagfusion.sources as s
    import dagfusion.migration as m_
    import dagfusion.sweeppoints as sp
    import dagfusion.validation as v
    import dagfusion.workflow as w
    import dagfusion.yamlsource as y

    source = "".join(inspect.getsource(m) for m in (s, v, w, y, m_, sp))
    used = set(re.findall(r'(?:Problem\(\s*|code = |")([a-z]+(?:-[a-z]+)+)"', source))
    assert used <= set(codes), f"undocumented problem codes: {sorted(used - set(codes))}"
