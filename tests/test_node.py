from __future__ import annotations

import pytest

from dagfusion import FLOAT, INT, Input, Output, node
from dagfusion.errors import NodeDefinitionError


def test_decorator_builds_spec_with_docstring_description() -> None:
    @node("t.Scale", version="1.2.3", category="math", inputs=[Input("x", FLOAT)], outputs=[Output("y", FLOAT)])
    def scale(ctx, x):
        """Scale a number.

        More words."""
        return x * 2

    assert scale.type_id == "t.Scale"
    assert scale.summary == "Scale a number."
    assert scale.parsed_version == (1, 2, 3)
    assert scale.normalize_outputs(4) == {"y": 4}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"type_id": "NoNamespace"}, "namespaced"),
        ({"version": "1.0"}, "semantic"),
        ({"inputs": [Input("x", INT, 5, max=3)]}, "default of input 'x'"),
        ({"inputs": [Input("x", INT), Input("x", INT)]}, "declared twice"),
        ({"inputs": [Input("bad name", INT)]}, "not an identifier"),
    ],
)
def test_malformed_declarations_fail_at_import(kwargs, message) -> None:
    args = {"type_id": "t.N", "version": "1.0.0", "inputs": [Input("x", INT)]}
    args.update(kwargs)
    type_id = args.pop("type_id")

    with pytest.raises(NodeDefinitionError, match=message):

        @node(type_id, category="c", outputs=[], **args)
        def fn(ctx, **inputs):
            return None


def test_signature_must_accept_declared_inputs() -> None:
    with pytest.raises(NodeDefinitionError, match="does not accept inputs"):

        @node("t.N", version="1.0.0", category="c", inputs=[Input("x", INT)])
        def fn(ctx, y):
            return None

    with pytest.raises(NodeDefinitionError, match="context first"):

        @node("t.N", version="1.0.0", category="c")
        def fn2():
            return None


def test_output_normalization_errors() -> None:
    @node("t.Two", version="1.0.0", category="c", outputs=[Output("a", INT), Output("b", INT)])
    def two(ctx):
        return 1, 2

    assert two.normalize_outputs((1, 2)) == {"a": 1, "b": 2}
    assert two.normalize_outputs({"a": 1, "b": 2}) == {"a": 1, "b": 2}
    with pytest.raises(TypeError, match="missing \\['b'\\]"):
        two.normalize_outputs({"a": 1})
    with pytest.raises(TypeError, match="tuple of 2"):
        two.normalize_outputs(5)


def test_bounds_and_choices() -> None:
    spec = Input("mode", "STRING", "a", choices=["a", "b"])
    assert spec.bound_problem("c") == "expected one of ['a', 'b'], got 'c'"
    assert Input("n", INT, 1, min=0).bound_problem(-1) == "expected a value >= 0, got -1"
    assert Input("f", FLOAT, 0.0, max=1.0).bound_problem(float("nan")) == "expected a number, got NaN"
    positive = Input("sigma", FLOAT, 1.0, exclusive_min=0.0)
    assert positive.bound_problem(0.0) == "expected a value > 0.0, got 0.0"
    assert positive.bound_problem(1e-9) is None
    fraction = Input("p", FLOAT, 0.5, exclusive_max=1.0)
    assert fraction.bound_problem(1) == "expected a value < 1.0, got 1" and fraction.bound_problem(0.99) is None
