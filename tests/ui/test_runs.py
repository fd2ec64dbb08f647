"""The run queue: one run at a time, per-node statuses, failures, sweeps and previews."""

from __future__ import annotations

import base64
import io
import time

import pytest

from dagfusion import Engine
from dagfusion.errors import ValidationError
from dagfusion.registry import Registry
from dagfusion.settings import Settings
from dagfusion.ui.runs import Run, RunQueue, encode_preview
from dagfusion.workflow import parse_workflow


def _wf(text: str):
    wf, problems = parse_workflow("format_version: 1\n" + text)
    assert wf is not None and problems == [], problems
    return wf


def _finish(queue: RunQueue, run: Run, timeout: float = 60.0) -> Run:
    deadline = time.time() + timeout
    while run.active and time.time() < deadline:
        time.sleep(0.02)
    assert not run.active, run.summary()
    return run


@pytest.fixture
def queue(ui_registry: Registry, ui_settings: Settings):
    queue = RunQueue(Engine(ui_registry, ui_settings))
    yield queue
    queue.shutdown()


def test_a_failing_node_fails_its_run_and_skips_what_depends_on_it(queue: RunQueue) -> None:
    run = queue.submit(
        _wf(
            "nodes:\n"
            "  a: {type: dagfusion.util.Number, inputs: {value: 1.0}}\n"
            "  clamp: {type: dagfusion.math.Clamp, inputs: {value: {from: a.value}, low: 2.0, high: 1.0}}\n"
            "  after: {type: dagfusion.math.Add, inputs: {a: {from: clamp.value}, b: 1.0}}\n"
            "  other: {type: dagfusion.math.Add, inputs: {a: {from: a.value}, b: 1.0}}\n"
        )
    )
    _finish(queue, run)
    state = run.snapshot()
    assert state["status"] == "failed" and "clamp" in state["message"]
    assert state["nodes"] == {"a": "done", "clamp": "failed", "after": "skipped", "other": "done"}
    assert "low" in state["errors"]["clamp"] and state["errors"]["after"] == "skipped because clamp failed"


def test_a_sweep_beyond_the_setting_is_refused_before_queueing(queue: RunQueue) -> None:
    values = ", ".join(str(float(i)) for i in range(1000))
    steps = ", ".join(str(i) for i in range(1, 1001))
    wf = _wf(f"nodes:\n  s: {{type: uitest.Slow, inputs: {{delay: 0.0}}}}\nsweep:\n  - {{s.x: [{values}]}}\n  - {{s.steps: [{steps}]}}\n")
    started = time.perf_counter()
    with pytest.raises(ValidationError, match="1,000,000 runs"):
        queue.submit(wf)
    assert time.perf_counter() - started < 0.5 and queue.summary() == []


def test_progress_and_sweep_points(queue: RunQueue) -> None:
    run = queue.submit(_wf("nodes:\n  s: {type: uitest.Slow, inputs: {steps: 3, delay: 0.0}}\nsweep:\n  - {s.x: [1.0, 2.0]}\n"))
    assert run.points == 2
    _finish(queue, run)
    state = run.snapshot()
    assert state["status"] == "done" and state["point"] == 2
    assert state["progress"]["s"] == {"step": 3, "total": 3, "message": "sleeping"}
    assert len(state["output_dirs"]) == 2


def test_the_queue_runs_one_at_a_time_in_order(queue: RunQueue) -> None:
    slow = _wf("nodes:\n  s: {type: uitest.Slow, inputs: {steps: 10, delay: 0.02}}\n")
    runs = [queue.submit(slow) for _ in range(3)]
    assert [r["number"] for r in queue.summary()] == [3, 2, 1]  # newest first
    positions = [queue.position(r) for r in runs]
    assert positions[1:] == [1, 2] or positions == [1, 2, 3]
    for run in runs:
        _finish(queue, run)
    starts = [r.started for r in runs]
    ends = [r.finished for r in runs]
    assert starts[1] >= ends[0] and starts[2] >= ends[1]


