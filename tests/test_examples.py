"""Every shipped workflow validates and runs (with the small overrides its metadata names for tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dagfusion import Engine
from dagfusion.workflow import load_workflow

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.yaml"))


def test_there_are_example_workflows() -> None:
    assert any(p.name == "quickstart.yaml" for p in WORKFLOWS)


#: Workflows whose tiny run still trains for several seconds: full suite only.
SLOW = frozenset({"distill_shapes", "mixed_precision_shapes"})


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW else p for p in WORKFLOWS],
    ids=[p.stem for p in WORKFLOWS],
)
def test_example_workflow_runs(path: Path, engine: Engine, tmp_path: Path) -> None:
    workflow = load_workflow(path)
    overrides = list(workflow.metadata.get("test_overrides", []))
    engine.validate(workflow)
    results = engine.run_sweep(workflow, overrides=overrides, out=tmp_path, check_mutation=True)
    for result in results:
        assert result.ok, result.errors
    again = load_workflow(workflow.dump(), text=True)
    assert again == workflow
