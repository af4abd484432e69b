"""``SQLiteTaskStore``: the task storage contract on one SQLite file.

DESIGN

* One connection per store, in autocommit mode, guarded by one lock: every
  attempt of a method's transaction takes the lock, so threads of one
  process never interleave statements; the pauses between retried attempts
  hold no lock.  Other processes may open the same file; SQLite's file
  locks arbitrate between them.
* WAL journal: readers never block the writer.  ``durability="normal"``
  sets ``synchronous=NORMAL``: a committed transaction survives the process
  being killed (kill -9), but the last transactions before a power loss or
  OS crash may be rolled back (never corrupted).  ``"full"`` sets
  ``synchronous=FULL``: every commit is fsync'd, so it also survives power
  loss.
* Every write is one explicit ``BEGIN IMMEDIATE`` transaction, which takes
  the write lock up front, so two processes never deadlock upgrading a read
  lock; or, where one statement does it all (enqueuing one task), that
  statement on its own, which takes the write lock as it starts.
  ``busy_timeout`` waits for a lock inside SQLite; if the lock is still
  held, the whole transaction is rolled back and retried with
  exponential backoff by the loop both stores share
  (``SQLTaskStore._retry``), so "database is locked" never reaches a
  caller (past ``patience_s`` it raises ``StorageBusyError``).  Under
  ``bounded_patience`` the wait for the store's lock and ``busy_timeout``
  are cut to the time left, so a bounded call (an HTTP request) ends with
  its bound even when queued behind this process's other calls.
* What this store runs like the PostgreSQL one comes from
  ``sql.SQLTaskStore`` (statements kept by name, rendered in this store's
  ``_DIALECT``); its own are the per-kind settle statements, the batch
  enqueue, the claim and the renewal of listed leases.  Named parameters are always bound from a
  mapping, positional ones only to ``?``.
* A durable row (an operation, a callback) of a task that does not exist
  is refused with ``UnknownTaskError``, as on PostgreSQL, where a foreign
  key does it: here the insert adds a row only if the task exists.
* The schema is versioned by ``PRAGMA user_version``; ``_MIGRATIONS`` holds
  every step, each applied once, in one transaction with the version bump.
  Opening reads the version first and takes the write lock only when a
  migration is due, so a store on a current file never waits for writers
  before its first read;
  ``schema.py`` describes the result (the tests check one against the
  other).
* Batches in a fixed number of steps.  Python's sqlite3 gives up the
  interpreter lock around every step of a statement (every row bound or
  read), and each time waits to take it back, up to the switch interval
  beside a busy Python thread, with the store's lock held.  So a batch
  enqueue, a claim, a settle of starts or completions and a renewal of
  listed leases are each a few statements over JSON arrays (``json_each``),
  not a row each; bytes travel as one blob beside the JSON.  A claim reads
  the oldest due tasks as one aggregated row and marks them with one
  ``UPDATE``, in one transaction.  Where SQLite lacks the JSON functions
  (``_has_json``; built in since 3.38) the row-by-row statements run: an
  ``executemany`` enqueue and the shared ``UPDATE … RETURNING`` claim
  (SQLite ≥ 3.35).
* Wake-ups.  After a commit that adds due work (an enqueue, a signal, a
  retry, a release, a recovery) or finishes tasks, the store tells the
  other processes on the file through its ``WakeChannel`` (UNIX datagram
  sockets in ``<file>.wake/``, ``wakeups.py``); ``set_waker`` and
  ``watch_finished`` listen there.  Where the channel cannot exist
  (``:memory:``, a path too long for a socket address) they do nothing and
  polling finds the work.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Set, TypeVar)

from ..errors import StorageBusyError, UnknownQueueError
from .schema import SCHEMA_VERSION
from .sql import Dialect, SQLTaskStore, TransientError, patience_left
from .storage import Outcome, Waker, callback_record, place_suspension
from .wakeups import FINISHED, WORK, WakeChannel

__all__ = ["SQLiteTaskStore", "DURABILITY"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DURABILITY = {"normal": "NORMAL", "full": "FULL"}
"""``durability=`` values and the ``synchronous`` pragma each sets."""

_MIN_SQLITE = (3, 35, 0)
_BUSY_TIMEOUT_MS = 2000

# Who is recovered as known dead: expanded per call (SQLite has no arrays).
_DEAD_OWNERS = "owner IN (:dead_owners)"

# The counts per queue and status, each status read from the index of its
# phase (migration 8) alone, finished tasks by their ``finished_at``; a
# queue without tasks has a row of its own.
_COUNTS = """
    SELECT name, NULL, 0 FROM {queues}
    UNION ALL SELECT queue, status, count(*) FROM {tasks} WHERE status IN {WAITING}
              GROUP BY queue, status
    UNION ALL SELECT queue, {RUNNING}, count(*) FROM {tasks} WHERE status = {RUNNING}
              GROUP BY queue
    UNION ALL SELECT queue, status, count(*) FROM {tasks} WHERE finished_at IS NOT NULL
              GROUP BY queue, status"""

_DIALECT = Dialect(dead_owners=_DEAD_OWNERS, extra={"counts": _COUNTS})

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
        f"""CREATE TRIGGER tasks_durable_ended AFTER UPDATE OF status ON tasks
           WHEN NEW.status IN ('completed', 'failed', 'cancelled')
           BEGIN {_DIALECT.sql("end_durable_state")}
           END""",
        """CREATE TRIGGER tasks_durable_swept AFTER DELETE ON tasks
           BEGIN
               DELETE FROM durable_ops WHERE task_id = OLD.id;
               DELETE FROM durable_callbacks WHERE task_id = OLD.id;
           END""",
    ],
    # 3: tasks as functions: name, arguments, result, traceback, progress,
    # priority and deduplication.
    [
        "ALTER TABLE queues ADD COLUMN config TEXT",
        "ALTER TABLE tasks ADD COLUMN name TEXT",
        "ALTER TABLE tasks ADD COLUMN args TEXT",
        "ALTER TABLE tasks ADD COLUMN result TEXT",
        "ALTER TABLE tasks ADD COLUMN traceback TEXT",
        "ALTER TABLE tasks ADD COLUMN progress TEXT",
        "ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN dedup_key TEXT",
        # The claim reads due tasks in its own order from here and stops
        # after ``limit`` of them; the query repeats the predicate word for
        # word, which is how SQLite knows the partial index applies.
        "CREATE INDEX tasks_claim ON tasks(queue, priority DESC, next_run_at, seq) "
        "WHERE status IN ('pending', 'suspended')",
        "CREATE UNIQUE INDEX tasks_dedup ON tasks(queue, dedup_key) "
        "WHERE dedup_key IS NOT NULL AND status IN ('pending', 'running', 'suspended')",
    ],
    # 4: periodic schedules.
    [
        """CREATE TABLE schedules (
               name        TEXT PRIMARY KEY,
               spec        TEXT NOT NULL,
               queue       TEXT NOT NULL,
               task        TEXT NOT NULL,
               last_tick   INTEGER NOT NULL,
               next_run_at INTEGER NOT NULL,
               updated_at  INTEGER NOT NULL
           ) WITHOUT ROWID""",
    ],
    # 5: attempts counted when their run starts, not at claim.
    [
        "ALTER TABLE tasks ADD COLUMN started_at INTEGER",
    ],
    # 6: listing tasks newest first by queue, task name, or failed tasks
    # (the listing names the status as a literal, so the partial index
    # applies).
    [
        "CREATE INDEX tasks_by_queue ON tasks(queue, seq)",
        "CREATE INDEX tasks_by_name ON tasks(name, seq) WHERE name IS NOT NULL",
        "CREATE INDEX tasks_failed ON tasks(seq) WHERE status = 'failed'",
        "CREATE INDEX tasks_failed_by_queue ON tasks(queue, seq) WHERE status = 'failed'",
    ],
    # 7: a task whose claim was lost before its run's start was recorded
    # records the start of its later runs before their handlers run.
    [
        "ALTER TABLE tasks ADD COLUMN confirm_start INTEGER NOT NULL DEFAULT 0",
    ],
    # 8: durable state is ended only for the tasks that have some.  The
    # first row of a task's log or callbacks marks the task ``durable``
    # (the insert's trigger, in its transaction); the trigger that ends
    # the state runs for marked tasks only, and only on the statements
    # that finish a task: each sets ``finished_at`` with the terminal
    # status (as the finished-tasks index and the sweep need), while a
    # claim or a start, which set the status or nothing of it, no longer
    # run a trigger program for every row.
    [
        "ALTER TABLE tasks ADD COLUMN durable INTEGER NOT NULL DEFAULT 0",
        "UPDATE tasks SET durable = 1 WHERE id IN (SELECT task_id FROM durable_ops "
        "UNION SELECT task_id FROM durable_callbacks)",
        *(f"""CREATE TRIGGER {table}_marked AFTER INSERT ON {table}
              BEGIN UPDATE tasks SET durable = 1 WHERE id = NEW.task_id AND durable = 0;
              END""" for table in ("durable_ops", "durable_callbacks")),
        "DROP TRIGGER tasks_durable_ended",
        f"""CREATE TRIGGER tasks_durable_ended AFTER UPDATE OF finished_at ON tasks
           WHEN NEW.durable = 1 AND NEW.status IN ('completed', 'failed', 'cancelled')
           BEGIN {_DIALECT.sql("end_durable_state")}
           END""",
        # One index per phase of a task's life instead of one over every
        # status: a claim changes two index entries less and a settle
        # three less.  Each answers what the old ones did, by the statuses
        # it holds: waiting tasks (next_due, clear), running ones (recover,
        # running owners, lease renewal by owner: running tasks are few),
        # finished ones (the sweep); the counts read all three.  Finished
        # tasks are told by ``finished_at``, which is set exactly while a
        # task is in a terminal status: a predicate on the status would
        # make every claim and insert evaluate it for this index too.
        "DROP INDEX tasks_due",
        "DROP INDEX tasks_leased",
        "DROP INDEX tasks_finished",
        "CREATE INDEX tasks_waiting ON tasks(queue, status, next_run_at) "
        "WHERE status IN ('pending', 'suspended')",
        "CREATE INDEX tasks_running ON tasks(queue, status, owner) WHERE status = 'running'",
        "CREATE INDEX tasks_finished ON tasks(queue, status, finished_at) "
        "WHERE finished_at IS NOT NULL",
    ],
]


_BULK_KINDS = ("start", "complete")
"""Outcome kinds a group commit writes with one statement each, as long as
every row applies."""


class _NotAllApplied(Exception):
    """A bulk write matched fewer rows than it had: the group commit is
    rolled back and written one outcome at a time, to tell which."""


_FINISHING = frozenset({"complete", "fail"})
_REQUEUEING = frozenset({"retry", "release", "suspend"})

_QUEUE_EXISTS = _DIALECT.render("SELECT 1 FROM {queues} WHERE name = ?")
_ENQUEUE = _DIALECT.render("INSERT INTO {tasks}(id, queue, payload, status, next_run_at, "
                           "created_at) VALUES (?, ?, ?, {PENDING}, ?, ?)")
_ENQUEUE_ONE = _DIALECT.render("INSERT INTO {tasks}(id, queue, payload, status, next_run_at, "
                               "created_at) SELECT ?, name, ?, {PENDING}, ?, ? "
                               "FROM {queues} WHERE name = ?")

# One statement per outcome kind; each applies only while the task runs
# under the outcome's token.  A start counts the attempt (not a replay's);
# an outcome whose start was never recorded counts it itself.  A release
# gives back the attempt its start counted (the handler never ran).
_COUNTED = "attempt = attempt + (started_at IS NULL AND awaiting IS NULL)"
_LEASE_ENDS = "owner = NULL, lease_expires_at = NULL, token = NULL"
_CHANGES = {
    "start": f"{_COUNTED}, started_at = ?, lease_expires_at = coalesce(?, lease_expires_at)",
    "complete": f"status = {{COMPLETED}}, message = ?, result = ?, finished_at = ?, "
                f"awaiting = NULL, {_COUNTED}, {_LEASE_ENDS}",
    "fail": f"status = {{FAILED}}, message = ?, traceback = ?, finished_at = ?, "
            f"awaiting = NULL, {_COUNTED}, {_LEASE_ENDS}",
    "retry": f"status = {{PENDING}}, message = ?, traceback = ?, next_run_at = ?, "
             f"awaiting = NULL, {_COUNTED}, {_LEASE_ENDS}",
    "release": f"status = {{PENDING}}, message = ?, next_run_at = ?, started_at = NULL, "
               f"attempt = attempt - (started_at IS NOT NULL AND awaiting IS NULL), "
               f"{_LEASE_ENDS}",
    "suspend": f"status = ?, message = ?, next_run_at = ?, awaiting = ?, {_COUNTED}, "
               f"{_LEASE_ENDS}",
}
"""What each outcome kind sets; its ``?`` are bound from the start of the
kind's parameters (``_settle_params``), which end with the task's id and
the outcome's token."""