def test_cancelling_a_queued_run_is_immediate(queue: RunQueue) -> None:
    blocker = queue.submit(_wf("nodes:\n  s: {type: uitest.Slow, inputs: {steps: 200, delay: 0.01}}\n"))
    waiting = queue.submit(_wf("nodes:\n  s: {type: uitest.Slow, inputs: {steps: 1, delay: 0.0}}\n"))
    assert queue.cancel(waiting.id)
    assert waiting.status == "cancelled" and waiting.snapshot()["nodes"] == {"s": "cancelled"}
    assert blocker.status in ("queued", "running")
    queue.cancel(blocker.id)
    _finish(queue, blocker)
    assert blocker.status == "cancelled"


def test_an_invalid_workflow_reaching_the_engine_is_reported(queue: RunQueue) -> None:
    run = queue.submit(_wf("nodes:\n  a: {type: dagfusion.util.Number, inputs: {value: nope}}\n"))
    _finish(queue, run)
    assert run.status == "invalid" and run.problems[0]["code"] == "type-mismatch"


def _decode(url: str):
    from PIL import Image

    head, data = url.split(",", 1)
    return head, Image.open(io.BytesIO(base64.b64decode(data)))


def test_previews_from_pictures_arrays_tensors_and_frames() -> None:
    import numpy as np
    import torch
    from PIL import Image

    url, w, h, kind = encode_preview(Image.new("RGB", (2000, 1000)))
    head, image = _decode(url)
    assert head == "data:image/png;base64" and kind == "image" and (w, h) == image.size == (768, 384)
    assert encode_preview(np.zeros((4, 6, 3), dtype=np.uint8))[1:3] == (6, 4)
    assert encode_preview(torch.rand(3, 5, 7))[1:3] == (7, 5)
    assert encode_preview(torch.rand(1, 1, 5, 7))[1:3] == (7, 5)
    url, _, _, kind = encode_preview([torch.rand(3, 8, 8), torch.zeros(3, 8, 8)])
    head, image = _decode(url)
    assert kind == "video" and head == "data:image/gif;base64" and image.n_frames == 2


def test_previews_arrive_in_order_and_bad_ones_do_not_fail_the_run(queue: RunQueue) -> None:
    run = queue.submit(
        _wf("nodes:\n  one: {type: uitest.Picture}\n  clip: {type: uitest.Picture, inputs: {frames: 3, value: 0.2}}\n")
    )
    _finish(queue, run)
    state = run.snapshot()
    assert state["status"] == "done"
    assert [(p["node"], p["kind"]) for p in state["previews"]] == [("one", "image"), ("clip", "video")]
    assert [p["index"] for p in run.snapshot(since=1)["previews"]] == [1]
    from dagfusion.events import NodePreview

    run.handle(NodePreview(run.id, node_id="one", preview=object()))  # not a picture: logged, ignored
    assert len(run.snapshot()["previews"]) == 2


def test_old_runs_keep_their_statuses_but_not_their_previews(ui_registry: Registry, ui_settings: Settings) -> None:
    from dagfusion.ui import runs as runs_module

    queue = RunQueue(Engine(ui_registry, ui_settings), max_history=runs_module.PREVIEW_HISTORY + 1)
    try:
        pictures = [_wf(f"nodes:\n  p: {{type: uitest.Picture, inputs: {{value: {i / 20}}}}}\n") for i in range(runs_module.PREVIEW_HISTORY + 2)]
        submitted = [_finish(queue, queue.submit(p)) for p in pictures]  # different values: no cache hits
        assert len(queue.summary()) == runs_module.PREVIEW_HISTORY + 1  # the history is bounded
        kept = [len(r.previews) for r in submitted[1:]]  # the first left the history
        assert kept[0] == 0 and set(kept[1:]) == {1}
        assert all(r.status == "done" for r in submitted)
    finally:
        queue.shutdown()
