"""``SQLTaskStore``: what the SQLite and PostgreSQL task stores share.

DESIGN

* One base class holds every operation whose SQL and flow the two databases
  agree on; a backend subclasses it, names its ``Dialect`` (table prefix,
  row-locking clauses, casts, the statements only it has) and supplies
  four primitives: ``_query`` (a read), ``_single`` (one statement, atomic
  on its own), ``_atomic`` (a body of statements in one transaction), each
  retried through ``_retry``, and ``_busy_message``; its attempts decide
  which failures are transient.  What only one database can do well
  (PostgreSQL's one-statement batches over ``unnest``, SQLite's per-kind
  settle statements) stays in the backend.
* Every statement is kept by name in ``STATEMENTS`` and rendered once per
  dialect (``Dialect.sql``): ``{tasks}``-style fields become table names,
  ``{PENDING}``-style fields status literals (``status.TaskStatus``), and
  ``:name`` placeholders the driver's named parameters, so a shared
  statement always takes its parameters as a mapping.
* Transient failures (a locked SQLite file, a lost PostgreSQL connection,
  a serialization failure) are retried by ``_retry``, the one loop both
  use: an attempt raises ``TransientError`` to ask for another, and the
  loop backs off exponentially with jitter until ``patience_s`` has passed,
  then raises ``StorageBusyError``.
* Lock order, where the database locks rows (PostgreSQL): a task's row
  before its callbacks' rows, in every operation that takes both.
"""

from __future__ import annotations

import logging
import random
import re
import time
import uuid
from abc import abstractmethod
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from ..durable import CallbackRecord
from ..errors import NonDeterminismError, StorageBusyError, UnknownCallbackError, UnknownTaskError
from ..errors import TaskNotRetryableError
from .status import RETRYABLE, TERMINAL, UNFINISHED, WAITING, TaskStatus, literal, literals
from .storage import (
    CALLBACK_COLUMNS,
    NEVER,
    STATUSES,
    ClaimedTask,
    NewCall,
    TaskRecord,
    TaskStore,
    apply_signal,
    callback_record,
    check_signal_state,
)

