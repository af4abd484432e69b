"""The SQL of the operating verbs both stores share: listing tasks,
retrying them and purging them.

``sql.SQLTaskStore`` inherits ``ManagedTasks`` and renders
``MANAGE_STATEMENTS`` with its other statements, in each dialect.  Every
listing reads rows newest first from an index ending in ``seq`` (schema
migration 6) or from the table's key, so a page stops after ``limit``
matches; no listing index holds the status, which every claim and settle
changes, except the partial ones of failed tasks, which seldom change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, cast

from ..errors import TaskNotRetryableError, UnknownTaskError
from .status import RETRYABLE, TERMINAL, TaskStatus, literal
from .storage import NEVER, TASK_COLUMNS, TaskRecord

if TYPE_CHECKING:
    from .sql import Dialect, SQLTaskStore

__all__ = ["MANAGE_STATEMENTS", "LIST_FILTERS", "listing", "ManagedTasks"]

Conn = Any

MANAGE_STATEMENTS: Dict[str, str] = {
    # Listing, newest first: the filters the call gives are appended
    # (``LIST_FILTERS``), then ``list_order``.  Every row is read newest
    # first from an index ending in seq (migration 6) or from the key, so
    # a page stops after ``limit`` matches: a queue's or a task function's
    # through its index, failed tasks through theirs (the status is
    # written as a literal so that the partial index applies), others by
    # the key, quickly where the status is common among recent tasks.
    "list_tasks": f"SELECT {TASK_COLUMNS} FROM {{tasks}} WHERE seq < :before",
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
}
"""The operating verbs' statements, by name, in ``sql.STATEMENTS``' form."""


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
    return dialect.render(MANAGE_STATEMENTS["list_tasks"] + text
                          + MANAGE_STATEMENTS["list_order"])


class ManagedTasks:
    """``TaskStore.list_tasks``, ``retry_task`` and ``purge`` for
    ``SQLTaskStore``."""

    def list_tasks(self, *, queue: Optional[str] = None, status: Optional[str] = None,
                   name: Optional[str] = None, limit: int = 100,
                   before_id: Optional[str] = None) -> List[TaskRecord]:
        """See ``TaskStore.list_tasks``."""
        store = cast("SQLTaskStore", self)  # the class this mixes into
        before = NEVER
        if before_id is not None:
            rows = store._rows("task_seq", {"id": before_id})
            if not rows:
                raise UnknownTaskError(before_id)
            before = int(rows[0][0])
        params: Dict[str, Any] = {"queue": queue, "status": status, "name": name}
        given = tuple(column for column in LIST_FILTERS if params[column] is not None)
        params.update(before=before, limit=limit)
        sql = listing(store.dialect, given, status or "")
        return [TaskRecord(*row) for row in store._query(sql, params)]

    def retry_task(self, task_id: str, now: int) -> Optional[str]:
        """See ``TaskStore.retry_task``.  One transaction reads the task
        (locking its row where rows lock), checks that no unfinished task
        holds its dedup key, and makes it pending."""
        store = cast("SQLTaskStore", self)  # the class this mixes into
        sql = store.dialect.sql
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
            return store._atomic(body)
        except store.unique_violation:  # the key was taken meanwhile
            raise TaskNotRetryableError(task_id, "failed", holder="") from None

    def purge(self, queue: str, status: str, limit: int) -> int:
        """See ``TaskStore.purge``."""
        store = cast("SQLTaskStore", self)  # the class this mixes into
        if status not in TERMINAL:
            raise ValueError(f"only finished tasks are purged, not {status!r} ones")
        return store._rowcount(f"purge_{status}", {"queue": queue, "limit": limit})
