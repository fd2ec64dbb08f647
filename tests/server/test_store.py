"""The SQLite store on its own: migrations, priorities, claims, recovery, retention."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dagfusion.server.store import MIGRATIONS, JobStore, NewJob, QueueFull


def test_schema_version_and_wal(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db", tmp_path / "out")
    assert store.schema_version == len(MIGRATIONS)
    store.close()
    conn = sqlite3.connect(tmp_path / "db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    JobStore(tmp_path / "db", tmp_path / "out").close()  # reopening migrates nothing


def test_priority_then_fifo_and_single_claim(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db", tmp_path / "out")
    a = store.add(NewJob(b"a", priority=0))
    b = store.add(NewJob(b"b", priority=5))
    c = store.add(NewJob(b"c", priority=0))
    order = [store.claim(("auto",), "s") for _ in range(4)]
    assert [j.id if j else None for j in order] == [b.id, a.id, c.id, None]
    assert store.finish(a.id, "done") and not store.finish(a.id, "failed")  # ends once


def test_recover_requeues_once_then_fails(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db", tmp_path / "out")
    job = store.add(NewJob(b"x"))
    store.claim(("auto",), "s")
    assert store.recover(requeue=True) == [job.id]
    assert store.get(job.id).status == "queued"  # type: ignore[union-attr]
    store.claim(("auto",), "s")
    store.recover(requeue=True)
    again = store.get(job.id)
    assert again is not None and again.status == "failed" and "second time" in (again.error or "")
    kinds = [e["event"] for _, e in store.events(job.id)]
    assert kinds.count("JobInterrupted") == 2 and kinds[-1] == "JobFinished"


def test_queue_limit_and_retention(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "db", tmp_path / "out")
    first = store.add(NewJob(b"x"), max_queue=1)
    try:
        store.add(NewJob(b"y"), max_queue=1)
        raise AssertionError("the queue limit was not applied")
    except QueueFull:
        pass
    store.cancel(first.id)
    assert store.expire(1, now=first.created + 2 * 86400) == [first.id]
    assert store.get(first.id) is None and store.events(first.id) == []
