"""Persistent task queues (``TaskService``) and their storage backends.

``storage`` holds the contract every backend implements (``TaskStore``),
``sqlite`` the SQLite backend, ``postgres`` the PostgreSQL backend
(imported only when a ``postgresql://`` DSN is opened, as its driver,
psycopg 3, is the optional extra ``callbackworker[postgres]``), ``service``
the service that runs tasks on the C core, ``functions`` the layer that
makes Python functions tasks (``@svc.task``).
"""

from __future__ import annotations

from .functions import Task
from .service import QueueConfig, TaskContext, TaskInfo, TaskService, current_task
from .sqlite import SQLiteTaskStore
from .storage import TaskStore

__all__ = ["TaskService", "Task", "QueueConfig", "TaskInfo", "TaskContext", "current_task", "TaskStore", "SQLiteTaskStore"]
