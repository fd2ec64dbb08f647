"""The job server's persistent queue, history and event log: one SQLite database.

:class:`JobStore` keeps every job (its workflow, overrides, priority, submitter, status,
attempts) and every event of every job in ``jobs.sqlite3`` in the server's state folder. The
database runs in WAL mode with ``synchronous=NORMAL``: a committed change survives the server
process being killed (``kill -9``). All writes go through one connection under one lock (a
single writer); reads use one connection per thread. The schema is versioned with
``PRAGMA user_version`` and migrated forward on open (:data:`MIGRATIONS`).

Job states: ``queued`` → ``running`` → ``done`` | ``failed`` | ``cancelled``. A job found
``running`` when the store is opened by a new server (:meth:`JobStore.recover`) was
interrupted: it is re-queued once (``interruptions`` counts it), the next time failed with the
reason. :meth:`JobStore.claim` moves the best queued job (highest priority, then oldest) to
``running`` atomically, so no job is handed out twice.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
TERMINAL = frozenset({DONE, FAILED, CANCELLED})

#: Schema migrations: entry *k* brings ``user_version`` from *k* to *k + 1*.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        submitter TEXT NOT NULL DEFAULT '',
        name TEXT NOT NULL DEFAULT '',
        source BLOB NOT NULL,
        overrides TEXT NOT NULL DEFAULT '[]',
        device TEXT NOT NULL DEFAULT 'auto',
        points INTEGER NOT NULL DEFAULT 1,
        slot TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        interruptions INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        result TEXT,
        output_dir TEXT NOT NULL,
        event_count INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        started REAL,
        finished REAL
    );
    CREATE INDEX jobs_queue ON jobs (status, priority DESC, seq);
    CREATE INDEX jobs_submitter ON jobs (submitter, seq);
    CREATE TABLE events (
        job_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (job_id, idx)
    ) WITHOUT ROWID;
    """,
)

_PUBLIC = (
    "id", "status", "priority", "submitter", "name", "device", "points", "slot", "attempts",
    "interruptions", "cancel_requested", "error", "result", "output_dir", "event_count",
    "created", "started", "finished", "seq",
)


@dataclass(frozen=True)
class Job:
    """One job as stored (``source`` is the workflow file's bytes, YAML or PNG)."""

    id: str
    status: str
    priority: int
    submitter: str
    name: str
    source: bytes
    overrides: tuple[str, ...]
    device: str
    points: int
    slot: str | None
    attempts: int
    interruptions: int
    cancel_requested: bool
    error: str | None
    result: Any
    output_dir: str
    event_count: int
    created: float
    started: float | None
    finished: float | None
    seq: int = 0

    def public(self) -> dict[str, Any]:
        """The job as the API shows it (without the workflow's bytes)."""
        data = {name: getattr(self, name) for name in _PUBLIC}
        data["overrides"] = list(self.overrides)
        return data


@dataclass(frozen=True)
class NewJob:
    """What a submission stores: the workflow's bytes and how to run it."""

    source: bytes
    name: str = ""
    overrides: Sequence[str] = ()
    priority: int = 0
    submitter: str = ""
    device: str = "auto"
    points: int = 1
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


class QueueFull(Exception):
    """The queue already holds ``server_max_queue`` jobs."""


