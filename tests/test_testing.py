"""dagfusion.testing: the node contract catches broken nodes; run_workflow and the fixtures work."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from dagfusion import (
    FLOAT,
    INT,
    LIST,
    STRING,
    TENSOR,
    Engine,
    Input,
    Link,
    NodeInstance,
    Output,
    RunResult,
    Settings,
    ValidationError,
    Workflow,
    hookimpl,
    load_workflow,
    node,
)
from dagfusion.registry import Registry
from dagfusion.testing import (
    WorkflowRunFailed,
    assert_node_contract,
    check_node_contract,
    example_inputs,
    make_registry,
    make_settings,
    run_workflow,
    temporary_plugins,
)


@pytest.fixture(scope="module")
def builtins() -> Registry:
    return make_registry()


def problems_of(spec: Any, registry: Registry, tmp_path: Path, **options: Any) -> str:
    """All problems joined into one string (for substring assertions)."""
    return "\n".join(check_node_contract(spec, registry, tmp_path=tmp_path, **options))


# --- nodes used by the tests ------------------------------------------------------------------


@node(
    "contracttest.Scale",
    version="1.0.0",
    category="math",
    inputs=[
        Input("x", FLOAT, description="The number."),
        Input("factor", FLOAT, 2.0, min=0.0, max=10.0, description="Multiplier."),
    ],
    outputs=[Output("y", FLOAT, "x times factor.")],
    examples=[{"x": 1.5}, {"x": 2, "factor": 0.5}],
)
def good_scale(ctx: Any, x: float, factor: float) -> float:
    """Multiply ``x`` by ``factor``."""
    return x * factor


@node(
    "contracttest.WrongType",
    version="1.0.0",
    category="math",
    inputs=[Input("x", FLOAT)],
    outputs=[Output("y", FLOAT)],
    examples=[{"x": 1.0}],
)
def wrong_type(ctx: Any, x: float) -> str:
    """Claims a number, returns text."""
    return f"{x}"


@node(
    "contracttest.Undocumented",
    version="1.0.0",
    category="math",
    inputs=[Input("x", FLOAT, 0.0)],
    outputs=[Output("y", FLOAT)],
)
def undocumented(ctx: Any, x: float) -> float:
    return x


@node(
    "contracttest.MutatesTensor",
    version="1.0.0",
    category="tensor",
    inputs=[Input("tensor", TENSOR)],
    outputs=[Output("tensor", TENSOR)],
    examples=[lambda: {"tensor": __import__("torch").zeros(2, 2)}],
)
def mutates_tensor(ctx: Any, tensor: Any) -> Any:
    """Adds one in place (forbidden)."""
    tensor.add_(1)
    return tensor


@node(
    "contracttest.MutatesList",
    version="1.0.0",
    category="util",
    inputs=[Input("items", LIST)],
    outputs=[Output("count", INT)],
    examples=[{"items": [1, 2]}],
)
def mutates_list(ctx: Any, items: list[Any]) -> int:
    """Appends to its input list (forbidden)."""
    items.append(0)
    return len(items)


@node(
    "contracttest.Dice",
    version="1.0.0",
    category="random",
    inputs=[Input("sides", INT, 6, min=2)],
    outputs=[Output("roll", FLOAT)],
)
def dice(ctx: Any, sides: int) -> float:
    """Unseeded randomness, wrongly declared pure."""
    return random.random() * sides


@node(
    "contracttest.TensorDice",
    version="1.0.0",
    category="random",
    inputs=[Input("size", INT, 4, min=1)],
    outputs=[Output("tensor", TENSOR)],
)
def tensor_dice(ctx: Any, size: int) -> Any:
    """Unseeded torch randomness, wrongly declared pure."""
    import torch

    return torch.rand(size)


@node(
    "contracttest.ImpureDice",
    version="1.0.0",
    category="random",
    inputs=[Input("sides", INT, min=2)],
    outputs=[Output("roll", FLOAT)],
    pure=False,
)
def impure_dice(ctx: Any, sides: int) -> float:
    """Unseeded randomness, honestly declared impure (no examples needed)."""
    return random.random() * sides


@node(
    "contracttest.NeedsExamples",
    version="1.0.0",
    category="tensor",
    inputs=[Input("tensor", TENSOR)],
    outputs=[Output("mean", FLOAT)],
)
def needs_examples(ctx: Any, tensor: Any) -> float:
    """Pure, with a required tensor input and no examples."""
    return float(tensor.mean())


@node(
    "contracttest.ReturnsNone",
    version="1.0.0",
    category="math",
    inputs=[Input("x", FLOAT, 1.0)],
    outputs=[Output("y", FLOAT)],
)
def returns_none(ctx: Any, x: float) -> None:
    """Forgets to return."""


@node(
    "contracttest.SecretWriter",
    version="1.0.0",
    category="io",
    inputs=[Input("text", STRING, "hi")],
    outputs=[Output("path", STRING)],
)
def secret_writer(ctx: Any, text: str) -> str:
    """Writes a file but claims to be pure."""
    path = ctx.output_path("secret.txt")
    path.write_text(text)
    return str(path)


@node(
    "contracttest.BadDeclarations",
    version="1.0.0",
    category="util",
    inputs=[
        Input("count", INT, "three"),
        Input("mode", STRING, "a", choices=("a", 1)),
        Input("level", FLOAT, min=1.0, max=0.0),
        Input("name", STRING, "x", min=0),
    ],
    outputs=[Output("y", FLOAT)],
)
def bad_declarations(ctx: Any, count: Any, mode: str, level: float, name: str) -> float:
    """Every input declaration is wrong in its own way."""
    return 0.0


@node(
    "contracttest.Persisted",
    version="1.0.0",
    category="util",
    inputs=[Input("n", INT, 2, min=0, max=10)],
    outputs=[Output("items", LIST)],
    persist=True,
)
def persisted(ctx: Any, n: int) -> list[int]:
    """Persists a LIST, which has no serializer."""
    return list(range(n))


@node(
    "contracttest.LinkOnly",
    version="1.0.0",
    category="math",
    inputs=[Input("x", FLOAT, link_only=True, description="Must come from a node.")],
    outputs=[Output("y", FLOAT)],
    examples=[{"x": 4.0}],
)
def link_only(ctx: Any, x: float) -> float:
    """A link-only number input: the contract feeds it over a link."""
    return x / 2


def _file_example(folder: Path) -> dict[str, Any]:
    (folder / "words.txt").write_text("one two three")
    return {"path": str(folder / "words.txt")}


@node(
    "contracttest.CountWords",
    version="1.0.0",
    category="text",
    inputs=[Input("path", "PATH", description="A text file.")],
    outputs=[Output("words", INT)],
    examples=[_file_example],
)
def count_words(ctx: Any, path: str) -> int:
    """Count the words of a text file."""
    return len(ctx.input_path(path).read_text().split())


class TempPlugin:
    """A temporary plugin registering the good node, a mutating node and the link-only node."""

    @hookimpl
    def register_nodes(self, register: Any) -> None:
        register(good_scale)
        register(mutates_list)
        register(link_only)


# --- the contract -----------------------------------------------------------------------------


def test_a_good_node_passes(builtins: Registry, tmp_path: Path) -> None:
    assert check_node_contract(good_scale, builtins, tmp_path=tmp_path) == []
    assert_node_contract(good_scale, builtins, tmp_path=tmp_path, require_input_docs=True)


def test_wrong_return_type_is_caught(builtins: Registry, tmp_path: Path) -> None:
    text = problems_of(wrong_type, builtins, tmp_path)
    assert "example 1: failed: TypeError: output 'y' is declared FLOAT but the node returned STRING" in text


def test_missing_docs_are_caught(builtins: Registry, tmp_path: Path) -> None:
    assert "no description" in problems_of(undocumented, builtins, tmp_path)
    strict = problems_of(good_scale.__class__(**{**_fields(good_scale), "outputs": (Output("y", FLOAT),)}), builtins, tmp_path, require_input_docs=True)
    assert "output 'y' has no description" in strict
    assert "input 'x' has no description" in problems_of(wrong_type, builtins, tmp_path, require_input_docs=True)


def _fields(spec: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def test_input_mutation_is_caught(builtins: Registry, tmp_path: Path) -> None:
    assert "modified its input(s) ['tensor'] in place" in problems_of(mutates_tensor, builtins, tmp_path)
    assert "modified its input(s) ['items'] in place" in problems_of(mutates_list, builtins, tmp_path)


def test_nondeterminism_is_caught(builtins: Registry, tmp_path: Path) -> None:
    text = problems_of(dice, builtins, tmp_path)
    assert "run with defaults: not deterministic: output 'roll'" in text
    assert "not deterministic: output 'tensor'" in problems_of(tensor_dice, builtins, tmp_path)
    # The same randomness declared impure is fine, and needs no examples.
    assert check_node_contract(impure_dice, builtins, tmp_path=tmp_path) == []


def test_declaration_problems_are_caught(builtins: Registry, tmp_path: Path) -> None:
    problems = check_node_contract(bad_declarations, builtins, tmp_path=tmp_path, run_examples=False)
    text = "\n".join(problems)
    assert "input 'count' (INT): default 'three' is STRING (str), not INT" in text
    assert "input 'mode' (STRING): choice 1 is not a STRING value" in text
    assert "input 'level' (FLOAT): min 1.0 is greater than max 0.0" in text
    assert "input 'name' (STRING): min/max are set but the type is not numeric" in text
    assert len(problems) == 4


def test_out_of_bounds_default_is_caught(builtins: Registry, tmp_path: Path) -> None:
    # NodeSpec refuses such a default at declaration; a spec built around that check (or by a
    # future declaration path) is still caught by the contract.
    spec = good_scale.__class__(**_fields(good_scale))
    bad = Input("factor", FLOAT, 20.0, min=0.0, max=10.0, description="Multiplier.")
    object.__setattr__(spec, "inputs", (spec.inputs[0], bad))
    text = problems_of(spec, builtins, tmp_path)
    assert "input 'factor' (FLOAT): default expected a value <= 10.0, got 20.0" in text
    choice = Input("mode", STRING, "c", choices=("a", "b"))
    object.__setattr__(spec, "inputs", (spec.inputs[0], choice))
    assert "input 'mode' (STRING): default expected one of ['a', 'b'], got 'c'" in problems_of(spec, builtins, tmp_path, run_examples=False)


def test_unregistered_types_are_caught(builtins: Registry, tmp_path: Path) -> None:
    spec = good_scale.__class__(**{**_fields(good_scale), "outputs": (Output("y", "NOT_A_TYPE"),)})
    assert check_node_contract(spec, builtins, tmp_path=tmp_path) == ["output 'y' has unregistered type(s) ['NOT_A_TYPE']"]


def test_missing_examples_none_outputs_and_side_effects(builtins: Registry, tmp_path: Path) -> None:
    assert "no examples: a pure node with required inputs ['tensor']" in problems_of(needs_examples, builtins, tmp_path)
    assert "output 'y' is None, which is not a FLOAT value" in problems_of(returns_none, builtins, tmp_path / "n")
    assert "a pure node wrote files ['secret.txt']" in problems_of(secret_writer, builtins, tmp_path / "w")
    assert "persist=True but output 'items' has type LIST, which has no serializer" in problems_of(persisted, builtins, tmp_path / "p")


def test_bad_examples_are_reported(builtins: Registry, tmp_path: Path) -> None:
    fields = _fields(good_scale)
    spec = good_scale.__class__(**{**fields, "examples": ({"x": 1.0, "factr": 2.0}, {"x": 1.0, "factor": 99.0}, lambda: 3)})
    text = problems_of(spec, builtins, tmp_path)
    assert "example 1: names undeclared inputs ['factr']" in text
    assert "example 2: invalid inputs: factor: expected a value <= 10.0, got 99.0" in text
    assert "example 3: could not be built: TypeError" in text


def test_link_only_and_file_examples_run(builtins: Registry, tmp_path: Path) -> None:
    assert check_node_contract(link_only, builtins, tmp_path=tmp_path / "a") == []
    assert check_node_contract(count_words, builtins, tmp_path=tmp_path / "b") == []
    assert example_inputs(count_words, tmp_path / "c") == [{"path": str(tmp_path / "c" / "words.txt")}]


def test_persist_round_trip_is_checked(builtins: Registry, tmp_path: Path) -> None:
    @node("contracttest.Sum", version="1.0.0", category="math", inputs=[Input("n", INT, 3, min=0)], outputs=[Output("total", INT)], persist=True)
    def total(ctx: Any, n: int) -> int:
        """Sum of 0..n-1, persisted as JSON."""
        return sum(range(n))

    assert check_node_contract(total, builtins, tmp_path=tmp_path) == []


def test_check_by_type_id_and_assert_message(tmp_path: Path) -> None:
    registry = make_registry(("temp", TempPlugin()))
    assert registry.origin("contracttest.Scale") == "temp"
    assert check_node_contract("contracttest.Scale", registry, tmp_path=tmp_path) == []
    assert check_node_contract("contracttest.Nope", registry) == ["node type 'contracttest.Nope' is not registered"]
    with pytest.raises(AssertionError) as info:
        assert_node_contract("contracttest.MutatesList", registry, tmp_path=tmp_path)
    message = str(info.value)
    assert message.startswith("contracttest.MutatesList breaks the node contract:\n  - example 1: failed: RuntimeError")


def test_custom_settings_are_used(builtins: Registry, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "elsewhere")
    assert check_node_contract(count_words, builtins, settings=settings, tmp_path=tmp_path / "scratch") == []


# --- run_workflow -----------------------------------------------------------------------------

YAML = """\
format_version: 1
nodes:
  a: {type: dagfusion.util.Number, inputs: {value: 2.5}}
  b: {type: contracttest.Scale, inputs: {x: {from: a.value}, factor: 4}}
