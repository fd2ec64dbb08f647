"""The EDICT vs DDIM inversion benchmark runs on tiny settings, and EDICT reconstructs better."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.slow
def test_edict_shapes_reports_both_methods_and_edict_reconstructs_better(tmp_path: Path, benchmark_module: Any) -> None:
    module = benchmark_module("edict_shapes")
    out = tmp_path / "result.json"
    module.main(["--images", "2", "--steps", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"edict", "ddim"}
    assert result["images"] == 2 and result["steps"] == 3
    for guidance in ("1", "3"):
        edict, ddim = result["methods"]["edict"][guidance], result["methods"]["ddim"][guidance]
        assert edict["latent_psnr_db"] > ddim["latent_psnr_db"], (edict, ddim)
        assert edict["max_abs_latent_error"] < ddim["max_abs_latent_error"]
        for row in (edict, ddim):
            assert 0.0 <= row["edit_shapeeval_all_correct"] <= 1.0
            assert row["seconds_per_image"] > 0 and len(row["per_image"]["psnr_vs_render_db"]) == 2