class JobStore:
    """The SQLite database of one job server (see the module docstring)."""

    def __init__(self, path: Path, output_root: Path) -> None:
        self.path = path
        self.output_root = output_root
        self._lock = threading.Lock()
        self._local = threading.local()
        self._writer = self._connect()
        self._writer.execute("PRAGMA journal_mode=WAL")
        self._migrate()
        #: per job, the number of events stored (read without touching the database)
        self._counts: dict[str, int] = {}
        self._listeners: list[Callable[[str], None]] = []

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(job_id)`` whenever events are appended to a job: from the writing
        thread, with the store locked, possibly just before the events are committed (so it
        must return at once; what it raises is ignored)."""
        self._listeners.append(listener)

    # --- connections and schema ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.row_factory = sqlite3.Row
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _migrate(self) -> None:
        with self._lock:
            version = self._writer.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"{self.path} was written by a newer dagfusion (schema {version}; this one knows {len(MIGRATIONS)})"
                )
            for target in range(version, len(MIGRATIONS)):
                self._writer.execute("BEGIN IMMEDIATE")
                try:
                    for statement in MIGRATIONS[target].split(";"):
                        if statement.strip():
                            self._writer.execute(statement)
                    self._writer.execute(f"PRAGMA user_version = {target + 1}")
                    self._writer.execute("COMMIT")
                except BaseException:
                    self._writer.execute("ROLLBACK")
                    raise

    @property
    def schema_version(self) -> int:
        return int(self._reader().execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._writer.close()

    def _write(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> list[sqlite3.Cursor]:
        with self._lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                cursors = [conn.execute(sql, params) for sql, params in statements]
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return cursors

    # --- jobs --------------------------------------------------------------------------------

    def add(self, new: NewJob, *, max_queue: int | None = None) -> Job:
        """Store a queued job (raises :class:`QueueFull` when ``max_queue`` jobs already wait)."""
        out = str(self.output_root / new.id)
        now = time.time()
        event = json.dumps({"event": "JobQueued", "job_id": new.id, "time": now, "priority": new.priority})
        with self._lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                if max_queue is not None:
                    waiting = conn.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (QUEUED,)).fetchone()[0]
                    if waiting >= max_queue:
                        raise QueueFull(f"the queue is full ({waiting} jobs wait; server_max_queue is {max_queue})")
                conn.execute(
                    "INSERT INTO jobs (id, status, priority, submitter, name, source, overrides, device, points,"
                    " output_dir, event_count, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
                    (new.id, QUEUED, new.priority, new.submitter, new.name, new.source,
                     json.dumps(list(new.overrides)), new.device, new.points, out, now),
                )
                conn.execute("INSERT INTO events (job_id, idx, data) VALUES (?, 0, ?)", (new.id, event))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._counts[new.id] = 1
        job = self.get(new.id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        row = self._reader().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def query(
        self, *, status: str | None = None, submitter: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Job], int]:
        """Jobs matching the filters, newest first: ``(page, total matching)``. The jobs'
        ``source`` is left empty: :meth:`get` one job for its workflow."""
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if submitter is not None:
            where.append("submitter = ?")
            params.append(submitter)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        conn = self._reader()
        total = conn.execute(f"SELECT COUNT(*) FROM jobs{clause}", params).fetchone()[0]
        # A listing never reads the workflows' bytes (up to 64 MiB each): ``source`` comes back empty.
        rows = conn.execute(
            f"SELECT {_LISTED_COLUMNS}, X'' AS source FROM jobs{clause} ORDER BY seq DESC LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        return [_job(r) for r in rows], int(total)

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state."""
        rows = self._reader().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        found = {status: 0 for status in STATUSES}
        found.update({r[0]: r[1] for r in rows})
        return found

    def claim(self, devices: Sequence[str], slot: str) -> Job | None:
        """Move the best queued job whose ``device`` is one of ``devices`` to ``running`` on
        ``slot`` (one more attempt) and return it; ``None`` when none waits."""
        marks = ",".join("?" * len(devices))
        with self._lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    f"SELECT id FROM jobs WHERE status = ? AND device IN ({marks}) ORDER BY priority DESC, seq LIMIT 1",
                    (QUEUED, *devices),
                ).fetchone()
                if row is None:
                    conn.execute("COMMIT")
                    return None
                conn.execute(
                    "UPDATE jobs SET status = ?, slot = ?, attempts = attempts + 1, started = ?, error = NULL"
                    " WHERE id = ?",
                    (RUNNING, slot, time.time(), row[0]),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return self.get(row[0])

    def finish(self, job_id: str, status: str, *, error: str | None = None, result: Any = None) -> bool:
        """End a running job (``done``, ``failed`` or ``cancelled``) and log ``JobFinished``;
        ``False`` if it was not running (it ends once)."""
        assert status in TERMINAL
        now = time.time()
        with self._lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = conn.execute(
                    "UPDATE jobs SET status = ?, error = ?, result = ?, finished = ? WHERE id = ? AND status = ?",
                    (status, error, json.dumps(result) if result is not None else None, now, job_id, RUNNING),
                )
                if cursor.rowcount:
                    self._append_locked(job_id, [{"event": "JobFinished", "status": status, "error": error, "time": now}])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return bool(cursor.rowcount)

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued one ends ``cancelled`` now; a running one is flagged (the
        runner stops it). Returns the job's status afterwards, ``None`` if there is no such job."""
        now = time.time()
        with self._lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None:
                    conn.execute("COMMIT")
                    return None
                status = row[0]
                if status == QUEUED:
                    conn.execute(
                        "UPDATE jobs SET status = ?, cancel_requested = 1, finished = ? WHERE id = ?",
                        (CANCELLED, now, job_id),
                    )
                    self._append_locked(job_id, [{"event": "JobFinished", "status": CANCELLED, "error": None, "time": now}])
                    status = CANCELLED
                elif status == RUNNING:
                    conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return str(status)

    def delete(self, job_id: str) -> bool:
        """Forget a job that is not running, with its events (its outputs are the caller's)."""
        cursors = self._write([
            ("DELETE FROM jobs WHERE id = ? AND status != ?", (job_id, RUNNING)),
        ])
        if cursors[0].rowcount:
            self._write([("DELETE FROM events WHERE job_id = ?", (job_id,))])
            self._counts.pop(job_id, None)
        return bool(cursors[0].rowcount)

    def recover(self, *, requeue: bool) -> list[str]:
        """At start: every job left ``running`` by a server that stopped is interrupted:
        re-queued if ``requeue`` and it was never interrupted before, else failed with the
        reason. Returns the ids of the interrupted jobs."""
        now = time.time()
        ids: list[str] = []
        with self._lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute("SELECT id, interruptions FROM jobs WHERE status = ?", (RUNNING,)).fetchall()
                for job_id, interruptions in rows:
                    ids.append(job_id)
                    again = requeue and interruptions < 1
                    reason = None if again else (
                        "the server stopped while this job ran"
                        + (" a second time" if interruptions else "")
                        + ("; it is not re-queued (server_requeue_interrupted is off)" if not requeue else "")
                    )
                    events: list[dict[str, Any]] = [{"event": "JobInterrupted", "requeued": again, "time": now}]
                    if again:
                        conn.execute(
                            "UPDATE jobs SET status = ?, interruptions = interruptions + 1, slot = NULL WHERE id = ?",
                            (QUEUED, job_id),
                        )
                    else:
                        conn.execute(
                            "UPDATE jobs SET status = ?, interruptions = interruptions + 1, error = ?, finished = ?"
                            " WHERE id = ?",
                            (FAILED, reason, now, job_id),
                        )
                        events.append({"event": "JobFinished", "status": FAILED, "error": reason, "time": now})
                    self._append_locked(job_id, events)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return ids

    def expire(self, days: int, *, now: float | None = None) -> list[str]:
        """Forget finished jobs older than ``days`` days (0: keep all); returns their ids."""
        if days <= 0:
            return []
        cutoff = (now if now is not None else time.time()) - days * 86400
        marks = ",".join("?" * len(TERMINAL))
        rows = self._reader().execute(
            f"SELECT id FROM jobs WHERE status IN ({marks}) AND finished < ?", (*sorted(TERMINAL), cutoff)
        ).fetchall()
        ids = [r[0] for r in rows]
        for job_id in ids:
            self.delete(job_id)
        return ids

    # --- events ------------------------------------------------------------------------------

    def append_events(self, job_id: str, events: Sequence[dict[str, Any]]) -> None:
        """Append events to a job's log (indexes continue from the last one)."""
        if not events:
            return
        with self._lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._append_locked(job_id, events)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _append_locked(self, job_id: str, events: Sequence[dict[str, Any]]) -> None:
        conn = self._writer
        row = conn.execute("SELECT event_count FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return
        start = int(row[0])
        conn.executemany(
            "INSERT INTO events (job_id, idx, data) VALUES (?, ?, ?)",
            [(job_id, start + i, json.dumps(e, default=str)) for i, e in enumerate(events)],
        )
        conn.execute("UPDATE jobs SET event_count = ? WHERE id = ?", (start + len(events), job_id))
        self._counts[job_id] = start + len(events)
        for listener in self._listeners:
            with contextlib.suppress(Exception):  # a listener never breaks a write
                listener(job_id)

    def event_count(self, job_id: str) -> int:
        """How many events the job has logged (cheap: kept in memory once seen)."""
        count = self._counts.get(job_id)
        if count is None:
            row = self._reader().execute("SELECT event_count FROM jobs WHERE id = ?", (job_id,)).fetchone()
            count = int(row[0]) if row is not None else 0
        return count

    def events(self, job_id: str, since: int = 0, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        """``(index, event)`` of the job's events from index ``since`` on, in order."""
        rows = self._reader().execute(
            "SELECT idx, data FROM events WHERE job_id = ? AND idx >= ? ORDER BY idx LIMIT ?", (job_id, since, limit)
        )
        return [(int(r[0]), json.loads(r[1])) for r in rows]


#: Every column of ``jobs`` but ``source`` (what a listing reads).
_LISTED_COLUMNS = (
    "seq, id, status, priority, submitter, name, overrides, device, points, slot, attempts, interruptions, "
    "cancel_requested, error, result, output_dir, event_count, created, started, finished"
)


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        status=row["status"],
        priority=row["priority"],
        submitter=row["submitter"],
        name=row["name"],
        source=bytes(row["source"]),
        overrides=tuple(json.loads(row["overrides"])),
        device=row["device"],
        points=row["points"],
        slot=row["slot"],
        attempts=row["attempts"],
        interruptions=row["interruptions"],
        cancel_requested=bool(row["cancel_requested"]),
        error=row["error"],
        result=json.loads(row["result"]) if row["result"] else None,
        output_dir=row["output_dir"],
        event_count=row["event_count"],
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        seq=row["seq"],
    )


__all__ = ["CANCELLED", "DONE", "FAILED", "Job", "JobStore", "MIGRATIONS", "NewJob", "QUEUED", "QueueFull", "RUNNING", "STATUSES", "TERMINAL"]
