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


def _problems(registry, nodes: str) -> list:
    from dagfusion.validation import check
    from dagfusion.workflow import load_workflow

    _, problems, _ = check(load_workflow(f"format_version: 1\nnodes:\n{nodes}", text=True), registry)
    return [(p.node, p.input, p.code) for p in problems]


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ("{guidance_min: 8.0, guidance_max: 2.0}", ("loss", "guidance_max", "bad-range")),
        ("{timestep_weights: '1, x'}", ("loss", "timestep_weights", "bad-weights")),
        ("{timestep_weights: '1, 2, 3, 4, 5', train_timesteps: 4}", ("loss", "timestep_weights", "bad-weights")),
        ("{prediction: epsilon, zero_terminal_snr: true}", ("loss", "prediction", "bad-prediction")),
    ],
)
def test_validation_reports_a_bad_distill_loss_naming_node_and_input(registry, inputs: str, expected: tuple) -> None:
    assert _problems(registry, f"  loss: {{type: dagfusion.quant.DistillLoss, inputs: {inputs}}}\n") == [expected]


def test_validation_reports_torchao_for_int4_and_too_many_profile_bins(registry) -> None:
    nodes = """  load: {type: dagfusion.models.LoadEmbedded, inputs: {model: shapes-sd}}
  q: {type: dagfusion.quant.WeightOnly, inputs: {model: {from: load.model}, format: int4, backend: torchao}}
  p: {type: dagfusion.quant.ErrorProfile, inputs: {model: {from: q.model}, conditioning: {from: load.model}, latent: {from: load.model}, bins: 20, train_timesteps: 10}}
"""
    found = _problems(registry, nodes)
    assert ("q", "backend", "bad-backend") in found and ("p", "bins", "bad-range") in found, found


def test_a_linked_bad_value_raises_node_input_error_naming_the_input(tmp_path: Path) -> None:
    from dagfusion import NodeInputError
    from dagfusion.nodes.quant.distill import quant_distill_loss
    from dagfusion.testing import NodeCallContext

    good = {"stage": "output", "guidance_min": 1.0, "guidance_max": 7.5, "timestep_weights": "", "prediction": "epsilon",
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "train_timesteps": 1000,
            "zero_terminal_snr": False}
    quant_distill_loss.fn(NodeCallContext(tmp_path), **good)
    for bad, name in (({"guidance_min": 9.0}, "guidance_max"), ({"timestep_weights": "0, 0"}, "timestep_weights"),
                      ({"zero_terminal_snr": True}, "prediction")):
        with pytest.raises(NodeInputError) as info:
            quant_distill_loss.fn(NodeCallContext(tmp_path), **{**good, **bad})
        assert info.value.input == name
