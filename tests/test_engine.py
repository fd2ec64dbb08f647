"""The engine's preparation: validated once, sweep points checked up front and built lazily,
unchanged files remembered (without serving stale inputs), and ``dagfusion.validate`` callable."""

from __future__ import annotations

import importlib
import importlib.util
import textwrap
import time
from pathlib import Path

import pytest

import dagfusion
import dagfusion.engine as engine_module
import dagfusion.validation as validation
import dagfusion.workflow as workflow_module
from dagfusion import Engine, Settings, ValidationError
from dagfusion.engine import Prepared, SweepPoint, set_default_engine
from dagfusion.registry import Registry

SWEEP = """\
format_version: 1
nodes:
  a: {type: dagfusion.math.Add, inputs: {a: 1, b: 2}}
  f: {type: dagfusion.text.Format, inputs: {template: "{a}", a: {from: a.sum}}}
sweep:
  - {a.b: [10, 20, 30]}
  - {f.template: ["sum={a}", "{a:.1f}"]}
"""


def write(tmp_path: Path, text: str, name: str = "wf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def count_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = engine_module.check

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "check", counting)
    return calls


def test_a_sweep_is_validated_once(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_checks(monkeypatch)
    results = engine.run_sweep(write(tmp_path, SWEEP), record=False)
    assert len(calls) == 1
    assert [r.output("f.text") for r in results] == ["sum=11", "11.0", "sum=21", "21.0", "sum=31", "31.0"]


def test_prepare_gives_ready_points_in_order(engine: Engine, tmp_path: Path) -> None:
    prepared = engine.prepare(write(tmp_path, SWEEP), overrides=["a.a=5"])
    assert isinstance(prepared, Prepared) and len(prepared) == 6
    points = list(prepared)
    assert all(isinstance(p, SweepPoint) for p in points) and [p.index for p in points] == list(range(6))
    assert points[3].assignment == {"a.b": 20, "f.template": "{a:.1f}"}
    point = points[3].validated
    assert point.workflow.sweep == () and point.workflow.nodes["a"].inputs == {"a": 5, "b": 20}
    assert point.specs is prepared.validated.specs and point.order == prepared.validated.order
    result = engine.run_point(points[3], record=False)
    assert result.output("f.text") == "25.0"


def test_a_bad_swept_value_is_reported_before_anything_runs(engine: Engine, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        format_version: 1
        nodes:
          a: {type: dagfusion.math.Add, inputs: {a: 1, b: 2}}
          f: {type: dagfusion.text.Format, inputs: {template: "{a}", a: {from: a.sum}}}
        sweep:
          - {a.b: [1, 2]}
          - {f.template: ["ok {a}", "{a.__class__}"]}
        """,
    )
    out = tmp_path / "runs"
    with pytest.raises(ValidationError) as info:
        engine.run_sweep(path, out=out)
    (problem,) = info.value.problems
    assert problem.code == "bad-template" and problem.node == "f" and problem.line == 7
    assert "sweep point f.template='{a.__class__}'" in problem.message
    assert not out.exists()
    validated, problems, _ = engine.check_source(path)
    assert validated is None and [p.code for p in problems] == ["bad-template"]


def test_a_ten_thousand_point_sweep_is_prepared_quickly_and_built_one_at_a_time(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = ", ".join(str(i) for i in range(10_000))
    path = write(tmp_path, f"format_version: 1\nnodes:\n  a: {{type: dagfusion.math.Add}}\nsweep:\n  - {{a.b: [{values}]}}\n")
    built: list[int] = []
    real = engine_module.with_constants
    monkeypatch.setattr(engine_module, "with_constants", lambda *a: built.append(1) or real(*a))
    start = time.perf_counter()
    prepared = engine.prepare(path)
    assert time.perf_counter() - start < 2.0
    assert len(prepared) == 10_000 and built == []
    points = iter(prepared)
    first = next(points)
    assert built == [1] and first.assignment == {"a.b": 0}
    assert next(points).validated.workflow.nodes["a"].inputs["b"] == 1 and len(built) == 2


def test_a_rerun_of_an_unchanged_file_is_not_parsed_or_validated_again(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "format_version: 1\nnodes:\n  a: {type: dagfusion.math.Add, inputs: {a: 1, b: 2}}\n")
    calls = count_checks(monkeypatch)
    parses: list[int] = []
    real_parse = engine_module.parse_workflow
    monkeypatch.setattr(engine_module, "parse_workflow", lambda *a: parses.append(1) or real_parse(*a))
    first = engine.run(path, record=False)
    second = engine.run(path, record=False)
    assert first.executed == ["a"] and second.cached == ["a"] and second.output("a.sum") == 3
    assert len(calls) == 1 and len(parses) == 1
    path.write_text(path.read_text().replace("b: 2", "b: 5"))  # an edited file is read afresh
    assert engine.run(path, record=False).output("a.sum") == 6 and len(calls) == 2
    engine.run(path, overrides=["a.b=7"], record=False)  # other overrides: another entry
    assert len(calls) == 3


def test_the_memo_is_bounded(engine: Engine, tmp_path: Path) -> None:
    for i in range(engine_module.MEMO_SIZE + 5):
        engine.prepare(write(tmp_path, f"format_version: 1\nnodes:\n  a: {{type: dagfusion.math.Add, inputs: {{a: {i}}}}}\n"))
    assert len(engine._memo) == engine_module.MEMO_SIZE


def test_an_edited_path_input_is_noticed_on_a_rerun(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from safetensors.torch import save_file

    data = tmp_path / "t.safetensors"
    save_file({"tensor": torch.tensor([1.0, 2.0])}, str(data))
    path = write(
        tmp_path,
        f"""\
        format_version: 1
        nodes:
          load: {{type: dagfusion.io.LoadTensor, inputs: {{path: "{data}"}}}}
        """,
    )
    calls = count_checks(monkeypatch)
    assert engine.run(path, record=False).output("load.tensor").tolist() == [1.0, 2.0]
    cached = engine.run(path, record=False)
    assert cached.cached == ["load"] and len(calls) == 1
    save_file({"tensor": torch.tensor([7.0])}, str(data))
    fresh = engine.run(path, record=False)
    assert fresh.executed == ["load"] and fresh.output("load.tensor").tolist() == [7.0]
    assert len(calls) == 1  # the workflow text did not change; the file it names did


def test_a_remembered_workflow_still_checks_its_paths(
    registry: Registry, settings: Settings, tmp_path: Path
) -> None:
    engine = Engine(registry, settings)
    data = tmp_path / "t.safetensors"
    data.write_bytes(b"")
    path = write(tmp_path, f'format_version: 1\nnodes:\n  load: {{type: dagfusion.io.LoadTensor, inputs: {{path: "{data}"}}}}\n')
    assert engine.check_source(path)[0] is not None
    data.unlink()
    data.mkdir()
    (tmp_path / "elsewhere").mkdir()
    # The same text, now naming a path outside the read folders once the settings change.
    engine.settings = settings.with_overrides(read_dirs=[str(tmp_path / "elsewhere")])
    validated, problems, _ = engine.check_source(path)
    assert validated is None and [p.code for p in problems] == ["path-not-allowed"]


def test_validate_stays_callable_after_run(engine: Engine) -> None:
    previous = set_default_engine(engine)
    try:
        wf = dagfusion.load_workflow("format_version: 1\nnodes:\n  a: {type: dagfusion.math.Add, inputs: {a: 1}}\n", text=True)
        assert dagfusion.run(wf, record=False).output("a.sum") == 1
        importlib.import_module("dagfusion.validation")  # importing the module never shadows the function
        assert importlib.util.find_spec("dagfusion.validate") is None  # no module of that name
        assert callable(dagfusion.validate)
        assert dagfusion.validate is validation.validate
        assert dagfusion.validate(wf, engine.registry).order == ("a",)
    finally:
        set_default_engine(previous)


def test_a_sweep_value_replacing_a_link_drops_the_dependency(engine: Engine, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        format_version: 1
        nodes:
          a: {type: dagfusion.math.Add, inputs: {a: 1, b: 2}}
          b: {type: dagfusion.math.Add, inputs: {a: {from: a.sum}, b: 1}}
        outputs: [b]
        sweep:
          - {b.a: [10]}
        """,
    )
    (result,) = engine.run_sweep(path, record=False)
    assert result.executed == ["b"] and result.output("b.sum") == 11


def test_overrides_naming_unknown_nodes_are_problems(engine: Engine, tmp_path: Path) -> None:
    path = write(tmp_path, "format_version: 1\nnodes:\n  a: {type: dagfusion.math.Add}\n")
    validated, problems, _ = engine.check_source(path, overrides=["nope.a=1"])
    assert validated is None and [p.code for p in problems] == ["unknown-node"]
    assert workflow_module.sweep_points(engine.load(path)) == 1
