"""The GPU video benchmark's code runs (its --dry-run on tiny configs on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.slow
def test_video_speed_dry_run_runs_every_variant(tmp_path: Path, benchmark_module: Any) -> None:
    module = benchmark_module("video_speed")
    out = tmp_path / "result.json"
    assert module.main(["--dry-run", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["seconds"]) == {"teacher", "one-step", "unet-teacher", "unet-one-step"}
    assert result["device"] == "cpu (dry run)" and all(v > 0 for v in result["seconds"].values())