_SETTLE_SQL = {kind: _DIALECT.render(f"UPDATE {{tasks}} SET {change} "
                                     f"WHERE id = ? AND token = ? AND status = {{RUNNING}}")
               for kind, change in _CHANGES.items()}


def _bulk_settle(change: str) -> str:
    """One statement that applies ``change`` to every task of a JSON array
    (the ``:batch`` parameter) of the kind's parameter lists, each only
    while its task runs under its token: the values are joined in as
    ``o.p0``, ``o.p1``, ..., the id and token last.  Like PostgreSQL's
    batches, it is one statement over one parameter made by ``json.dumps``
    in C; against an ``executemany`` row each, a settle of 1000 costs a
    fifth less per task (``benchmarks/task_sql.py``)."""
    n = change.count("?") + 2
    values = ", ".join(f"json_extract(value, '$[{i}]') AS p{i}" for i in range(n))
    for i in range(n - 2):
        change = change.replace("?", f"o.p{i}", 1)
    return _DIALECT.render(
        f"UPDATE {{tasks}} SET {change} FROM (SELECT {values} FROM json_each(:batch)) AS o "
        f"WHERE {{tasks}}.id = o.p{n - 2} AND {{tasks}}.token = o.p{n - 1} "
        f"AND {{tasks}}.status = {{RUNNING}}")


