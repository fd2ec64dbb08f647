"""The cache-quality benchmark's LazyDiT rows: the paper's threshold rule (with and without a
reuse limit) as well as target laziness, each with the gates of the given file."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def test_lazydit_rows_cover_the_threshold_rule_and_the_reuse_limit(tmp_path: Path, benchmark_module: Any) -> None:
    from dagfusion.nodes.cache.lazydit import LazyGates, architecture, new_gates
    from dagfusion.testing import models as tiny

    arch = architecture(tiny.pixart_handles()["model"].denoiser)
    path = tmp_path / "gates.safetensors"
    LazyGates(new_gates(arch, steps=4, seed=0), arch).save(path)
    rows = dict(benchmark_module("cache_quality").lazydit_variants(str(path)))
    threshold = {label: patch for label, patch in rows.items() if "threshold" in label}
    assert {(p.rule, p.threshold, p.max_reuse) for p in threshold.values()} == {
        ("threshold", 0.5, 1), ("threshold", 0.8, 1), ("threshold", 0.5, 0)}
    assert sorted(p.laziness for label, p in rows.items() if "laziness" in label) == [0.1, 0.2, 0.3, 0.5]
    assert benchmark_module("cache_quality").lazydit_variants(None) == []
