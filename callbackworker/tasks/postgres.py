"""``PostgresTaskStore``: the task storage contract on PostgreSQL, so that
one queue can be served by processes on many hosts.

DESIGN

* Connections.  A small pool (``pool_size``, default 4) of autocommit
  connections: the dispatcher, the group committer and callers' threads
  each borrow one per call, so a slow read never holds up a claim.  A
  connection that broke is discarded, never returned to the pool.
* Statements.  Nearly every method is one SQL statement, hence atomic on
  its own in autocommit mode and one round trip: enqueue is one
  ``INSERT … SELECT FROM unnest(…)`` for the whole batch, a group commit
  is one ``UPDATE … FROM unnest(…)`` for every outcome, recovery one
  ``UPDATE`` that decides per row between retry and failure.  A claim
  under ``delay_ms`` (below), a group commit holding a suspension and a
  callback signal (below) are explicit transactions.
* Claims.  ``UPDATE … WHERE seq IN (SELECT seq … ORDER BY next_run_at, seq
  LIMIT n FOR UPDATE SKIP LOCKED) RETURNING …``: concurrent claimers on any
  host skip each other's rows instead of waiting, and no row is handed out
  twice.  Every transition out of ``running`` names the claim's token in
  its ``WHERE``; under READ COMMITTED a blocked ``UPDATE`` re-checks that
  condition on the row as committed by the winner, so a stale completion
  matches nothing and is reported as rejected.
* Global delay.  With ``delay_ms > 0`` the claim runs in one transaction
  that first locks the queue's row (``SELECT … FOR NO KEY UPDATE``; it does
  not conflict with enqueues, which only take the key-share lock of the
  foreign key), reads its ``next_start_at``, claims at most one task and
  moves ``next_start_at`` to ``now + delay_ms``.  Every host serialises on
  that row, so the gap between consecutive starts holds across all of
  them, measured by their clocks (clock skew between hosts adds to or
  takes from the gap).
* Durable callbacks.  ``cbw_durable_ops`` and ``cbw_durable_callbacks``
  reference their task (``ON DELETE CASCADE``: retention deletes them with
  it); a row trigger on ``cbw_tasks`` deletes the log and closes the
  pending callbacks whenever a task reaches a terminal status, whatever
  statement put it there.  Lock order is always the task's row, then its
  callbacks': the trigger follows it, a signal locks the owner task
  (``FOR NO KEY UPDATE``) before the callback (``FOR UPDATE``), and a
  suspension reads the callback in a second statement, after its
  ``UPDATE`` holds the task.  So they never deadlock, concurrent signals
  serialise on the callback (the first applies, the others find it no
  longer pending), and a signal racing a suspension either committed
  before the callback is read (the task becomes pending at once) or waits
  and finds the task suspended (and wakes it).
* Transient failures.  Serialization failures, deadlocks, a lost
  connection and a server shutting down or restarting are retried, the
  whole statement or transaction again on a fresh or same connection, with
  exponential backoff; past ``patience_s`` they raise ``StorageBusyError``.
  A connection lost while a commit was in flight leaves the outcome
  unknown: a retried ``enqueue`` may then fail on its duplicate task id
  (the first try did commit); a retried claim leaves the first claim's
  tasks to lease recovery.
* Wake-ups.  Enqueueing, and anything that puts a task back to pending
  (a retry, a release, a recovery, a signal), or suspends it until a
  callback's expiry, sends ``NOTIFY callbackworker_tasks,
  '<queue>'`` in the same statement, delivered on commit.  ``set_waker``
  starts a listener thread with its own connection that ``LISTEN``s and
  calls the waker for each notification.  If that connection drops it
  reconnects with backoff and then wakes everything (notifications sent
  meanwhile are lost).  The service keeps polling every ``poll_ms``
  anyway, so a task written without a notification is still picked up.
* Big batches.  An ``enqueue_many`` whose payloads pass 64 MiB is cut into
  several statements in one transaction (a value sent to the server is
  limited to 1 GB).
* Schema.  Tables are prefixed ``cbw_`` and live in the connection's
  current schema (set ``search_path`` in the DSN to keep several
  deployments in one database).  ``cbw_schema_version`` holds the version;
  ``_MIGRATIONS`` holds every step.  Opening a store takes a transaction-
  scoped advisory lock keyed on the schema, then applies the missing steps
  and bumps the version in the same transaction, so hosts starting at once
  migrate exactly once and the others wait, then see the new version.
* Durability is the server's: a commit that returned is as durable as its
  ``synchronous_commit`` and ``fsync`` settings make it.
  ``durability="full"`` sets ``synchronous_commit = on`` on the store's
  connections (the commit is flushed to disk before it returns, whatever
  the server's default); ``"normal"`` keeps the server's default.
"""

from __future__ import annotations

import logging
import random
import select
import socket
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, TypeVar

