"""Warnings for cache damage and failed cache writes, and planning-time refusals."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from dagfusion import Engine, EventCollector
from dagfusion.cache import DiskCache
from dagfusion.errors import ValidationError
from dagfusion.events import RunStarted, RunWarning
from dagfusion.executor import execute
from dagfusion.registry import Registry
from dagfusion.workflow import load_workflow

PERSISTED = "format_version: 1\nnodes:\n  p: {type: test.Persisted, inputs: {seed: 4}}\n"


def test_a_damaged_entry_is_a_warning_event(test_registry: Registry, settings, calls, tmp_path: Path) -> None:
    workflow = load_workflow(PERSISTED, text=True)
    Engine(test_registry, settings).run(workflow, out=tmp_path / "runs" / "1")
    (tensor_file,) = (settings.cache_dir / "outputs").rglob("0-*")
    tensor_file.write_bytes(tensor_file.read_bytes()[:-8])
    events = EventCollector()
    result = Engine(test_registry, settings).run(workflow, out=tmp_path / "runs" / "2", handler=events)
    (warning,) = events.of(RunWarning)
    assert warning.node_id == "p" and "damaged" in warning.message
    assert isinstance(events.events[0], RunStarted) and events.events[1] is warning
    assert result.ok and result.executed == ["p"]
    assert any("damaged" in w for w in result.warnings)


def test_a_failed_cache_write_is_a_warning_event(test_registry: Registry, settings, calls, tmp_path: Path) -> None:
    blocker = tmp_path / "cache-file"
    blocker.write_text("")
    engine = Engine(test_registry, settings)
    plan = engine.plan(engine.validate(load_workflow(PERSISTED, text=True)), run_id="r1", use_cache=False)
    events = EventCollector()
    result = execute(
        plan, registry=test_registry, settings=settings, run_id="r1", output_dir=tmp_path / "runs" / "1",
        disk=DiskCache(blocker), handler=events,
    )
    assert result.ok
    (warning,) = events.of(RunWarning)
    assert warning.node_id == "p" and "could not store" in warning.message


def test_a_file_as_cache_dir_is_one_error_before_any_node_runs(
    test_registry: Registry, settings, calls, tmp_path: Path
) -> None:
    blocker = tmp_path / "cache-file"
    blocker.write_text("")
    engine = Engine(test_registry, settings.with_overrides(cache_dir=str(blocker)))
    with pytest.raises(ValidationError, match="is a file, not a folder"):
        engine.run(load_workflow(PERSISTED, text=True), out=tmp_path / "runs" / "1")
    assert calls.counts == {}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_path_input_is_refused_while_planning(engine: Engine, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    workflow = load_workflow(
        f"format_version: 1\nnodes:\n  t: {{type: dagfusion.io.LoadTensor, inputs: {{path: '{fifo}'}}}}\n", text=True
    )
    caught: list[BaseException] = []

    def run() -> None:
        try:
            engine.plan(engine.validate(workflow), run_id="r1")
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    (error,) = caught
    assert isinstance(error, ValidationError) and "FIFO" in str(error)
    assert error.problems[0].node == "t" and error.problems[0].input == "path"
