from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dagfusion.cache import OutputCache, estimate_nbytes
from dagfusion.errors import UnsafeOperationError
from dagfusion.fingerprint import SpecialFileError, fingerprint, fingerprint_path

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


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


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """``call()``'s result or exception, failing the test if it takes longer than ``seconds``."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds}s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_a_symlinked_folder_counts_by_the_content_behind_it(tmp_path: Path) -> None:
    weights = tmp_path / "store" / "weights"
    weights.mkdir(parents=True)
    (weights / "w.bin").write_bytes(b"old weights")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights").symlink_to(weights, target_is_directory=True)
    before = fingerprint_path(model)

    (weights / "w.bin").write_bytes(b"new weights")
    assert fingerprint_path(model) != before
    (weights / "extra.bin").write_bytes(b"x")
    changed = fingerprint_path(model)
    assert changed != before and fingerprint_path(model) == changed


def test_a_symlinked_file_counts_by_its_target(tmp_path: Path) -> None:
    target = tmp_path / "blob"
    target.write_bytes(b"abc")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").symlink_to(target)
    before_dir, before_file = fingerprint_path(folder), fingerprint_path(folder / "w.bin")
    target.write_bytes(b"abcd")
    assert fingerprint_path(folder) != before_dir
    assert fingerprint_path(folder / "w.bin") != before_file


def test_a_symlink_loop_terminates(tmp_path: Path) -> None:
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "w.bin").write_bytes(b"w")
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)
    (root / "self").symlink_to(root / "self")  # a link that resolves to itself
    first = within(10, lambda: fingerprint_path(root))
    assert within(10, lambda: fingerprint_path(root)) == first
    (root / "sub" / "w.bin").write_bytes(b"v")
    assert within(10, lambda: fingerprint_path(root)) != first


def test_plain_folders_keep_their_fingerprint_when_an_unrelated_link_appears_elsewhere(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"w")
    before = fingerprint_path(folder)
    (tmp_path / "elsewhere").symlink_to(folder, target_is_directory=True)
    assert fingerprint_path(folder) == before
    assert fingerprint_path(tmp_path / "elsewhere") == before


@needs_fifo
def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(SpecialFileError, match="FIFO") as caught:
        within(5, lambda: fingerprint_path(fifo))
    assert isinstance(caught.value, UnsafeOperationError)
    link = tmp_path / "link"
    link.symlink_to(fifo)
    with pytest.raises(SpecialFileError):
        within(5, lambda: fingerprint_path(link))


@needs_fifo
def test_a_fifo_inside_a_folder_is_counted_without_being_opened(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"w")
    without = fingerprint_path(folder)
    os.mkfifo(folder / "pipe")
    with_fifo = within(5, lambda: fingerprint_path(folder))
    assert with_fifo != without
    assert within(5, lambda: fingerprint_path(folder)) == with_fifo


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
