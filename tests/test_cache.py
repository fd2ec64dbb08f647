"""The on-disk cache: verified reads, damage reported and repaired, atomic concurrent writes,
and an unusable cache folder that is named instead of crashing a run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from dagfusion import Engine
from dagfusion import diskcache as cache_module
from dagfusion.cache import CacheDamage, DiskCache
from dagfusion.executor import execute
from dagfusion.registry import Registry
from dagfusion.types import TypeSystem
from dagfusion.workflow import load_workflow

KEY = "ab" + "0" * 30
LOSS_TYPES = {"loss": "FLOAT"}
TENSOR_TYPES = {"tensor": "TENSOR"}


@pytest.fixture
def types(registry: Registry) -> TypeSystem:
    return registry.types


@pytest.fixture
def disk(tmp_path: Path) -> DiskCache:
    return DiskCache(tmp_path / "cache")


class Damages(list[CacheDamage]):
    """An ``on_damage`` callback that keeps what it was told."""

    def __call__(self, damage: CacheDamage) -> None:
        self.append(damage)


def entry_file(disk: DiskCache, key: str, output: str) -> Path:
    """The file holding ``output`` of the entry ``key`` (found through its index)."""
    (folder,) = [p for p in disk.root.rglob(key) if p.is_dir()]
    index = json.loads((folder / "index.json").read_text())
    return folder / index["outputs"][output]["file"]


def entries(disk: DiskCache) -> list[Path]:
    """Every folder under the cache's shard folders, hidden ones (temporary, old) included."""
    return [p for shard in (disk.root / "outputs").iterdir() if shard.is_dir() for p in shard.iterdir()]


def test_stored_outputs_come_back_equal(disk: DiskCache, types: TypeSystem) -> None:
    damages = Damages()
    assert disk.put(KEY, {"loss": 0.25}, LOSS_TYPES, types) is True
    assert disk.get(KEY, types, on_damage=damages) == {"loss": 0.25}
    assert disk.get("cd" + "0" * 30, types, on_damage=damages) is None
    assert damages == []


def test_an_edited_json_value_is_detected_deleted_and_rewritten(disk: DiskCache, types: TypeSystem) -> None:
    disk.put(KEY, {"loss": 0.25}, LOSS_TYPES, types)
    entry_file(disk, KEY, "loss").write_text("123.0")
    damages = Damages()

    assert disk.get(KEY, types, on_damage=damages) is None
    assert len(damages) == 1 and damages[0].key == KEY and damages[0].removed
    assert "checksum" in damages[0].message or "bytes" in damages[0].message
    assert entries(disk) == []  # deleted, so the damage is reported once
    assert disk.get(KEY, types, on_damage=damages) is None and len(damages) == 1

    assert disk.put(KEY, {"loss": 0.25}, LOSS_TYPES, types)
    assert disk.get(KEY, types, on_damage=damages) == {"loss": 0.25}
    assert len(damages) == 1


def test_flipped_tensor_bytes_are_detected(disk: DiskCache, types: TypeSystem) -> None:
    tensor = torch.arange(1024, dtype=torch.float32)  # 4 KiB
    disk.put(KEY, {"tensor": tensor}, TENSOR_TYPES, types)
    path = entry_file(disk, KEY, "tensor")
    data = bytearray(path.read_bytes())
    data[-2048] ^= 0xFF  # inside the tensor data: the file still loads, with a wrong value
    path.write_bytes(bytes(data))
    damages = Damages()

    assert disk.get(KEY, types, on_damage=damages) is None
    assert [d.reason for d in damages] == [f"{path.name} does not match its checksum"]
    disk.put(KEY, {"tensor": tensor}, TENSOR_TYPES, types)
    assert torch.equal(disk.get(KEY, types, on_damage=damages)["tensor"], tensor)
    assert len(damages) == 1