_BULK_SQL = {kind: _bulk_settle(_CHANGES[kind]) for kind in _BULK_KINDS}

_BULK_MIN = 8
"""Fewer rows of a kind than this go by ``executemany`` instead: the
joined statement costs more to start (a settle of one row, 8 us more)."""


# ---- batches in a fixed number of steps (see the module notes) -------------

_ENQUEUE_JSON = _DIALECT.render(
    "INSERT INTO {tasks}(id, queue, payload, status, next_run_at, created_at) "
    "SELECT json_extract(value, '$[0]'), :queue, "
    # substr of an empty blob is NULL: an empty payload stays an empty blob
    "coalesce(substr(:payloads, json_extract(value, '$[1]'), json_extract(value, '$[2]')), "
    "x''), {PENDING}, :now, :now FROM json_each(:batch)")
"""A batch of tasks, each ``[id, offset (from 1), length]`` of its payload
in ``:payloads``, the payloads joined; inserted in the batch's order."""

_CHUNK_BYTES = 64 << 20
"""At most this many payload bytes per enqueue statement (or the
connection's length limit, if lower): a larger batch is several statements
in one transaction.  Each statement binds its payloads as one blob, which
SQLite copies."""

_INLINE_BYTES = 64 << 10
"""A claimed task whose payload and arguments are larger than this is read
by a statement of its own, a step, instead of inline with the claim's
other tasks; lowered for a claim of many tasks, so that what the claim
reads inline stays within ``_CHUNK_BYTES`` (and an eighth of the length
limit: JSON may escape arguments sixfold).  Joining costs more per byte
than reading a row: alone, 3 us a task instead of 2 at 1 KiB, 136 instead
of 45 at 64 KiB; but less than one wait for the interpreter lock (up to 5
ms)."""

