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
  then raises ``StorageBusyError``.  A caller that must answer sooner (an
  HTTP request) shortens it for its own calls with ``bounded_patience``,
  a context variable, so no other thread's patience changes.
* Lock order, where the database locks rows (PostgreSQL): a task's row
  before its callbacks' rows, in every operation that takes both.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
import re
import time
import uuid
from abc import abstractmethod
from typing import (Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple,
                    Type, TypeVar)

from ..durable import CallbackRecord
from ..errors import NonDeterminismError, StorageBusyError, UnknownCallbackError, UnknownTaskError
from .sqlmanage import MANAGE_STATEMENTS, ManagedTasks
from .status import RETRYABLE, TERMINAL, UNFINISHED, WAITING, TaskStatus, literal, literals
from .storage import (
    CALLBACK_COLUMNS,
    NEVER,
    STATUSES,
    TASK_COLUMNS,
    ClaimedTask,
    NewCall,
    ScheduleRecord,
    TaskRecord,
    TaskStore,
    apply_signal,
    callback_record,
    check_signal_state,
)
from .wakeups import WORK

__all__ = ["Dialect", "SQLTaskStore", "TransientError", "STATEMENTS", "bounded_patience",
           "patience_left"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Conn = Any
"""A DB-API connection whose ``execute(sql, params)`` returns a cursor
(``sqlite3.Connection`` and ``psycopg.Connection`` both do)."""

_TASK_FIELDS = TASK_COLUMNS

# The message a task gets when its worker was lost, with no attempt left
# and with one left.
_LOST = ("'worker lost during attempt ' || attempt || ' (lease expired); no attempts left'",
         "'worker lost during attempt ' || attempt || '; retrying'")

# A lost run that used up the attempts: started, and the last allowed.
_SPENT = "started_at IS NOT NULL AND attempt >= :max_attempts"

STATEMENTS: Dict[str, str] = {
    "ensure_queue": "INSERT INTO {queues}(name) VALUES (:name) ON CONFLICT (name) DO NOTHING",
    "queues": "SELECT name FROM {queues} ORDER BY name",
    "declare_queue": "INSERT INTO {queues}(name, config) VALUES (:name, :config) "
                     "ON CONFLICT (name) DO UPDATE SET config = excluded.config",
    "queue_config": "SELECT config FROM {queues} WHERE name = :name",
    "queue_start": "SELECT next_start_at FROM {queues} WHERE name = :queue{lock_row}",
    "space_starts": "UPDATE {queues} SET next_start_at = :next_start WHERE name = :queue",
    # The first due tasks in claim order (the order of the claim index, so
    # the scan stops after ``limit`` due rows), claimed under a lease.  The
    # attempt is counted when the run starts ("start" in settle), not here;
    # the claim returns the number the run will have (a replay of a
    # suspended task, ``awaiting`` set, stays in its attempt) and whether
    # the run must wait for its start to be recorded (``confirm_start``).
    "claim": """
        UPDATE {tasks} SET status = {RUNNING}, started_at = NULL,
               owner = :owner, lease_expires_at = :expires, token = :token
        WHERE seq IN (SELECT seq FROM {tasks}
                      WHERE queue = :queue AND status IN {WAITING} AND next_run_at <= :now
                      ORDER BY priority DESC, next_run_at, seq LIMIT :limit{skip_locked})
        RETURNING priority, next_run_at, seq, id, payload,
                  attempt + (awaiting IS NULL){as_int}, name, args, confirm_start""",
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
    # once the attempts are used up.  A claim whose run never started
    # (``started_at`` NULL: the worker died first, or the claim's answer
    # was lost with its connection) goes back to pending as it was, its
    # attempt not counted, and marked ``confirm_start``: its run may have
    # begun before its start was recorded, so later runs wait for theirs.
    # ``{dead_owners}`` is the dialect's test of ``owner`` against the
    # ``owners`` of the call.
    "recover": f"""
        UPDATE {{tasks}} SET
            status = CASE WHEN {_SPENT} THEN {{FAILED}} ELSE {{PENDING}} END,
            finished_at = CASE WHEN {_SPENT} THEN :now{{as_bigint}} END,
            next_run_at = CASE WHEN {_SPENT} THEN next_run_at ELSE :now{{as_bigint}} END,
            message = CASE WHEN started_at IS NULL THEN message
                           WHEN attempt >= :max_attempts THEN {_LOST[0]} ELSE {_LOST[1]} END,
            -- a lost run is the last failed attempt, and has no traceback
            traceback = CASE WHEN started_at IS NULL THEN traceback END,
            awaiting = CASE WHEN started_at IS NULL THEN awaiting END,
            confirm_start = CASE WHEN started_at IS NULL THEN 1 ELSE confirm_start END,
            owner = NULL, lease_expires_at = NULL, token = NULL
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
    # A starting service files its schedule: a new name, or a changed
    # spec, starts from the given baseline; an unchanged spec keeps its
    # last tick, so ticks missed while no service ran coalesce into one.
    # (Every right-hand side reads the row as it was.)
    "register_schedule": """
        INSERT INTO {schedules}(name, spec, queue, task, last_tick, next_run_at, updated_at)
        VALUES (:name, :spec, :queue, :task, :baseline, :next_run, :now)
        ON CONFLICT (name) DO UPDATE SET
            queue = excluded.queue, task = excluded.task, updated_at = excluded.updated_at,
            last_tick = CASE WHEN {schedules}.spec = excluded.spec THEN {schedules}.last_tick
                             ELSE excluded.last_tick END,
            next_run_at = CASE WHEN {schedules}.spec = excluded.spec
                               THEN {schedules}.next_run_at ELSE excluded.next_run_at END,
            spec = excluded.spec""",
    # The compare-and-set that makes a tick run once: it moves the last
    # tick forward only from an older one, under the spec the schedule has
    # now.  Concurrent claims of one tick serialise on the row (the write
    # lock on SQLite, the row lock on PostgreSQL, where the loser re-reads
    # the committed row and matches nothing).
    "claim_tick": "UPDATE {schedules} SET last_tick = :tick, next_run_at = :next_run "
                  "WHERE name = :name AND spec = :spec AND last_tick < :tick",
    "schedules": "SELECT name, spec, queue, task, last_tick, next_run_at, updated_at "
                 "FROM {schedules} ORDER BY name",
    "remove_schedule": "DELETE FROM {schedules} WHERE name = :name",
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
    **MANAGE_STATEMENTS,
}
"""Every statement the stores share, by name, in the dialect-neutral form
``Dialect.sql`` renders."""

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
            "schedules": f"{prefix}schedules",
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


_deadline: "contextvars.ContextVar[Optional[float]]" = contextvars.ContextVar(
    "callbackworker_store_deadline", default=None)


@contextlib.contextmanager
def bounded_patience(seconds: float) -> Iterator[None]:
    """Within the block, in this context (this thread, or this task), every
    SQL store call gives up transient failures ``seconds`` after the block
    was entered at the latest (``StorageBusyError``), however patient its
    store is otherwise; an enclosing, earlier bound still holds.  Other
    threads keep their store's ``patience_s``."""
    deadline = time.monotonic() + seconds
    outer = _deadline.get()
    reset = _deadline.set(deadline if outer is None else min(outer, deadline))
    try:
        yield
    finally:
        _deadline.reset(reset)


def patience_left() -> Optional[float]:
    """Seconds left under the innermost ``bounded_patience`` (at least 0),
    or None outside one."""
    deadline = _deadline.get()
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class TransientError(Exception):
    """Raised by one attempt of ``SQLTaskStore._retry`` when its failure
    (the ``__cause__``) is one another attempt may get past."""


class SQLTaskStore(ManagedTasks, TaskStore):
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
    def _busy_message(self, exc: BaseException, waited_s: float) -> str:
        """The ``StorageBusyError`` message once ``_retry`` gives up after
        ``waited_s`` seconds of patience."""

    unique_violation: Tuple[Type[BaseException], ...] = ()
    """The driver's errors for a duplicate key."""

    foreign_key_violation: Tuple[Type[BaseException], ...] = ()
    """The driver's errors for a row whose parent row is missing."""

    def _wake_others(self, message: bytes) -> None:
        """Called after a commit that may concern other processes: ``WORK``
        + a queue's name (empty: any queue) or ``FINISHED``
        (``wakeups.py``).  A backend whose statements notify by
        themselves keeps this default, which does nothing."""

    # ---- the retry loop --------------------------------------------------

    def _retry(self, attempt: Callable[[], T]) -> T:
        """Runs ``attempt`` (a whole transaction) until it returns or raises
        something other than ``TransientError``; after ``patience_s`` of
        transient failures (less under ``bounded_patience``), raises
        ``StorageBusyError``."""
        patience = self._patience_s
        left = patience_left()
        if left is not None:
            patience = min(patience, left)
        deadline = time.monotonic() + patience
        pause = 0.001
        while True:
            try:
                return attempt()
            except TransientError as wrapped:
                exc = wrapped.__cause__ or wrapped
                if time.monotonic() >= deadline:
                    raise StorageBusyError(self._busy_message(exc, patience)) from exc
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

    def declare_queue(self, name: str, config: str) -> None:
        self._rowcount("declare_queue", {"name": name, "config": config})

    def queue_config(self, name: str) -> Optional[str]:
        rows = self._rows("queue_config", {"name": name})
        return rows[0][0] if rows else None

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

        task_id = self._atomic(body)
        self._wake_others(WORK + queue.encode("utf-8", "surrogatepass"))
        return task_id

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
        rows = self._claim_rows(params, spaced=delay_ms > 0)
        rows.sort(key=lambda r: (-r[0], r[1], r[2]))
        return [ClaimedTask(r[3], bytes(r[4]), r[5], token, r[6], r[7], bool(r[8]))
                for r in rows]

    def _claim_rows(self, params: Mapping[str, Any], spaced: bool) -> List[Any]:
        """The claimed tasks as ``claim`` statement rows (priority, due time,
        seq, id, payload, attempt, name, args, confirm_start), in any order.
        ``spaced`` (under ``delay_ms``): in one transaction with reading the
        queue's next allowed start and moving it on; else the ``claim``
        statement on its own."""
        sql = self.dialect.sql
        claim = sql("claim")
        if not spaced:
            return self._single(lambda conn: list(conn.execute(claim, params).fetchall()))

        def body(conn: Conn) -> List[Any]:
            row = conn.execute(sql("queue_start"), params).fetchone()
            if row is None or row[0] > params["now"]:
                return []
            rows = conn.execute(claim, params).fetchall()
            if rows:
                conn.execute(sql("space_starts"), params)
            return list(rows)

        return self._atomic(body)

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

    # ---- periodic schedules ------------------------------------------------

    def register_schedule(self, name: str, spec: str, *, queue: str, task: str,
                          baseline: int, next_run_at: int, now: int) -> None:
        self._rowcount("register_schedule", {
            "name": name, "spec": spec, "queue": queue, "task": task,
            "baseline": baseline, "next_run": next_run_at, "now": now})

    def claim_tick(self, name: str, spec: str, tick: int, next_run_at: int, queue: str,
                   call: NewCall, now: int) -> bool:
        """See ``TaskStore.claim_tick``: one transaction runs the
        compare-and-set and, when it wins, the enqueue."""
        sql = self.dialect.sql
        claim = {"name": name, "spec": spec, "tick": tick, "next_run": next_run_at}
        enqueue = {"queue": queue, "id": call.id, "empty": b"", "run_at": call.run_at,
                   "now": now, "name": call.name, "args": call.args, "priority": call.priority,
                   "dedup_key": call.dedup_key}

        def body(conn: Conn) -> bool:
            if conn.execute(sql("claim_tick"), claim).rowcount != 1:
                return False
            conn.execute(sql("ensure_queue"), {"name": queue})
            conn.execute(sql("enqueue_call"), enqueue).fetchall()
            return True

        return self._atomic(body)

    def schedules(self) -> List[ScheduleRecord]:
        return [ScheduleRecord(*row) for row in self._rows("schedules", {})]

    def remove_schedule(self, name: str) -> bool:
        return self._rowcount("remove_schedule", {"name": name}) == 1

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

        record = self._atomic(body)
        self._wake_others(WORK)  # the task it woke, in whichever queue
        return record
