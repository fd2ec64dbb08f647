from __future__ import annotations

import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dagfusion import Link, ValidationError, load_workflow
from dagfusion.workflow import (
    apply_overrides,
    expand_sweep,
    parse_workflow,
    workflow_from_dict,
)

GOOD = textwrap.dedent(
    """\
    format_version: 1
    metadata:
      name: demo
    nodes:
      a:
        type: dagfusion.util.Number
        inputs:
          value: 2.0
      b:
        type: dagfusion.math.Add
        version: 1.0.0
        inputs:
          a: {from: a.value}
          b: 3
        ui:
          pos: [10, 20]
    outputs: [b.sum]
    """
)


def test_load_parses_links_constants_and_layout() -> None:
    wf = load_workflow(GOOD, text=True)
    assert list(wf.nodes) == ["a", "b"]
    assert wf.nodes["b"].inputs["a"] == Link("a", "value")
    assert wf.nodes["b"].inputs["b"] == 3
    assert wf.nodes["b"].version == "1.0.0"
    assert wf.nodes["b"].ui["pos"] == [10, 20]
    assert wf.outputs == ("b.sum",)
    assert wf.name == "demo"
    assert wf.node_line("b", "b") == 14


def test_round_trip_is_byte_stable_and_equal() -> None:
    wf = load_workflow(GOOD, text=True)
    once = wf.dump()
    again = load_workflow(once, text=True)
    assert again == wf
    assert again.dump() == once
    assert "{from: a.value}" in once


def test_workflow_is_immutable() -> None:
    wf = load_workflow(GOOD, text=True)
    with pytest.raises(TypeError):
        wf.nodes["c"] = wf.nodes["a"]  # type: ignore[index]
    with pytest.raises(TypeError):
        wf.nodes["a"].inputs["value"] = 1  # type: ignore[index]


def test_structural_problems_are_all_reported_with_lines() -> None:
    text = textwrap.dedent(
        """\
        format_version: 1
        nodse: {}
        nodes:
          a:
            type: dagfusion.util.Number
            inptus: {value: 1}
          b:
            type: dagfusion.math.Add
            inputs:
              a: {from: a}
              b: {from: x.y, extra: 1}
          a:
            type: dagfusion.util.Number
          9bad:
            type: dagfusion.util.Number
        """
    )
    wf, problems = parse_workflow(text)
    codes = sorted(p.code for p in problems)
    assert codes == sorted(["unknown-key", "unknown-key", "bad-reference", "bad-reference", "duplicate-id", "bad-node-id"])
    by_code = {p.code: p for p in problems}
    assert by_code["duplicate-id"].line == 12
    assert by_code["duplicate-id"].node == "a"
    unknown = [p for p in problems if p.code == "unknown-key"]
    assert any("did you mean 'nodes'" in p.message and p.line == 2 for p in unknown)
    assert any("did you mean 'inputs'" in p.message and p.line == 6 and p.node == "a" for p in unknown)
    with pytest.raises(ValidationError) as info:
        load_workflow(text, text=True)
    assert len(info.value.problems) == 6


def test_newer_format_is_refused() -> None:
    with pytest.raises(ValidationError, match="upgrade dagfusion"):
        load_workflow("format_version: 99\nnodes: {a: {type: x.Y}}\n", text=True)


@pytest.mark.parametrize(
    "text, code",
    [
        ("", "not-a-mapping"),
        ("- 1\n- 2\n", "not-a-mapping"),
        ("a: [1,\n", "yaml-syntax"),
        ("format_version: 1\nnodes: []\n", "bad-value"),
        ("!!python/object:os.system {}\n", "yaml-syntax"),
    ],
)
def test_bad_documents(text: str, code: str) -> None:
    _, problems = parse_workflow(text)
    assert [p.code for p in problems][:1] == [code]


