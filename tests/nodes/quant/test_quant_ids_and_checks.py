"""The quant pack's renamed node ids still load from workflow files; its node checks run at validation time."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")


def test_a_workflow_naming_the_former_distill_loss_id_loads_runs_and_saves_the_new_id(engine, tmp_path: Path) -> None:
    from dagfusion.validation import check
    from dagfusion.workflow import load_workflow

    def text(type_id: str) -> str:
        return f"format_version: 1\nnodes:\n  loss: {{type: {type_id}, inputs: {{stage: output, guidance_min: 2.0}}}}\n"

    old = load_workflow(text("dagfusion.train.QuantDistillLoss"), text=True)
    validated, problems, warnings = check(old, engine.registry)
    assert problems == [] and validated is not None
    assert warnings == ["node 'loss': node type dagfusion.train.QuantDistillLoss is now dagfusion.quant.DistillLoss; "
                        "saving the workflow writes the new id"]
    assert "type: dagfusion.quant.DistillLoss" in validated.workflow.dump()
    first = engine.run(old, out=tmp_path / "old")
    second = engine.run(load_workflow(text("dagfusion.quant.DistillLoss"), text=True), out=tmp_path / "new")
    assert first.ok and second.ok, (first.errors, second.errors)
    assert first.output("loss.objective") == second.output("loss.objective")


def test_validation_reports_bad_candidate_bits_naming_the_node_and_input(registry) -> None:
    from dagfusion.validation import check
    from dagfusion.workflow import load_workflow

    text = """format_version: 1
nodes:
  load: {type: dagfusion.models.LoadEmbedded, inputs: {model: shapes-sd}}
  sens: {type: dagfusion.quant.Sensitivity, inputs: {model: {from: load.model}, conditioning: {from: load.model}, latent: {from: load.model}, bits: '2, 9'}}
"""
    _, problems, _ = check(load_workflow(text, text=True), registry)
    bits = [p for p in problems if p.code == "bad-bits"]
    assert [(p.node, p.input, p.line) for p in bits] == [("sens", "bits", 4)], problems
