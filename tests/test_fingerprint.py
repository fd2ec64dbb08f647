from __future__ import annotations

import os
from pathlib import Path

import torch

from dagfusion.cache import OutputCache, estimate_nbytes
from dagfusion.fingerprint import fingerprint, fingerprint_path


def test_plain_values_are_fingerprinted_by_content_and_type() -> None:
    assert fingerprint({"a": [1, 2.0, "x"]}) == fingerprint({"a": [1, 2.0, "x"]})
    assert fingerprint(1) != fingerprint(1.0) != fingerprint(True)
    assert fingerprint("1") != fingerprint(1)
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])
    assert fingerprint(object()) is None


def test_tensors_by_content_dtype_and_shape() -> None:
    t = torch.arange(6, dtype=torch.float32)
    assert fingerprint(t) == fingerprint(t.clone())
    assert fingerprint(t) != fingerprint(t.reshape(2, 3))
    assert fingerprint(t) != fingerprint(t.double())
    u = t.clone()
    u[3] += 1e-6
    assert fingerprint(t) != fingerprint(u)
    assert fingerprint(torch.ones(2, dtype=torch.bfloat16)) is not None


def test_modules_by_weights() -> None:
    torch.manual_seed(0)
    a = torch.nn.Linear(2, 2)
    b = torch.nn.Linear(2, 2)
    b.load_state_dict(a.state_dict())
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.bias.add_(1)
    assert fingerprint(a) != fingerprint(b)


def test_files_and_folders_notice_edits(tmp_path: Path) -> None:
    f = tmp_path / "model" / "w.bin"
    f.parent.mkdir()
    f.write_bytes(b"abc")
    before_file, before_dir = fingerprint_path(f), fingerprint_path(f.parent)
    f.write_bytes(b"abd")
    os.utime(f, ns=(1, 1))  # even with a rewound mtime, size+mtime+hash memo keys differ
    assert fingerprint_path(f) != before_file
    assert fingerprint_path(f.parent) != before_dir
    (f.parent / "new.json").write_text("{}")
    assert fingerprint_path(f.parent) != before_dir
    assert fingerprint_path(tmp_path / "missing") == fingerprint_path(tmp_path / "missing")


def test_lru_evicts_oldest_beyond_budget() -> None:
    cache = OutputCache(budget_bytes=3 * 4096)
    for name in "abc":
        cache.put(name, {"t": torch.zeros(800)})  # ~3.2 kB each
    cache.get("a")  # a is now most recent
    cache.put("d", {"t": torch.zeros(800)})
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.used_bytes <= cache.budget_bytes
    assert cache.put("huge", {"t": torch.zeros(100_000)}) is False
    assert estimate_nbytes(torch.nn.Linear(10, 10)) == (100 + 10) * 4
