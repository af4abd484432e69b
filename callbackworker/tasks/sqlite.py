"""``SQLiteTaskStore``: the task storage contract on one SQLite file.

DESIGN

* One connection per store, in autocommit mode, guarded by one lock: every
  method takes the lock, so threads of one process never interleave
  statements.  Other processes may open the same file; SQLite's file locks
  arbitrate between them.
* WAL journal: readers never block the writer.  ``durability="normal"``
  sets ``synchronous=NORMAL``: a committed transaction survives the process
  being killed (kill -9), but the last transactions before a power loss or
  OS crash may be rolled back (never corrupted).  ``"full"`` sets
  ``synchronous=FULL``: every commit is fsync'd, so it also survives power
  loss.
* Every write is one explicit ``BEGIN IMMEDIATE`` transaction, which takes
  the write lock up front, so two processes never deadlock upgrading a read
  lock.  ``busy_timeout`` waits for a lock inside SQLite; if the lock is
  still held, the whole transaction is rolled back and retried with
  exponential backoff, so "database is locked" never reaches a caller (past
  ``patience_s`` it raises ``StorageBusyError``).
* The schema is versioned by ``PRAGMA user_version``; ``_MIGRATIONS`` holds
  every step, each applied once, in one transaction with the version bump.
* A claim is one ``UPDATE … RETURNING`` over the oldest due pending tasks
  (SQLite ≥ 3.35).
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, TypeVar

from ..durable import CallbackRecord
from ..errors import (
    NonDeterminismError,
    StorageBusyError,
    UnknownCallbackError,
    UnknownQueueError,
)
from .storage import (
    NEVER,
    STATUSES,
    ClaimedTask,
    Outcome,
    TaskRecord,
    TaskStore,
    CALLBACK_COLUMNS,
    apply_signal,
    callback_record,
    check_signal_state,
    place_suspension,
)

__all__ = ["SQLiteTaskStore", "DURABILITY"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DURABILITY = {"normal": "NORMAL", "full": "FULL"}
"""``durability=`` values and the ``synchronous`` pragma each sets."""

_MIN_SQLITE = (3, 35, 0)
_BUSY_TIMEOUT_MS = 2000

_MIGRATIONS: List[List[str]] = [
    # 1: queues and tasks.
    [
        """CREATE TABLE queues (
               name          TEXT PRIMARY KEY,
               next_start_at INTEGER NOT NULL DEFAULT 0
           ) WITHOUT ROWID""",
        """CREATE TABLE tasks (
               seq              INTEGER PRIMARY KEY,
               id               TEXT NOT NULL UNIQUE,
               queue            TEXT NOT NULL REFERENCES queues(name),
               payload          BLOB NOT NULL,
               status           TEXT NOT NULL,
               message          TEXT NOT NULL DEFAULT '',
               attempt          INTEGER NOT NULL DEFAULT 0,
               next_run_at      INTEGER NOT NULL,
               created_at       INTEGER NOT NULL,
               finished_at      INTEGER,
               owner            TEXT,
               lease_expires_at INTEGER,
               token            TEXT
           )""",
        "CREATE INDEX tasks_due ON tasks(queue, status, next_run_at, seq)",
        "CREATE INDEX tasks_finished ON tasks(queue, finished_at) WHERE finished_at IS NOT NULL",
        "CREATE INDEX tasks_leased ON tasks(owner) WHERE status = 'running'",
    ],
    # 2: durable operation logs and callbacks; suspended tasks.
    [
        # The callback a suspended task waits for.  Kept until the replay
        # ends: a claim, or a graceful release, of a task with it set is a
        # replay of the attempt the task is in, not a new attempt.
        "ALTER TABLE tasks ADD COLUMN awaiting TEXT",
        """CREATE TABLE durable_ops (
               task_id TEXT NOT NULL,
               seq     INTEGER NOT NULL,
               kind    TEXT NOT NULL,
               name    TEXT NOT NULL,
               value   BLOB NOT NULL,
               PRIMARY KEY (task_id, seq)
           ) WITHOUT ROWID""",
        """CREATE TABLE durable_callbacks (
               id                   TEXT PRIMARY KEY,
               task_id              TEXT NOT NULL,
               name                 TEXT NOT NULL,
               state                TEXT NOT NULL DEFAULT 'pending',
               result               BLOB,
               error                TEXT,
               created_at           INTEGER NOT NULL,
               last_beat_at         INTEGER NOT NULL,
               timeout_ms           INTEGER NOT NULL,
               heartbeat_timeout_ms INTEGER NOT NULL
           ) WITHOUT ROWID""",
        "CREATE INDEX durable_callbacks_task ON durable_callbacks(task_id)",
        # Every path to a terminal status (complete, fail, recover, cancel,
        # clear) ends the task's durable state here, in its transaction.
        """CREATE TRIGGER tasks_durable_ended AFTER UPDATE OF status ON tasks
           WHEN NEW.status IN ('completed', 'failed', 'cancelled')
           BEGIN
               DELETE FROM durable_ops WHERE task_id = NEW.id;
               UPDATE durable_callbacks
                  SET state = CASE state WHEN 'pending' THEN 'closed' ELSE state END,
                      result = NULL
                WHERE task_id = NEW.id;
           END""",
        """CREATE TRIGGER tasks_durable_swept AFTER DELETE ON tasks
           BEGIN
               DELETE FROM durable_ops WHERE task_id = OLD.id;
               DELETE FROM durable_callbacks WHERE task_id = OLD.id;
           END""",
    ],
]


_SETTLE_SQL = {
    "complete": """UPDATE tasks SET status = 'completed', message = ?, finished_at = ?,
                       awaiting = NULL, owner = NULL, lease_expires_at = NULL, token = NULL
                   WHERE id = ? AND token = ? AND status = 'running'""",
    "fail": """UPDATE tasks SET status = 'failed', message = ?, finished_at = ?,
                   awaiting = NULL, owner = NULL, lease_expires_at = NULL, token = NULL
               WHERE id = ? AND token = ? AND status = 'running'""",
    "retry": """UPDATE tasks SET status = 'pending', message = ?, next_run_at = ?,
                    awaiting = NULL, owner = NULL, lease_expires_at = NULL, token = NULL
                WHERE id = ? AND token = ? AND status = 'running'""",
    "release": """UPDATE tasks SET status = 'pending', message = ?, next_run_at = ?,
                      attempt = attempt - (awaiting IS NULL), owner = NULL,
                      lease_expires_at = NULL, token = NULL
                  WHERE id = ? AND token = ? AND status = 'running'""",
    "suspend": """UPDATE tasks SET status = ?, message = ?, next_run_at = ?, awaiting = ?,
                      owner = NULL, lease_expires_at = NULL, token = NULL
                  WHERE id = ? AND token = ? AND status = 'running'""",
}


def _check_sqlite_version() -> None:
    if sqlite3.sqlite_version_info < _MIN_SQLITE:
        raise RuntimeError(
            f"callbackworker task queues need SQLite >= 3.35 (UPDATE ... RETURNING); "
            f"this Python is linked with SQLite {sqlite3.sqlite_version}")


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class SQLiteTaskStore(TaskStore):
    """The ``TaskStore`` contract on a SQLite file (``path``; ``":memory:"``
    works for one process).  ``durability`` is ``"normal"`` (survives a
    killed process) or ``"full"`` (also survives power loss); see the module
    docstring.  ``patience_s`` bounds how long a write keeps retrying while
    other processes hold the database locked."""

    def __init__(self, path: "str | os.PathLike[str]", *, durability: str = "normal",
                 patience_s: float = 60.0) -> None:
        _check_sqlite_version()
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {sorted(DURABILITY)}, not {durability!r}")
        self.path = os.fspath(path)
        self.durability = durability
        self._patience_s = patience_s
        self._lock = threading.Lock()
        self._db: Optional[sqlite3.Connection] = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False,
            timeout=_BUSY_TIMEOUT_MS / 1000)
        try:
            self._configure()
        except BaseException:
            self._db.close()
            raise

    # ---- connection and transactions -----------------------------------

    def _configure(self) -> None:
        db = self._conn()
        self._retry(lambda: db.execute("PRAGMA journal_mode=WAL").fetchone())
        db.execute(f"PRAGMA synchronous={DURABILITY[self.durability]}")
        db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        self._write(self._migrate)

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(_MIGRATIONS):
            raise RuntimeError(f"{self.path}: task schema version {version} is newer than this "
                               f"callbackworker knows ({len(_MIGRATIONS)}); upgrade callbackworker")
        for step in range(version, len(_MIGRATIONS)):
            for statement in _MIGRATIONS[step]:
                db.execute(statement)
            log.info("%s: task schema migrated to version %d", self.path, step + 1)
        if version < len(_MIGRATIONS):
            db.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the task store is closed")
        return self._db

    def _retry(self, attempt: Callable[[], T]) -> T:
        """Runs ``attempt`` (a whole transaction) until it gets past lock
        contention, backing off exponentially with jitter."""
        deadline = time.monotonic() + self._patience_s
        pause = 0.001
        while True:
            try:
                return attempt()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise StorageBusyError(
                        f"{self.path}: the database stayed locked by other connections "
                        f"for {self._patience_s:g} s") from exc
                log.debug("%s: busy (%s); retrying in %.0f ms", self.path, exc, pause * 1000)
                time.sleep(pause * (0.5 + random.random()))
                pause = min(pause * 2, 0.1)

    def _write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Runs ``body`` in one ``BEGIN IMMEDIATE`` transaction, retried as a
        whole on lock contention."""
        with self._lock:
            db = self._conn()

            def attempt() -> T:
                db.execute("BEGIN IMMEDIATE")
                try:
                    result = body(db)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
                return result

            return self._retry(attempt)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> List[Any]:
        with self._lock:
            db = self._conn()
            return self._retry(lambda: db.execute(sql, params).fetchall())

    # ---- queues --------------------------------------------------------

    def ensure_queue(self, name: str) -> None:
        self._write(lambda db: db.execute(
            "INSERT INTO queues(name) VALUES (?) ON CONFLICT(name) DO NOTHING", (name,)))

    def queues(self) -> List[str]:
        return [row[0] for row in self._read("SELECT name FROM queues ORDER BY name")]

    # ---- producing -----------------------------------------------------

    def enqueue_many(self, queue: str, tasks: Sequence["tuple[str, bytes]"], now: int) -> None:
        def body(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM queues WHERE name = ?", (queue,)).fetchone() is None:
                raise UnknownQueueError(queue)
            db.executemany(
                "INSERT INTO tasks(id, queue, payload, status, next_run_at, created_at) "
                "VALUES (?, ?, ?, 'pending', ?, ?)",
                [(task_id, queue, payload, now, now) for task_id, payload in tasks])

        self._write(body)

    # ---- consuming -----------------------------------------------------

    def claim(self, queue: str, *, owner: str, limit: int, now: int, lease_ms: int,
              delay_ms: int = 0) -> List[ClaimedTask]:
        if limit <= 0:
            return []
        token = uuid.uuid4().hex  # unique per claim; a task appears once in a claim

        def body(db: sqlite3.Connection) -> List[ClaimedTask]:
            n = limit
            if delay_ms > 0:
                row = db.execute("SELECT next_start_at FROM queues WHERE name = ?",
                                 (queue,)).fetchone()
                if row is None or row[0] > now:
                    return []
                n = 1
            rows = db.execute(
                """UPDATE tasks SET status = 'running', attempt = attempt + (awaiting IS NULL),
                       owner = ?, lease_expires_at = ?, token = ?
                   WHERE seq IN (SELECT seq FROM tasks
                                 WHERE queue = ? AND status IN ('pending', 'suspended')
                                       AND next_run_at <= ?
                                 ORDER BY next_run_at, seq LIMIT ?)
                   RETURNING next_run_at, seq, id, payload, attempt""",
                (owner, now + lease_ms, token, queue, now, n)).fetchall()
            if rows and delay_ms > 0:
                db.execute("UPDATE queues SET next_start_at = ? WHERE name = ?",
                           (now + delay_ms, queue))
            rows.sort(key=lambda r: (r[0], r[1]))
            return [ClaimedTask(r[2], bytes(r[3]), r[4], token) for r in rows]

        return self._write(body)

    def settle(self, outcomes: Sequence[Outcome]) -> List[bool]:
        for o in outcomes:
            if o.kind not in _SETTLE_SQL:
                raise ValueError(f"unknown outcome kind {o.kind!r}; expected one of "
                                 f"{Outcome.KINDS}")

        def body(db: sqlite3.Connection) -> List[bool]:
            return [db.execute(_SETTLE_SQL[o.kind], self._settle_params(db, o)).rowcount == 1
                    for o in outcomes]

        return self._write(body) if outcomes else []

    def _settle_params(self, db: sqlite3.Connection, o: Outcome) -> Sequence[Any]:
        if o.kind != "suspend":
            return (o.message, o.at, o.task_id, o.token)
        row = db.execute(f"SELECT {CALLBACK_COLUMNS} FROM durable_callbacks WHERE id = ?",
                         (o.awaiting,)).fetchone()
        status, due = place_suspension(None if row is None else callback_record(row), o.at)
        return (status, o.message, due, o.awaiting, o.task_id, o.token)

    # ---- leases --------------------------------------------------------

    def renew_leases(self, owner: str, expires_at: int) -> int:
        return self._write(lambda db: db.execute(
            "UPDATE tasks SET lease_expires_at = ? WHERE owner = ? AND status = 'running'",
            (expires_at, owner)).rowcount)

    def running_owners(self, queue: str) -> List[str]:
        return [row[0] for row in self._read(
            "SELECT DISTINCT owner FROM tasks WHERE queue = ? AND status = 'running' "
            "ORDER BY owner", (queue,))]

    def recover(self, queue: str, *, now: int, max_attempts: int,
                owners: Iterable[str] = ()) -> int:
        dead = sorted(set(owners))
        marks = ",".join("?" * len(dead))
        lost = (f"status = 'running' AND queue = ? AND "
                f"(lease_expires_at <= ? OR owner IN ({marks}))")
        params = (queue, now, *dead)

        def body(db: sqlite3.Connection) -> int:
            failed = db.execute(
                f"""UPDATE tasks SET status = 'failed', finished_at = ?,
                        message = 'worker lost during attempt ' || attempt
                                  || ' (lease expired); no attempts left',
                        awaiting = NULL, owner = NULL, lease_expires_at = NULL, token = NULL
                    WHERE {lost} AND attempt >= ?""", (now, *params, max_attempts)).rowcount
            retried = db.execute(
                f"""UPDATE tasks SET status = 'pending', next_run_at = ?,
                        message = 'worker lost during attempt ' || attempt || '; retrying',
                        awaiting = NULL, owner = NULL, lease_expires_at = NULL, token = NULL
                    WHERE {lost}""", (now, *params)).rowcount
            return int(failed + retried)

        return self._write(body)

    # ---- management ----------------------------------------------------

    def get(self, task_id: str) -> Optional[TaskRecord]:
        rows = self._read(
            "SELECT id, queue, status, message, attempt, next_run_at, finished_at, owner, "
            "lease_expires_at FROM tasks WHERE id = ?", (task_id,))
        return TaskRecord(*rows[0]) if rows else None

    def cancel(self, task_id: str, now: int) -> Optional[str]:
        def body(db: sqlite3.Connection) -> Optional[str]:
            row = db.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                return None
            if row[0] in ("pending", "suspended"):
                db.execute("UPDATE tasks SET status = 'cancelled', finished_at = ?, "
                           "awaiting = NULL WHERE id = ?", (now, task_id))
            return str(row[0])

        return self._write(body)

    def clear(self, queue: str, now: int) -> int:
        return self._write(lambda db: db.execute(
            "UPDATE tasks SET status = 'cancelled', finished_at = ?, awaiting = NULL "
            "WHERE queue = ? AND status IN ('pending', 'suspended')", (now, queue)).rowcount)

    def counts(self) -> Dict[str, Dict[str, int]]:
        table: Dict[str, Dict[str, int]] = {name: dict.fromkeys(STATUSES, 0)
                                            for name in self.queues()}
        for queue, status, n in self._read(
                "SELECT queue, status, count(*) FROM tasks GROUP BY queue, status"):
            table.setdefault(queue, dict.fromkeys(STATUSES, 0))[status] = n
        return table

    def next_due(self, queue: str) -> Optional[int]:
        rows = self._read(
            """SELECT (SELECT min(next_run_at) FROM tasks
                       WHERE queue = ?1 AND status IN ('pending', 'suspended')
                             AND next_run_at < ?2),
                      (SELECT next_start_at FROM queues WHERE name = ?1)""", (queue, NEVER))
        due, next_start = rows[0]
        if due is None:
            return None
        return max(due, next_start or 0)

    def sweep(self, queue: str, finished_before: int) -> int:
        return self._write(lambda db: db.execute(
            "DELETE FROM tasks WHERE queue = ? AND finished_at < ? "
            "AND status IN ('completed', 'failed', 'cancelled')",
            (queue, finished_before)).rowcount)

    # ---- durable operation logs and callbacks ---------------------------

    def durable_ops(self, task_id: str) -> List["tuple[str, str, bytes]"]:
        return [(kind, name, bytes(value)) for kind, name, value in self._read(
            "SELECT kind, name, value FROM durable_ops WHERE task_id = ? ORDER BY seq",
            (task_id,))]

    def durable_record(self, task_id: str, seq: int, kind: str, name: str,
                       value: bytes) -> None:
        def body(db: sqlite3.Connection) -> None:
            try:
                db.execute("INSERT INTO durable_ops(task_id, seq, kind, name, value) "
                           "VALUES (?, ?, ?, ?, ?)", (task_id, seq, kind, name, value))
            except sqlite3.IntegrityError:
                raise NonDeterminismError(
                    f"operation {seq + 1} of task {task_id} was recorded twice (did two runs "
                    f"of the task overlap?)") from None

        self._write(body)

    def durable_add_callback(self, record: CallbackRecord) -> None:
        self._write(lambda db: db.execute(
            f"INSERT INTO durable_callbacks({CALLBACK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.callback_id, record.owner, record.name, record.created_ms, record.timeout_ms,
             record.heartbeat_timeout_ms, record.state, record.result, record.error,
             record.last_beat_ms)))

    def durable_callback(self, callback_id: str) -> Optional[CallbackRecord]:
        rows = self._read(f"SELECT {CALLBACK_COLUMNS} FROM durable_callbacks WHERE id = ?",
                          (callback_id,))
        return callback_record(rows[0]) if rows else None

    def durable_signal(self, callback_id: str, state: str, result: Optional[bytes],
                       error: Optional[str], now: int) -> CallbackRecord:
        check_signal_state(state)

        def body(db: sqlite3.Connection) -> CallbackRecord:
            row = db.execute(f"SELECT {CALLBACK_COLUMNS} FROM durable_callbacks WHERE id = ?",
                             (callback_id,)).fetchone()
            if row is None:
                raise UnknownCallbackError(callback_id)
            record = callback_record(row)
            due = apply_signal(record, state, result, error, now)
            if due is not None:  # a heartbeat
                db.execute("UPDATE durable_callbacks SET last_beat_at = ? WHERE id = ?",
                           (now, callback_id))
                db.execute("UPDATE tasks SET next_run_at = ? WHERE id = ? "
                           "AND status = 'suspended' AND awaiting = ?",
                           (due, record.owner, callback_id))
                return record
            db.execute("UPDATE durable_callbacks SET state = ?, result = ?, error = ? "
                       "WHERE id = ?", (state, result, error, callback_id))
            db.execute("UPDATE tasks SET status = 'pending', next_run_at = ? "
                       "WHERE id = ? AND status = 'suspended' AND awaiting = ?",
                       (now, record.owner, callback_id))
            return record

        return self._write(body)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __repr__(self) -> str:
        return f"<SQLiteTaskStore {self.path!r} durability={self.durability}>"