def test_a_truncated_file_is_recomputed_and_rewritten(disk: DiskCache, types: TypeSystem) -> None:
    tensor = torch.ones(256)
    disk.put(KEY, {"tensor": tensor}, TENSOR_TYPES, types)
    path = entry_file(disk, KEY, "tensor")
    path.write_bytes(path.read_bytes()[:100])
    damages = Damages()

    assert disk.get(KEY, types, on_damage=damages) is None
    assert "expected" in damages[0].reason
    assert disk.put(KEY, {"tensor": tensor}, TENSOR_TYPES, types)
    assert torch.equal(disk.get(KEY, types, on_damage=damages)["tensor"], tensor)
    assert len(damages) == 1


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda folder: (folder / "index.json").unlink(), "index.json is missing or unreadable"),
        (lambda folder: (folder / "index.json").write_text("{not json"), "index.json is not valid JSON"),
        (lambda folder: (folder / "index.json").write_text('{"format": 2, "outputs": {"loss": {"file": "../x"}}}'),
         "index.json is malformed"),
        (lambda folder: next(folder.glob("0-*")).unlink(), "cannot be read"),
    ],
    ids=["index-missing", "index-not-json", "index-malformed", "file-missing"],
)
def test_a_damaged_index_or_missing_file_is_reported(disk: DiskCache, types: TypeSystem, damage, reason: str) -> None:
    disk.put(KEY, {"loss": 0.25}, LOSS_TYPES, types)
    (folder,) = entries(disk)
    damage(folder)
    damages = Damages()
    assert disk.get(KEY, types, on_damage=damages) is None
    assert len(damages) == 1 and reason in damages[0].reason
    assert not folder.exists()


def test_get_without_a_callback_still_repairs(disk: DiskCache, types: TypeSystem) -> None:
    disk.put(KEY, {"loss": 0.25}, LOSS_TYPES, types)
    entry_file(disk, KEY, "loss").write_text("1.0")
    assert disk.get(KEY, types) is None
    assert entries(disk) == []


def test_an_entry_in_the_older_layout_is_a_quiet_miss_and_replaced(disk: DiskCache, types: TypeSystem) -> None:
    folder = disk.root / "outputs" / KEY[:2] / KEY
    folder.mkdir(parents=True)
    (folder / "0-loss").write_text("0.5")
    (folder / "index.json").write_text(json.dumps({"loss": {"type": "FLOAT", "file": "0-loss"}}))
    damages = Damages()
    assert disk.get(KEY, types, on_damage=damages) is None
    assert damages == []
    assert disk.put(KEY, {"loss": 0.25}, LOSS_TYPES, types)
    assert disk.get(KEY, types, on_damage=damages) == {"loss": 0.25}


def test_concurrent_puts_and_gets_in_threads_leave_one_valid_entry(disk: DiskCache, types: TypeSystem) -> None:
    _hammer(disk, types)


def test_without_file_locks_threads_are_still_excluded(
    disk: DiskCache, types: TypeSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "_fcntl", None)
    monkeypatch.setattr(cache_module, "_msvcrt", None)
    _hammer(disk, types)


def _hammer(disk: DiskCache, types: TypeSystem) -> None:
    """Eight writers and four readers on one key: readers never see damage, one entry remains."""
    values = [float(i) for i in range(8)]
    damages = Damages()
    failures: list[str] = []
    stop = threading.Event()

    def write(value: float) -> None:
        for _ in range(10):
            disk.put(KEY, {"loss": value}, LOSS_TYPES, types, on_error=failures.append)

    def read() -> None:
        while not stop.is_set():
            got = disk.get(KEY, types, on_damage=damages)
            if got is not None and got["loss"] not in values:
                failures.append(f"read {got}")

    readers = [threading.Thread(target=read) for _ in range(4)]
    writers = [threading.Thread(target=write, args=(v,)) for v in values]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert failures == [] and damages == []
    assert disk.get(KEY, types)["loss"] in values
    assert [p.name for p in entries(disk)] == [KEY]  # no temporary or replaced folders left


WRITER = textwrap.dedent(
    """\
    import sys
    from pathlib import Path
    from dagfusion.cache import DiskCache
    from dagfusion.registry import Registry

    types = Registry.from_plugins(load_entrypoints=False).types
    disk, value = DiskCache(Path(sys.argv[1])), float(sys.argv[2])
    Path(sys.argv[3]).touch()
    while not Path(sys.argv[4]).exists():
        pass
    for _ in range(30):
        assert disk.put(sys.argv[5], {"loss": value}, {"loss": "FLOAT"}, types, on_error=print)
    """
)


