"""The GPU TextCraftor speed benchmark's code runs (its --dry-run on tiny configs on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.slow
def test_textcraftor_speed_dry_run_measures_every_row(tmp_path: Path, benchmark_module: Any) -> None:
    module = benchmark_module("textcraftor_speed")
    out = tmp_path / "result.json"
    assert module.main(["--dry-run", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu (dry run)" and result["dry_run"] is True
    rows = {(r["batch"], r["gradient_checkpointing"]): r for r in result["rows"]}
    assert set(rows) == {(b, c) for b in (1, 4) for c in (True, False)}
    for row in rows.values():
        assert row["status"] == "ok" and row["seconds_per_step"] > 0 and row["timed_steps"] == 1
        assert row["peak_memory_gib"] is None
    assert [q["batch"] for q in result["ratios"]] == [1, 4]
    assert all(q["time_with_over_without"] > 0 and q["memory_with_over_without"] is None for q in result["ratios"])