# The claim reads the due tasks in claim order (the ``tasks_claim`` index,
# its predicate repeated word for word) as one row: a JSON array of the
# tasks and their inline payloads joined in one blob, both aggregates
# taking the rows in the same order.  ``big`` tasks (``_INLINE_BYTES``)
# leave payload and arguments to ``_CLAIM_BIG``.
_CLAIM_READ = _DIALECT.render("""
    SELECT json_group_array(json_array(priority, next_run_at, seq, id, length(payload),
                                       attempt + (awaiting IS NULL), name,
                                       CASE WHEN big THEN NULL ELSE args END,
                                       confirm_start, big)),
           CAST(group_concat(CASE WHEN big THEN NULL ELSE payload END, '') AS BLOB)
    FROM (SELECT priority, next_run_at, seq, id, payload, attempt, awaiting, name, args,
                 confirm_start, length(payload) + coalesce(length(args), 0) > :inline AS big
          FROM {tasks}
          WHERE queue = :queue AND status IN {WAITING} AND next_run_at <= :now
          ORDER BY priority DESC, next_run_at, seq LIMIT :limit)""")
_CLAIM_BIG = _DIALECT.render(
    "SELECT seq, payload, args FROM {tasks} WHERE seq IN (SELECT value FROM json_each(:seqs))")
_CLAIM_MARK = _DIALECT.render(
    "UPDATE {tasks} SET status = {RUNNING}, started_at = NULL, owner = :owner, "
    "lease_expires_at = :expires, token = :token "
    "WHERE seq IN (SELECT value FROM json_each(:seqs))")
_RENEW_LISTED = _DIALECT.render(
    "UPDATE {tasks} SET lease_expires_at = :expires "
    "WHERE id IN (SELECT value FROM json_each(:ids)) AND owner = :owner "
    "AND status = {RUNNING}")


def _length_limit(db: sqlite3.Connection) -> int:
    """The longest string or blob ``db`` takes (``SQLITE_LIMIT_LENGTH``)."""
    getlimit = getattr(db, "getlimit", None)  # Python >= 3.11
    if getlimit is None:
        return 1_000_000_000  # SQLite's default
    return int(getlimit(sqlite3.SQLITE_LIMIT_LENGTH))