"""


def test_run_workflow_from_text_path_mapping_and_object(tmp_path: Path) -> None:
    plugin = ("temp", TempPlugin())
    result = run_workflow(YAML, plugins=[plugin], tmp_path=tmp_path)
    assert isinstance(result, RunResult) and result.output("b.y") == 10.0
    path = tmp_path / "wf.yaml"
    path.write_text(YAML)
    registry = make_registry(plugin)
    assert run_workflow(path, registry=registry, tmp_path=tmp_path).output("b.y") == 10.0
    assert run_workflow(str(path), registry=registry, tmp_path=tmp_path, overrides=["b.factor=1"]).output("b.y") == 2.5
    data = {"format_version": 1, "nodes": {"a": {"type": "dagfusion.util.Integer", "inputs": {"value": 3}}}}
    assert run_workflow(data, tmp_path=tmp_path).output("a.value") == 3
    wf = Workflow(nodes={"t": NodeInstance("t", "dagfusion.util.Text", inputs={"text": "hi"})})
    assert run_workflow(wf, tmp_path=tmp_path).output("t.text") == "hi"
    with pytest.raises(TypeError, match="either registry= or plugins="):
        run_workflow(YAML, registry=registry, plugins=[plugin])


def test_run_workflow_raises_a_readable_error(tmp_path: Path) -> None:
    text = """\
