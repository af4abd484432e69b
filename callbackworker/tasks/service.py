"""``TaskService``: persistent task queues whose tasks run on the C core.

DESIGN

* Storage.  Every task lives in a ``TaskStore`` (SQLite by default,
  PostgreSQL for a ``postgresql://`` DSN).  The service decides policy
  (backoff, recovery, liveness of owners); the store makes each state
  change atomic.  ``enqueue`` commits before it returns.
* Composition.  A service is a client and a runtime over one store.  The
  client (``TaskClient``, ``client.py``) holds the verbs that need no
  thread: enqueue, get, cancel, counts, signals.  The runtime
  (``TaskRuntime``, ``runtime.py``) serves the queues the service creates:
  the dispatcher, leases, recovery, sweep, the group committer
  (``committer.py``) and the dead-owner probe (``owners.py``).  The client
  wakes the runtime after each enqueue and signal it commits, so work the
  service serves starts at once.  A service that creates no queue starts
  no thread.
* Functions.  The service owns a ``FunctionRegistry`` (``functions.py``):
  ``task`` files functions in it, ``serve`` has the runtime serve their
  queues with no raw handler, and the runtime runs every stored call
  through it.  Its tasks enqueue through the client.  A ``Completions``
  shared by the runtime's committer and the client wakes ``result``
  waiters as soon as this service settles an outcome.
* Periodic tasks.  ``periodic`` files a function as a task and its
  schedule in the service's ``Scheduler`` (``scheduler.py``); ``serve``
  has the scheduler claim the ticks of the schedules of the queues it
  serves, each through the store, and wake the runtime for each tick it
  enqueues.
* Close.  ``close`` first makes the client refuse callers, then stops the
  scheduler, then closes the runtime (running handlers finish, claimed
  tasks are given back), then the store.  At interpreter exit, live services are closed before any
  worker (the package's one exit hook, ``_lifecycle.py``).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from .._lifecycle import live_services
from ..errors import QueueExistsError, ServiceClosedError
from .client import TaskClient, open_store
from .config import (
    INTERVAL_MAX_MS,
    MAX_BACKOFF_MS,
    MAX_PAYLOAD,
    MAX_QUEUE_NAME,
    Handler,
    QueueConfig,
    TaskContext,
    TaskInfo,
    check_int,
    check_queue_name,
    config_from_json,
    config_to_json,
    retry_delay_ms,
    wall_clock_ms,
)
from .events import TaskEvents
from .functions import FunctionRegistry, Task, encode_arguments
from .results import Completions
from .runtime import TaskRuntime, current_task
from .scheduler import Periodic, Scheduler, ScheduleInfo
from .schedules import Schedule

__all__ = ["TaskService", "QueueConfig", "TaskInfo", "TaskContext", "current_task", "Handler", "MAX_PAYLOAD", "MAX_QUEUE_NAME",
           "MAX_BACKOFF_MS", "retry_delay_ms"]


class TaskService:
    """Persistent task queues on a database file, run on the C core.

    ``dsn`` is a SQLite file path (created if missing; several processes on
    one host may share it) or a ``postgresql://`` URL (any number of
    processes on any number of hosts; needs ``callbackworker[postgres]``;
    see ``callbackworker.tasks.postgres``).  On SQLite,
    ``durability="normal"`` makes every committed change survive the
    process being killed; ``"full"`` also survives power loss (each commit
    is fsync'd).  On PostgreSQL the server's settings decide; ``"full"``
    forces ``synchronous_commit = on`` for the service's connections.

    ``QueueConfig.concurrency`` is per service: a queue served by N
    processes runs up to the sum of their concurrencies at once.
    ``delay_ms`` is global: it spaces the starts of every process on the
    database.  ``clock`` returns the time in milliseconds (default:
    wall clock); every stored time uses it.  ``lease_ms`` is how long a
    claimed task stays leased without renewal (renewed every third of it);
    ``poll_ms`` bounds how long work written by another process may wait
    to be noticed.

    ``prefetch`` lets each queue claim that many tasks beyond its free
    slots, in one transaction, so they wait in the queue's route instead
    of being claimed one by one (0 claims only tasks about to run).  The
    default, None, adapts: what the queue finishes in 20 ms at its recent
    rate, at least its ``concurrency`` and at most 1000.  It costs no
    attempt on a crash: an attempt is counted when its run starts, so a
    prefetched task that never ran comes back as it was.

    With ``background=False`` nothing runs by itself: each
    ``_dispatch_once()`` call does one pass, and each ``_schedule_once()``
    one pass of the periodic scheduler (tests drive a fake clock so).

    The verbs that need no thread (``enqueue``, ``get``, ``cancel``,
    ``counts``, the signals...) are those of its ``client``.  Use it as a
    context manager or call ``close()``.
    """

    def __init__(self, dsn: "str | os.PathLike[str]" = "callbackworker.db", *,
                 durability: str = "normal", clock: Optional[Callable[[], int]] = None,
                 lease_ms: int = 30_000, poll_ms: int = 200,
                 prefetch: Optional[int] = None,
                 background: bool = True) -> None:
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be callable, not {type(clock).__name__}")
        check_int(lease_ms, "lease_ms", 100, INTERVAL_MAX_MS)
        check_int(poll_ms, "poll_ms", 1, 60_000)
        if prefetch is not None:
            check_int(prefetch, "prefetch", 0, 100_000)
        if type(background) is not bool:
            raise TypeError(f"background must be a bool, not {type(background).__name__}")
        self._store = open_store(dsn, durability)
        clock = clock or wall_clock_ms
        completions = Completions()
        self._events = TaskEvents()
        self._functions = FunctionRegistry(lambda *a, **k: self._client.enqueue_task(*a, **k))
        self._runtime = TaskRuntime(self._store, clock, lease_ms=lease_ms, poll_ms=poll_ms,
                                    prefetch=prefetch, background=background,
                                    calls=self._functions, completions=completions,
                                    events=self._events)
        self._client = TaskClient(self._store, clock=clock, on_commit=self._runtime.wake,
                                  completions=completions, events=self._events)
        self._scheduler = Scheduler(self._store, clock, self._runtime.wake,
                                    background=background)
        self._close_lock = threading.Lock()
        self._closed = False
        live_services.add(self)

    def __enter__(self) -> "TaskService":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<callbackworker.TaskService {state} {self._store!r} "
                f"queues={self._runtime.queue_names()}>")

    def close(self) -> None:
        """Stops the service; idempotent.

        No task is claimed and no handler starts once it has begun.
        Running handlers finish and their outcomes are committed; tasks
        claimed but not yet started go back to pending with their attempt
        given back.  Must not be called from a handler.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._client.close()
        self._scheduler.close()
        self._runtime.close()
        self._store.close()
        live_services.discard(self)

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceClosedError("the TaskService has been closed")

    @property
    def client(self) -> TaskClient:
        """The service's client: the verbs that need no thread, over the
        service's store.  What it enqueues or signals wakes this service's
        dispatcher; it is closed with the service."""
        return self._client

    @property
    def events(self) -> TaskEvents:
        """What this service does to tasks (enqueues, attempts, lease
        recovery), logged on ``callbackworker.tasks.events`` and told to
        subscribed observers such as ``callbackworker.metrics``."""
        return self._events

    def create_queue(self, name: str, config: Optional[QueueConfig] = None,
                     handler: Optional[Handler] = None) -> None:
        """Creates (or joins, in the shared database) the queue ``name`` and
        starts running its tasks with ``handler``.

        ``QueueExistsError`` if this service already created it.  Running
        tasks left behind by a dead predecessor are recovered first: those
        whose lease expired, and those of a service on this host whose
        process is gone (pending again with the attempt counted, or failed
        if no attempt is left).  Running tasks of a live service (another
        process on the file) are left alone.
        """
        name = check_queue_name(name)
        config = QueueConfig() if config is None else config
        if not isinstance(config, QueueConfig):
            raise TypeError(f"config must be a QueueConfig, not {type(config).__name__}")
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        self._check_open()
        self._runtime.serve(name, config, handler)

    def served_queues(self) -> List[str]:
        """The queues this service created (and runs the tasks of), sorted."""
        return self._runtime.queue_names()

    def flush(self) -> None:
        """Waits until every task this service has claimed so far has
        finished and its outcome is committed: completed, failed, due for a
        retry or suspended in the database, for every process to see.
        (Outcomes are otherwise committed in batches by a background
        thread.)  Tasks claimed after the call are not waited for; a handler
        that never returns makes this wait for ever.  Returns at once when
        the service serves no queue.  ``RuntimeError`` from a handler (it
        would wait for itself)."""
        self._check_open()
        if current_task() is not None:
            raise RuntimeError("TaskService.flush() cannot be called from a task handler: "
                               "it would wait for that handler to finish")
        self._runtime.flush()

    def queues(self) -> List[str]:
        """The names of every queue in the database, sorted (as
        ``TaskClient.queues``)."""
        return self._client.queues()

    def clear_queue(self, name: str) -> int:
        """As ``TaskClient.clear_queue``: cancels every pending and
        suspended task of the queue and returns how many."""
        return self._client.clear_queue(name)

    def counts(self) -> Dict[str, Dict[str, int]]:
        """As ``TaskClient.counts``: every queue's number of tasks per status."""
        return self._client.counts()

    def enqueue(self, queue: str, payload: bytes) -> str:
        """As ``TaskClient.enqueue``: adds a task (bytes-like, at most 1 MiB),
        committed when this returns, and returns its id.  A queue this
        service serves runs it at once if it has a free slot."""
        return self._client.enqueue(queue, payload)

    def enqueue_many(self, queue: str, payloads: Iterable[bytes]) -> List[str]:
        """As ``TaskClient.enqueue_many``: several tasks in one transaction."""
        return self._client.enqueue_many(queue, payloads)

    def get(self, task_id: str) -> TaskInfo:
        """As ``TaskClient.get``: the task's status, message and attempt."""
        return self._client.get(task_id)

    def cancel(self, task_id: str) -> None:
        """As ``TaskClient.cancel``: cancels a pending or suspended task."""
        self._client.cancel(task_id)

    def list_tasks(self, *, queue: Optional[str] = None, status: Optional[str] = None,
                   name: Optional[str] = None, limit: int = 100,
                   before_id: Optional[str] = None) -> List[TaskInfo]:
        """As ``TaskClient.list_tasks``: tasks newest first, filtered,
        paginated by ``before_id``."""
        return self._client.list_tasks(queue=queue, status=status, name=name, limit=limit,
                                       before_id=before_id)

    def retry_task(self, task_id: str) -> None:
        """As ``TaskClient.retry_task``: a failed or cancelled task is
        pending again, due now; this service runs it at once if it serves
        its queue."""
        self._client.retry_task(task_id)

    def purge(self, queue: str, *, status: str,
              on_batch: Optional[Callable[[int], None]] = None) -> int:
        """As ``TaskClient.purge``: deletes the queue's finished tasks of
        ``status`` and returns how many."""
        return self._client.purge(queue, status=status, on_batch=on_batch)

    def send_callback_success(self, callback_id: str, result: bytes) -> None:
        """As ``TaskClient.send_callback_success``: the suspended task waiting
        for the callback replays, and this service runs it at once if it
        serves its queue."""
        self._client.send_callback_success(callback_id, result)

    def send_callback_failure(self, callback_id: str, error: str) -> None:
        """As ``TaskClient.send_callback_failure``."""
        self._client.send_callback_failure(callback_id, error)

    def send_callback_heartbeat(self, callback_id: str) -> None:
        """As ``TaskClient.send_callback_heartbeat``."""
        self._client.send_callback_heartbeat(callback_id)

    # ---- tasks as functions (``functions.py``) ---------------------------

    def task(self, name: "Optional[str] | Callable[..., Any]" = None, *, queue: str = "default",
             max_retries: Optional[int] = None, backoff_ms: Optional[int] = None,
             timeout_ms: Optional[int] = None, priority: int = 0) -> Any:
        """Registers a function as a task: ``@svc.task(...)`` (or bare
        ``@svc.task``) returns a ``Task``; calling it runs the function
        inline, ``.enqueue(...)`` stores a call.

        ``name`` defaults to ``module.qualname`` and is what producers
        enqueue by; registering a name twice is a ``ValueError``.  Several
        tasks may share a ``queue``.  ``max_retries``, ``backoff_ms`` and
        ``timeout_ms`` (None: the queue's config) and ``priority`` (higher
        runs first) apply to every call.  ``async def`` functions run to
        completion on an event loop.  Registering serves nothing: see
        ``serve``.
        """
        def register(fn: Callable[..., Any]) -> Task:
            self._check_open()
            return self._functions.register(fn, None if callable(name) else name, queue,
                                            max_retries, backoff_ms, timeout_ms, priority)

        return register(name) if callable(name) else register

    def enqueue_task(self, name: str, args: Sequence[Any] = (),
                     kwargs: Optional[Mapping[str, Any]] = None, *, queue: str = "default",
                     delay_ms: int = 0, run_at_ms: Optional[int] = None, priority: int = 0,
                     dedup_key: Optional[str] = None) -> str:
        """As ``TaskClient.enqueue_task``: enqueues a call of the task
        ``name`` without importing its function (a producer such as a web
        app) and returns the task id."""
        return self._client.enqueue_task(name, args, kwargs, queue=queue, delay_ms=delay_ms,
                                         run_at_ms=run_at_ms, priority=priority,
                                         dedup_key=dedup_key)

    def declare_queue(self, name: str, config: Optional[QueueConfig] = None) -> None:
        """Creates the queue if it does not exist and stores ``config``
        (default ``QueueConfig()``) as its declared config in the database,
        without serving it: every service that serves the queue for its
        task functions (``serve``, here or in another process, later) uses
        it.  Declaring again updates it (a service already serving the queue
        keeps the config it started with).  Enqueueing a task into a queue
        that does not exist creates it with the default config."""
        name = check_queue_name(name)
        config = QueueConfig() if config is None else config
        if not isinstance(config, QueueConfig):
            raise TypeError(f"config must be a QueueConfig, not {type(config).__name__}")
        self._check_open()
        self._store.declare_queue(name, config_to_json(config))
        self._functions.declare(name, config)

    def serve(self, queues: Optional[Iterable[str]] = None) -> None:
        """Starts running registered tasks: on every queue a registered task
        uses, or on the ``queues`` named (each must have one), each with
        its declared config (``declare_queue``; the default without one).
        Returns at once; ``close()`` stops.  A queue this service serves
        already is left as it is."""
        registered = self._functions.queues()
        if queues is None:
            wanted = registered
        else:
            if isinstance(queues, str):
                raise TypeError("queues must be an iterable of queue names, not one str "
                                "(write queues=[name])")
            wanted = [check_queue_name(q) for q in queues]
            stray = [q for q in wanted if q not in registered]
            if stray:
                raise ValueError(f"no registered task uses queue {stray[0]!r}; register one "
                                 "with task(queue=...) before serving it")
        self._check_open()
        for queue in wanted:
            if queue not in self._runtime.queue_names():
                config = self._functions.declared(queue)
                if config is None:
                    stored = self._store.queue_config(queue)
                    config = QueueConfig() if stored is None else config_from_json(stored)
                try:
                    self._runtime.serve(queue, config, None)
                except QueueExistsError:
                    pass  # served meanwhile by a concurrent serve()
        self._scheduler.serve(wanted)

    # ---- periodic tasks (``scheduler.py``, ``schedules.py``) -------------------

    def periodic(self, *, cron: Optional[str] = None, every_ms: Optional[int] = None,
                 name: Optional[str] = None, queue: str = "default", args: Sequence[Any] = (),
                 kwargs: Optional[Mapping[str, Any]] = None,
                 tz: Optional[str] = None) -> Callable[[Callable[..., Any]], Task]:
        """Registers a function as a task (as ``task(name=..., queue=...)``
        does) that runs by itself on a schedule: ``@svc.periodic(cron="0 3
        * * *")`` or ``@svc.periodic(every_ms=60_000)``, exactly one of
        them.  Returns the ``Task``.

        ``cron`` is a five-field expression in UTC, or in the IANA time
        zone ``tz`` (daylight-saving transitions as ``croniter`` defines
        them: see ``callbackworker.tasks.schedules``); ``every_ms`` ticks on
        its multiples since the Unix epoch.  Each tick enqueues one call
        with ``args`` / ``kwargs`` (JSON-encodable, checked here), once
        across every service on the database however many serve the
        schedule.  A service serves the schedule once it serves ``queue``
        (``serve()``, or ``callbackworker worker``).  Ticks missed while no
        service ran coalesce into one run; a new or changed schedule first
        runs at its next tick.  ``TypeError`` / ``ValueError`` for a spec or
        arguments that cannot run.
        """
        schedule = Schedule(cron=cron, every_ms=every_ms, tz=tz)
        if not isinstance(args, (list, tuple)):
            raise TypeError(f"args must be a list or tuple, not {type(args).__name__}")

        def register(fn: Callable[..., Any]) -> Task:
            self._check_open()
            label = name if name is not None else getattr(fn, "__qualname__", repr(fn))
            call = encode_arguments(label, args, {} if kwargs is None else kwargs)
            task = self._functions.register(fn, name, queue, None, None, None, 0)
            self._scheduler.add(Periodic(task.name, schedule, task.name, task.queue, call,
                                         task.priority))
            return task

        return register

    def schedules(self) -> List[ScheduleInfo]:
        """This service's periodic schedules, by name, as ``(name,
        next_run_at_ms)``: the next run as stored by whichever service
        claimed the last tick (at or before now: due, it runs at the next
        pass), or, for a schedule not registered in the database yet or
        registered there with another spec, its first tick after now."""
        self._check_open()
        return self._scheduler.schedules()

    def _schedule_once(self) -> int:
        """Test hook (documented, for ``background=False``): one scheduler
        pass, synchronously: enqueues every due tick of the schedules this
        service serves.  Returns how many it enqueued."""
        self._check_open()
        return self._scheduler.run_due()

    def result(self, task_id: str, timeout_ms: int = -1) -> Any:
        """As ``TaskClient.result``: blocks until the task is finished and
        returns its function's decoded return value, or raises
        ``TaskFailedError`` / ``TaskCancelledError`` (``WaitTimeoutError``
        past ``timeout_ms``).  Tasks this service settles wake it at once;
        others are seen by reading the database, with a backoff."""
        return self._client.result(task_id, timeout_ms)

    async def result_async(self, task_id: str, timeout_ms: int = -1) -> Any:
        """As ``TaskClient.result_async``: ``await``-able ``result``."""
        return await self._client.result_async(task_id, timeout_ms)

    def _dispatch_once(self) -> int:
        """Test hook (documented, for ``background=False``): one full pass,
        synchronously.  Renews leases, recovers expired ones, sweeps
        retention, claims every due task that fits the free slots, runs them
        and commits their outcomes before returning.  Returns how many tasks
        ran."""
        self._check_open()
        return self._runtime.dispatch_once()
