"""Persistent task queues (``TaskService``, ``TaskClient``) and their
storage backends.

``config`` holds the records and limits (``QueueConfig``, ``TaskInfo``),
``client`` the verbs that need no thread (``TaskClient``), ``runtime`` the
threads that claim and run tasks, with ``committer`` (the group committer)
and ``owners`` (lease owners and the dead-owner probe); ``service``
composes a client and a runtime into ``TaskService``.  ``storage`` holds
the contract every backend implements (``TaskStore``), ``status`` the
task statuses, ``schema`` the schema both backends reach, ``sql`` what the
two backends share (``sqlmanage``: listing, retrying and purging), ``sqlite`` the SQLite backend, ``postgres`` (with
``pgconn``) the PostgreSQL backend (imported only when a ``postgresql://``
DSN is opened, as its driver, psycopg 3, is the optional extra
``callbackworker[postgres]``), ``durablestore`` the durable logs in a task
store.  ``functions`` makes Python functions tasks (``@svc.task``),
``results`` waits for their outcomes and ``progress`` records their
progress.  ``events`` logs what happens to tasks and tells observers
(``callbackworker.metrics``).
"""

from __future__ import annotations

from .client import TaskClient
from .functions import Task
from .service import QueueConfig, TaskContext, TaskInfo, TaskService, current_task
from .sqlite import SQLiteTaskStore
from .storage import TaskStore

__all__ = ["TaskService", "TaskClient", "Task", "QueueConfig", "TaskInfo", "TaskContext",
           "current_task", "TaskStore", "SQLiteTaskStore"]
