"""``PostgresTaskStore``: the task storage contract on PostgreSQL, so that
one queue can be served by processes on many hosts.

DESIGN

* Connections.  A small pool (``pool_size``, default 4) of autocommit
  connections: the dispatcher, the group committer and callers' threads
  each borrow one per call, so a slow read never holds up a claim.  A
  connection that broke is discarded, never returned to the pool
  (``pgconn.py`` holds the pool and the listener).
* Statements.  What this store runs like the SQLite one comes from
  ``sql.SQLTaskStore``, rendered in this store's dialect (``_DIALECT``); its
  own statements (batches over ``unnest`` or a JSON array, ``NOTIFY``) are
  kept by name in ``_STATEMENTS``.  Nearly every method is one SQL
  statement, hence atomic on its own in autocommit mode and one round trip:
  enqueue is one ``INSERT … SELECT FROM unnest(…)`` for the whole batch, a
  group commit is one ``UPDATE … FROM jsonb_array_elements(…)`` for every
  outcome (one JSON text dumps faster than eight list parameters, and the
  server parses it once as ``jsonb``), recovery one ``UPDATE`` that
  decides per row between retry and failure.  A claim under ``delay_ms``
  (below), a cancel, a group commit holding a suspension and a callback
  signal (below) are explicit transactions.
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
  it), so a durable row of a task that does not exist is refused
  (``UnknownTaskError``); a row trigger on ``cbw_tasks`` deletes the log and
  closes the pending callbacks whenever a task reaches a terminal status,
  whatever statement put it there.  Lock order is always the task's row,
  then its callbacks': the trigger follows it, a signal locks the owner task
  (``FOR NO KEY UPDATE``) before the callback (``FOR UPDATE``), and a
  suspension reads the callback in a second statement, after its ``UPDATE``
  holds the task.  So they never deadlock, concurrent signals serialise on
  the callback (the first applies, the others find it no longer pending),
  and a signal racing a suspension either committed before the callback is
  read (the task becomes pending at once) or waits and finds the task
  suspended (and wakes it).
* Transient failures.  Serialization failures, deadlocks, a lost
  connection and a server shutting down or restarting are retried by the
  shared loop (``SQLTaskStore._retry``), the whole statement or
  transaction again on a fresh or same connection, with exponential
  backoff; past ``patience_s`` they raise ``StorageBusyError``.
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
  ``_MIGRATIONS`` holds every step, and ``schema.py`` describes the result
  (the tests check one against the other).  Opening a store takes a transaction-
  scoped advisory lock keyed on the schema, then applies the missing steps
  and bumps the version in the same transaction, so hosts starting at once
  migrate exactly once and the others wait, then see the new version.
* Durability is the server's: a commit that returned is as durable as its
  ``synchronous_commit`` and ``fsync`` settings make it.  Two records
  commit without waiting for the flush, whatever the setting: a claim
  without ``delay_ms`` and a batch of starts alone (``_claim_rows``,
  ``settle``).  Only a crash of the server can lose them, and losing one
  costs at most a run's count and, for a claim, a run again (execution is
  at-least-once anyway); any later commit that waits for the flush
  flushes them too.  ``durability="full"`` sets ``synchronous_commit =
  on`` on the store's connections (every other commit is flushed to disk
  before it returns, whatever the server's default); ``"normal"`` keeps
  the server's default.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, TypeVar

from ..errors import UnknownQueueError
from .dsn import redact_dsn  # re-exported: listed in __all__
from .pgconn import CHANNEL, Listener, Pool, is_transient, psycopg, require_psycopg
from .schema import SCHEMA_VERSION
from .sql import STATEMENTS, Dialect, SQLTaskStore, TransientError, patience_left
from .storage import CALLBACK_COLUMNS, Outcome, Waker, callback_record, place_suspension

if psycopg is not None:
    from psycopg import errors as pg_errors

__all__ = ["PostgresTaskStore", "CHANNEL", "SCHEMA_VERSION", "redact_dsn"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_DURABILITY = ("normal", "full")
_LISTENER_NAME = "callbackworker-listener"
_RETRY_PAUSE_MAX_S = 0.5

def _notifying(update: str) -> str:
    """``update`` (an ``UPDATE`` of tasks) followed, in the same statement,
    by one ``NOTIFY`` for each queue whose tasks it changed."""
    return (f"WITH changed AS ({update} RETURNING queue) "
            f"SELECT pg_notify('{CHANNEL}', queue) FROM (SELECT DISTINCT queue FROM changed) AS q")


# A batch of starts or outcomes travels as one JSON parameter, an array of
# arrays: psycopg dumps a list parameter element by element in Python,
# json.dumps works in C.  The server reads it as ``jsonb``, parsed once
# (``->>`` on ``json`` parses the element's text again at every use), into
# a materialized CTE, so that each field is extracted once per row rather
# than once per ``CASE`` that reads it: together a fifth of a settle's
# server time.  The tasks are found through their ids as an array (``id =
# ANY``, the unique index): joined on ``id`` alone the planner scans every
# running task of every worker, which made a settle twice as costly with a
# few thousand tasks running elsewhere.  The status is tested as
# ``coalesce(status, '')`` (never NULL: the same test) so that the indexes
# of running tasks cannot serve it: a generic plan, which knows neither the
# batch's size nor how many tasks run, would otherwise still read them all.
_START = """
        WITH o AS MATERIALIZED (
            SELECT v->>0 AS id, v->>1 AS token, (v->>2)::bigint AS at,
                   (v->>3)::bigint AS lease_until
            FROM jsonb_array_elements(:batch::jsonb) AS e(v))
        UPDATE {{tasks}} t SET started_at = o.at,
               lease_expires_at = coalesce(o.lease_until, t.lease_expires_at),
               attempt = t.attempt + (t.started_at IS NULL AND t.awaiting IS NULL)::int
        FROM {quick}o
        WHERE t.id = ANY(ARRAY(SELECT id FROM o)) AND t.id = o.id AND t.token = o.token
              AND coalesce(t.status, '') = {{RUNNING}}
        RETURNING t.id, o.token"""

# A one-row join that makes the transaction of the statement it is joined
# to commit without waiting for the server's flush (``settle``, ``claim``).
_QUICK = "(SELECT set_config('synchronous_commit', 'off', true) AS setting) AS quick"

_STATEMENTS = {
    # A signal that wakes a suspended task notifies its queue.
    "wake": _notifying(STATEMENTS["wake"]),
    # So does a task retried by hand.
    "retry_task": _notifying(STATEMENTS["retry_task"]),
    # A recovery that puts tasks back to pending notifies their queue.
    "recover": f"""
        WITH lost AS ({STATEMENTS["recover"]} RETURNING status)
        SELECT count(*),
               (SELECT count(*) FROM (SELECT pg_notify('{CHANNEL}', :queue)
                                      FROM lost WHERE status = {{PENDING}} LIMIT 1) AS notified)
        FROM lost""",
    "enqueue": """
        WITH added AS (
            INSERT INTO {tasks}(id, queue, payload, status, next_run_at, created_at)
            SELECT id, :queue, payload, {PENDING}, :now, :now
            FROM unnest(:ids::text[], :payloads::bytea[]) WITH ORDINALITY AS t(id, payload, n)
            ORDER BY n)
        SELECT pg_notify(:channel, :queue)""",
    # One statement settles a whole batch; each outcome applies only to its
    # task while running under its token.  Queues that got a task back as
    # pending (a retry, or a release by a closing service) are notified
    # once each, so other services take it as soon as it is due.  A
    # suspension is stored as suspended and never due here; "suspend" then
    # sets when it is due (or makes it pending), in the same transaction.
    "settle": """
        WITH o AS MATERIALIZED (
            SELECT v->>0 AS id, v->>1 AS token, v->>2 AS kind, v->>3 AS message,
                   (v->>4)::bigint AS at, v->>5 AS awaiting, v->>6 AS result,
                   v->>7 AS traceback
            FROM jsonb_array_elements(:batch::jsonb) AS e(v)),
        settled AS (
        UPDATE {tasks} t SET
            status = CASE o.kind WHEN 'complete' THEN {COMPLETED} WHEN 'fail' THEN {FAILED}
                                 WHEN 'suspend' THEN {SUSPENDED} ELSE {PENDING} END,
            message = o.message,
            result = CASE WHEN o.kind = 'complete' THEN o.result ELSE t.result END,
            traceback = CASE WHEN o.kind IN ('fail', 'retry') THEN o.traceback
                             ELSE t.traceback END,
            finished_at = CASE WHEN o.kind IN ('complete', 'fail') THEN o.at END,
            next_run_at = CASE WHEN o.kind IN ('retry', 'release') THEN o.at
                               WHEN o.kind = 'suspend' THEN {NEVER}
                               ELSE t.next_run_at END,
            attempt = CASE WHEN o.kind = 'release'
                           THEN t.attempt - (t.started_at IS NOT NULL AND t.awaiting IS NULL)::int
                           ELSE t.attempt + (t.started_at IS NULL AND t.awaiting IS NULL)::int
                      END,
            started_at = CASE WHEN o.kind = 'release' THEN NULL ELSE t.started_at END,
            awaiting = CASE o.kind WHEN 'release' THEN t.awaiting
                                   WHEN 'suspend' THEN o.awaiting END,
            owner = NULL, lease_expires_at = NULL, token = NULL
        FROM o
        WHERE t.id = ANY(ARRAY(SELECT id FROM o)) AND t.id = o.id AND t.token = o.token
              AND coalesce(t.status, '') = {RUNNING}
        RETURNING t.id, o.token, t.queue, t.status),
        woken AS (
            SELECT pg_notify(:channel, queue) FROM (SELECT DISTINCT queue FROM settled
                                                    WHERE status = {PENDING}) AS requeued)
        SELECT id, token, (SELECT count(*) FROM woken) FROM settled""",
    # Runs that start: the attempt is counted (not a replay's), once.  In
    # "start_quick", starts alone in their transaction, it commits without
    # waiting for the flush (see ``settle``); ``quick`` is a one-row join so
    # that it is set.  Beside outcomes, it must not be.
    "start": _START.format(quick=""),
    "start_quick": _START.format(quick=_QUICK + ", "),
    # A claim alone in its transaction commits without waiting for the
    # flush either (see ``_claim_rows``).
    "claim_quick": STATEMENTS["claim"].replace("WHERE seq IN", f"FROM {_QUICK} WHERE seq IN", 1),
    # The second half of a suspension, run after "settle" in its
    # transaction, with the callbacks read afresh (``_suspensions``): the
    # task is due when its callback expires (NEVER: only a signal wakes
    # it), or is pending at once if the callback was signalled or expired
    # meanwhile.  A queue whose task may now wake by itself is notified, so
    # that every dispatcher knows when.
    "suspend": """
        WITH placed AS (
            UPDATE {tasks} t SET status = w.status, next_run_at = w.at
            FROM unnest(:ids::text[], :statuses::text[], :ats::bigint[]) AS w(id, status, at)
            WHERE t.id = w.id AND t.status = {SUSPENDED}
            RETURNING t.queue, t.next_run_at)
        SELECT pg_notify(:channel, queue)
        FROM (SELECT DISTINCT queue FROM placed WHERE next_run_at < {NEVER}) AS due""",
    "callbacks": f"SELECT {CALLBACK_COLUMNS} FROM {{callbacks}} WHERE id = ANY(:ids)",
    # The leases of the tasks named, in one statement (a prefetching
    # service holds hundreds).
    "renew_some": "UPDATE {tasks} SET lease_expires_at = :expires "
                  "WHERE id = ANY(:ids::text[]) AND owner = :owner AND status = {RUNNING}",
    # A function call added notifies its queue.
    "enqueue_call": f"""
        WITH added AS ({STATEMENTS["enqueue_call"]}),
             notified AS (SELECT pg_notify('{CHANNEL}', :queue) FROM added)
        SELECT id, (SELECT count(*) FROM notified) FROM added""",
}

_DIALECT = Dialect(prefix="cbw_", lock_row=" FOR NO KEY UPDATE", lock_update=" FOR UPDATE",
                   skip_locked=" FOR UPDATE SKIP LOCKED", as_int="::int", as_bigint="::bigint",
                   as_bytes="::bytea", named="%({})s",
                   dead_owners="owner = ANY(:owners::text[])", extra=_STATEMENTS)


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
        f"""CREATE FUNCTION cbw_tasks_durable_ended() RETURNS trigger
           LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
           BEGIN {_DIALECT.sql("end_durable_state")}
               RETURN NULL;
           END $$""",
        """CREATE TRIGGER cbw_tasks_durable_ended AFTER UPDATE OF status ON cbw_tasks
           FOR EACH ROW
           WHEN (NEW.status IN ('completed', 'failed', 'cancelled')
                 AND OLD.status NOT IN ('completed', 'failed', 'cancelled'))
           EXECUTE FUNCTION cbw_tasks_durable_ended()""",
    ],
    # 3: tasks as functions: name, arguments, result, traceback, progress,
    # priority and deduplication.
    [
        "ALTER TABLE cbw_queues ADD COLUMN config text",
        """ALTER TABLE cbw_tasks ADD COLUMN name text, ADD COLUMN args text,
               ADD COLUMN result text, ADD COLUMN traceback text, ADD COLUMN progress text,
               ADD COLUMN priority integer NOT NULL DEFAULT 0, ADD COLUMN dedup_key text""",
        # The claim reads due tasks in its own order from here and stops
        # after ``limit`` of them.
        "CREATE INDEX cbw_tasks_claim ON cbw_tasks(queue, priority DESC, next_run_at, seq) "
        "WHERE status IN ('pending', 'suspended')",
        "CREATE UNIQUE INDEX cbw_tasks_dedup ON cbw_tasks(queue, dedup_key) "
        "WHERE dedup_key IS NOT NULL AND status IN ('pending', 'running', 'suspended')",
    ],
    # 4: periodic schedules.
    [
        """CREATE TABLE cbw_schedules (
               name        text PRIMARY KEY,
               spec        text NOT NULL,
               queue       text NOT NULL,
               task        text NOT NULL,
               last_tick   bigint NOT NULL,
               next_run_at bigint NOT NULL,
               updated_at  bigint NOT NULL
           )""",
    ],
    # 5: attempts counted when their run starts, not at claim.
    [
        "ALTER TABLE cbw_tasks ADD COLUMN started_at bigint",
    ],
    # 6: listing tasks newest first by queue, task name, or failed tasks.
    [
        "CREATE INDEX cbw_tasks_by_queue ON cbw_tasks(queue, seq)",
        "CREATE INDEX cbw_tasks_by_name ON cbw_tasks(name, seq) WHERE name IS NOT NULL",
        "CREATE INDEX cbw_tasks_failed ON cbw_tasks(seq) WHERE status = 'failed'",
        "CREATE INDEX cbw_tasks_failed_by_queue ON cbw_tasks(queue, seq) "
        "WHERE status = 'failed'",
    ],
    # 7: a task whose claim was lost before its run's start was recorded
    # records the start of its later runs before their handlers run.
    [
        "ALTER TABLE cbw_tasks ADD COLUMN confirm_start integer NOT NULL DEFAULT 0",
    ],
    # 8: durable state is ended only for the tasks that have some.  The
    # first row of a task's log or callbacks marks the task ``durable``
    # (the insert's trigger, in its transaction, after the foreign key
    # found the task); the trigger that ends the state calls its function
    # for marked tasks only.
    [
        "ALTER TABLE cbw_tasks ADD COLUMN durable integer NOT NULL DEFAULT 0",
        "UPDATE cbw_tasks SET durable = 1 WHERE id IN (SELECT task_id FROM cbw_durable_ops "
        "UNION SELECT task_id FROM cbw_durable_callbacks)",
        """CREATE FUNCTION cbw_tasks_durable_marked() RETURNS trigger
           LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
           BEGIN
               UPDATE cbw_tasks SET durable = 1 WHERE id = NEW.task_id AND durable = 0;
               RETURN NULL;
           END $$""",
        *(f"""CREATE TRIGGER {table}_marked AFTER INSERT ON {table} FOR EACH ROW
              EXECUTE FUNCTION cbw_tasks_durable_marked()"""
          for table in ("cbw_durable_ops", "cbw_durable_callbacks")),
        "DROP TRIGGER cbw_tasks_durable_ended ON cbw_tasks",
        """CREATE TRIGGER cbw_tasks_durable_ended AFTER UPDATE OF status ON cbw_tasks
           FOR EACH ROW
           WHEN (NEW.durable = 1 AND NEW.status IN ('completed', 'failed', 'cancelled')
                 AND OLD.status NOT IN ('completed', 'failed', 'cancelled'))
           EXECUTE FUNCTION cbw_tasks_durable_ended()""",
    ],
]


_CHUNK_BYTES = 64 << 20


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


class PostgresTaskStore(SQLTaskStore):
    """The ``TaskStore`` contract on a PostgreSQL database (``dsn``: a
    libpq connection string or ``postgresql://`` URL), shared safely by any
    number of processes on any number of hosts.

    ``pool_size`` bounds this store's connections (plus one for the
    listener, once ``set_waker`` is called).  ``patience_s`` bounds how
    long a call keeps retrying transient failures (serialization failures,
    deadlocks, a lost connection) before raising ``StorageBusyError``.
    ``durability`` is ``"normal"`` (the server's ``synchronous_commit``) or
    ``"full"`` (``synchronous_commit = on``).  See the module docstring."""

    dialect = _DIALECT
    unique_violation = (pg_errors.UniqueViolation,) if psycopg is not None else ()
    foreign_key_violation = (pg_errors.ForeignKeyViolation,) if psycopg is not None else ()

    def __init__(self, dsn: str, *, durability: str = "normal", pool_size: int = 4,
                 patience_s: float = 60.0) -> None:
        require_psycopg()
        if durability not in _DURABILITY:
            raise ValueError(f"durability must be one of {list(_DURABILITY)}, not {durability!r}")
        if type(pool_size) is not int or pool_size < 1:
            raise ValueError(f"pool_size must be an int >= 1, not {pool_size!r}")
        self.dsn = dsn
        self._max_pause_s = _RETRY_PAUSE_MAX_S
        self.durability = durability
        self._patience_s = patience_s
        self._pool = Pool(self._connect, pool_size)
        self._listener: Optional[Listener] = None
        self._listener_lock = threading.Lock()
        self._reached = False
        try:
            self._run(self._migrate)
        except BaseException:
            self._pool.close()
            raise

    # ---- connections and transactions ----------------------------------

    def _connect(self, application_name: str = "callbackworker") -> "psycopg.Connection[Any]":
        options: Dict[str, Any] = {}
        left = patience_left()
        if left is not None:  # an unreachable host must not outlast a bounded call
            options["connect_timeout"] = max(2, math.ceil(left))
        conn = psycopg.connect(self.dsn, autocommit=True, application_name=application_name,
                               **options)
        if self.durability == "full":
            conn.execute("SET synchronous_commit = on")
        self._reached = True
        return conn

    def _run(self, body: Callable[["psycopg.Connection[Any]"], T]) -> T:
        """Runs ``body`` (one statement, or its own transaction) on a pooled
        connection, again from the start after a transient failure."""
        def attempt() -> T:
            conn: Optional["psycopg.Connection[Any]"] = None
            try:
                conn = self._pool.acquire()
                return body(conn)
            except psycopg.Error as exc:
                # A server that was never reached is a configuration error,
                # reported at once; one that went away is waited for.
                if self._reached and is_transient(exc, conn):
                    raise TransientError() from exc
                raise
            finally:
                if conn is not None:
                    self._pool.release(conn)

        return self._retry(attempt)

    _single = _run

    def _atomic(self, body: Callable[["psycopg.Connection[Any]"], T]) -> T:
        def transaction(conn: "psycopg.Connection[Any]") -> T:
            with conn.transaction():
                return body(conn)

        return self._run(transaction)

    def _query(self, sql: str, params: Mapping[str, Any]) -> List[Any]:
        return self._run(lambda conn: conn.execute(sql, params).fetchall())

    def _busy_message(self, exc: BaseException, waited_s: float) -> str:
        reason = " ".join(str(exc).split())  # libpq's messages run over several lines
        return f"the PostgreSQL task store kept failing for {round(waited_s, 1):g} s: {reason}"

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
            if version < SCHEMA_VERSION:
                conn.execute("""INSERT INTO cbw_schema_version(version) VALUES (%s)
                                ON CONFLICT (one) DO UPDATE SET version = excluded.version""",
                             (SCHEMA_VERSION,))
                log.info("PostgreSQL task schema %s version %d",
                         f"migrated from version {version} to" if version else "created at",
                         SCHEMA_VERSION)

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
                self._listener = Listener(lambda: self._connect(_LISTENER_NAME), waker)

    @property
    def listener_pid(self) -> Optional[int]:
        """The server process of the listener's connection, None while it is
        (re)connecting or not started (for monitoring and tests)."""
        listener = self._listener
        return None if listener is None else listener.backend_pid

    # ---- producing -----------------------------------------------------

    def enqueue_many(self, queue: str, tasks: Sequence["tuple[str, bytes]"], now: int) -> None:
        """See ``TaskStore.enqueue_many``.  A batch is one statement; one
        whose payloads pass ``_CHUNK_BYTES`` is several statements in one
        transaction (a value sent to the server is limited to 1 GB)."""
        if not tasks:
            return
        chunks = _chunks(tasks, _CHUNK_BYTES)

        def insert(conn: "psycopg.Connection[Any]", chunk: Batch) -> None:
            conn.execute(_DIALECT.sql("enqueue"), {
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

    def _claim_rows(self, params: Mapping[str, Any], spaced: bool) -> List[Any]:
        """A claim without ``delay_ms``: one prepared statement that commits
        without waiting for the server's flush (``synchronous_commit =
        off`` for its transaction), as starts do: the server's CPU and the
        dispatcher's wait for that flush were a good part of a task's cost.
        Nothing a claim records needs it: the commit is visible to every
        other claimer at once (no task is handed out twice), and only a
        crash of the server can lose it, which puts its tasks back as they
        were before the claim, their attempts not counted; a run that began
        meanwhile ends with an outcome that no longer matches and is
        rejected, and the task runs again, as after any lost claim.  A
        later commit that waits for the flush (an outcome of one of those
        tasks, say) flushes the claim with it, as the server's log is
        written in order.  Under ``delay_ms`` (``spaced``) the claim and
        the move of the queue's next start commit with the server's
        setting, so that the gap between starts survives a crash."""
        if spaced:
            return super()._claim_rows(params, spaced)
        sql = _DIALECT.sql("claim_quick")
        return self._run(lambda conn: list(conn.execute(sql, params, prepare=True).fetchall()))

    starts_apart = True

    def settle(self, outcomes: Sequence[Outcome]) -> List[bool]:
        """See ``TaskStore.settle``.  Starts are one ``UPDATE`` over a JSON
        array, the other outcomes another; with both in the batch they run
        in one transaction, starts first.  A batch of starts alone commits
        without waiting for the server's flush (``synchronous_commit = off``
        for that transaction): a start is about a worker that may die, and
        only a server crash can lose it, which costs that run its count,
        never a run that did not happen.  Beside outcomes, the transaction
        keeps the server's setting."""
        for o in outcomes:
            if o.kind not in Outcome.KINDS:
                raise ValueError(f"unknown outcome kind {o.kind!r}; expected one of "
                                 f"{Outcome.KINDS}")
        if not outcomes:
            return []
        starts = [o for o in outcomes if o.kind == "start"]
        ends = [o for o in outcomes if o.kind != "start"]
        start_params = {"batch": json.dumps([[o.task_id, o.token, o.at, o.lease_until]
                                             for o in starts])}
        params = {"batch": json.dumps([[o.task_id, o.token, o.kind, o.message, o.at,
                                        o.awaiting, o.result, o.traceback] for o in ends]),
                  "channel": CHANNEL}
        sql = _DIALECT.sql("settle")
        start_sql = _DIALECT.sql("start" if ends else "start_quick")
        suspends = [o for o in ends if o.kind == "suspend"]

        def statements(conn: "psycopg.Connection[Any]") -> "tuple[List[Any], List[Any]]":
            started = (conn.execute(start_sql, start_params, prepare=True).fetchall()
                       if starts else [])
            if not ends:
                return started, []
            rows = conn.execute(sql, params, prepare=True).fetchall()
            if suspends:
                # The second statement reads the callbacks after the first
                # holds the tasks' rows, so a signal either committed before
                # (and is seen) or waits for this transaction (and sees it
                # suspended).
                self._suspensions(conn, suspends, {(r[0], r[1]) for r in rows})
            return started, rows

        def body(conn: "psycopg.Connection[Any]") -> "tuple[List[Any], List[Any]]":
            if not suspends and (not starts or not ends):
                return statements(conn)
            with conn.transaction():
                return statements(conn)

        started, rows = self._run(body)
        applied_starts = {(r[0], r[1]) for r in started}
        applied = {(r[0], r[1]) for r in rows}
        results = []
        for o in outcomes:  # a repeated outcome applies once, the first time
            key = (o.task_id, o.token)
            done = applied_starts if o.kind == "start" else applied
            results.append(key in done)
            done.discard(key)
        return results

    def _suspensions(self, conn: "psycopg.Connection[Any]", suspends: Sequence[Outcome],
                     applied: Set["tuple[str, str]"]) -> None:
        """Places the tasks that ``"settle"`` just suspended: due when
        their callback expires, or pending at ``at`` if it is no longer
        pending (signalled or expired before the suspension applied)."""
        placed: Dict[str, Outcome] = {}
        for o in suspends:  # a repeated outcome applied once, the first time
            if (o.task_id, o.token) in applied and o.task_id not in placed:
                placed[o.task_id] = o
        if not placed:
            return
        records = {row[0]: callback_record(row) for row in conn.execute(
            _DIALECT.sql("callbacks"), {"ids": [o.awaiting for o in placed.values()]}).fetchall()}
        ids: List[str] = []
        statuses: List[str] = []
        ats: List[int] = []
        for o in placed.values():
            status, due = place_suspension(records.get(o.awaiting), o.at)
            ids.append(o.task_id)
            statuses.append(status)
            ats.append(due)
        conn.execute(_DIALECT.sql("suspend"),
                     {"ids": ids, "statuses": statuses, "ats": ats, "channel": CHANNEL})

    # ---- leases --------------------------------------------------------

    def renew_leases(self, owner: str, expires_at: int,
                     task_ids: Optional[Sequence[str]] = None) -> int:
        """See ``TaskStore.renew_leases``; the tasks named are renewed in
        one statement."""
        if task_ids is None:
            return super().renew_leases(owner, expires_at)
        if not task_ids:
            return 0
        return self._rowcount("renew_some", {"ids": list(task_ids), "owner": owner,
                                             "expires": expires_at})

    def recover(self, queue: str, *, now: int, max_attempts: int,
                owners: Iterable[str] = ()) -> int:
        (total, _), = self._query(_DIALECT.sql("recover"), {
            "queue": queue, "now": now, "max_attempts": max_attempts,
            "owners": sorted(set(owners))})
        return int(total)

    # ---- lifecycle -----------------------------------------------------

    def close(self) -> None:
        self.set_waker(None)
        self._pool.close()

    def __repr__(self) -> str:
        return f"<PostgresTaskStore {redact_dsn(self.dsn)!r} durability={self.durability}>"

