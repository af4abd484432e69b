"""``TaskClient``: the verbs of task queues that need no thread.

DESIGN

* What it is.  A client writes and reads a ``TaskStore``: it adds tasks
  (``enqueue``, ``enqueue_many``, and calls of task functions by name,
  ``enqueue_task``), reads and lists them (``get``, ``counts``,
  ``queues``, ``list_tasks``), waits for them (``result``,
  ``result_async``, ``results.py``), cancels, retries and purges them
  (``cancel``, ``clear_queue``, ``retry_task``, ``purge``) and signals
  durable callbacks (``send_callback_*``).  It starts no thread, holds no
  lease and runs no handler; a process that only produces tasks, runs a
  dashboard or answers an HTTP endpoint needs nothing more.
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

import asyncio
import json
import os
import pickle
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from ..durable import CallbackRecord, check_callback_id, check_error, check_result
from ..errors import (
    ServiceClosedError,
    TaskNotCancellableError,
    TaskNotRetryableError,
    UnknownQueueError,
    UnknownTaskError,
)
from .config import (TaskInfo, check_int, check_payload, check_queue_name, check_task_id,
                     wall_clock_ms)
from .dsn import is_postgres_dsn
from .events import TaskEvents
from .functions import check_dedup_key, check_priority, check_task_name, encode_arguments
from .results import Completions, wait_for_result, wait_for_result_async
from .sqlite import SQLiteTaskStore
from .status import RETRYABLE, TERMINAL, WAITING
from .storage import STATUSES, NewCall, ScheduleRecord, TaskRecord, TaskStore
from .taskids import new_task_id, new_task_ids


__all__ = ["TaskClient", "open_store", "PURGE_BATCH", "LIST_LIMIT_MAX"]

PURGE_BATCH = 1000
"""Tasks ``purge`` deletes per transaction."""

LIST_LIMIT_MAX = 10_000
"""The largest page ``list_tasks`` returns."""


def _decoded(text: Optional[str]) -> Any:
    """A stored JSON value, decoded (None stays None)."""
    return None if text is None else json.loads(text)


def _info(record: TaskRecord) -> TaskInfo:
    """The ``TaskInfo`` of a stored task."""
    return TaskInfo(record.status, record.message, record.attempt, record.id, record.name,
                    record.queue, _decoded(record.result), _decoded(record.progress),
                    record.traceback, record.created_at, record.finished_at)


def _check_status(status: object, allowed: "tuple[str, ...]", verb: str) -> str:
    if not isinstance(status, str):
        raise TypeError(f"status must be a str, not {type(status).__name__}")
    if status not in allowed:
        raise ValueError(f"{verb} takes a status among {', '.join(allowed)}, not {status!r}")
    return status


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
    A ``TaskService`` has one: ``TaskService.client``.  ``events``
    (default: a new one) is told of every enqueue (``events.py``).

    Use it as a context manager or call ``close()``.  Thread-safe.
    """

    def __init__(self, store: TaskStore, *, clock: Optional[Callable[[], int]] = None,
                 on_commit: Optional[Callable[[Optional[str]], None]] = None,
                 completions: Optional[Completions] = None,
                 events: Optional[TaskEvents] = None) -> None:
        if not isinstance(store, TaskStore):
            raise TypeError(f"store must be a TaskStore, not {type(store).__name__}")
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be callable, not {type(clock).__name__}")
        if on_commit is not None and not callable(on_commit):
            raise TypeError(f"on_commit must be callable, not {type(on_commit).__name__}")
        self._store = store
        self._clock: Callable[[], int] = clock or wall_clock_ms
        self._on_commit = on_commit
        self._completions = completions if completions is not None else Completions()
        self._watching = False  # the store wakes the completions of other processes
        self._events = TaskEvents() if events is None else events
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

    @property
    def events(self) -> TaskEvents:
        """What this client (and the service it belongs to) does to tasks,
        for observers such as ``callbackworker.metrics``."""
        return self._events

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
        checked = [check_payload(p) for p in payloads]
        tasks = list(zip(new_task_ids(len(checked)), checked))
        self._check_open()
        if tasks:
            self._store.enqueue_many(name, tasks, self._now())
            self._events.enqueued(name, None, len(tasks))
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
        return _info(record)

    def list_tasks(self, *, queue: Optional[str] = None, status: Optional[str] = None,
                   name: Optional[str] = None, limit: int = 100,
                   before_id: Optional[str] = None) -> List[TaskInfo]:
        """Up to ``limit`` (1..10_000) tasks, newest first, of the ``queue``,
        ``status`` and task function ``name`` given (None: any).  Pages go
        by id: pass the last id of a page as ``before_id`` to get the next
        one (an empty list after the last).  ``UnknownTaskError`` if
        ``before_id`` is no longer in the database (swept or purged)."""
        if queue is not None:
            queue = check_queue_name(queue)
        if status is not None:
            status = _check_status(status, STATUSES, "list_tasks")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        if name is not None and ("\x00" in name or not name.isprintable()):
            raise ValueError("name must be printable text (no NUL or control characters)")
        check_int(limit, "limit", 1, LIST_LIMIT_MAX)
        if before_id is not None:
            before_id = check_task_id(before_id)
        self._check_open()
        return [_info(r) for r in self._store.list_tasks(queue=queue, status=status, name=name,
                                                         limit=limit, before_id=before_id)]

    def retry_task(self, task_id: str) -> None:
        """Makes a failed or cancelled task pending again, due now, with a
        fresh count of attempts (its last message and traceback stay until
        its next attempt ends).  ``TaskNotRetryableError`` (with
        ``.status``) for a task in any other status, or whose ``dedup_key``
        an unfinished task now holds; ``UnknownTaskError`` if there is no
        such task."""
        task_id = check_task_id(task_id)
        self._check_open()
        status = self._store.retry_task(task_id, self._now())
        if status is None:
            raise UnknownTaskError(task_id)
        if status not in RETRYABLE:
            raise TaskNotRetryableError(task_id, status)
        if self._on_commit is not None:
            record = self._store.get(task_id)
            if record is not None:
                self._on_commit(record.queue)

    def purge(self, queue: str, *, status: str,
              on_batch: Optional[Callable[[int], None]] = None) -> int:
        """Deletes the queue's tasks in ``status`` (``"completed"``,
        ``"failed"`` or ``"cancelled"``), with their durable state, and
        returns how many.  Deletes ``PURGE_BATCH`` tasks per transaction,
        oldest first, so a large purge never holds the database long;
        ``on_batch(deleted_so_far)`` is called after each.
        ``UnknownQueueError`` if the queue does not exist."""
        name = check_queue_name(queue)
        status = _check_status(status, tuple(s.value for s in TERMINAL), "purge")
        if on_batch is not None and not callable(on_batch):
            raise TypeError(f"on_batch must be callable, not {type(on_batch).__name__}")
        self._check_open()
        if name not in self._store.queues():
            raise UnknownQueueError(name)
        total = 0
        while True:
            deleted = self._store.purge(name, status, PURGE_BATCH)
            total += deleted
            if deleted and on_batch is not None:
                on_batch(total)
            if deleted < PURGE_BATCH:
                return total

    def enqueue_task(self, name: str, args: Sequence[Any] = (),
                     kwargs: Optional[Mapping[str, Any]] = None, *, queue: str = "default",
                     delay_ms: int = 0, run_at_ms: Optional[int] = None, priority: int = 0,
                     dedup_key: Optional[str] = None) -> str:
        """Adds a call of the task function registered as ``name`` (by
        whichever process serves ``queue``) and returns its task id,
        committed when this returns; the queue is created if it does not
        exist.  ``args`` (list or tuple) and ``kwargs`` must be
        JSON-encodable, else ``TypeError`` and nothing is stored.  The task
        starts no earlier than ``delay_ms`` from now or ``run_at_ms`` (epoch
        ms; not both); higher ``priority`` runs first, equal priorities in
        order.  With ``dedup_key``, while a task of the queue with that key
        is pending, running or suspended, nothing is stored and that task's
        id is returned."""
        name = check_task_name(name)
        queue = check_queue_name(queue)
        check_int(delay_ms, "delay_ms", 0, 2**62)
        if run_at_ms is not None:
            check_int(run_at_ms, "run_at_ms", 0, 2**62)
            if delay_ms:
                raise ValueError("give delay_ms or run_at_ms, not both")
        text = encode_arguments(name, args, {} if kwargs is None else kwargs)
        self._check_open()
        now = self._now()
        run_at = now + delay_ms if run_at_ms is None else run_at_ms
        call_id = new_task_id()
        task_id = self._store.enqueue_call(queue, NewCall(call_id, name, text,
                                                          check_priority(priority), run_at,
                                                          check_dedup_key(dedup_key)), now)
        if task_id == call_id:  # not an earlier task holding the dedup key
            self._events.enqueued(queue, name, 1)
        if self._on_commit is not None:
            self._on_commit(queue)
        return task_id

    def result(self, task_id: str, timeout_ms: int = -1) -> Any:
        """Blocks until the task is finished (run by any process on the
        database) and returns its function's JSON-decoded return value (a
        raw task's message).  Raises ``TaskFailedError`` (``.message``,
        ``.traceback``, ``.attempt``) or ``TaskCancelledError``;
        ``WaitTimeoutError`` after ``timeout_ms`` (-1: no limit), the task
        untouched; ``UnknownTaskError`` for an unknown id."""
        task_id = check_task_id(task_id)
        if not self._watching:  # tasks finished by other processes wake the wait
            self._watching = True
            self._store.watch_finished(self._completions.notify)
        return wait_for_result(lambda: self.get(task_id), task_id, timeout_ms, self._completions)

    async def result_async(self, task_id: str, timeout_ms: int = -1) -> Any:
        """``result`` for a coroutine: the event loop keeps running while it
        waits (each read of the store runs in a thread)."""
        task_id = check_task_id(task_id)
        return await wait_for_result_async(lambda: asyncio.to_thread(self.get, task_id),
                                           task_id, timeout_ms)

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

    def stored_schedules(self) -> List[ScheduleRecord]:
        """Every periodic schedule in the database, whichever service
        registered it, by name: spec, queue, task, last tick and next run
        (``TaskService.schedules`` gives one service's own)."""
        self._check_open()
        return self._store.schedules()

    def remove_schedule(self, name: str) -> bool:
        """Deletes the stored schedule ``name`` (one no code registers any
        more; a service still serving it registers it again); returns
        whether it existed."""
        if not isinstance(name, str):
            raise TypeError(f"a schedule name must be a str, not {type(name).__name__}")
        self._check_open()
        return self._store.remove_schedule(name)

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

    def callbacks(self, task_id: str) -> List[CallbackRecord]:
        """The durable callbacks the task has created and still holds, in
        the order it created them, each as stored (a pending one past its
        limit shows as ``timed_out``).  A finished task holds none: its
        operation log ends with it.  ``[]`` for an unknown task."""
        task_id = check_task_id(task_id)
        self._check_open()
        records = []
        for kind, _name, value in self._store.durable_ops(task_id):
            if kind == "callback":
                record = self._store.durable_callback(pickle.loads(value))
                if record is not None:
                    record.expire_if_due(self._now())
                    records.append(record)
        return records

    def _signal(self, callback_id: str, state: str, result: Optional[bytes],
                error: Optional[str]) -> None:
        self._check_open()
        self._store.durable_signal(callback_id, state, result, error, self._now())
        if self._on_commit is not None:
            self._on_commit(None)
