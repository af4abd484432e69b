"""``TaskClient``: the verbs of task queues that need no thread.

DESIGN

* What it is.  A client writes and reads a ``TaskStore``: it adds tasks
  (``enqueue``, ``enqueue_many``), reads them (``get``, ``counts``,
  ``queues``), cancels them (``cancel``, ``clear_queue``) and signals
  durable callbacks (``send_callback_*``).  It starts no thread, holds no
  lease and runs no handler; a process that only produces tasks, or
  answers an HTTP endpoint, needs nothing more.  Listing verbs belong here.
* Commits.  Every verb is one store transaction, committed when it
  returns.  Times come from the client's ``clock`` (wall-clock
  milliseconds by default), the same clock the runtime uses in a
  ``TaskService``.
* Wake-ups.  After an enqueue or a signal has committed, the client calls
  ``on_commit`` (if given) from the calling thread: with the queue's name
  after an enqueue, with None after a signal.  ``TaskService`` passes its
  dispatcher's wake-up so that work it serves starts at once; any other
  process learns of the work through the store (``TaskStore.set_waker``)
  or its poll.
* Ownership.  A client made by ``TaskClient.open(dsn)`` owns its store and
  closes it; one made from a store only stops answering when closed (the
  store's owner closes the store).
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Callable, Dict, Iterable, List, Optional

from ..durable import check_callback_id, check_error, check_result
from ..errors import ServiceClosedError, TaskNotCancellableError, UnknownQueueError, UnknownTaskError
from .config import TaskInfo, check_payload, check_queue_name, check_task_id, wall_clock_ms
from .dsn import is_postgres_dsn
from .sqlite import SQLiteTaskStore
from .status import WAITING
from .storage import TaskStore

__all__ = ["TaskClient", "open_store"]


def open_store(dsn: "str | os.PathLike[str]", durability: str = "normal") -> TaskStore:
    """The store ``dsn`` names: a ``postgresql://`` URL opens PostgreSQL
    (``callbackworker[postgres]``), anything else a SQLite file (created if
    missing).  ``durability`` as ``TaskService``."""
    if not isinstance(dsn, (str, os.PathLike)):
        raise TypeError(f"dsn must be a path or a URL string, not {type(dsn).__name__}")
    if isinstance(dsn, str) and is_postgres_dsn(dsn):
        from .postgres import PostgresTaskStore  # psycopg is an optional extra

        return PostgresTaskStore(dsn, durability=durability)
    return SQLiteTaskStore(dsn, durability=durability)


class TaskClient:
    """Adds, reads, cancels and signals tasks in a ``TaskStore``, without
    any thread.

    ``TaskClient.open(dsn)`` opens a store (as ``TaskService`` does) and
    closes it with the client; ``TaskClient(store)`` uses a store someone
    else owns.  ``clock`` returns the time in milliseconds (default: wall
    clock).  ``on_commit(queue)`` is called after an enqueue (the queue's
    name) or a callback signal (None) has committed; it must not raise.
    A ``TaskService`` has one: ``TaskService.client``.

    Use it as a context manager or call ``close()``.  Thread-safe.
    """

    def __init__(self, store: TaskStore, *, clock: Optional[Callable[[], int]] = None,
                 on_commit: Optional[Callable[[Optional[str]], None]] = None) -> None:
        if not isinstance(store, TaskStore):
            raise TypeError(f"store must be a TaskStore, not {type(store).__name__}")
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be callable, not {type(clock).__name__}")
        if on_commit is not None and not callable(on_commit):
            raise TypeError(f"on_commit must be callable, not {type(on_commit).__name__}")
        self._store = store
        self._clock: Callable[[], int] = clock or wall_clock_ms
        self._on_commit = on_commit
        self._owns_store = False
        self._close_lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, dsn: "str | os.PathLike[str]" = "callbackworker.db", *,
             durability: str = "normal", clock: Optional[Callable[[], int]] = None) -> "TaskClient":
        """A client over the store ``dsn`` names (see ``open_store``); its
        ``close()`` closes that store."""
        client = cls(open_store(dsn, durability), clock=clock)
        client._owns_store = True
        return client

    def __enter__(self) -> "TaskClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<callbackworker.TaskClient {state} {self._store!r}>"

    def _now(self) -> int:
        return int(self._clock())

    def close(self) -> None:
        """Stops answering (every verb then raises ``ServiceClosedError``)
        and closes the store if ``open`` opened it; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._owns_store:
            self._store.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceClosedError("the task client has been closed "
                                     "(TaskClient.close or TaskService.close)")

    def queues(self) -> List[str]:
        """The names of every queue in the database, sorted."""
        self._check_open()
        return self._store.queues()

    def counts(self) -> Dict[str, Dict[str, int]]:
        """For every queue in the database, its number of tasks per status."""
        self._check_open()
        return self._store.counts()

    def enqueue(self, queue: str, payload: bytes) -> str:
        """Adds a task (``payload``: bytes-like, at most 1 MiB) to the queue
        and returns its id.  It is committed (durable) when this returns.
        ``UnknownQueueError`` if no service ever created the queue in this
        database."""
        return self.enqueue_many(queue, [payload])[0]

    def enqueue_many(self, queue: str, payloads: Iterable[bytes]) -> List[str]:
        """Adds several tasks in one transaction; returns their ids in order.
        All or none are added."""
        name = check_queue_name(queue)
        if isinstance(payloads, (str, bytes, bytearray, memoryview)):
            raise TypeError("payloads must be an iterable of bytes-like objects, "
                            f"not one {type(payloads).__name__}")
        tasks = [(uuid.uuid4().hex, check_payload(p)) for p in payloads]
        self._check_open()
        if tasks:
            self._store.enqueue_many(name, tasks, self._now())
            if self._on_commit is not None:
                self._on_commit(name)
        return [task_id for task_id, _ in tasks]

    def get(self, task_id: str) -> TaskInfo:
        """The task's status, message and attempt.  ``UnknownTaskError``
        (a ``KeyError``) for an id never issued or already swept."""
        task_id = check_task_id(task_id)
        self._check_open()
        record = self._store.get(task_id)
        if record is None:
            raise UnknownTaskError(task_id)
        return TaskInfo(record.status, record.message, record.attempt)

    def cancel(self, task_id: str) -> None:
        """Cancels a pending or suspended task (a suspended one's callbacks
        are closed: later signals raise ``CallbackAlreadyCompletedError``).
        ``TaskNotCancellableError`` (with ``.status``) if it is running,
        completed, failed or already cancelled; ``UnknownTaskError`` if
        there is no such task."""
        task_id = check_task_id(task_id)
        self._check_open()
        status = self._store.cancel(task_id, self._now())
        if status is None:
            raise UnknownTaskError(task_id)
        if status not in WAITING:
            raise TaskNotCancellableError(task_id, status)

    def clear_queue(self, name: str) -> int:
        """Cancels every pending and suspended task of the queue; returns
        how many.  Running tasks are not affected.  ``UnknownQueueError``
        if no service ever created the queue in this database."""
        name = check_queue_name(name)
        self._check_open()
        if name not in self._store.queues():
            raise UnknownQueueError(name)
        return self._store.clear(name, self._now())

    def send_callback_success(self, callback_id: str, result: bytes) -> None:
        """Signals success to a task's callback: the task, if suspended
        waiting for it, becomes due now and replays; its ``callback_result``
        returns ``result`` (bytes-like, at most 1 MiB).  The signal is
        committed when this returns; any client or service on the database
        may send it.  Raises ``UnknownCallbackError`` for an id never issued
        (or swept with its task) and ``CallbackAlreadyCompletedError`` once
        the callback has succeeded, failed, timed out or its task ended: of
        concurrent or duplicate signals exactly one is applied."""
        self._signal(check_callback_id(callback_id), "succeeded", check_result(result), None)

    def send_callback_failure(self, callback_id: str, error: str) -> None:
        """Signals failure: the task's ``callback_result`` raises
        ``CallbackFailedError`` carrying ``error``.  Otherwise as
        ``send_callback_success``."""
        self._signal(check_callback_id(callback_id), "failed", None, check_error(error))

    def send_callback_heartbeat(self, callback_id: str) -> None:
        """Tells a callback with ``heartbeat_timeout_ms`` that the outside
        system is still at work: its heartbeat deadline (and the suspended
        task's due time) moves to now plus that interval.  Errors as
        ``send_callback_success``."""
        self._signal(check_callback_id(callback_id), "pending", None, None)

    def _signal(self, callback_id: str, state: str, result: Optional[bytes],
                error: Optional[str]) -> None:
        self._check_open()
        self._store.durable_signal(callback_id, state, result, error, self._now())
        if self._on_commit is not None:
            self._on_commit(None)
