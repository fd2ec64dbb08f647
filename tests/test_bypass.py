"""Bypassed nodes: ``bypass: true`` in the file, kept when saving, refused where an output has no
input of its type, and skipped by the engine, which passes the matching input through."""

from __future__ import annotations

import textwrap

import pytest

from dagfusion import Engine
from dagfusion.validation import check
from dagfusion.workflow import parse_workflow

CHAIN = """\
format_version: 1
nodes:
  one: {type: dagfusion.math.Add, inputs: {a: 1, b: 2}}
  two:
    type: dagfusion.math.Add
    bypass: true
    inputs:
      a: {from: one.sum}
      b: 100
  text:
    type: dagfusion.text.Format
    inputs:
      template: "{a}"
      a: {from: two.sum}
"""


def parse(text: str):
    workflow, problems = parse_workflow(textwrap.dedent(text), "wf.yaml")
    assert problems == []
    return workflow


def test_bypass_is_read_and_saved_back_unchanged() -> None:
    workflow = parse(CHAIN)
    assert workflow.nodes["two"].bypass is True and workflow.nodes["one"].bypass is False
    dumped = workflow.dump()
    assert "bypass: true" in dumped and dumped.count("bypass") == 1
    assert parse(dumped).dump() == dumped


def test_bypass_must_be_a_boolean() -> None:
    _, problems = parse_workflow("format_version: 1\nnodes:\n  a: {type: dagfusion.math.Add, bypass: 'yes'}\n", "wf.yaml")
    assert [p.code for p in problems] == ["bad-value"] and "bypass" in problems[0].message and problems[0].line == 3


def test_engine_passes_the_matching_input_through(engine: Engine) -> None:
    result = engine.run(parse(CHAIN))
    assert result.ok
    assert result.output("two.sum") == 3  # not 103: the node did not run, its input 'a' passed through
    assert result.output("text.text") == "3"


def test_bypass_changes_the_cache_key(engine: Engine) -> None:
    plain = parse(CHAIN.replace("    bypass: true\n", ""))
    assert engine.run(plain).output("text.text") == "103"
    bypassed = engine.run(parse(CHAIN))
    assert bypassed.output("text.text") == "3"  # not the cached 103 of the node that ran
    assert "two" not in bypassed.cached
    again = engine.run(plain)
    assert again.output("text.text") == "103" and "text" in again.cached


def test_a_bypass_without_an_input_of_the_output_type_is_refused(registry) -> None:
    workflow = parse(
        """\
        format_version: 1
        nodes:
          noise: {type: dagfusion.tensor.Noise, bypass: true}
          blur: {type: dagfusion.tensor.Blur, inputs: {tensor: {from: noise.tensor}}}
        """
    )
    validated, problems, _ = check(workflow, registry)
    assert validated is None
    (problem,) = [p for p in problems if p.code == "bypass-impossible"]
    assert problem.node == "noise" and "'tensor'" in problem.message and "TENSOR" in problem.message
    assert problem.line == 3


def test_a_bypassed_constant_passes_through(engine: Engine) -> None:
    workflow = parse(
        """\
        format_version: 1
        nodes:
          text: {type: dagfusion.text.Format, bypass: true, inputs: {template: "kept {a}", a: 1}}
        outputs: [text.text]
        """
    )
    assert engine.run(workflow).output("text.text") == "kept {a}"


def test_schema_allows_bypass(registry) -> None:
    from dagfusion.schema import workflow_schema

    jsonschema = pytest.importorskip("jsonschema")
    schema = workflow_schema(registry)
    assert schema["$defs"]["node"]["properties"]["bypass"]["type"] == "boolean"
    validator = jsonschema.Draft202012Validator(schema)
    good = {"format_version": 1, "nodes": {"a": {"type": "dagfusion.math.Add", "bypass": True, "inputs": {"a": 1, "b": 2}}}}
    validator.validate(good)
    bad = {"format_version": 1, "nodes": {"a": {"type": "dagfusion.math.Add", "bypass": "yes"}}}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)