from ..durable import CallbackRecord
from .dsn import redact_dsn  # re-exported: listed in __all__
from ..errors import (
    NonDeterminismError,
    StorageBusyError,
    UnknownCallbackError,
    UnknownQueueError,
    UnknownTaskError,
)
from .storage import (
    NEVER,
    STATUSES,
    ClaimedTask,
    Outcome,
    TaskRecord,
    TaskStore,
    Waker,
    CALLBACK_COLUMNS,
    apply_signal,
    callback_record,
    check_signal_state,
    place_suspension,
)

try:
    import psycopg
    from psycopg import errors as pg_errors
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    psycopg = None  # type: ignore[assignment]
    _IMPORT_ERROR: Optional[ImportError] = exc
else:
    _IMPORT_ERROR = None

__all__ = ["PostgresTaskStore", "CHANNEL", "SCHEMA_VERSION", "redact_dsn"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL = "callbackworker_tasks"
"""The ``NOTIFY`` channel; the payload is the queue's name."""

_DURABILITY = ("normal", "full")
_LISTENER_NAME = "callbackworker-listener"
_LISTEN_PING_S = 10.0  # an idle listener checks its connection this often
_RETRY_PAUSE_MAX_S = 0.5
_RECONNECT_PAUSE_MAX_S = 5.0

# Class 08: connection exceptions; 57P01..57P03: the server is shutting
# down, crashed, or cannot take connections yet.  40001/40P01: the
# statement lost a serialization conflict or a deadlock.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "57P01", "57P02", "57P03"}

_MIGRATIONS: List[List[str]] = [
    # 1: queues and tasks.
    [
        """CREATE TABLE cbw_queues (
               name          text PRIMARY KEY,
               next_start_at bigint NOT NULL DEFAULT 0
           )""",
        """CREATE TABLE cbw_tasks (
               seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
               id               text NOT NULL UNIQUE,
               queue            text NOT NULL REFERENCES cbw_queues(name),
               payload          bytea NOT NULL,
               status           text NOT NULL CHECK (status IN
                                    ('pending', 'running', 'completed', 'failed', 'cancelled')),
               message          text NOT NULL DEFAULT '',
               attempt          integer NOT NULL DEFAULT 0,
               next_run_at      bigint NOT NULL,
               created_at       bigint NOT NULL,
               finished_at      bigint,
               owner            text,
               lease_expires_at bigint,
               token            text
           )""",
        "CREATE INDEX cbw_tasks_due ON cbw_tasks(queue, next_run_at, seq) WHERE status = 'pending'",
        "CREATE INDEX cbw_tasks_finished ON cbw_tasks(queue, finished_at) "
        "WHERE finished_at IS NOT NULL",
        "CREATE INDEX cbw_tasks_leases ON cbw_tasks(queue, lease_expires_at) "
        "WHERE status = 'running'",
        "CREATE INDEX cbw_tasks_owned ON cbw_tasks(owner) WHERE status = 'running'",
    ],
    # 2: durable operation logs and callbacks; suspended tasks.
    [
        # The callback a suspended task waits for.  Kept until the replay
        # ends: a claim, or a graceful release, of a task with it set is a
        # replay of the attempt the task is in, not a new attempt.
        "ALTER TABLE cbw_tasks ADD COLUMN awaiting text",
        "ALTER TABLE cbw_tasks DROP CONSTRAINT cbw_tasks_status_check",
        """ALTER TABLE cbw_tasks ADD CONSTRAINT cbw_tasks_status_check CHECK (status IN
               ('pending', 'running', 'suspended', 'completed', 'failed', 'cancelled'))""",
        # Suspended tasks are claimable once due, like pending ones.
        "DROP INDEX cbw_tasks_due",
        "CREATE INDEX cbw_tasks_due ON cbw_tasks(queue, next_run_at, seq) "
        "WHERE status IN ('pending', 'suspended')",
        # Both tables go with their task when retention deletes it.
        """CREATE TABLE cbw_durable_ops (
               task_id text NOT NULL REFERENCES cbw_tasks(id) ON DELETE CASCADE,
               seq     integer NOT NULL,
               kind    text NOT NULL,
               name    text NOT NULL,
               value   bytea NOT NULL,
               PRIMARY KEY (task_id, seq)
           )""",
        """CREATE TABLE cbw_durable_callbacks (
               id                   text PRIMARY KEY,
               task_id              text NOT NULL REFERENCES cbw_tasks(id) ON DELETE CASCADE,
               name                 text NOT NULL,
               state                text NOT NULL DEFAULT 'pending' CHECK (state IN
                                        ('pending', 'succeeded', 'failed', 'closed')),
               result               bytea,
               error                text,
               created_at           bigint NOT NULL,
               last_beat_at         bigint NOT NULL,
               timeout_ms           bigint NOT NULL,
               heartbeat_timeout_ms bigint NOT NULL
           )""",
        "CREATE INDEX cbw_durable_callbacks_task ON cbw_durable_callbacks(task_id)",
        # Every path to a terminal status (complete, fail, recover, cancel,
        # clear) ends the task's durable state here, in its transaction.
        # The function resolves table names with the search_path it was
        # created under, whatever the session's.
        """CREATE FUNCTION cbw_tasks_durable_ended() RETURNS trigger
           LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
           BEGIN
               DELETE FROM cbw_durable_ops WHERE task_id = NEW.id;
               UPDATE cbw_durable_callbacks
                  SET state = CASE state WHEN 'pending' THEN 'closed' ELSE state END,
                      result = NULL
                WHERE task_id = NEW.id;
               RETURN NULL;
           END $$""",
        """CREATE TRIGGER cbw_tasks_durable_ended AFTER UPDATE OF status ON cbw_tasks
           FOR EACH ROW
           WHEN (NEW.status IN ('completed', 'failed', 'cancelled')
                 AND OLD.status NOT IN ('completed', 'failed', 'cancelled'))
           EXECUTE FUNCTION cbw_tasks_durable_ended()""",
    ],
]

SCHEMA_VERSION = len(_MIGRATIONS)
"""The schema version this callbackworker creates and understands."""

_CHUNK_BYTES = 64 << 20

_ENQUEUE_SQL = """
    WITH added AS (
        INSERT INTO cbw_tasks(id, queue, payload, status, next_run_at, created_at)
        SELECT id, %(queue)s, payload, 'pending', %(now)s, %(now)s
        FROM unnest(%(ids)s::text[], %(payloads)s::bytea[]) WITH ORDINALITY AS t(id, payload, n)
        ORDER BY n)
    SELECT pg_notify(%(channel)s, %(queue)s)"""

_CLAIM_SQL = """
    UPDATE cbw_tasks SET status = 'running', attempt = attempt + (awaiting IS NULL)::int,
           owner = %(owner)s, lease_expires_at = %(expires)s, token = %(token)s
    WHERE seq IN (SELECT seq FROM cbw_tasks
                  WHERE queue = %(queue)s AND status IN ('pending', 'suspended')
                        AND next_run_at <= %(now)s
                  ORDER BY next_run_at, seq
                  LIMIT %(limit)s
                  FOR UPDATE SKIP LOCKED)
    RETURNING next_run_at, seq, id, payload, attempt"""

# One statement settles a whole batch; each outcome applies only to its
# task while running under its token.  Queues that got a task back as
# pending (a retry, or a release by a closing service) are notified once
# each, so other services take it as soon as it is due.  A suspension is
# stored as suspended and never due here; ``_SUSPEND_SQL`` then sets when
# it is due (or makes it pending), in the same transaction.
_SETTLE_SQL = f"""
    WITH settled AS (
    UPDATE cbw_tasks t SET
        status = CASE o.kind WHEN 'complete' THEN 'completed' WHEN 'fail' THEN 'failed'
                             WHEN 'suspend' THEN 'suspended' ELSE 'pending' END,
        message = o.message,
        finished_at = CASE WHEN o.kind IN ('complete', 'fail') THEN o.at END,
        next_run_at = CASE WHEN o.kind IN ('retry', 'release') THEN o.at
                           WHEN o.kind = 'suspend' THEN {NEVER}
                           ELSE t.next_run_at END,
        attempt = CASE WHEN o.kind = 'release' THEN t.attempt - (t.awaiting IS NULL)::int
                       ELSE t.attempt END,
        awaiting = CASE o.kind WHEN 'release' THEN t.awaiting
                               WHEN 'suspend' THEN o.awaiting END,
        owner = NULL, lease_expires_at = NULL, token = NULL
    FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[])
         AS o(id, token, kind, message, at, awaiting)
    WHERE t.id = o.id AND t.token = o.token AND t.status = 'running'
    RETURNING t.id, o.token, t.queue, t.status),
    woken AS (
        SELECT pg_notify(%s, queue) FROM (SELECT DISTINCT queue FROM settled
                                          WHERE status = 'pending') AS requeued)
    SELECT id, token, (SELECT count(*) FROM woken) FROM settled"""

# The second half of a suspension, run after ``_SETTLE_SQL`` in its
# transaction, with the callbacks read afresh (``_suspensions``): the task
# is due when its callback expires (NEVER: only a signal wakes it), or is
# pending at once if the callback was signalled or expired meanwhile.  A
# queue whose task may now wake by itself is notified, so that every
# dispatcher knows when.
_SUSPEND_SQL = f"""
    WITH placed AS (
        UPDATE cbw_tasks t SET status = w.status, next_run_at = w.at
        FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS w(id, status, at)
        WHERE t.id = w.id AND t.status = 'suspended'
        RETURNING t.queue, t.next_run_at)
    SELECT pg_notify(%s, queue)
    FROM (SELECT DISTINCT queue FROM placed WHERE next_run_at < {NEVER}) AS due"""

_RECOVER_SQL = """
    WITH lost AS (
        UPDATE cbw_tasks SET
            status = CASE WHEN attempt >= %(max_attempts)s THEN 'failed' ELSE 'pending' END,
            finished_at = CASE WHEN attempt >= %(max_attempts)s THEN %(now)s::bigint END,
            next_run_at = CASE WHEN attempt >= %(max_attempts)s THEN next_run_at
                               ELSE %(now)s::bigint END,
            message = CASE WHEN attempt >= %(max_attempts)s
                           THEN 'worker lost during attempt ' || attempt
                                || ' (lease expired); no attempts left'
                           ELSE 'worker lost during attempt ' || attempt || '; retrying' END,
            awaiting = NULL, owner = NULL, lease_expires_at = NULL, token = NULL
        WHERE queue = %(queue)s AND status = 'running'
              AND (lease_expires_at <= %(now)s OR owner = ANY(%(owners)s::text[]))
        RETURNING status)
    SELECT count(*),
           (SELECT count(*) FROM (SELECT pg_notify(%(channel)s, %(queue)s)
                                  FROM lost WHERE status = 'pending' LIMIT 1) AS notified)
    FROM lost"""

_CANCEL_SQL = """
    WITH found AS (SELECT seq, status FROM cbw_tasks WHERE id = %s FOR UPDATE),
         cancelled AS (UPDATE cbw_tasks t SET status = 'cancelled', finished_at = %s,
                              awaiting = NULL
                       FROM found WHERE t.seq = found.seq
                                        AND found.status IN ('pending', 'suspended'))
    SELECT status FROM found"""


# A signal that wakes a suspended task notifies its queue.
_WAKE_SQL = """
    WITH woken AS (
        UPDATE cbw_tasks SET status = 'pending', next_run_at = %s
        WHERE id = %s AND status = 'suspended' AND awaiting = %s
        RETURNING queue)
    SELECT pg_notify(%s, queue) FROM woken"""


Batch = Sequence["tuple[str, bytes]"]


def _chunks(tasks: Batch, max_bytes: int) -> List[Batch]:
    """``tasks`` cut, in order, into runs of at most ``max_bytes`` of
    payload (each run holds at least one task)."""
    chunks: List[Batch] = []
    start, size = 0, 0
    for i, (_, payload) in enumerate(tasks):
        if i > start and size + len(payload) > max_bytes:
            chunks.append(tasks[start:i])
            start, size = i, 0
        size += len(payload)
    chunks.append(tasks[start:])
    return chunks


def _require_psycopg() -> None:
    if _IMPORT_ERROR is not None:
        raise ImportError("the PostgreSQL task store needs psycopg 3: "
                          "pip install 'callbackworker[postgres]'") from _IMPORT_ERROR


def _is_transient(exc: BaseException, conn: Optional["psycopg.Connection[Any]"]) -> bool:
    """True for failures that a retry, possibly on a new connection, may
    get past."""
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08"):
        return True
    if conn is None:  # could not connect
        return isinstance(exc, psycopg.OperationalError)
    return bool(conn.broken or conn.closed)


class _Pool:
    """At most ``size`` connections, opened on demand and reused; a
    borrower waits for a free one.  Broken connections are dropped."""

    def __init__(self, connect: Callable[[], "psycopg.Connection[Any]"], size: int) -> None:
        self._connect = connect
        self._size = size
        self._cond = threading.Condition()
        self._idle: List["psycopg.Connection[Any]"] = []
        self._open = 0
        self._closed = False

    def acquire(self) -> "psycopg.Connection[Any]":
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the task store is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self._size:
                    self._open += 1
                    break
                self._cond.wait()
        try:
            return self._connect()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def release(self, conn: "psycopg.Connection[Any]") -> None:
        usable = not (conn.broken or conn.closed) and \
            conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with self._cond:
            if usable and not self._closed:
                self._idle.append(conn)
                conn = None  # type: ignore[assignment]
            else:
                self._open -= 1
            self._cond.notify()
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()


class _Listener:
    """A thread that ``LISTEN``s on its own connection and calls ``wake``
    with the queue each notification names; ``wake(None)`` after every
    (re)connection, since notifications sent while it was not listening are
    lost."""

    def __init__(self, connect: Callable[[], "psycopg.Connection[Any]"],
                 wake: Waker) -> None:
        self._connect = connect
        self._wake = wake
        self._stopping = False
        self._stop_r, self._stop_w = socket.socketpair()
        self.backend_pid: Optional[int] = None
        self.connections = 0
        self._thread = threading.Thread(target=self._run, name="callbackworker-task-listen",
                                         daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping = True
        try:
            self._stop_w.send(b"x")
        except OSError:
            pass
        self._thread.join()
        self._stop_r.close()
        self._stop_w.close()

    def _run(self) -> None:
        pause = 0.05
        while not self._stopping:
            conn: Optional["psycopg.Connection[Any]"] = None
            try:
                conn = self._connect()
                conn.add_notify_handler(lambda n: self._wake(n.payload))
                conn.execute(f"LISTEN {CHANNEL}")
                self.backend_pid = conn.info.backend_pid
                self.connections += 1
                pause = 0.05
                self._wake(None)
                self._listen(conn)
            except Exception as exc:
                if self._stopping:
                    break
                if isinstance(exc, psycopg.Error):
                    log.warning("task listener: connection lost (%s); reconnecting in %.2f s; "
                                "polling meanwhile", exc, pause)
                else:
                    log.exception("task listener failed; restarting in %.2f s", pause)
                if select.select([self._stop_r], [], [], pause)[0]:
                    break
                pause = min(pause * 2, _RECONNECT_PAUSE_MAX_S)
            finally:
                self.backend_pid = None
                if conn is not None:
                    conn.close()

    def _listen(self, conn: "psycopg.Connection[Any]") -> None:
        fd, stop_fd = conn.fileno(), self._stop_r.fileno()
        while not self._stopping:
            ready = select.select([fd, stop_fd], [], [], _LISTEN_PING_S)[0]
            if stop_fd in ready:
                return
            if not ready:
                conn.execute("SELECT 1")  # notices a silently dead connection
                continue
            conn.pgconn.consume_input()  # raises once the server has gone
            queues: Set[str] = set()
            while True:
                note = conn.pgconn.notifies()
                if note is None:
                    break
                queues.add(note.extra.decode("utf-8", "replace"))
            for queue in sorted(queues):
                self._wake(queue)


class PostgresTaskStore(TaskStore):
    """The ``TaskStore`` contract on a PostgreSQL database (``dsn``: a
    libpq connection string or ``postgresql://`` URL), shared safely by any
    number of processes on any number of hosts.

    ``pool_size`` bounds this store's connections (plus one for the
    listener, once ``set_waker`` is called).  ``patience_s`` bounds how
    long a call keeps retrying transient failures (serialization failures,
    deadlocks, a lost connection) before raising ``StorageBusyError``.
    ``durability`` is ``"normal"`` (the server's ``synchronous_commit``) or
    ``"full"`` (``synchronous_commit = on``).  See the module docstring."""

    def __init__(self, dsn: str, *, durability: str = "normal", pool_size: int = 4,
                 patience_s: float = 60.0) -> None:
        _require_psycopg()
        if durability not in _DURABILITY:
            raise ValueError(f"durability must be one of {list(_DURABILITY)}, not {durability!r}")
        if type(pool_size) is not int or pool_size < 1:
            raise ValueError(f"pool_size must be an int >= 1, not {pool_size!r}")
        self.dsn = dsn
        self.durability = durability
        self._patience_s = patience_s
        self._pool = _Pool(self._connect, pool_size)
        self._listener: Optional[_Listener] = None
        self._listener_lock = threading.Lock()
        self._reached = False
        try:
            self._run(self._migrate)
        except BaseException:
            self._pool.close()
            raise

    # ---- connections and transactions ----------------------------------

    def _connect(self, application_name: str = "callbackworker") -> "psycopg.Connection[Any]":
        conn = psycopg.connect(self.dsn, autocommit=True, application_name=application_name)
        if self.durability == "full":
            conn.execute("SET synchronous_commit = on")
        self._reached = True
        return conn

    def _run(self, body: Callable[["psycopg.Connection[Any]"], T]) -> T:
        """Runs ``body`` (one statement, or its own transaction) on a pooled
        connection, again from the start after a transient failure, backing
        off exponentially with jitter."""
        deadline = time.monotonic() + self._patience_s
        pause = 0.001
        while True:
            conn: Optional["psycopg.Connection[Any]"] = None
            try:
                conn = self._pool.acquire()
                return body(conn)
            except psycopg.Error as exc:
                # A server that was never reached is a configuration error,
                # reported at once; one that went away is waited for.
                if not (self._reached and _is_transient(exc, conn)):
                    raise
                if time.monotonic() >= deadline:
                    raise StorageBusyError(
                        f"the PostgreSQL task store kept failing for {self._patience_s:g} s: "
                        f"{exc}") from exc
                log.debug("transient database failure (%s); retrying in %.0f ms",
                          exc, pause * 1000)
                if conn is not None:
                    self._pool.release(conn)
                    conn = None
                time.sleep(pause * (0.5 + random.random()))
                pause = min(pause * 2, _RETRY_PAUSE_MAX_S)
            finally:
                if conn is not None:
                    self._pool.release(conn)

    def _fetch(self, sql: str, params: Any = None) -> List[Any]:
        return self._run(lambda conn: conn.execute(sql, params).fetchall())

    def _rowcount(self, sql: str, params: Any = None) -> int:
        return self._run(lambda conn: conn.execute(sql, params).rowcount)

    def _migrate(self, conn: "psycopg.Connection[Any]") -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('callbackworker.tasks:' "
                         "|| current_schema()))")
            conn.execute("""CREATE TABLE IF NOT EXISTS cbw_schema_version (
                                one     boolean PRIMARY KEY DEFAULT true CHECK (one),
                                version integer NOT NULL)""")
            row = conn.execute("SELECT version FROM cbw_schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"task schema version {version} is newer than this "
                                   f"callbackworker knows ({SCHEMA_VERSION}); "
                                   f"upgrade callbackworker")
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement)
                log.info("PostgreSQL task schema migrated to version %d", step + 1)
            if version < SCHEMA_VERSION:
                conn.execute("""INSERT INTO cbw_schema_version(version) VALUES (%s)
                                ON CONFLICT (one) DO UPDATE SET version = excluded.version""",
                             (SCHEMA_VERSION,))

    # ---- wake-ups ------------------------------------------------------

    def set_waker(self, waker: Optional[Waker]) -> None:
        """Starts (or, with None, stops) the listener thread that calls
        ``waker(queue)`` on every notification and ``waker(None)`` after
        each (re)connection."""
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            if waker is not None:
                self._listener = _Listener(lambda: self._connect(_LISTENER_NAME), waker)

    @property
    def listener_pid(self) -> Optional[int]:
        """The server process of the listener's connection, None while it is
        (re)connecting or not started (for monitoring and tests)."""
        listener = self._listener
        return None if listener is None else listener.backend_pid

    # ---- queues --------------------------------------------------------

    def ensure_queue(self, name: str) -> None:
        self._rowcount("INSERT INTO cbw_queues(name) VALUES (%s) ON CONFLICT (name) DO NOTHING",
                       (name,))

    def queues(self) -> List[str]:
        return [row[0] for row in self._fetch("SELECT name FROM cbw_queues ORDER BY name")]

    # ---- producing -----------------------------------------------------

    def enqueue_many(self, queue: str, tasks: Sequence["tuple[str, bytes]"], now: int) -> None:
        """See ``TaskStore.enqueue_many``.  A batch is one statement; one
        whose payloads pass ``_CHUNK_BYTES`` is several statements in one
        transaction (a value sent to the server is limited to 1 GB)."""
        if not tasks:
            return
        chunks = _chunks(tasks, _CHUNK_BYTES)

        def insert(conn: "psycopg.Connection[Any]", chunk: Batch) -> None:
            conn.execute(_ENQUEUE_SQL, {
                "queue": queue, "now": now, "ids": [task_id for task_id, _ in chunk],
                "payloads": [payload for _, payload in chunk], "channel": CHANNEL})

        def body(conn: "psycopg.Connection[Any]") -> None:
            if len(chunks) == 1:
                insert(conn, chunks[0])
                return
            with conn.transaction():
                for chunk in chunks:
                    insert(conn, chunk)

        try:
            self._run(body)
        except pg_errors.ForeignKeyViolation:
            raise UnknownQueueError(queue) from None

    # ---- consuming -----------------------------------------------------

    def claim(self, queue: str, *, owner: str, limit: int, now: int, lease_ms: int,
              delay_ms: int = 0) -> List[ClaimedTask]:
        if limit <= 0:
            return []
        token = uuid.uuid4().hex  # unique per claim; a task appears once in a claim
        params = {"owner": owner, "expires": now + lease_ms, "token": token, "queue": queue,
                  "now": now, "limit": limit if delay_ms <= 0 else 1}

        def spaced(conn: "psycopg.Connection[Any]") -> List[Any]:
            with conn.transaction():
                row = conn.execute("SELECT next_start_at FROM cbw_queues WHERE name = %s "
                                   "FOR NO KEY UPDATE", (queue,)).fetchone()
                if row is None or row[0] > now:
                    return []
                rows = conn.execute(_CLAIM_SQL, params).fetchall()
                if rows:
                    conn.execute("UPDATE cbw_queues SET next_start_at = %s WHERE name = %s",
                                 (now + delay_ms, queue))
                return rows

        if delay_ms > 0:
            rows = self._run(spaced)
        else:
            rows = self._fetch(_CLAIM_SQL, params)
        rows.sort(key=lambda r: (r[0], r[1]))
        return [ClaimedTask(r[2], bytes(r[3]), r[4], token) for r in rows]

    def settle(self, outcomes: Sequence[Outcome]) -> List[bool]:
        for o in outcomes:
            if o.kind not in Outcome.KINDS:
                raise ValueError(f"unknown outcome kind {o.kind!r}; expected one of "
                                 f"{Outcome.KINDS}")
        if not outcomes:
            return []
        params = ([o.task_id for o in outcomes], [o.token for o in outcomes],
                  [o.kind for o in outcomes], [o.message for o in outcomes],
                  [o.at for o in outcomes], [o.awaiting for o in outcomes], CHANNEL)
        suspends = [o for o in outcomes if o.kind == "suspend"]

        def body(conn: "psycopg.Connection[Any]") -> List[Any]:
            if not suspends:
                return conn.execute(_SETTLE_SQL, params).fetchall()
            # Two statements: the second reads the callbacks after the first
            # holds the tasks' rows, so a signal either committed before (and
            # is seen) or waits for this transaction (and sees it suspended).
            with conn.transaction():
                rows = conn.execute(_SETTLE_SQL, params).fetchall()
                self._suspensions(conn, suspends, {(r[0], r[1]) for r in rows})
                return rows

        applied = {(task_id, token) for task_id, token, _ in self._run(body)}
        results = []
        for o in outcomes:  # a repeated outcome applies once, the first time
            key = (o.task_id, o.token)
            results.append(key in applied)
            applied.discard(key)
        return results

    def _suspensions(self, conn: "psycopg.Connection[Any]", suspends: Sequence[Outcome],
                     applied: Set["tuple[str, str]"]) -> None:
        """Places the tasks that ``_SETTLE_SQL`` just suspended: due when
        their callback expires, or pending at ``at`` if it is no longer
        pending (signalled or expired before the suspension applied)."""
        placed: Dict[str, Outcome] = {}
        for o in suspends:  # a repeated outcome applied once, the first time
            if (o.task_id, o.token) in applied and o.task_id not in placed:
                placed[o.task_id] = o
        if not placed:
            return
        records = {row[0]: callback_record(row) for row in conn.execute(
            f"SELECT {CALLBACK_COLUMNS} FROM cbw_durable_callbacks WHERE id = ANY(%s)",
            ([o.awaiting for o in placed.values()],)).fetchall()}
        ids: List[str] = []
        statuses: List[str] = []
        ats: List[int] = []
        for o in placed.values():
            status, due = place_suspension(records.get(o.awaiting), o.at)
            ids.append(o.task_id)
            statuses.append(status)
            ats.append(due)
        conn.execute(_SUSPEND_SQL, (ids, statuses, ats, CHANNEL))

    # ---- leases --------------------------------------------------------

    def renew_leases(self, owner: str, expires_at: int) -> int:
        return self._rowcount(
            "UPDATE cbw_tasks SET lease_expires_at = %s WHERE owner = %s AND status = 'running'",
            (expires_at, owner))

    def running_owners(self, queue: str) -> List[str]:
        return [row[0] for row in self._fetch(
            "SELECT DISTINCT owner FROM cbw_tasks WHERE queue = %s AND status = 'running' "
            "ORDER BY owner", (queue,))]

    def recover(self, queue: str, *, now: int, max_attempts: int,
                owners: Iterable[str] = ()) -> int:
        (total, _), = self._fetch(_RECOVER_SQL, {
            "queue": queue, "now": now, "max_attempts": max_attempts,
            "owners": sorted(set(owners)), "channel": CHANNEL})
        return int(total)

    # ---- management ----------------------------------------------------

    def get(self, task_id: str) -> Optional[TaskRecord]:
        rows = self._fetch(
            "SELECT id, queue, status, message, attempt, next_run_at, finished_at, owner, "
            "lease_expires_at FROM cbw_tasks WHERE id = %s", (task_id,))
        return TaskRecord(*rows[0]) if rows else None

    def cancel(self, task_id: str, now: int) -> Optional[str]:
        rows = self._fetch(_CANCEL_SQL, (task_id, now))
        return str(rows[0][0]) if rows else None

    def clear(self, queue: str, now: int) -> int:
        return self._rowcount(
            "UPDATE cbw_tasks SET status = 'cancelled', finished_at = %s, awaiting = NULL "
            "WHERE queue = %s AND status IN ('pending', 'suspended')", (now, queue))

    def counts(self) -> Dict[str, Dict[str, int]]:
        rows = self._fetch(
            """SELECT q.name, t.status, count(t.status)
               FROM cbw_queues q LEFT JOIN cbw_tasks t ON t.queue = q.name
               GROUP BY q.name, t.status ORDER BY q.name""")
        table: Dict[str, Dict[str, int]] = {}
        for queue, status, n in rows:
            row = table.setdefault(queue, dict.fromkeys(STATUSES, 0))
            if status is not None:
                row[status] = int(n)
        return table

    def next_due(self, queue: str) -> Optional[int]:
        rows = self._fetch(
            """SELECT (SELECT min(next_run_at) FROM cbw_tasks
                       WHERE queue = %(q)s AND status IN ('pending', 'suspended')
                             AND next_run_at < %(never)s),
                      (SELECT next_start_at FROM cbw_queues WHERE name = %(q)s)""",
            {"q": queue, "never": NEVER})
        due, next_start = rows[0]
        if due is None:
            return None
        return int(max(due, next_start or 0))

    def sweep(self, queue: str, finished_before: int) -> int:
        return self._rowcount(
            "DELETE FROM cbw_tasks WHERE queue = %s AND finished_at < %s "
            "AND status IN ('completed', 'failed', 'cancelled')", (queue, finished_before))

    # ---- durable operation logs and callbacks ---------------------------

    def durable_ops(self, task_id: str) -> List["tuple[str, str, bytes]"]:
        return [(kind, name, bytes(value)) for kind, name, value in self._fetch(
            "SELECT kind, name, value FROM cbw_durable_ops WHERE task_id = %s ORDER BY seq",
            (task_id,))]

    def durable_record(self, task_id: str, seq: int, kind: str, name: str,
                       value: bytes) -> None:
        """See ``TaskStore.durable_record``; raises ``UnknownTaskError`` if
        the task does not exist (any more)."""
        try:
            self._rowcount("INSERT INTO cbw_durable_ops(task_id, seq, kind, name, value) "
                           "VALUES (%s, %s, %s, %s, %s)", (task_id, seq, kind, name, value))
        except pg_errors.UniqueViolation:
            raise NonDeterminismError(
                f"operation {seq + 1} of task {task_id} was recorded twice (did two runs "
                f"of the task overlap?)") from None
        except pg_errors.ForeignKeyViolation:
            raise UnknownTaskError(task_id) from None

    def durable_add_callback(self, record: CallbackRecord) -> None:
        """See ``TaskStore.durable_add_callback``; raises
        ``UnknownTaskError`` if the owner task does not exist (any more)."""
        try:
            self._rowcount(
                f"INSERT INTO cbw_durable_callbacks({CALLBACK_COLUMNS}) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (record.callback_id, record.owner, record.name, record.created_ms,
                 record.timeout_ms, record.heartbeat_timeout_ms, record.state, record.result,
                 record.error, record.last_beat_ms))
        except pg_errors.ForeignKeyViolation:
            raise UnknownTaskError(record.owner) from None

    def durable_callback(self, callback_id: str) -> Optional[CallbackRecord]:
        rows = self._fetch(f"SELECT {CALLBACK_COLUMNS} FROM cbw_durable_callbacks "
                           f"WHERE id = %s", (callback_id,))
        return callback_record(rows[0]) if rows else None

    def durable_signal(self, callback_id: str, state: str, result: Optional[bytes],
                       error: Optional[str], now: int) -> CallbackRecord:
        """See ``TaskStore.durable_signal``.  One transaction locks the
        owner task's row, then the callback's (``FOR UPDATE``): the same
        order as a task reaching a terminal status (whose trigger closes
        the callbacks) and as a suspension, so none of them deadlock, and
        concurrent signals queue on the callback's row, where the first
        applies and the others find it no longer pending."""
        check_signal_state(state)

        def body(conn: "psycopg.Connection[Any]") -> CallbackRecord:
            with conn.transaction():
                owner = conn.execute("SELECT task_id FROM cbw_durable_callbacks WHERE id = %s",
                                     (callback_id,)).fetchone()
                if owner is None:
                    raise UnknownCallbackError(callback_id)
                conn.execute("SELECT 1 FROM cbw_tasks WHERE id = %s FOR NO KEY UPDATE",
                             (owner[0],))
                row = conn.execute(f"SELECT {CALLBACK_COLUMNS} FROM cbw_durable_callbacks "
                                   f"WHERE id = %s FOR UPDATE", (callback_id,)).fetchone()
                if row is None:  # swept meanwhile
                    raise UnknownCallbackError(callback_id)
                record = callback_record(row)
                due = apply_signal(record, state, result, error, now)
                if due is not None:  # a heartbeat
                    conn.execute("UPDATE cbw_durable_callbacks SET last_beat_at = %s "
                                 "WHERE id = %s", (now, callback_id))
                    conn.execute("UPDATE cbw_tasks SET next_run_at = %s WHERE id = %s "
                                 "AND status = 'suspended' AND awaiting = %s",
                                 (due, record.owner, callback_id))
                    return record
                conn.execute("UPDATE cbw_durable_callbacks SET state = %s, result = %s, "
                             "error = %s WHERE id = %s", (state, result, error, callback_id))
                conn.execute(_WAKE_SQL, (now, record.owner, callback_id, CHANNEL))
                return record

        return self._run(body)

    def close(self) -> None:
        self.set_waker(None)
        self._pool.close()

    def __repr__(self) -> str:
        return f"<PostgresTaskStore {redact_dsn(self.dsn)!r} durability={self.durability}>"