def _enqueue_chunks(tasks: Sequence["tuple[str, bytes]"],
                    limit: int) -> Iterator["tuple[str, bytes]"]:
    """``tasks`` as ``(batch, payloads)`` parameters of ``_ENQUEUE_JSON``,
    in order, each within ``limit`` bytes of payloads and of JSON (a
    payload longer than that on its own, which SQLite refuses)."""
    rows: List[Any] = []
    payloads: List[bytes] = []
    size = text = 0
    for task_id, payload in tasks:
        n = len(payload)
        row_text = 6 * len(task_id) + 32  # the row's JSON at worst (every id character escaped)
        if rows and (size + n > limit or text + row_text > limit):
            yield _enqueue_params(rows, payloads)
            rows, payloads, size, text = [], [], 0, 0
        rows.append((task_id, size + 1, n))
        payloads.append(payload)
        size += n
        text += row_text
    if rows:
        yield _enqueue_params(rows, payloads)


def _enqueue_params(rows: List[Any], payloads: List[bytes]) -> "tuple[str, bytes]":
    # ensure_ascii=False: an id that SQLite cannot take (a lone surrogate)
    # fails to bind here, as a row's would.
    return json.dumps(rows, ensure_ascii=False), b"".join(payloads)


def _check_sqlite_version() -> None:
    if sqlite3.sqlite_version_info < _MIN_SQLITE:
        raise RuntimeError(
            f"callbackworker task queues need SQLite >= 3.35 (UPDATE ... RETURNING); "
            f"this Python is linked with SQLite {sqlite3.sqlite_version}")


@functools.lru_cache(maxsize=None)
def _has_json() -> bool:
    """Whether this Python's SQLite has ``json_each`` (built in since 3.38,
    an option before): without it, batches go row by row."""
    db = sqlite3.connect(":memory:")
    try:
        db.execute("SELECT value FROM json_each('[1]')").fetchall()
    except sqlite3.OperationalError:
        return False
    finally:
        db.close()
    return True


def _apply_joined(db: sqlite3.Connection, kind: str, rows: List[Sequence[Any]]) -> Optional[int]:
    """How many of ``rows`` (a kind's parameter lists) the kind's joined
    statement applied, or None where it cannot take them and they must go
    by ``executemany``: no ``json_each`` in this SQLite, a NUL character
    in some text (``json_extract`` ends the text there; the test also
    sends text with a backslash before ``u0000`` row by row, which costs
    only time), or a batch longer than SQLite takes as one value
    (``SQLITE_MAX_LENGTH``, 10^9 bytes by default: a thousand results of
    1 MiB), though each row fits."""
    if not _has_json():
        return None
    # ensure_ascii=False: text that SQLite cannot take (a lone surrogate)
    # fails to bind here, as a row's would.
    batch = json.dumps(rows, ensure_ascii=False)
    if "\\u0000" in batch:
        return None
    try:
        return int(db.execute(_BULK_SQL[kind], {"batch": batch}).rowcount)
    except sqlite3.DataError:  # too big to bind: nothing ran
        return None


