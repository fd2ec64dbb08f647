from __future__ import annotations

import textwrap

import pytest

from dagfusion import Input, Output, ValidationError, hookimpl, node
from dagfusion.registry import Registry
from dagfusion.validation import check, validate
from dagfusion.workflow import parse_workflow


def problems_of(text: str, registry: Registry, settings=None):
    wf, problems = parse_workflow(textwrap.dedent(text))
    assert wf is not None
    _, more, warnings = check(wf, registry, settings, initial_problems=problems)
    return more, warnings


def test_every_problem_is_reported_at_once(registry: Registry) -> None:
    problems, _ = problems_of(
        """\
        format_version: 1
        nodes:
          n:
            type: dagfusion.util.Numbr
          a:
            type: dagfusion.math.Add
            inputs:
              a: {from: t.text}
              b: "three"
              c: 1
          t:
            type: dagfusion.util.Text
            inputs: {text: 5}
          noise:
            type: dagfusion.tensor.Noise
            inputs: {seed: -1, distribution: gamma, channels: 3.5}
          blur:
            type: dagfusion.tensor.Blur
          ghost:
            type: dagfusion.tensor.Blur
            inputs: {tensor: {from: nowhere.tensor}}
          typo:
            type: dagfusion.tensor.Blur
            inputs: {tensor: {from: noise.tensr}}
        outputs: [missing.x]
        """,
        registry,
    )
    got = {(p.code, p.node, p.input) for p in problems}
    assert got == {
        ("unknown-node-type", "n", None),
        ("type-mismatch", "a", "a"),
        ("type-mismatch", "a", "b"),
        ("unknown-input", "a", "c"),
        ("type-mismatch", "t", "text"),
        ("out-of-range", "noise", "seed"),
        ("not-a-choice", "noise", "distribution"),
        ("type-mismatch", "noise", "channels"),
        ("missing-input", "blur", "tensor"),
        ("dangling-reference", "ghost", "tensor"),
        ("dangling-reference", "typo", "tensor"),
        ("dangling-reference", None, None),
    }
    by_key = {(p.code, p.node, p.input): p for p in problems}
    assert "did you mean 'dagfusion.util.Number'" in by_key[("unknown-node-type", "n", None)].message
    assert by_key[("type-mismatch", "a", "a")].message == "expected FLOAT, got STRING from t.text"
    assert by_key[("type-mismatch", "a", "a")].line == 8
    assert "did you mean 'tensor'" in by_key[("dangling-reference", "typo", "tensor")].message
    assert "expected one of ['normal', 'uniform'], got 'gamma'" in by_key[("not-a-choice", "noise", "distribution")].message


def test_int_output_feeds_float_input(registry: Registry) -> None:
    problems, _ = problems_of(
        """\
        format_version: 1
        nodes:
          i: {type: dagfusion.util.Integer, inputs: {value: 3}}
          a: {type: dagfusion.math.Add, inputs: {a: {from: i.value}, b: 2}}
        """,
        registry,
    )
    assert problems == []


def test_cycle_is_printed_with_node_ids(registry: Registry) -> None:
    problems, _ = problems_of(
        """\
        format_version: 1
        nodes:
          a: {type: dagfusion.math.Add, inputs: {a: {from: c.sum}}}
          b: {type: dagfusion.math.Add, inputs: {a: {from: a.sum}}}
          c: {type: dagfusion.math.Add, inputs: {a: {from: b.sum}}}
          d: {type: dagfusion.math.Add, inputs: {a: {from: d.sum}}}
        """,
        registry,
    )
    messages = sorted(p.message for p in problems if p.code == "cycle")
    assert messages == ["cycle: a -> b -> c -> a", "cycle: d -> d"]


def _versioned_registry() -> Registry:
    def upgrade(inputs: dict) -> dict:
        if "radius" in inputs:
            inputs["size"] = inputs.pop("radius") * 2
        return inputs

    @node(
        "vers.Box",
        version="2.1.0",
        category="test",
        inputs=[Input("size", "INT", 1)],
        outputs=[Output("size", "INT")],
        migrations={1: upgrade},
    )
    def box(ctx, size):
        """A node at major version 2 that renamed 'radius' to 'size'."""
        return size

    class Plugin:
        @hookimpl
        def register_nodes(self, register):
            register(box)

    return Registry.from_plugins(load_entrypoints=False, include_builtins=False, extra_plugins=[("vers-plugin", Plugin())])


def test_old_major_versions_are_migrated_with_a_warning() -> None:
    registry = _versioned_registry()
    wf, _ = parse_workflow("format_version: 1\nnodes:\n  b: {type: vers.Box, version: 1.4.0, inputs: {radius: 3}}\n")
    validated = validate(wf, registry)
    assert validated.workflow.nodes["b"].inputs == {"size": 6}
    assert validated.workflow.nodes["b"].version == "2.1.0"
    assert validated.warnings and "migrated" in validated.warnings[0]


@pytest.mark.parametrize("pinned", ["3.0.0", "2.2.0"])
def test_newer_versions_name_the_plugin(pinned: str) -> None:
    registry = _versioned_registry()
    wf, _ = parse_workflow(f"format_version: 1\nnodes:\n  b: {{type: vers.Box, version: {pinned}}}\n")
    with pytest.raises(ValidationError) as info:
        validate(wf, registry)
    (problem,) = info.value.problems
    assert problem.code == "version-unsatisfied"
    assert "vers-plugin" in problem.message and "2.1.0" in problem.message
    assert problem.line == 3


def test_paths_outside_allowed_folders_are_problems(registry: Registry, settings, tmp_path) -> None:
    problems, _ = problems_of(
        """\
        format_version: 1
        nodes:
          l: {type: dagfusion.io.LoadTensor, inputs: {path: /etc/passwd}}
        """,
        registry,
        settings,
    )
    assert [(p.code, p.input) for p in problems] == [("path-not-allowed", "path")]


def test_sweep_keys_and_values_are_checked(registry: Registry) -> None:
    problems, _ = problems_of(
        """\
        format_version: 1
        nodes:
          noise: {type: dagfusion.tensor.Noise}
        sweep:
          - {noise.seed: [1, -5], noise.sed: [1, 2], nope.x: [1, 2]}
        """,
        registry,
    )
    assert sorted(p.code for p in problems) == ["dangling-reference", "out-of-range", "unknown-input"]


def test_a_renamed_node_type_loads_from_its_former_id_and_saves_the_new_one(registry) -> None:
    from dagfusion import FLOAT, Output, node
    from dagfusion.validation import check
    from dagfusion.workflow import load_workflow

    @node("newpack.Gain", version="1.0.0", category="t", outputs=[Output("x", FLOAT)], former_ids=["oldpack.Gain"])
    def gain(ctx):
        """A node that moved from one pack to another."""
        return 1.0

    derived = registry.with_nodes([gain], "newpack")
    workflow = load_workflow("format_version: 1\nnodes:\n  g: {type: oldpack.Gain}\n", text=True)
    validated, problems, warnings = check(workflow, derived)
    assert problems == [] and validated is not None
    assert warnings == ["node 'g': node type oldpack.Gain is now newpack.Gain; saving the workflow writes the new id"]
    assert "type: newpack.Gain" in validated.workflow.dump() and "oldpack" not in validated.workflow.dump()
    assert derived.get("oldpack.Gain") is gain and "oldpack.Gain" not in derived.node_types()
