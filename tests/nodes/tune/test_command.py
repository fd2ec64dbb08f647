"""The tune command's Ray path reports the points that failed, as the local path does."""

from __future__ import annotations

import argparse
import io
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from dagfusion.nodes.tune import command
from rich.console import Console


def test_failed_ray_points_are_printed_and_left_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    good = SimpleNamespace(ok=True, output=lambda name: json.dumps({"label": "steps 8", "psnr": 40.0}), errors={})
    bad = SimpleNamespace(ok=False, output=None, errors={"measure": "node 'measure' failed: ValueError: out of memory"})
    fake = types.ModuleType("dagfusion.distributed.command")
    fake.run_on_ray = lambda *a, **k: SimpleNamespace(results=[good, bad])  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dagfusion.distributed.command", fake)
    buffer = io.StringIO()
    args = argparse.Namespace(executor="ray", ray_address=None, ray_workers=1, budget_seconds=0)
    results = command._measure(None, tmp_path / "w.yaml", tmp_path, args, Console(file=buffer, width=200), 2)
    assert results == [{"label": "steps 8", "psnr": 40.0}]
    assert "out of memory" in buffer.getvalue()