def _is_busy(exc: BaseException) -> bool:
    """True for the lock contention that another attempt may get past."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _create_private(path: str) -> None:
    """Creates a new database file readable by its owner only (0600), not
    as the umask says: it holds callback ids, which are capabilities, and
    payloads.  SQLite gives the -wal and -shm files the database file's
    mode.  An existing file is left as it is."""
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except (FileExistsError, IsADirectoryError):
        return  # opening it says what is wrong, if anything
    except OSError:
        return  # e.g. a missing directory: sqlite3 reports it when opening
    os.close(fd)


class SQLiteTaskStore(SQLTaskStore):
    """The ``TaskStore`` contract on a SQLite file (``path``; ``":memory:"``
    works for one process).  ``durability`` is ``"normal"`` (survives a
    killed process) or ``"full"`` (also survives power loss); see the module
    docstring.  ``patience_s`` bounds how long a write keeps retrying while
    other processes hold the database locked."""

    dialect = _DIALECT
    unique_violation = (sqlite3.IntegrityError,)

    def __init__(self, path: "str | os.PathLike[str]", *, durability: str = "normal",
                 patience_s: float = 60.0) -> None:
        _check_sqlite_version()
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {sorted(DURABILITY)}, not {durability!r}")
        self.path = os.fspath(path)
        self.durability = durability
        self._patience_s = patience_s
        # SQLite's own wait for a file lock, within one attempt: never
        # longer than the patience, which it would otherwise overrun.
        self._busy_ms = max(1, int(min(_BUSY_TIMEOUT_MS, patience_s * 1000)))
        self._lock = threading.Lock()
        _create_private(self.path)
        self._waker: Optional[Waker] = None
        self._on_finished: Optional[Callable[[], None]] = None
        self._wake = WakeChannel.open(self.path)
        self._joins_blobs = False  # set by _configure
        self._db: Optional[sqlite3.Connection] = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False,
            timeout=self._busy_ms / 1000)
        try:
            self._configure()
        except BaseException:
            self._db.close()
            if self._wake is not None:
                self._wake.close()
            raise

    # ---- connection and transactions -----------------------------------

    def _configure(self) -> None:
        db = self._conn()
        self._retry(lambda: self._attempt(lambda: db.execute("PRAGMA journal_mode=WAL")
                                          .fetchone()))
        db.execute(f"PRAGMA synchronous={DURABILITY[self.durability]}")
        db.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        # Reading the version takes no write lock: a database already at
        # this version opens without waiting for writers (the commands and
        # pages that only read); the lock is taken only to migrate.
        if self._retry(lambda: self._attempt(lambda: self._schema_version(db))) != SCHEMA_VERSION:
            self._atomic(self._migrate)
        # group_concat joins blobs as text: byte for byte in UTF-8 only
        encoding = self._retry(lambda: self._attempt(
            lambda: db.execute("PRAGMA encoding").fetchone()[0]))
        self._joins_blobs = _has_json() and encoding == "UTF-8"

    def _schema_version(self, db: sqlite3.Connection) -> int:
        """The file's schema version; a ``RuntimeError`` if it is newer than
        this callbackworker knows."""
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: task schema version {version} is newer than this "
                               f"callbackworker knows ({SCHEMA_VERSION}); upgrade callbackworker")
        return version

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = self._schema_version(db)  # again, under the lock: another may have migrated
        for step in range(version, SCHEMA_VERSION):
            for statement in _MIGRATIONS[step]:
                db.execute(statement)
        if version < SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            log.info("%s: task schema %s version %d", self.path,
                     f"migrated from version {version} to" if version else "created at",
                     SCHEMA_VERSION)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the task store is closed")
        return self._db

    @staticmethod
    def _attempt(body: Callable[[], T]) -> T:
        """One try of ``body``; lock contention asks ``_retry`` for another."""
        try:
            return body()
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise TransientError() from exc
            raise

    def _busy_message(self, exc: BaseException, waited_s: float) -> str:
        return (f"{self.path}: the database stayed locked by other connections "
                f"for {round(waited_s, 1):g} s")

    def _atomic(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Runs ``body`` in one ``BEGIN IMMEDIATE`` transaction, retried as a
        whole on lock contention."""
        def transaction(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = body(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return result

        return self._locked(transaction)

    _single = _atomic

    def _query(self, sql: str, params: Mapping[str, Any]) -> List[Any]:
        return self._locked(lambda db: db.execute(sql, params).fetchall())

    def _locked(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """``body`` on the connection through ``_retry``, the store's lock held
        for each attempt only, so the retry loop's pauses leave the
        connection to this process's other calls.  Under
        ``bounded_patience`` the wait for the lock and SQLite's own wait for
        a file lock (``busy_timeout``) both end with the bound: a call
        queued behind others gives up with ``StorageBusyError`` when its
        bound runs out, never when theirs do."""
        bound = patience_left()
        if bound is None:
            def attempt() -> T:
                with self._lock:
                    return self._attempt(lambda: body(self._conn()))
            return self._retry(attempt)

        def bounded_attempt() -> T:
            if not self._lock.acquire(timeout=patience_left() or 0.0):
                raise StorageBusyError(
                    f"{self.path}: the store stayed busy with this process's other calls for "
                    f"{round(min(bound, self._patience_s), 1):g} s")
            try:
                return self._attempt(lambda: self._within_bound(body))
            finally:
                self._lock.release()
        return self._retry(bounded_attempt)

    def _within_bound(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """``body`` with SQLite's wait for a file lock cut to the time left
        under ``bounded_patience`` (the caller holds the store's lock)."""
        db = self._conn()
        wait_ms = min(self._busy_ms, int((patience_left() or 0.0) * 1000))
        db.execute(f"PRAGMA busy_timeout={wait_ms}")
        try:
            return body(db)
        finally:
            db.execute(f"PRAGMA busy_timeout={self._busy_ms}")

    # ---- producing -----------------------------------------------------

    def enqueue_many(self, queue: str, tasks: Sequence["tuple[str, bytes]"], now: int) -> None:
        """See ``TaskStore.enqueue_many``.  One task is one statement that
        finds the queue itself and commits on its own; more are inserted
        after one look at the queue, in one transaction (finding the queue
        per row would cost more than the statement it saves): one
        ``_ENQUEUE_JSON`` per ``_CHUNK_BYTES`` of payloads, or, without
        SQLite's JSON functions, an ``executemany`` of a row each."""
        def body(db: sqlite3.Connection) -> None:
            if db.execute(_QUEUE_EXISTS, (queue,)).fetchone() is None:
                raise UnknownQueueError(queue)
            if not _has_json():
                db.executemany(_ENQUEUE, [(task_id, queue, payload, now, now)
                                          for task_id, payload in tasks])
                return
            limit = min(_CHUNK_BYTES, _length_limit(db))
            for batch, payloads in _enqueue_chunks(tasks, limit):
                db.execute(_ENQUEUE_JSON, {"queue": queue, "now": now, "batch": batch,
                                           "payloads": payloads})

        if len(tasks) == 1:
            (task_id, payload), = tasks
            params = (task_id, payload, now, now, queue)
            if not self._locked(lambda db: db.execute(_ENQUEUE_ONE, params).rowcount):
                raise UnknownQueueError(queue)
        else:
            self._atomic(body)
        self._wake_others(WORK + queue.encode("utf-8", "surrogatepass"))

    # ---- consuming -----------------------------------------------------

    def _claim_rows(self, params: Mapping[str, Any], spaced: bool) -> List[Any]:
        """See ``SQLTaskStore._claim_rows``.  One ``BEGIN IMMEDIATE``
        transaction reads the due tasks in claim order as one row
        (``_CLAIM_READ``) and marks them claimed with one ``UPDATE``; a task
        larger than ``_INLINE_BYTES`` costs a row of its own; ``spaced``,
        the transaction first reads the queue's next allowed start and
        then moves it on.  Without SQLite's JSON functions, or in a file
        whose text is not UTF-8 (which would make the joined payloads text
        of another encoding), or where the one row would be longer than
        SQLite's length limit, the shared ``UPDATE ... RETURNING``."""
        if not self._joins_blobs:
            return super()._claim_rows(params, spaced)
        now, limit = params["now"], params["limit"]

        def body(db: sqlite3.Connection) -> List[Any]:
            if spaced:
                row = db.execute(_DIALECT.sql("queue_start"), params).fetchone()
                if row is None or row[0] > now:
                    return []
            inline = min(_INLINE_BYTES, min(_CHUNK_BYTES, _length_limit(db) // 8) // limit)
            listed, joined = db.execute(_CLAIM_READ, dict(params, inline=inline)).fetchone()
            rows = json.loads(listed)
            if not rows:
                return []
            big = [r[2] for r in rows if r[9]]
            apart = {} if not big else {
                seq: (bytes(payload), args) for seq, payload, args in
                db.execute(_CLAIM_BIG, {"seqs": json.dumps(big)}).fetchall()}
            db.execute(_CLAIM_MARK, dict(params, seqs=json.dumps([r[2] for r in rows])))
            if spaced:
                db.execute(_DIALECT.sql("space_starts"), params)
            joined = joined or b""
            claimed, offset = [], 0
            for priority, due, seq, task_id, length, attempt, name, args, confirm, is_big in rows:
                if is_big:
                    payload, args = apart[seq]
                else:  # the inline payloads, joined in the order of the rows
                    payload = joined[offset:offset + length]
                    offset += length
                claimed.append((priority, due, seq, task_id, payload, attempt, name, args,
                                confirm))
            return claimed

        try:
            return self._atomic(body)
        except sqlite3.DataError:
            # The listing (ids, names, inline arguments as JSON) is longer
            # than the connection takes as one value: rolled back, nothing
            # claimed; the row-by-row statement returns a row per task.
            return super()._claim_rows(params, spaced)

    def renew_leases(self, owner: str, expires_at: int,
                     task_ids: Optional[Sequence[str]] = None) -> int:
        """See ``TaskStore.renew_leases``.  Listed tasks are renewed by one
        statement over a JSON array of their ids (a task listed twice counts
        once), or one statement each without SQLite's JSON functions."""
        if task_ids is None or not task_ids or not _has_json():
            return super().renew_leases(owner, expires_at, task_ids)
        params = {"owner": owner, "expires": expires_at,
                  "ids": json.dumps(list(task_ids), ensure_ascii=False)}
        # one statement: on its own, it takes the write lock as it starts
        return int(self._locked(lambda db: db.execute(_RENEW_LISTED, params).rowcount))

    def settle(self, outcomes: Sequence[Outcome]) -> List[bool]:
        for o in outcomes:
            if o.kind not in _SETTLE_SQL:
                raise ValueError(f"unknown outcome kind {o.kind!r}; expected one of "
                                 f"{Outcome.KINDS}")

        def one_by_one(db: sqlite3.Connection) -> List[bool]:
            return [db.execute(_SETTLE_SQL[o.kind], self._settle_params(db, o)).rowcount == 1
                    for o in outcomes]

        def in_bulk(db: sqlite3.Connection) -> List[bool]:
            # Every start first (a run's start precedes its end), then every
            # completion, each kind in one statement (``_apply_joined``) or one
            # executemany; the rest one by one.
            for kind in _BULK_KINDS:
                rows = [self._settle_params(db, o) for o in outcomes if o.kind == kind]
                applied = _apply_joined(db, kind, rows) if len(rows) >= _BULK_MIN else None
                if applied is None:
                    applied = db.executemany(_SETTLE_SQL[kind], rows).rowcount if rows else 0
                if applied != len(rows):
                    raise _NotAllApplied()
            return [True if o.kind in _BULK_KINDS else
                    db.execute(_SETTLE_SQL[o.kind], self._settle_params(db, o)).rowcount == 1
                    for o in outcomes]

        if not outcomes:
            return []
        try:
            applied = self._atomic(in_bulk)
        except _NotAllApplied:  # rolled back: which ones, is told row by row
            applied = self._atomic(one_by_one)
        kinds = {o.kind for o in outcomes}
        if kinds & _FINISHING:
            self._wake_others(FINISHED)
        if kinds & _REQUEUEING:
            self._wake_others(WORK)
        return applied

    def _settle_params(self, db: sqlite3.Connection, o: Outcome) -> Sequence[Any]:
        if o.kind == "complete":
            return (o.message, o.result, o.at, o.task_id, o.token)
        if o.kind in ("fail", "retry"):
            return (o.message, o.traceback, o.at, o.task_id, o.token)
        if o.kind == "start":
            return (o.at, o.lease_until, o.task_id, o.token)
        if o.kind != "suspend":
            return (o.message, o.at, o.task_id, o.token)
        row = db.execute(_DIALECT.sql("callback"), {"id": o.awaiting}).fetchone()
        status, due = place_suspension(None if row is None else callback_record(row), o.at)
        return (status, o.message, due, o.awaiting, o.task_id, o.token)

    # ---- leases --------------------------------------------------------

    def recover(self, queue: str, *, now: int, max_attempts: int,
                owners: Iterable[str] = ()) -> int:
        dead = sorted(set(owners))
        params: Dict[str, Any] = {f"owner{i}": owner for i, owner in enumerate(dead)}
        params.update(queue=queue, now=now, max_attempts=max_attempts)
        marks = ", ".join(f":owner{i}" for i in range(len(dead)))
        sql = _DIALECT.sql("recover").replace(_DEAD_OWNERS, f"owner IN ({marks})")
        recovered = int(self._single(lambda db: db.execute(sql, params).rowcount))
        if recovered:
            self._wake_others(WORK + queue.encode("utf-8", "surrogatepass"))
        return recovered

    # ---- wake-ups ------------------------------------------------------

    def _wake_others(self, message: bytes) -> None:
        if self._wake is not None:
            self._wake.notify(message)

    def set_waker(self, waker: Optional[Waker]) -> None:
        """Calls ``waker(queue)`` when another process on the file enqueues,
        signals, requeues or recovers (see the module notes)."""
        self._waker = waker
        self._listen()

    def watch_finished(self, callback: Optional[Callable[[], None]]) -> None:
        """Calls ``callback()`` when another process on the file finishes
        tasks."""
        self._on_finished = callback
        self._listen()

    def _listen(self) -> None:
        if self._wake is not None:
            wanted = self._waker is not None or self._on_finished is not None
            self._wake.listen(self._woken if wanted else None)

    def _woken(self, messages: Set[bytes]) -> None:
        waker, on_finished = self._waker, self._on_finished
        if FINISHED in messages and on_finished is not None:
            on_finished()
        if waker is not None:
            for message in messages:
                if message.startswith(WORK):
                    queue = message[len(WORK):].decode("utf-8", "surrogatepass")
                    waker(queue or None)

    # ---- lifecycle -----------------------------------------------------

    def close(self) -> None:
        if self._wake is not None:
            self._wake.close()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __repr__(self) -> str:
        return f"<SQLiteTaskStore {self.path!r} durability={self.durability}>"