def test_hostile_documents_are_refused_quickly() -> None:
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i, prev in zip("bcdefghij", "abcdefghi"):
        laughs += f"{i}: &{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
    _, problems = parse_workflow(laughs)
    assert problems[0].code == "yaml-too-large"
    _, problems = parse_workflow("[" * 5000 + "]" * 5000)
    assert problems[0].code in {"yaml-too-large", "yaml-syntax"}
    _, problems = parse_workflow("a: " + "x" * (17 * 1024 * 1024))
    assert problems[0].code == "yaml-too-large"


def test_overrides_read_values_as_yaml_and_report_unknown_nodes() -> None:
    wf = load_workflow(GOOD, text=True)
    changed = apply_overrides(wf, ["a.value=7", "b.b=2.5"])
    assert changed.nodes["a"].inputs["value"] == 7
    assert changed.nodes["b"].inputs["b"] == 2.5
    assert wf.nodes["a"].inputs["value"] == 2.0  # original untouched
    with pytest.raises(ValidationError) as info:
        apply_overrides(wf, ["zz.value=1", "nodot"])
    assert len(info.value.problems) == 2


def test_sweep_zips_within_groups_and_multiplies_across() -> None:
    text = GOOD + "sweep:\n  - {a.value: [1, 2, 3], b.b: [10, 20, 30]}\n  - {b.a: [0.5, 1.5]}\n"
    wf = load_workflow(text, text=True)
    runs = expand_sweep(wf)
    assert len(runs) == 6
    assignments = [r[0] for r in runs]
    assert {"a.value": 2, "b.b": 20, "b.a": 1.5} in assignments
    assert all(not point.sweep for _, point in runs)


def test_sweep_groups_need_equal_lengths() -> None:
    _, problems = parse_workflow(GOOD + "sweep:\n  - {a.value: [1, 2], b.b: [1]}\n")
    assert problems and "equal lengths" in problems[0].message


def test_from_dict_matches_yaml() -> None:
    wf = load_workflow(GOOD, text=True)
    assert workflow_from_dict(wf.to_dict()) == wf


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30), st.integers(), st.floats(allow_nan=False))
def test_constants_round_trip(text: str, number: int, real: float) -> None:
    wf = load_workflow(GOOD, text=True).with_inputs({("a", "value"): real, ("b", "b"): number})
    wf = wf.with_inputs({("b", "a"): text})
    again = load_workflow(wf.dump(), text=True)
    assert again.nodes["b"].inputs["a"] == text
    assert again.nodes["b"].inputs["b"] == number
    assert again.nodes["a"].inputs["value"] == real
    assert again.dump() == wf.dump()


@pytest.mark.parametrize(
    "text",
    [
        "a: 1\nb: [x, 'y', 010, 0x1f, 1_000, 1:30, .5, -.inf, ~, null, yes, No, 2001-12-14, '']\n",
        "nodes:\n  a: {type: x}\n  a: {type: y}\nb: {c: [1, {d: 2}]}\n",
        "{1: a, 2.5: b, true: c, null: d}\n",
        "a: &x {b: 1}\nc: *x\n",
        "<<: {a: 1}\nb: 2\n",
        "a: !!str 5\nb: 'multi\n  line'\nc: |\n  block\n",
        "a: 1\n---\nb: 2\n",
        "? [a]\n: 1\n",
        "a: 2001-13-45\n",
        "",
    ],
)
def test_the_fast_reader_agrees_with_pyyaml_composition(text: str) -> None:
    from dagfusion.yamlsource import _load_composed, load_yaml

    def outcome(read):
        try:
            data, smap, problems = read(text, "x.yaml")
        except ValidationError as exc:
            return "error", [(p.code, p.line) for p in exc.problems]
        return data, smap.lines, [str(p) for p in problems]

    assert outcome(load_yaml) == outcome(_load_composed)


def test_lines_are_found_only_when_asked_for() -> None:
    from dagfusion.yamlsource import load_yaml

    _, smap, _ = load_yaml("a: 1\nb:\n  - x\n  - {c: 2}\n")
    assert smap._lines is None  # nothing recorded while reading a valid document
    assert smap.line("b", 1, "c") == 4 and smap.line("b", 0) == 3 and smap.line("zzz") is None
