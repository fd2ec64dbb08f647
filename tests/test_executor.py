from __future__ import annotations

import json
import textwrap

import pytest

from dagfusion import (
    CancelToken,
    Engine,
    EventCollector,
    NodeCached,
    NodeExecutionError,
    NodeFailed,
    NodeFinished,
    NodeProgress,
    NodeSkipped,
    NodeStarted,
    RunFinished,
    RunStarted,
    hookimpl,
)
from dagfusion.registry import Registry
from dagfusion.workflow import load_workflow


def wf(text: str):
    return load_workflow(textwrap.dedent(text), text=True)


MODULE_CHAIN = """\
format_version: 1
nodes:
  lin: {type: test.Linear, inputs: {seed: 1}}
  doubled: {type: test.DoubleWeightsInPlace, inputs: {module: {from: lin.module}}}
  before: {type: test.WeightSum, inputs: {module: {from: lin.module}}}
  after: {type: test.WeightSum, inputs: {module: {from: doubled.module}}}
outputs: [lin, before, after]
"""


def test_patching_node_never_changes_the_cached_upstream_module(test_engine: Engine, calls, tmp_path) -> None:
    first = test_engine.run(wf(MODULE_CHAIN), out=tmp_path / "r1", check_mutation=True)
    assert first.ok, first.errors
    base = first.output("before.sum")
    assert first.output("after.sum") == pytest.approx(2 * base)
    cached_module = first.output("lin.module")
    weights = cached_module.weight.detach().clone()

    second = test_engine.run(wf(MODULE_CHAIN), out=tmp_path / "r2", check_mutation=True)
    assert second.ok
    assert "lin" in second.cached and calls.counts["linear"] == 1
    assert second.output("lin.module") is cached_module
    assert (cached_module.weight == weights).all()
    assert second.output("after.sum") == pytest.approx(2 * base)  # not 4x: the input was copied


def test_undeclared_in_place_patch_is_caught(test_engine: Engine, tmp_path) -> None:
    result = test_engine.run(
        wf(
            """\
            format_version: 1
            nodes:
              lin: {type: test.Linear}
              patch: {type: test.SneakyPatch, inputs: {module: {from: lin.module}}}
            """
        ),
        out=tmp_path,
        check_mutation=True,
    )
    assert result.status == "failed"
    assert "modified its input(s) ['module'] in place" in str(result.errors["patch"])


def test_failure_skips_dependents_and_keeps_everything_else(test_engine: Engine, tmp_path) -> None:
    events = EventCollector()
    result = test_engine.run(
        wf(
            """\
            format_version: 1
            nodes:
              bad: {type: test.Fail, inputs: {x: 1.0}}
              child: {type: test.Count, inputs: {x: {from: bad.y}}}
              grandchild: {type: test.Count, inputs: {x: {from: child.y}}}
              fine: {type: dagfusion.math.Add, inputs: {a: 1, b: 2}}
            """
        ),
        out=tmp_path,
        handler=events,
    )
    assert result.status == "failed"
    error = result.errors["bad"]
    assert isinstance(error, NodeExecutionError)
    assert isinstance(error.original, ZeroDivisionError) and error.__cause__ is error.original
    assert "node 'bad' (test.Fail) failed: ZeroDivisionError" in str(error)
    assert result.skipped == {"child": "bad", "grandchild": "bad"}
    assert result.output("fine.sum") == 3
    assert [e.node_id for e in events.of(NodeSkipped)] == ["child", "grandchild"]
    (failed,) = events.of(NodeFailed)
    assert "ZeroDivisionError" in failed.traceback
    (finished,) = events.of(RunFinished)
    assert finished.failed == ("bad",) and finished.skipped == ("child", "grandchild")
    with pytest.raises(NodeExecutionError):
        result.raise_for_status()