def test_concurrent_puts_from_processes_leave_one_valid_entry(
    disk: DiskCache, types: TypeSystem, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(disk.root), str(i), str(tmp_path / f"ready{i}"), str(go), KEY]
        )
        for i in range(3)
    ]
    try:
        while not all((tmp_path / f"ready{i}").exists() or p.poll() is not None for i, p in enumerate(procs)):
            threading.Event().wait(0.01)
        go.touch()
        assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    finally:
        for p in procs:
            p.kill()
    damages = Damages()
    assert disk.get(KEY, types, on_damage=damages)["loss"] in (0.0, 1.0, 2.0)
    assert damages == []
    assert [p.name for p in entries(disk)] == [KEY]


def test_a_cache_root_that_is_a_file_is_named_and_never_raises(tmp_path: Path, types: TypeSystem) -> None:
    root = tmp_path / "cache"
    root.write_text("not a folder")
    disk = DiskCache(root)
    problem = disk.problem()
    assert problem is not None and "is a file, not a folder" in problem and "DAGFUSION_CACHE_DIR" in problem
    errors: list[str] = []
    assert disk.put(KEY, {"loss": 0.25}, LOSS_TYPES, types, on_error=errors.append) is False
    assert len(errors) == 1 and str(root) in errors[0]
    assert disk.put(KEY, {"loss": 0.25}, LOSS_TYPES, types) is False
    assert disk.get(KEY, types, on_damage=Damages()) is None
    assert root.read_text() == "not a folder"


def test_a_cache_root_below_a_file_names_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    problem = DiskCache(blocker / "sub" / "cache").problem()
    assert problem is not None and f"{blocker} is a file, not a folder" in problem


def test_a_usable_cache_root_has_no_problem_and_is_created(tmp_path: Path) -> None:
    disk = DiskCache(tmp_path / "new" / "cache")
    assert disk.problem() is None
    assert disk.root.is_dir()


def test_a_value_the_serializer_rejects_is_a_reported_failed_write(disk: DiskCache, types: TypeSystem) -> None:
    errors: list[str] = []
    assert disk.put(KEY, {"tensor": "not a tensor"}, TENSOR_TYPES, types, on_error=errors.append) is False
    assert len(errors) == 1
    assert disk.get(KEY, types) is None
    assert entries(disk) == []  # the temporary folder is gone too


PERSISTED = "format_version: 1\nnodes:\n  p: {type: test.Persisted, inputs: {seed: 4}}\n"


def test_a_run_recomputes_a_damaged_entry_and_the_next_run_is_served(
    test_registry: Registry, settings, calls, tmp_path: Path
) -> None:
    workflow = load_workflow(PERSISTED, text=True)
    first = Engine(test_registry, settings).run(workflow, out=tmp_path / "runs" / "1")
    disk = DiskCache(settings.cache_dir)
    (folder,) = entries(disk)
    (tensor_file,) = folder.glob("0-*")
    tensor_file.write_bytes(tensor_file.read_bytes()[:-8])

    second = Engine(test_registry, settings).run(workflow, out=tmp_path / "runs" / "2")
    assert second.executed == ["p"] and calls.counts["persisted"] == 2
    third = Engine(test_registry, settings).run(workflow, out=tmp_path / "runs" / "3")
    assert third.cached == ["p"] and calls.counts["persisted"] == 2
    assert torch.equal(third.output("p.tensor"), first.output("p.tensor"))


def test_a_failed_cache_write_does_not_fail_the_node(test_registry: Registry, settings, calls, tmp_path: Path) -> None:
    blocker = tmp_path / "cache-file"
    blocker.write_text("")
    engine = Engine(test_registry, settings)
    validated = engine.validate(load_workflow(PERSISTED, text=True))
    plan = engine.plan(validated, run_id="r1", use_cache=False)
    result = execute(
        plan, registry=test_registry, settings=settings, run_id="r1", output_dir=tmp_path / "runs" / "1",
        disk=DiskCache(blocker),
    )
    assert result.ok and result.executed == ["p"]
    assert blocker.read_text() == ""