format_version: 1
nodes:
  a: {type: dagfusion.math.Clamp, inputs: {value: 1.0, low: 2.0, high: 1.0}}
  b: {type: dagfusion.math.Add, inputs: {a: {from: a.value}}}
  c: {type: dagfusion.util.Integer, inputs: {value: 1}}
"""
    with pytest.raises(WorkflowRunFailed) as info:
        run_workflow(text, tmp_path=tmp_path)
    message = str(info.value)
    assert "node 'a' (dagfusion.math.Clamp) failed: ValueError: low (2.0) is greater than high (1.0)" in message
    assert "Traceback" in message and "in clamp" in message
    assert "skipped: b (after a)" in message
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.result.output("c.value") == 1
    result = run_workflow(text, tmp_path=tmp_path, raise_on_error=False)
    assert result.status == "failed" and set(result.errors) == {"a"}


def test_run_workflow_checks_mutation_and_validates(tmp_path: Path) -> None:
    wf = Workflow(
        nodes={
            "items": NodeInstance("items", "dagfusion.util.Text", inputs={"text": "x"}),
            "m": NodeInstance("m", "contracttest.MutatesList", inputs={"items": Link("l", "value")}),
        }
    )
    with pytest.raises(ValidationError, match="links to node 'l', which does not exist"):
        run_workflow(wf, plugins=[("temp", TempPlugin())], tmp_path=tmp_path)

    class ListPlugin:
        @hookimpl
        def register_nodes(self, register: Any) -> None:
            @node("contracttest.MakeList", version="1.0.0", category="util", outputs=[Output("items", LIST)])
            def make_list(ctx: Any) -> list[int]:
                """A fresh list."""
                return [1, 2]

            register(make_list)

    wf = Workflow(
        nodes={
            "l": NodeInstance("l", "contracttest.MakeList"),
            "m": NodeInstance("m", "contracttest.MutatesList", inputs={"items": Link("l", "items")}),
        }
    )
    with pytest.raises(WorkflowRunFailed, match=r"modified its input\(s\) \['items'\] in place"):
        run_workflow(wf, plugins=[("temp", TempPlugin()), ("lists", ListPlugin())], tmp_path=tmp_path)


# --- fixtures and the pytest plugin -------------------------------------------------------------


def test_fixtures(
    dagfusion_settings: Settings,
    dagfusion_registry: Any,
    dagfusion_engine: Any,
    dagfusion_run: Any,
    tmp_path: Path,
) -> None:
    assert dagfusion_settings.output_dir == tmp_path / "outputs"
    assert dagfusion_settings.cache_dir == tmp_path / "cache"
    assert dagfusion_settings.read_dirs == (tmp_path,)
    assert dagfusion_settings.device == "cpu"
    registry = dagfusion_registry(("temp", TempPlugin()))
    assert "contracttest.Scale" in registry and "dagfusion.math.Add" in registry
    bare = dagfusion_registry(("temp", TempPlugin()), builtins=False)
    assert "dagfusion.math.Add" not in bare and "contracttest.Scale" in bare
    engine = dagfusion_engine(("temp", TempPlugin()))
    assert isinstance(engine, Engine) and engine.settings is dagfusion_settings
    assert engine.run(load_workflow(YAML, text=True)).output("b.y") == 10.0
    result = dagfusion_run(YAML, plugins=[("temp", TempPlugin())])
    assert result.output("b.y") == 10.0
    assert result.output_dir is not None and tmp_path in result.output_dir.parents


def test_plugin_module_is_cheap_to_import() -> None:
    code = textwrap.dedent(
        """
        import sys
        import dagfusion.testing
        heavy = [m for m in ("torch", "networkx", "dagfusion.engine", "dagfusion.registry") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_temporary_plugins_replace_the_process_wide_registry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import dagfusion
    from dagfusion.cli import main

    before = dagfusion.default_registry()
    wf = load_workflow(YAML, text=True)
    with temporary_plugins(("temp", TempPlugin()), settings=make_settings(tmp_path)) as registry:
        assert dagfusion.default_registry() is registry and Engine().registry is registry
        assert dagfusion.run(wf).output("b.y") == 10.0
        assert main(["nodes"]) == 0
        assert "contracttest.Scale" in capsys.readouterr().out
    assert dagfusion.default_registry() is before and "contracttest.Scale" not in before


def test_dagfusion_plugins_fixture(dagfusion_plugins: Any, dagfusion_settings: Settings) -> None:
    import dagfusion

    registry = dagfusion_plugins(("temp", TempPlugin()))
    assert dagfusion.default_registry() is registry
    result = dagfusion.run(load_workflow(YAML, text=True))
    assert result.output("b.y") == 10.0 and dagfusion_settings.output_dir in result.output_dir.parents


def test_dagfusion_plugins_fixture_was_undone() -> None:
    import dagfusion

    assert "contracttest.Scale" not in dagfusion.default_registry()
