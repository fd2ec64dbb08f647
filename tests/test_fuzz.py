"""Hostile and arbitrary input never escapes as anything but a WorkflowError with a message."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

from dagfusion import ValidationError, WorkflowError
from dagfusion.registry import Registry
from dagfusion.validation import check
from dagfusion.workflow import parse_workflow, workflow_from_dict

BLURRED_NOISE = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflows" / "blurred_noise.yaml").read_text())

_REGISTRY = Registry.from_plugins(load_entrypoints=False)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
    st.sampled_from(["noise.tensor", "x.y", "dagfusion.math.Add", "1.0.0", "99.0.0", "", "..", "{from: a}"]),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(["from", "type", "inputs", "nodes"])), children, max_size=4),
    ),
    max_leaves=12,
)


def _full_check(text: str) -> None:
    workflow, problems = parse_workflow(text)
    for problem in problems:
        assert problem.message
    if workflow is not None:
        _, more, _ = check(workflow, _REGISTRY, initial_problems=problems)
        for problem in more:
            assert problem.message and str(problem)


@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    _full_check(text)


@given(values)
def test_arbitrary_yaml_documents(document: Any) -> None:
    _full_check(yaml.safe_dump(document))


@st.composite
def mutated_workflows(draw: st.DrawFn) -> dict[str, Any]:
    data = copy.deepcopy(BLURRED_NOISE)
    for _ in range(draw(st.integers(1, 4))):
        node_id = draw(st.sampled_from(sorted(data["nodes"]) or ["x"]))
        where = draw(st.sampled_from(["input", "type", "version", "drop", "top", "node", "link"]))
        node = data["nodes"].get(node_id)
        if not isinstance(node, dict):
            break
        if not isinstance(node.get("inputs"), dict):
            node["inputs"] = {}
        if where == "input":
            node["inputs"][draw(st.sampled_from(["seed", "tensor", "sigma", "zz", "template"]))] = draw(values)
        elif where == "type":
            node["type"] = draw(st.sampled_from(["dagfusion.math.Add", "nope.Nope", "", "dagfusion.tensor.Stats"]))
        elif where == "version":
            node["version"] = draw(st.sampled_from(["1.0.0", "2.0.0", "0.9.0", "x", "1.0.1"]))
        elif where == "drop":
            data["nodes"].pop(node_id)
        elif where == "top":
            data[draw(st.sampled_from(["format_version", "nodes", "outputs", "sweep", "metadata", "bogus"]))] = draw(values)
        elif where == "node":
            data["nodes"][node_id] = draw(values)
        elif where == "link":
            other = draw(st.sampled_from(sorted(data["nodes"])))
            node["inputs"]["tensor"] = {"from": f"{other}.{draw(st.sampled_from(['tensor', 'text', 'mean']))}"}
        if not isinstance(data.get("nodes"), dict):
            break
    return data


@given(mutated_workflows())
def test_mutations_of_a_valid_workflow(data: dict[str, Any]) -> None:
    _full_check(yaml.safe_dump(data))
    try:
        workflow_from_dict(data)
    except ValidationError as exc:
        assert exc.problems
    except WorkflowError as exc:  # pragma: no cover - any WorkflowError subclass is acceptable
        assert str(exc)