def test_event_order_and_cache_events(test_engine: Engine, tmp_path) -> None:
    text = """\
        format_version: 1
        nodes:
          a: {type: dagfusion.math.Add, inputs: {a: 1, b: 2}}
          s: {type: test.Steps, inputs: {steps: 4}}
        """
    events = EventCollector()
    test_engine.run(wf(text), out=tmp_path / "1", handler=events)
    kinds = [e.kind for e in events.events]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished"
    assert [e.step for e in events.of(NodeProgress)] == [1, 2, 3, 4]
    assert {e.node_id for e in events.of(NodeStarted)} == {"a", "s"}
    again = EventCollector()
    result = test_engine.run(wf(text), out=tmp_path / "2", handler=again)
    assert sorted(result.cached) == ["a", "s"] and result.executed == []
    assert [e.kind for e in again.events] == ["RunStarted", "NodeCached", "NodeCached", "RunFinished"]


def test_cancel_stops_inside_a_node_and_between_nodes(test_engine: Engine, tmp_path) -> None:
    events = EventCollector()
    result = test_engine.run(
        wf(
            """\
            format_version: 1
            nodes:
              s: {type: test.Steps, inputs: {steps: 10, cancel_at: 3}}
              after: {type: test.Count, inputs: {x: {from: s.done}}}
            """
        ),
        out=tmp_path,
        handler=events,
    )
    assert result.status == "cancelled"
    assert max(e.step for e in events.of(NodeProgress)) == 3
    assert events.events[-1].kind == "RunCancelled"
    token = CancelToken()
    token.cancel()
    result = test_engine.run(wf("format_version: 1\nnodes: {a: {type: test.Count}}\n"), out=tmp_path / "x", cancel_token=token)
    assert result.status == "cancelled" and result.executed == []


def test_impure_nodes_rerun_and_invalidate_downstream(test_engine: Engine, calls, tmp_path) -> None:
    text = """\
        format_version: 1
        nodes:
          i: {type: test.Impure, inputs: {x: 2.0}}
          c: {type: test.Count, inputs: {x: {from: i.y}}}
        """
    test_engine.run(wf(text), out=tmp_path / "1")
    second = test_engine.run(wf(text), out=tmp_path / "2")
    assert calls.counts == {"impure": 2, "count": 2}
    assert second.cached == []


def test_only_nodes_feeding_targets_run(test_engine: Engine, calls, tmp_path) -> None:
    text = """\
        format_version: 1
        nodes:
          a: {type: test.Count, inputs: {x: 1.0}}
          b: {type: test.Count, inputs: {x: {from: a.y}}}
          unrelated: {type: test.Impure}
        outputs: [b.y]
        """
    result = test_engine.run(wf(text), out=tmp_path)
    assert sorted(result.executed) == ["a", "b"] and "impure" not in calls.counts
    calls.counts.clear()
    # changing a constant upstream invalidates exactly the dependent chain
    result = test_engine.run(wf(text), out=tmp_path / "2", overrides=["b.x=5"], targets=["b"])
    assert result.executed == ["b"] and result.cached == [] and calls.counts == {"count": 1}


def test_cached_upstream_is_not_even_looked_at_when_downstream_hits(test_engine: Engine, calls, tmp_path) -> None:
    text = "format_version: 1\nnodes:\n  a: {type: test.Count, inputs: {x: 1.0}}\n  b: {type: test.Count, inputs: {x: {from: a.y}}}\n"
    test_engine.run(wf(text), out=tmp_path / "1")
    result = test_engine.run(wf(text), out=tmp_path / "2")
    assert result.cached == ["b"]  # 'a' is not needed: its only consumer is a hit


def test_no_cache_recomputes(test_engine: Engine, calls, tmp_path) -> None:
    text = "format_version: 1\nnodes:\n  a: {type: test.Count, inputs: {x: 1.0}}\n"
    test_engine.run(wf(text), out=tmp_path / "1")
    test_engine.run(wf(text), out=tmp_path / "2", use_cache=False)
    assert calls.counts["count"] == 2


