"""The GPU video benchmark's code runs (its --dry-run on tiny configs on the CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_video_speed_dry_run_runs_every_variant(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("video_speed", ROOT / "benchmarks" / "video_speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "result.json"
    assert module.main(["--dry-run", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["seconds"]) == {"teacher", "one-step", "unet-teacher", "unet-one-step"}
    assert result["device"] == "cpu (dry run)" and all(v > 0 for v in result["seconds"].values())
