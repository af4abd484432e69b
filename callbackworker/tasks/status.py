"""Task statuses, as one enum that the stores' SQL and the public records
share.

The stored value of a status is its string (``"pending"``, …): the
``status`` column holds it and ``TaskRecord.status`` / ``TaskInfo.status``
return it as a plain ``str``.  The stores' statements name statuses only
through ``literal`` and ``literals``, so a status is spelt once, here; the
released schema migrations, which are history, keep theirs as written
(the tests check PostgreSQL's status constraint against this enum).
"""

from __future__ import annotations

from enum import Enum
from typing import Tuple

__all__ = ["TaskStatus", "TERMINAL", "WAITING", "UNFINISHED", "RETRYABLE", "literal",
           "literals"]


class TaskStatus(str, Enum):
    """Every status of a task, in the order tables show them; see
    ``callbackworker.tasks.storage`` for the transitions."""

    PENDING = "pending"
    RUNNING = "running"
    SUSPENDED = "suspended"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


TERMINAL: Tuple[TaskStatus, ...] = (TaskStatus.COMPLETED, TaskStatus.FAILED,
                                     TaskStatus.CANCELLED)
"""Statuses a task never leaves: its durable state ends on entering one,
and retention deletes it by ``finished_at``."""

WAITING: Tuple[TaskStatus, ...] = (TaskStatus.PENDING, TaskStatus.SUSPENDED)
"""Statuses a claim takes a due task from, and that cancelling ends."""

UNFINISHED: Tuple[TaskStatus, ...] = (TaskStatus.PENDING, TaskStatus.RUNNING,
                                      TaskStatus.SUSPENDED)
"""Statuses of a task not finished yet: one holding a ``dedup_key`` keeps
another with the same key in its queue from being stored."""


RETRYABLE: Tuple[TaskStatus, ...] = (TaskStatus.FAILED, TaskStatus.CANCELLED)
"""Statuses ``retry_task`` makes a task pending again from."""


def literal(status: TaskStatus) -> str:
    """``status`` as an SQL string literal: ``'pending'``."""
    return f"'{status.value}'"


def literals(statuses: Tuple[TaskStatus, ...]) -> str:
    """``statuses`` as a parenthesised SQL list: ``('pending', 'suspended')``."""
    return "(" + ", ".join(literal(s) for s in statuses) + ")"