def test_declared_output_types_are_enforced(test_engine: Engine, tmp_path) -> None:
    result = test_engine.run(wf("format_version: 1\nnodes:\n  w: {type: test.WrongType}\n"), out=tmp_path)
    assert "declared INT but the node returned STRING" in str(result.errors["w"])


def test_values_from_any_outputs_are_checked_on_arrival(test_engine: Engine, tmp_path) -> None:
    result = test_engine.run(
        wf(
            """\
            format_version: 1
            nodes:
              s: {type: test.AnyOut, inputs: {value: hello}}
              add: {type: dagfusion.math.Add, inputs: {a: {from: s.value}}}
            """
        ),
        out=tmp_path,
    )
    assert "expected FLOAT, got STRING" in str(result.errors["add"])


def test_persisted_outputs_survive_a_new_engine(test_registry: Registry, settings, calls, tmp_path) -> None:
    text = "format_version: 1\nnodes:\n  p: {type: test.Persisted, inputs: {seed: 4}}\n"
    first = Engine(test_registry, settings).run(wf(text), out=tmp_path / "1")
    second = Engine(test_registry, settings).run(wf(text), out=tmp_path / "2")
    assert calls.counts["persisted"] == 1
    assert second.cached == ["p"]
    assert (second.output("p.tensor") == first.output("p.tensor")).all()


def test_lifecycle_hooks_fire(settings, test_nodes_plugin, tmp_path) -> None:
    seen: list[tuple[str, str]] = []

    class Tracer:
        @hookimpl
        def before_node_run(self, node_id, spec):
            seen.append(("before", node_id))

        @hookimpl
        def after_node_run(self, node_id, outputs, seconds):
            seen.append(("after", node_id))

        @hookimpl
        def on_node_error(self, node_id, error):
            seen.append(("error", f"{node_id}:{type(error).__name__}"))

    registry = Registry.from_plugins(load_entrypoints=False, extra_plugins=[("t", test_nodes_plugin), ("tracer", Tracer())])
    Engine(registry, settings).run(
        wf("format_version: 1\nnodes:\n  a: {type: test.Count}\n  f: {type: test.Fail}\n"), out=tmp_path
    )
    assert seen == [("before", "a"), ("after", "a"), ("before", "f"), ("error", "f:ZeroDivisionError")]


def test_run_record(test_engine: Engine, tmp_path) -> None:
    out = tmp_path / "record"
    result = test_engine.run(
        wf("format_version: 1\nnodes:\n  n: {type: dagfusion.tensor.Noise, inputs: {seed: 11, height: 4, width: 4}}\n"),
        out=out,
    )
    assert result.ok and result.output_dir == out
    assert load_workflow(out / "workflow.yaml").nodes["n"].inputs["seed"] == 11
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["RunStarted", "NodeStarted", "NodeFinished", "RunFinished"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seeds"] == {"n.seed": 11}
    assert manifest["torch"] and manifest["dagfusion"]
    assert manifest["plugins"]["dagfusion.builtin.tensor"]["status"] == "loaded"


def test_sweep_runs_share_the_cache(test_engine: Engine, calls, tmp_path) -> None:
    text = """\
        format_version: 1
        nodes:
          base: {type: test.Count, inputs: {x: 1.0}}
          add: {type: dagfusion.math.Add, inputs: {a: {from: base.y}, b: 0}}
        sweep:
          - {add.b: [1, 2, 3]}
        """
    results = test_engine.run_sweep(wf(text), out=tmp_path)
    assert [r.output("add.sum") for r in results] == [2, 3, 4]
    assert calls.counts["count"] == 1
    assert (tmp_path / "sweep-002" / "manifest.json").is_file()
    assert json.loads((tmp_path / "sweep-001" / "manifest.json").read_text())["sweep"] == {"add.b": 2}


def test_events_are_frozen() -> None:
    event = RunStarted("r", nodes=("a",))
    with pytest.raises(AttributeError):
        event.run_id = "x"  # type: ignore[misc]
    assert NodeFinished("r", node_id="a").to_dict()["event"] == "NodeFinished"
    assert NodeCached("r").kind == "NodeCached"
