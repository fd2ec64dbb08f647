"""Node types the cache pack renamed still load from workflow files naming their former ids."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")


def test_a_workflow_naming_the_former_lazy_gate_loss_id_loads_runs_and_saves_the_new_id(engine, tmp_path: Path) -> None:
    from dagfusion.nodes.cache.lazydit import LazyGateObjective
    from dagfusion.validation import check
    from dagfusion.workflow import load_workflow

    def text(type_id: str) -> str:
        return f"format_version: 1\nnodes:\n  loss: {{type: {type_id}, inputs: {{sampling_steps: 10, target_laziness: 0.7}}}}\n"

    old = load_workflow(text("dagfusion.train.LazyGateLoss"), text=True)
    validated, problems, warnings = check(old, engine.registry)
    assert problems == [] and validated is not None
    assert warnings == ["node 'loss': node type dagfusion.train.LazyGateLoss is now dagfusion.cache.LazyGateLoss; "
                        "saving the workflow writes the new id"]
    assert "type: dagfusion.cache.LazyGateLoss" in validated.workflow.dump()
    first = engine.run(old, out=tmp_path / "old")
    second = engine.run(load_workflow(text("dagfusion.cache.LazyGateLoss"), text=True), out=tmp_path / "new")
    assert first.ok and second.ok, (first.errors, second.errors)
    objective = first.output("loss.objective")
    assert isinstance(objective, LazyGateObjective) and objective == second.output("loss.objective")
    assert objective.sampling_steps == 10 and objective.target_laziness == 0.7
