"""The task schema at ``SCHEMA_VERSION``, described once for both backends.

Each backend reaches this schema by its own versioned migrations (SQLite's
``PRAGMA user_version``, PostgreSQL's ``cbw_schema_version``): a migration,
once released, is history and never changes, so the DDL is not rendered
from here.  Instead the tests open every backend, fresh and migrated from
each older version, and compare its live tables, columns, types,
nullability and indexes with ``expected_columns`` and ``INDEXES``.  A
schema change therefore touches three places together: a new migration in
each backend and this description.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

__all__ = ["SCHEMA_VERSION", "Column", "TABLES", "TYPES", "INDEXES", "expected_columns"]

SCHEMA_VERSION = 8
"""The schema version this callbackworker creates and understands."""


class Column(NamedTuple):
    """One column: its name, its portable type (a key of ``TYPES``) and
    whether it may be NULL."""

    name: str
    type: str
    nullable: bool = False


TABLES: Dict[str, Tuple[Column, ...]] = {
    "queues": (
        Column("name", "text"),
        # The next time a claim under a global delay may start a task.
        Column("next_start_at", "bigint"),
        # The config declared for the queue (version 3): JSON of the
        # ``QueueConfig`` fields, NULL if none was declared.
        Column("config", "text", True),
    ),
    "tasks": (
        Column("seq", "bigint"),  # insertion order, the claim's tie-break
        Column("id", "text"),
        Column("queue", "text"),
        Column("payload", "bytes"),
        Column("status", "text"),  # a ``TaskStatus`` value
        Column("message", "text"),
        Column("attempt", "int"),
        Column("next_run_at", "bigint"),
        Column("created_at", "bigint"),
        Column("finished_at", "bigint", True),
        Column("owner", "text", True),
        Column("lease_expires_at", "bigint", True),
        Column("token", "text", True),
        # The callback a suspended task waits for, kept until the replay
        # ends.
        Column("awaiting", "text", True),
        # Tasks as functions (version 3): the registered name (NULL for a
        # raw payload), the call's arguments, the return value, the last
        # failed attempt's traceback and the latest progress, all JSON text
        # but the traceback; the claim order; the deduplication key.
        Column("name", "text", True),
        Column("args", "text", True),
        Column("result", "text", True),
        Column("traceback", "text", True),
        Column("progress", "text", True),
        Column("priority", "int"),
        Column("dedup_key", "text", True),
        # When the current attempt's run started (version 5): NULL while a
        # claimed task waits for its run, so a claim that never ran is
        # taken back without counting an attempt.
        Column("started_at", "bigint", True),
        # 1 once a claim of the task was taken back before its run's start
        # was recorded (version 7): the start of a run is written through
        # the group commit while the handler already runs, so a crash in
        # that moment costs no attempt; every later run of such a task
        # waits for its start to be recorded, so a handler that kills its
        # process runs uncounted once at most.
        Column("confirm_start", "int"),
        # 1 once the task has had durable state (an operation log or
        # callbacks; version 8): the trigger that ends that state when the
        # task finishes runs for these tasks only.
        Column("durable", "int"),
    ),
    # Periodic schedules (version 4), one row per name: the spec the last
    # service started with, the task it enqueues, the last tick enqueued
    # (the compare-and-set that makes each tick run once) and the next.
    "schedules": (
        Column("name", "text"),
        Column("spec", "text"),
        Column("queue", "text"),
        Column("task", "text"),
        Column("last_tick", "bigint"),
        Column("next_run_at", "bigint"),
        Column("updated_at", "bigint"),
    ),
    "durable_ops": (
        Column("task_id", "text"),
        Column("seq", "int"),
        Column("kind", "text"),
        Column("name", "text"),
        Column("value", "bytes"),
    ),
    "durable_callbacks": (
        Column("id", "text"),
        Column("task_id", "text"),
        Column("name", "text"),
        Column("state", "text"),
        Column("result", "bytes", True),
        Column("error", "text", True),
        Column("created_at", "bigint"),
        Column("last_beat_at", "bigint"),
        Column("timeout_ms", "bigint"),
        Column("heartbeat_timeout_ms", "bigint"),
    ),
}
"""Every table (without the backend's prefix) and its columns."""

TYPES: Dict[str, Dict[str, str]] = {
    "sqlite": {"text": "TEXT", "int": "INTEGER", "bigint": "INTEGER", "bytes": "BLOB"},
    "postgresql": {"text": "text", "int": "integer", "bigint": "bigint", "bytes": "bytea"},
}
"""Each portable type as each backend declares it."""

PREFIX: Dict[str, str] = {"sqlite": "", "postgresql": "cbw_"}
"""What each backend puts before a table's name."""

INDEXES: Dict[str, Dict[str, str]] = {
    "sqlite": {
        # One index per phase of a task's life (version 8), so a claim or
        # a settle changes only the entries of the phases it moves the
        # task between; the counts per status read all three.
        "tasks_waiting": "tasks(queue, status, next_run_at) "
                         "WHERE status IN ('pending', 'suspended')",
        "tasks_running": "tasks(queue, status, owner) WHERE status = 'running'",
        "tasks_finished": "tasks(queue, status, finished_at) WHERE finished_at IS NOT NULL",
        "durable_callbacks_task": "durable_callbacks(task_id)",
        # The claim's order, due tasks read first to last (version 3).
        "tasks_claim": "tasks(queue, priority DESC, next_run_at, seq) "
                       "WHERE status IN ('pending', 'suspended')",
        "tasks_dedup": "UNIQUE tasks(queue, dedup_key) WHERE dedup_key IS NOT NULL "
                       "AND status IN ('pending', 'running', 'suspended')",
        # Listing newest first by queue, task name, or failed tasks
        # (version 6); none has the status, which changes at every claim
        # and settle, except for failed tasks, which seldom change.
        "tasks_by_queue": "tasks(queue, seq)",
        "tasks_by_name": "tasks(name, seq) WHERE name IS NOT NULL",
        "tasks_failed": "tasks(seq) WHERE status = 'failed'",
        "tasks_failed_by_queue": "tasks(queue, seq) WHERE status = 'failed'",
    },
    "postgresql": {
        "cbw_tasks_due": "cbw_tasks(queue, next_run_at, seq) "
                         "WHERE status IN ('pending', 'suspended')",
        "cbw_tasks_finished": "cbw_tasks(queue, finished_at) WHERE finished_at IS NOT NULL",
        "cbw_tasks_leases": "cbw_tasks(queue, lease_expires_at) WHERE status = 'running'",
        "cbw_tasks_owned": "cbw_tasks(owner) WHERE status = 'running'",
        "cbw_durable_callbacks_task": "cbw_durable_callbacks(task_id)",
        "cbw_tasks_claim": "cbw_tasks(queue, priority DESC, next_run_at, seq) "
                           "WHERE status IN ('pending', 'suspended')",
        "cbw_tasks_dedup": "UNIQUE cbw_tasks(queue, dedup_key) WHERE dedup_key IS NOT NULL "
                           "AND status IN ('pending', 'running', 'suspended')",
        "cbw_tasks_by_queue": "cbw_tasks(queue, seq)",
        "cbw_tasks_by_name": "cbw_tasks(name, seq) WHERE name IS NOT NULL",
        "cbw_tasks_failed": "cbw_tasks(seq) WHERE status = 'failed'",
        "cbw_tasks_failed_by_queue": "cbw_tasks(queue, seq) WHERE status = 'failed'",
    },
}
"""The secondary indexes each backend creates (keys and unique constraints
aside), by name, as ``[UNIQUE ]table(columns) [WHERE predicate]``."""


def expected_columns(backend: str) -> Dict[str, Dict[str, Tuple[str, bool]]]:
    """``{table: {column: (declared type, nullable)}}`` as ``backend``
    (``"sqlite"`` or ``"postgresql"``) should hold it, prefixes included."""
    types, prefix = TYPES[backend], PREFIX[backend]
    return {prefix + table: {c.name: (types[c.type], c.nullable) for c in columns}
            for table, columns in TABLES.items()}