__all__ = ["Dialect", "SQLTaskStore", "TransientError", "STATEMENTS", "LIST_FILTERS", "listing"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Conn = Any
"""A DB-API connection whose ``execute(sql, params)`` returns a cursor
(``sqlite3.Connection`` and ``psycopg.Connection`` both do)."""

_TASK_FIELDS = "id, queue, status, message, attempt, next_run_at, finished_at, owner, " \
               "lease_expires_at, name, result, traceback, progress, created_at"

# The message a task gets when its worker was lost, with no attempt left
# and with one left.
_LOST = ("'worker lost during attempt ' || attempt || ' (lease expired); no attempts left'",
         "'worker lost during attempt ' || attempt || '; retrying'")

STATEMENTS: Dict[str, str] = {
    "ensure_queue": "INSERT INTO {queues}(name) VALUES (:name) ON CONFLICT (name) DO NOTHING",
    "queues": "SELECT name FROM {queues} ORDER BY name",
    "queue_start": "SELECT next_start_at FROM {queues} WHERE name = :queue{lock_row}",
    "space_starts": "UPDATE {queues} SET next_start_at = :next_start WHERE name = :queue",
    # The first due tasks in claim order (the order of the claim index, so
    # the scan stops after ``limit`` due rows), claimed under a lease; a
    # replay of a suspended task (``awaiting`` set) stays in its attempt.
    "claim": """
        UPDATE {tasks} SET status = {RUNNING}, attempt = attempt + (awaiting IS NULL){as_int},
               owner = :owner, lease_expires_at = :expires, token = :token
        WHERE seq IN (SELECT seq FROM {tasks}
                      WHERE queue = :queue AND status IN {WAITING} AND next_run_at <= :now
                      ORDER BY priority DESC, next_run_at, seq LIMIT :limit{skip_locked})
        RETURNING priority, next_run_at, seq, id, payload, attempt, name, args""",
    # A function call; with a dedup key, nothing while an unfinished task of
    # the queue holds it (the partial unique index decides, race-free).
    "enqueue_call": """
        INSERT INTO {tasks}(id, queue, payload, status, next_run_at, created_at, name, args,
                            priority, dedup_key)
        VALUES (:id, :queue, :empty{as_bytes}, {PENDING}, :run_at, :now, :name, :args,
                :priority, :dedup_key)
        ON CONFLICT (queue, dedup_key) WHERE dedup_key IS NOT NULL AND status IN {UNFINISHED}
        DO NOTHING RETURNING id""",
    "dedup_holder": "SELECT id FROM {tasks} WHERE queue = :queue AND dedup_key = :dedup_key "
                    "AND status IN {UNFINISHED}",
    "set_progress": "UPDATE {tasks} SET progress = :progress "
                    "WHERE id = :id AND token = :token AND status = {RUNNING}",
    "renew_leases": "UPDATE {tasks} SET lease_expires_at = :expires "
                    "WHERE owner = :owner AND status = {RUNNING}",
    "renew_lease": "UPDATE {tasks} SET lease_expires_at = :expires "
                   "WHERE id = :id AND owner = :owner AND status = {RUNNING}",
    "running_owners": "SELECT DISTINCT owner FROM {tasks} "
                      "WHERE queue = :queue AND status = {RUNNING} ORDER BY owner",
    # Lost leases: back to pending with the attempt counted, or failed
    # once the attempts are used up.  ``{dead_owners}`` is the dialect's
    # test of ``owner`` against the ``owners`` of the call.
    "recover": f"""
        UPDATE {{tasks}} SET
            status = CASE WHEN attempt >= :max_attempts THEN {{FAILED}} ELSE {{PENDING}} END,
            finished_at = CASE WHEN attempt >= :max_attempts THEN :now{{as_bigint}} END,
            next_run_at = CASE WHEN attempt >= :max_attempts THEN next_run_at
                               ELSE :now{{as_bigint}} END,
            message = CASE WHEN attempt >= :max_attempts THEN {_LOST[0]} ELSE {_LOST[1]} END,
            awaiting = NULL, owner = NULL, lease_expires_at = NULL, token = NULL
        WHERE queue = :queue AND status = {{RUNNING}}
              AND (lease_expires_at <= :now OR {{dead_owners}})""",
    "get": f"SELECT {_TASK_FIELDS} FROM {{tasks}} WHERE id = :id",
    "task_status": "SELECT status FROM {tasks} WHERE id = :id{lock_update}",
    "cancel": "UPDATE {tasks} SET status = {CANCELLED}, finished_at = :now, awaiting = NULL "
              "WHERE id = :id AND status IN {WAITING}",
    "clear": "UPDATE {tasks} SET status = {CANCELLED}, finished_at = :now, awaiting = NULL "
             "WHERE queue = :queue AND status IN {WAITING}",
    "counts": """SELECT q.name, t.status, count(t.status)
                 FROM {queues} q LEFT JOIN {tasks} t ON t.queue = q.name
                 GROUP BY q.name, t.status ORDER BY q.name""",
    "next_due": """SELECT (SELECT min(next_run_at) FROM {tasks}
                           WHERE queue = :queue AND status IN {WAITING}
                                 AND next_run_at < :never),
                          (SELECT next_start_at FROM {queues} WHERE name = :queue)""",
    # Failed tasks by their own retention; the first test keeps the scan
    # on the finished-tasks index.
    "sweep": """DELETE FROM {tasks} WHERE queue = :queue AND finished_at < :latest
                   AND status IN {TERMINAL}
                   AND finished_at < CASE status WHEN {FAILED} THEN :failed_before{as_bigint}
                                                 ELSE :before{as_bigint} END""",
    # Listing, newest first: the filters the call gives are appended
    # (``LIST_FILTERS``), then ``list_order``.  Every row is read newest
    # first from an index ending in seq (migration 4) or from the key, so
    # a page stops after ``limit`` matches: a queue's or a task function's
    # through its index, failed tasks through theirs (the status is
    # written as a literal so that the partial index applies), others by
    # the key, quickly where the status is common among recent tasks.
    "list_tasks": f"SELECT {_TASK_FIELDS} FROM {{tasks}} WHERE seq < :before",
    "list_order": " ORDER BY seq DESC LIMIT :limit",
    "task_seq": "SELECT seq FROM {tasks} WHERE id = :id",
    "retry_check": "SELECT status, queue, dedup_key FROM {tasks} WHERE id = :id{lock_update}",
    # A failed or cancelled task runs again from a fresh attempt count; its
    # last message and traceback stay until its next attempt ends.
    "retry_task": """UPDATE {tasks} SET status = {PENDING}, next_run_at = :now, attempt = 0,
                            finished_at = NULL, result = NULL, progress = NULL, awaiting = NULL
                     WHERE id = :id AND status IN {RETRYABLE}""",
    # One batch of a purge, oldest first, one statement per finished
    # status: the status is a literal, so failed tasks' partial index
    # applies.
    **{f"purge_{status.value}": f"""DELETE FROM {{tasks}} WHERE seq IN (
                    SELECT seq FROM {{tasks}} WHERE queue = :queue AND status = {{{status.name}}}
                    ORDER BY seq LIMIT :limit)""" for status in TERMINAL},
    "durable_ops": "SELECT kind, name, value FROM {ops} WHERE task_id = :task_id ORDER BY seq",
    # Durable rows are refused for a task that does not exist: the insert
    # adds nothing (and a foreign key, where there is one, catches a task
    # deleted meanwhile).
    "durable_record": """
        INSERT INTO {ops}(task_id, seq, kind, name, value)
        SELECT :task_id, :seq, :kind, :name, :value{as_bytes}
        WHERE EXISTS (SELECT 1 FROM {tasks} WHERE id = :task_id)""",
    "durable_add_callback": f"""
        INSERT INTO {{callbacks}}({CALLBACK_COLUMNS})
        SELECT :id, :task_id, :name, :created, :timeout_ms, :heartbeat_ms, :state,
               :result{{as_bytes}}, :error, :last_beat
        WHERE EXISTS (SELECT 1 FROM {{tasks}} WHERE id = :task_id)""",
    "callback": f"SELECT {CALLBACK_COLUMNS} FROM {{callbacks}} WHERE id = :id",
    "callback_locked": f"SELECT {CALLBACK_COLUMNS} FROM {{callbacks}} WHERE id = :id"
                       "{lock_update}",
    "callback_owner": "SELECT task_id FROM {callbacks} WHERE id = :id",
    "lock_task": "SELECT 1 FROM {tasks} WHERE id = :id{lock_row}",
    "heartbeat": "UPDATE {callbacks} SET last_beat_at = :now WHERE id = :id",
    "heartbeat_task": "UPDATE {tasks} SET next_run_at = :due WHERE id = :task_id "
                      "AND status = {SUSPENDED} AND awaiting = :id",
    "resolve": "UPDATE {callbacks} SET state = :state, result = :result, error = :error "
               "WHERE id = :id",
    # What a trigger runs as task NEW reaches a terminal status: its log
    # goes and its pending callbacks close (both backends' migration 2).
    "end_durable_state": """
        DELETE FROM {ops} WHERE task_id = NEW.id;
        UPDATE {callbacks}
           SET state = CASE state WHEN 'pending' THEN 'closed' ELSE state END, result = NULL
         WHERE task_id = NEW.id;""",
    # A terminal signal wakes the task suspended on it: due now.
    "wake": "UPDATE {tasks} SET status = {PENDING}, next_run_at = :now WHERE id = :task_id "
            "AND status = {SUSPENDED} AND awaiting = :id",
}
"""Every statement the stores share, by name, in the dialect-neutral form
``Dialect.sql`` renders."""

LIST_FILTERS: Dict[str, str] = {"queue": " AND queue = :queue", "name": " AND name = :name",
                                "status": " AND status = {status}"}
"""The filters of ``list_tasks``, appended to its statement when given."""


def listing(dialect: "Dialect", filters: Tuple[str, ...], status: str = "") -> str:
    """The ``list_tasks`` statement with the ``filters`` (keys of
    ``LIST_FILTERS``) given, rendered in ``dialect``; ``status`` (a
    ``TaskStatus`` value, else ``ValueError``) when they include it."""
    text = "".join(LIST_FILTERS[f] for f in filters)
    if "status" in filters:
        text = text.replace("{status}", literal(TaskStatus(status)))
    return dialect.render(STATEMENTS["list_tasks"] + text + STATEMENTS["list_order"])

_PLACEHOLDER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class Dialect:
    """How one database spells what ``STATEMENTS`` leaves open.

    ``prefix`` is put before every table name; ``lock_row`` /
    ``lock_update`` / ``skip_locked`` end a ``SELECT`` that locks the rows
    it reads (empty where the whole database is locked for a write);
    ``as_int`` / ``as_bigint`` / ``as_bytes`` cast an expression or a
    parameter whose type the database cannot infer; ``named`` is the
    driver's named-parameter form (``{}`` for the name); ``dead_owners``
    tests ``owner`` against the ``owners`` parameter; ``extra`` adds or
    replaces statements."""

    def __init__(self, *, prefix: str = "", lock_row: str = "", lock_update: str = "",
                 skip_locked: str = "", as_int: str = "", as_bigint: str = "",
                 as_bytes: str = "", named: str = ":{}", dead_owners: str = "",
                 extra: Optional[Mapping[str, str]] = None) -> None:
        self.named = named
        self._fields: Dict[str, str] = {
            "tasks": f"{prefix}tasks", "queues": f"{prefix}queues",
            "ops": f"{prefix}durable_ops", "callbacks": f"{prefix}durable_callbacks",
            "lock_row": lock_row, "lock_update": lock_update, "skip_locked": skip_locked,
            "as_int": as_int, "as_bigint": as_bigint, "as_bytes": as_bytes,
            "dead_owners": dead_owners, "NEVER": str(NEVER),
            "TERMINAL": literals(TERMINAL), "WAITING": literals(WAITING),
            "UNFINISHED": literals(UNFINISHED), "RETRYABLE": literals(RETRYABLE),
        }
        self._fields.update({s.name: literal(s) for s in TaskStatus})
        self._sql = {name: self.render(text) for name, text in {**STATEMENTS,
                                                                 **(extra or {})}.items()}

    def render(self, text: str) -> str:
        """``text`` with its fields filled in and its ``:name`` placeholders
        in the driver's form."""
        filled = text.format(**self._fields)
        if self.named == ":{}":
            return filled
        return _PLACEHOLDER.sub(lambda m: self.named.format(m.group(1)), filled)

    def sql(self, name: str) -> str:
        """The statement called ``name``, rendered."""
        return self._sql[name]


class TransientError(Exception):
    """Raised by one attempt of ``SQLTaskStore._retry`` when its failure
    (the ``__cause__``) is one another attempt may get past."""


class SQLTaskStore(TaskStore):
    """The ``TaskStore`` operations both SQL backends run the same way.  A
    subclass sets ``dialect`` and supplies the primitives below."""

    dialect: Dialect
    _patience_s: float = 60.0
    _max_pause_s: float = 0.1

    # ---- primitives a backend supplies -----------------------------------

    @abstractmethod
    def _query(self, sql: str, params: Mapping[str, Any]) -> List[Any]:
        """The rows of one read-only statement."""

    @abstractmethod
    def _single(self, body: Callable[[Conn], T]) -> T:
        """Runs ``body`` (one statement) atomically, retried as a whole."""

    @abstractmethod
    def _atomic(self, body: Callable[[Conn], T]) -> T:
        """Runs ``body`` (several statements) in one transaction, retried
        as a whole."""

    @abstractmethod
    def _busy_message(self, exc: BaseException) -> str:
        """The ``StorageBusyError`` message once ``_retry`` gives up."""

    unique_violation: Tuple[Type[BaseException], ...] = ()
    """The driver's errors for a duplicate key."""

    foreign_key_violation: Tuple[Type[BaseException], ...] = ()
    """The driver's errors for a row whose parent row is missing."""

    # ---- the retry loop --------------------------------------------------

    def _retry(self, attempt: Callable[[], T]) -> T:
        """Runs ``attempt`` (a whole transaction) until it returns or raises
        something other than ``TransientError``; after ``patience_s`` of
        transient failures, raises ``StorageBusyError``."""
        deadline = time.monotonic() + self._patience_s
        pause = 0.001
        while True:
            try:
                return attempt()
            except TransientError as wrapped:
                exc = wrapped.__cause__ or wrapped
                if time.monotonic() >= deadline:
                    raise StorageBusyError(self._busy_message(exc)) from exc
                log.debug("%r: transient failure (%s); retrying in %.0f ms",
                          self, exc, pause * 1000)
                time.sleep(pause * (0.5 + random.random()))
                pause = min(pause * 2, self._max_pause_s)

    # ---- helpers ---------------------------------------------------------

    def _rowcount(self, name: str, params: Mapping[str, Any]) -> int:
        sql = self.dialect.sql(name)
        return int(self._single(lambda conn: conn.execute(sql, params).rowcount))

    def _rows(self, name: str, params: Mapping[str, Any]) -> List[Any]:
        return self._query(self.dialect.sql(name), params)

    # ---- queues ----------------------------------------------------------

    def ensure_queue(self, name: str) -> None:
        self._rowcount("ensure_queue", {"name": name})

    def queues(self) -> List[str]:
        return [row[0] for row in self._rows("queues", {})]

    # ---- producing -------------------------------------------------------

    def enqueue_call(self, queue: str, call: NewCall, now: int) -> str:
        """See ``TaskStore.enqueue_call``.  One transaction creates the
        queue if needed, then either inserts the call or, when the dedup
        index refuses it, reads the task holding the key; should that task
        finish between the two statements, it tries again."""
        sql = self.dialect.sql
        params = {"queue": queue, "id": call.id, "empty": b"", "run_at": call.run_at,
                  "now": now, "name": call.name, "args": call.args, "priority": call.priority,
                  "dedup_key": call.dedup_key}

        def body(conn: Conn) -> str:
            conn.execute(sql("ensure_queue"), {"name": queue})
            while True:
                row = conn.execute(sql("enqueue_call"), params).fetchone()
                if row is not None:
                    return str(row[0])
                held = conn.execute(sql("dedup_holder"), params).fetchone()
                if held is not None:
                    return str(held[0])

        return self._atomic(body)

    # ---- consuming -------------------------------------------------------

    def claim(self, queue: str, *, owner: str, limit: int, now: int, lease_ms: int,
              delay_ms: int = 0) -> List[ClaimedTask]:
        """See ``TaskStore.claim``.  Under ``delay_ms`` one transaction
        reads the queue's next allowed start (locking its row where rows
        lock), claims at most one task and moves that start on."""
        if limit <= 0:
            return []
        token = uuid.uuid4().hex  # unique per claim; a task appears once in a claim
        params = {"owner": owner, "expires": now + lease_ms, "token": token, "queue": queue,
                  "now": now, "limit": limit if delay_ms <= 0 else 1,
                  "next_start": now + delay_ms}
        claim = self.dialect.sql("claim")

        def spaced(conn: Conn) -> List[Any]:
            row = conn.execute(self.dialect.sql("queue_start"), params).fetchone()
            if row is None or row[0] > now:
                return []
            rows = conn.execute(claim, params).fetchall()
            if rows:
                conn.execute(self.dialect.sql("space_starts"), params)
            return list(rows)

        if delay_ms > 0:
            rows = self._atomic(spaced)
        else:
            rows = self._single(lambda conn: list(conn.execute(claim, params).fetchall()))
        rows.sort(key=lambda r: (-r[0], r[1], r[2]))
        return [ClaimedTask(r[3], bytes(r[4]), r[5], token, r[6], r[7]) for r in rows]

    def set_progress(self, task_id: str, token: str, progress: str) -> bool:
        return self._rowcount("set_progress", {"id": task_id, "token": token,
                                               "progress": progress}) == 1

    # ---- leases ----------------------------------------------------------

    def renew_leases(self, owner: str, expires_at: int,
                     task_ids: Optional[Sequence[str]] = None) -> int:
        if task_ids is None:
            return self._rowcount("renew_leases", {"owner": owner, "expires": expires_at})
        if not task_ids:
            return 0
        sql = self.dialect.sql("renew_lease")
        params = [{"id": task_id, "owner": owner, "expires": expires_at} for task_id in task_ids]

        def body(conn: Conn) -> int:
            return sum(conn.execute(sql, p).rowcount for p in params)

        return int(self._atomic(body))

    def running_owners(self, queue: str) -> List[str]:
        return [row[0] for row in self._rows("running_owners", {"queue": queue})]

    # ---- management ------------------------------------------------------

    def get(self, task_id: str) -> Optional[TaskRecord]:
        rows = self._rows("get", {"id": task_id})
        return TaskRecord(*rows[0]) if rows else None

    def cancel(self, task_id: str, now: int) -> Optional[str]:
        params = {"id": task_id, "now": now}

        def body(conn: Conn) -> Optional[str]:
            row = conn.execute(self.dialect.sql("task_status"), params).fetchone()
            if row is None:
                return None
            if row[0] in WAITING:
                conn.execute(self.dialect.sql("cancel"), params)
            return str(row[0])

        return self._atomic(body)

    def clear(self, queue: str, now: int) -> int:
        return self._rowcount("clear", {"queue": queue, "now": now})

    def counts(self) -> Dict[str, Dict[str, int]]:
        table: Dict[str, Dict[str, int]] = {}
        for queue, status, n in self._rows("counts", {}):
            row = table.setdefault(queue, dict.fromkeys(STATUSES, 0))
            if status is not None:
                row[status] = int(n)
        return table

    def next_due(self, queue: str) -> Optional[int]:
        (due, next_start), = self._rows("next_due", {"queue": queue, "never": NEVER})
        if due is None:
            return None
        return int(max(due, next_start or 0))

    def sweep(self, queue: str, finished_before: int,
              failed_before: Optional[int] = None) -> int:
        failed = finished_before if failed_before is None else failed_before
        return self._rowcount("sweep", {"queue": queue, "before": finished_before,
                                        "failed_before": failed,
                                        "latest": max(finished_before, failed)})

    def list_tasks(self, *, queue: Optional[str] = None, status: Optional[str] = None,
                   name: Optional[str] = None, limit: int = 100,
                   before_id: Optional[str] = None) -> List[TaskRecord]:
        """See ``TaskStore.list_tasks``."""
        before = NEVER
        if before_id is not None:
            rows = self._rows("task_seq", {"id": before_id})
            if not rows:
                raise UnknownTaskError(before_id)
            before = int(rows[0][0])
        params: Dict[str, Any] = {"queue": queue, "status": status, "name": name}
        given = tuple(column for column in LIST_FILTERS if params[column] is not None)
        params.update(before=before, limit=limit)
        sql = listing(self.dialect, given, status or "")
        return [TaskRecord(*row) for row in self._query(sql, params)]

    def retry_task(self, task_id: str, now: int) -> Optional[str]:
        """See ``TaskStore.retry_task``.  One transaction reads the task
        (locking its row where rows lock), checks that no unfinished task
        holds its dedup key, and makes it pending."""
        sql = self.dialect.sql
        params = {"id": task_id, "now": now}

        def body(conn: Conn) -> Optional[str]:
            row = conn.execute(sql("retry_check"), params).fetchone()
            if row is None:
                return None
            status, queue, dedup_key = row
            if status not in RETRYABLE:
                return str(status)
            if dedup_key is not None:
                held = conn.execute(sql("dedup_holder"),
                                    {"queue": queue, "dedup_key": dedup_key}).fetchone()
                if held is not None:
                    raise TaskNotRetryableError(task_id, str(status), str(held[0]))
            conn.execute(sql("retry_task"), params)
            return str(status)

        try:
            return self._atomic(body)
        except self.unique_violation:  # the key was taken meanwhile
            raise TaskNotRetryableError(task_id, "failed", holder="") from None

    def purge(self, queue: str, status: str, limit: int) -> int:
        if status not in TERMINAL:
            raise ValueError(f"only finished tasks are purged, not {status!r} ones")
        return self._rowcount(f"purge_{status}", {"queue": queue, "limit": limit})

    # ---- durable operation logs and callbacks ------------------------------

    def durable_ops(self, task_id: str) -> List["tuple[str, str, bytes]"]:
        return [(kind, name, bytes(value))
                for kind, name, value in self._rows("durable_ops", {"task_id": task_id})]

    def durable_record(self, task_id: str, seq: int, kind: str, name: str,
                       value: bytes) -> None:
        """See ``TaskStore.durable_record``; raises ``UnknownTaskError`` if
        the task does not exist (any more)."""
        try:
            added = self._rowcount("durable_record", {"task_id": task_id, "seq": seq,
                                                      "kind": kind, "name": name,
                                                      "value": value})
        except self.unique_violation:
            raise NonDeterminismError(
                f"operation {seq + 1} of task {task_id} was recorded twice (did two runs "
                f"of the task overlap?)") from None
        except self.foreign_key_violation:
            added = 0
        if not added:
            raise UnknownTaskError(task_id)

    def durable_add_callback(self, record: CallbackRecord) -> None:
        """See ``TaskStore.durable_add_callback``; raises
        ``UnknownTaskError`` if the owner task does not exist (any more)."""
        try:
            added = self._rowcount("durable_add_callback", {
                "id": record.callback_id, "task_id": record.owner, "name": record.name,
                "created": record.created_ms, "timeout_ms": record.timeout_ms,
                "heartbeat_ms": record.heartbeat_timeout_ms, "state": record.state,
                "result": record.result, "error": record.error,
                "last_beat": record.last_beat_ms})
        except self.foreign_key_violation:
            added = 0
        if not added:
            raise UnknownTaskError(record.owner)

    def durable_callback(self, callback_id: str) -> Optional[CallbackRecord]:
        rows = self._rows("callback", {"id": callback_id})
        return callback_record(rows[0]) if rows else None

    def durable_signal(self, callback_id: str, state: str, result: Optional[bytes],
                       error: Optional[str], now: int) -> CallbackRecord:
        """See ``TaskStore.durable_signal``.  One transaction locks the
        owner task's row, then the callback's: the same order as a task
        reaching a terminal status (whose trigger closes the callbacks) and
        as a suspension, so none of them deadlock, and concurrent signals
        queue on the callback's row, where the first applies and the others
        find it no longer pending."""
        check_signal_state(state)
        sql = self.dialect.sql

        def body(conn: Conn) -> CallbackRecord:
            params: Dict[str, Any] = {"id": callback_id, "now": now, "state": state,
                                      "result": result, "error": error}
            owner = conn.execute(sql("callback_owner"), params).fetchone()
            if owner is None:
                raise UnknownCallbackError(callback_id)
            conn.execute(sql("lock_task"), {"id": owner[0]})
            row = conn.execute(sql("callback_locked"), params).fetchone()
            if row is None:  # swept meanwhile
                raise UnknownCallbackError(callback_id)
            record = callback_record(row)
            params["task_id"] = record.owner
            params["due"] = apply_signal(record, state, result, error, now)
            if params["due"] is not None:  # a heartbeat
                conn.execute(sql("heartbeat"), params)
                conn.execute(sql("heartbeat_task"), params)
            else:
                conn.execute(sql("resolve"), params)
                conn.execute(sql("wake"), params)
            return record

        return self._atomic(body)
