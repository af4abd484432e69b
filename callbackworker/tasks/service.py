"""``TaskService``: persistent task queues whose tasks run on the C core.

DESIGN

* Storage.  Every task lives in a ``TaskStore`` (SQLite by default,
  PostgreSQL for a ``postgresql://`` DSN).  The service decides policy
  (backoff, recovery, liveness of owners); the store makes each state
  change atomic.  ``enqueue`` commits before it returns.
* Execution.  The service owns a ``Worker`` with one route per queue
  (``task:<name>``, ``concurrency`` threads).  A dispatcher thread claims due
  tasks, never more than the queue's free slots, and starts each as a job on
  that route (``Worker.run_detached``, one ``_Attempt`` work item per
  claimed task).  Handlers run on the C threads.
* Leases.  A claim leases the task to this service (``owner`` =
  host/pid/nonce) until ``now + lease_ms`` and gives it a fresh token.  The
  dispatcher renews its leases every ``lease_ms / 3``; a task whose lease
  expires (its process died or stalled) is taken back by whichever service
  serves the queue: pending again with the attempt counted, or failed when
  no attempt is left.  ``create_queue`` also takes back, at once, tasks of a
  predecessor that is provably dead: same host, process gone.
* Group commit.  A handler's outcome goes to one committer thread, which
  settles everything that piled up in one transaction.  A crash before that
  commit loses the outcome but not the task: its lease expires and it runs
  again (at-least-once execution, never two holders at once while leases
  are renewed).
* Wake-ups.  ``enqueue`` in this process and every finished attempt wake
  the dispatcher; so does the store, from its own thread, when it learns
  that another process added work (``TaskStore.set_waker``: PostgreSQL's
  LISTEN/NOTIFY; SQLite has no such thing).  Otherwise it sleeps until the
  next due time, at most ``poll_ms``, which is how it notices work written
  by other processes when no notification came.
* Durable tasks.  A handler may use ``current_job().create_callback`` /
  ``callback_result`` / ``step`` (``callbackworker.durable``); the service's
  worker hands it a ``DurableRun`` over the task's own store
  (``TaskDurableStore``).  When ``callback_result`` finds its callback
  pending, the run ends with ``SuspendJob`` and the attempt settles as
  "suspend": the task is ``suspended`` (no lease, the attempt given back),
  due when the callback expires or never.  A signal updates the callback
  and makes the task due in one transaction; the dispatcher claims it like
  any due task and the handler replays from the log.  A signal that races
  the suspension is caught by the store when the suspension is settled.
* Lock order: ``_cond`` (service state) is never held while calling the
  store or the worker.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import socket
import sys
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, NoReturn,
                    Optional, Sequence, Set, Tuple)

from ..durable import (
    DurableBackend,
    DurableRun,
    SuspendJob,
    check_callback_id,
    check_error,
    check_result,
)
from ..errors import (
    CallbackWorkerError,
    NoRetry,
    QueueExistsError,
    Retry,
    ServiceClosedError,
    TaskNotCancellableError,
    UnknownQueueError,
    UnknownTaskError,
)
from ..worker import Worker
from .durablestore import TaskDurableStore
from .sqlite import SQLiteTaskStore
from .storage import ClaimedTask, Outcome, TaskStore

if TYPE_CHECKING:
    from .functions import Task

__all__ = ["TaskService", "QueueConfig", "TaskInfo", "TaskContext", "current_task", "Handler", "MAX_PAYLOAD", "MAX_QUEUE_NAME",
           "MAX_BACKOFF_MS", "retry_delay_ms"]

log = logging.getLogger(__name__)

Handler = Callable[[memoryview], Optional[str]]
"""``handler(payload) -> message``: a read-only view of the task's payload;
the returned ``str`` (or None, stored as ``""``) becomes the task's message."""

MAX_PAYLOAD = 1 << 20
"""Largest payload, in bytes (1 MiB)."""

MAX_QUEUE_NAME = 128
"""Longest queue name, in UTF-8 bytes."""

MAX_BACKOFF_MS = 3_600_000
"""Retry delays are capped at one hour."""

_RETENTION_MIN_MS = 60_000
_RETENTION_MAX_MS = 604_800_000
_INTERVAL_MAX_MS = _RETENTION_MAX_MS
_CONCURRENCY_MAX = 1024
_RETRIES_MAX = 2**31 - 1
_ROUTE_NAME_MAX = 128
_SWEEP_EVERY_S = 60.0


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_int(value: object, name: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value}")
    return value


@dataclass(frozen=True)
class QueueConfig:
    """A queue's policy, with the reference's defaults and bounds.

    * ``concurrency`` (1..1024, default 1): handlers of this queue running
      at once in this service.
    * ``max_retries`` (>= 0, default 0): attempts after the first failure.
    * ``backoff_ms`` (0..604_800_000, default 1000): the delay before retry
      n is ``backoff_ms << (n - 1)``, capped at one hour.
    * ``delay_ms`` (0..604_800_000, default 0): minimum gap between
      consecutive starts in the queue, across every process on the database.
    * ``retention_ms`` (60_000..604_800_000, default one hour): how long
      completed, failed and cancelled tasks are kept.
    """

    concurrency: int = 1
    max_retries: int = 0
    backoff_ms: int = 1000
    delay_ms: int = 0
    retention_ms: int = 3_600_000

    def __post_init__(self) -> None:
        _check_int(self.concurrency, "concurrency", 1, _CONCURRENCY_MAX)
        _check_int(self.max_retries, "max_retries", 0, _RETRIES_MAX)
        _check_int(self.backoff_ms, "backoff_ms", 0, _INTERVAL_MAX_MS)
        _check_int(self.delay_ms, "delay_ms", 0, _INTERVAL_MAX_MS)
        _check_int(self.retention_ms, "retention_ms", _RETENTION_MIN_MS, _RETENTION_MAX_MS)


class TaskInfo(NamedTuple):
    """A task's state: ``status`` ("pending", "running", "suspended" (a
    durable handler waits for an external callback), "completed", "failed",
    "cancelled"), ``message`` (the handler's result, or the error
    text ``"ExcType: message"`` of the last failed attempt) and ``attempt``
    (1-based, counted when the task is claimed; 0 before its first run)."""

    status: str
    message: str
    attempt: int


class TaskContext(NamedTuple):
    """What a running handler may ask about its task (``current_task()``)."""

    id: str
    queue: str
    attempt: int


_running = threading.local()


def current_task() -> Optional[TaskContext]:
    """Inside a handler, the task it is running; None anywhere else."""
    return getattr(_running, "task", None)


def _suspend_task(wake_after_ms: int, request: bytes) -> NoReturn:
    """Ends a task's run that waits for a callback; ``_attempt`` settles it
    as suspended (the store works out when it is due)."""
    raise SuspendJob()


class _TaskDurable(DurableBackend):
    """The durable backend of the service's worker: a task handler's
    durable operations go to the task's store, not to the worker's memory.
    The run of the task the calling thread handles is made by its first
    durable operation."""

    def __init__(self, store: TaskStore, clock: Callable[[], int]) -> None:
        self._store = store
        self._clock = clock

    def run_for(self, job_id: int, attempt: int, request: Callable[[], bytes]) -> DurableRun:
        durable: Optional[DurableRun] = getattr(_running, "durable", None)
        if durable is None:
            task = current_task()
            if task is None:
                raise CallbackWorkerError("durable operations of a task must run in its handler")
            store = TaskDurableStore(self._store, self._clock, task.id)
            durable = _running.durable = DurableRun(store, task.id, b"", _suspend_task)
        return durable


def retry_delay_ms(backoff_ms: int, attempt: int) -> int:
    """The delay before retrying after failed attempt ``attempt`` (1-based):
    ``backoff_ms << (attempt - 1)``, at most one hour."""
    return min(backoff_ms << min(attempt - 1, 62), MAX_BACKOFF_MS)


def _check_queue_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"queue name must be a str, not {type(name).__name__}")
    size = len(name.encode("utf-8", "surrogatepass"))
    if not 0 < size <= MAX_QUEUE_NAME or "\0" in name:
        raise ValueError(f"queue name must be 1..{MAX_QUEUE_NAME} UTF-8 bytes without NUL, "
                         f"not {size} bytes")
    return name


def _check_payload(payload: object) -> bytes:
    if isinstance(payload, str):
        raise TypeError("payload must be bytes-like, not str (encode it first)")
    try:
        view = memoryview(payload)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"payload must be bytes-like, not {type(payload).__name__}") from None
    if view.nbytes > MAX_PAYLOAD:
        raise ValueError(f"payload is {view.nbytes} bytes; the limit is {MAX_PAYLOAD} (1 MiB)")
    return payload if type(payload) is bytes else view.tobytes()


def _check_task_id(task_id: object) -> str:
    if not isinstance(task_id, str):
        raise TypeError(f"task id must be a str, not {type(task_id).__name__}")
    return task_id


def _route_for(queue: str) -> str:
    """The worker route of a queue: ``task:<name>``, or a digest of the name
    when that would pass the worker's 128-byte limit ("task#" cannot clash
    with a "task:" name)."""
    route = f"task:{queue}"
    if len(route.encode("utf-8", "surrogatepass")) <= _ROUTE_NAME_MAX:
        return route
    return "task#" + hashlib.blake2b(queue.encode("utf-8", "surrogatepass"), digest_size=24).hexdigest()


def _host_identity() -> str:
    """This host as lease owners name it: the host name and, on Linux, a
    digest of the kernel's boot id and this pid namespace.  With a shared
    database (PostgreSQL, or a file on a shared volume) two machines or
    containers may share a host name; pids of one mean nothing to the
    other, so neither may judge the other's workers dead by probing pids."""
    name = socket.gethostname()
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return name
    digest = hashlib.blake2b(f"{boot}:{pid_namespace}".encode(), digest_size=6).hexdigest()
    return f"{name}#{digest}"


_HOST = _host_identity()


def _new_owner() -> str:
    return f"{_HOST}/{os.getpid()}/{uuid.uuid4().hex[:12]}"


def _owner_is_dead(owner: str) -> bool:
    """True only when ``owner`` provably no longer runs: a service of this
    host whose process is gone.  Anything else (another host, a live or
    reused pid, Windows, where probing a pid is not harmless) is left to
    lease expiry."""
    host, _, rest = owner.rpartition("/")[0].partition("/")
    if host != _HOST or sys.platform == "win32":
        return False
    try:
        pid = int(rest)
    except ValueError:
        return False
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class _Attempt:
    """The work item of one claimed task's job (``Worker.run_detached``)."""

    __slots__ = ("service", "queue", "task")

    def __init__(self, service: "TaskService", queue: "_Queue", task: ClaimedTask) -> None:
        self.service = service
        self.queue = queue
        self.task = task

    def run(self) -> None:
        self.service._run(self)


@dataclass(eq=False)
class _Queue:
    name: str
    route: str
    config: QueueConfig
    handler: Handler
    in_flight: int = 0  # claimed by this service and not yet finished


class _GroupCommitter:
    """One thread that settles finished attempts in batches: everything that
    piled up while the previous batch was being committed goes in the next
    transaction."""

    _BATCH_MAX = 10_000

    def __init__(self, store: TaskStore, on_suspended: Callable[[], None]) -> None:
        self._store = store
        self._on_suspended = on_suspended
        self._cond = threading.Condition()
        self._queue: List[Outcome] = []
        self._busy = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="callbackworker-task-commit",
                                        daemon=True)
        self._thread.start()

    def put(self, outcome: Outcome) -> None:
        with self._cond:
            self._queue.append(outcome)
            if len(self._queue) == 1:
                self._cond.notify_all()

    def flush(self) -> None:
        """Returns once everything put so far has been committed."""
        with self._cond:
            while (self._queue or self._busy) and self._thread.is_alive():
                self._cond.wait()

    def close(self) -> None:
        """Commits what is left, then stops the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._queue[:self._BATCH_MAX]
                del self._queue[:self._BATCH_MAX]
                self._busy = True
            try:
                applied = self._store.settle(batch)
                for outcome, ok in zip(batch, applied):
                    if not ok:
                        log.warning("task %s: outcome %r rejected: its lease was lost "
                                    "(the task was recovered meanwhile)",
                                    outcome.task_id, outcome.kind)
                if any(o.kind == "suspend" for o in batch):
                    self._on_suspended()  # one whose callback was signalled meanwhile is due
            except Exception:
                log.exception("could not commit %d task outcomes; those tasks run again "
                              "once their leases expire", len(batch))
            with self._cond:
                self._busy = False
                self._cond.notify_all()


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

    ``prefetch`` (default 0) lets each queue claim that many tasks beyond
    its free slots, in one transaction, so they wait in the queue's route
    instead of being claimed one by one: far higher throughput, at a cost
    on a crash: a prefetched task's attempt was counted at claim, so it
    comes back with one attempt fewer left (or fails if it had none) though
    its handler never ran.  A graceful ``close()`` gives those attempts
    back.  With 0, only tasks that are about to run hold a lease.

    With ``background=False`` nothing runs by itself: each
    ``_dispatch_once()`` call does one pass (tests drive a fake clock so).

    Use it as a context manager or call ``close()``.
    """

    def __init__(self, dsn: "str | os.PathLike[str]" = "callbackworker.db", *,
                 durability: str = "normal", clock: Optional[Callable[[], int]] = None,
                 lease_ms: int = 30_000, poll_ms: int = 200, prefetch: int = 0,
                 background: bool = True) -> None:
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be callable, not {type(clock).__name__}")
        self._lease_ms = _check_int(lease_ms, "lease_ms", 100, _INTERVAL_MAX_MS)
        self._poll_ms = _check_int(poll_ms, "poll_ms", 1, 60_000)
        self._prefetch = _check_int(prefetch, "prefetch", 0, 100_000)
        if type(background) is not bool:
            raise TypeError(f"background must be a bool, not {type(background).__name__}")
        self._store = _open_store(dsn, durability)
        self._clock: Callable[[], int] = clock or _wall_clock_ms
        self._background = background
        self._owner = _new_owner()
        self._cond = threading.Condition()
        self._create_lock = threading.Lock()
        self._queues: Dict[str, _Queue] = {}
        self._unstarted: Set[_Attempt] = set()  # claimed, handed to the worker, not yet run
        self._kicked = False
        self._closed = False
        self._worker: Optional[Worker] = None
        self._committer: Optional[_GroupCommitter] = None
        self._dispatcher: Optional[threading.Thread] = None
        from .functions import FunctionRegistry  # it builds on this module

        self._functions = FunctionRegistry(self)
        _live_services.add(self)

    # ---- lifecycle ----------------------------------------------------

    def __enter__(self) -> "TaskService":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<callbackworker.TaskService {state} {self._store!r} queues={sorted(self._queues)}>"

    def close(self) -> None:
        """Stops the service; idempotent.

        No task is claimed and no handler starts once it has begun.
        Running handlers finish and their outcomes are committed; tasks
        claimed but not yet started go back to pending with their attempt
        given back.  Must not be called from a handler.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._dispatcher is not None:
            self._dispatcher.join()
        if self._worker is not None:
            self._worker.close()  # running handlers finish; queued jobs never run
        now = self._now()
        with self._cond:
            unstarted = list(self._unstarted)
            self._unstarted.clear()
        if self._committer is not None:
            for attempt in unstarted:
                task = attempt.task
                self._committer.put(Outcome(task.id, task.token, "release", "", now))
            self._committer.close()
        self._store.close()
        _live_services.discard(self)

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceClosedError("the TaskService has been closed")

    def _now(self) -> int:
        return int(self._clock())

    # ---- queues -------------------------------------------------------

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
        name = _check_queue_name(name)
        config = QueueConfig() if config is None else config
        if not isinstance(config, QueueConfig):
            raise TypeError(f"config must be a QueueConfig, not {type(config).__name__}")
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        with self._create_lock:
            self._check_open()
            if name in self._queues:
                raise QueueExistsError(f"queue {name!r} was already created by this service")
            self._store.ensure_queue(name)
            dead = [o for o in self._store.running_owners(name) if _owner_is_dead(o)]
            recovered = self._store.recover(name, now=self._now(),
                                            max_attempts=config.max_retries + 1, owners=dead)
            if recovered:
                log.info("queue %r: recovered %d running tasks of dead workers", name, recovered)
            queue = _Queue(name, _route_for(name), config, handler)
            self._start_machinery().open_route(queue.route, concurrency=config.concurrency)
            with self._cond:
                self._queues[name] = queue
                self._kick_locked()

    def _start_machinery(self) -> Worker:
        """The worker, committer and dispatcher, created with the first queue
        (a service that only enqueues and inspects needs none)."""
        if self._worker is None:
            self._committer = _GroupCommitter(self._store, self._kick)
            self._worker = Worker(durable_backend=_TaskDurable(self._store, self._now))
            if self._background:
                self._store.set_waker(self._wake_from_store)
                self._dispatcher = threading.Thread(target=self._dispatch_loop, daemon=True,
                                                    name="callbackworker-task-dispatch")
                self._dispatcher.start()
        return self._worker

    def clear_queue(self, name: str) -> int:
        """Cancels every pending and suspended task of the queue; returns
        how many.  Running tasks are not affected."""
        name = self._known_queue(name)
        return self._store.clear(name, self._now())

    def _known_queue(self, name: object) -> str:
        name = _check_queue_name(name)
        self._check_open()
        if name not in self._queues and name not in self._store.queues():
            raise UnknownQueueError(name)
        return name

    def counts(self) -> Dict[str, Dict[str, int]]:
        """For every queue in the database, its number of tasks per status."""
        self._check_open()
        return self._store.counts()

    # ---- tasks as functions (``callbackworker.tasks.functions``) -------

    def task(self, name: "Optional[str] | Callable[..., Any]" = None, *, queue: str = "default",
             max_retries: Optional[int] = None, backoff_ms: Optional[int] = None,
             timeout_ms: Optional[int] = None, priority: int = 0) -> Any:
        """Registers a function as a task: ``@svc.task(...)`` (or bare
        ``@svc.task``) returns a ``Task``.

        ``name`` defaults to ``module.qualname`` and is what producers
        enqueue by; registering a name twice is a ``ValueError``.  Several
        tasks may share a ``queue``.  ``max_retries``, ``backoff_ms`` and
        ``timeout_ms`` (None: the queue's config) and ``priority`` (higher
        runs first) apply to every call.  Registering serves nothing: see
        ``serve``.
        """
        def register(fn: Callable[..., Any]) -> "Task":
            self._check_open()
            return self._functions.register(fn, name if not callable(name) else None, queue,
                                            max_retries, backoff_ms, timeout_ms, priority)

        return register(name) if callable(name) else register

    def enqueue_task(self, name: str, args: Sequence[Any] = (),
                     kwargs: Optional[Mapping[str, Any]] = None, *,
                     queue: str = "default") -> str:
        """Enqueues a call of the task ``name`` without importing its
        function (a producer such as a web app); returns the task id.
        ``args`` (a list or tuple) and ``kwargs`` must be JSON-encodable
        (else ``TypeError``, nothing stored).  The queue is created if it
        does not exist yet."""
        from .functions import check_task_name

        name = check_task_name(name)
        if not isinstance(args, (list, tuple)):
            raise TypeError(f"args must be a list or tuple, not {type(args).__name__}")
        self._check_open()
        return self._functions.enqueue(name, _check_queue_name(queue), args,
                                       {} if kwargs is None else kwargs)

    def declare_queue(self, name: str, config: Optional[QueueConfig] = None) -> None:
        """Creates the queue in the database if it does not exist, without
        serving it; ``config`` is the policy this service serves it with
        (``serve``; default ``QueueConfig()``)."""
        name = _check_queue_name(name)
        if config is not None and not isinstance(config, QueueConfig):
            raise TypeError(f"config must be a QueueConfig, not {type(config).__name__}")
        self._check_open()
        self._functions.declare_queue(name, config)

    def serve(self, queues: Optional[Iterable[str]] = None) -> None:
        """Starts running registered tasks: on every queue a registered task
        uses, or on the ``queues`` named (each must have one).  Returns at
        once; ``close()`` stops.  Serving a queue again does nothing."""
        self._check_open()
        self._functions.serve(queues)

    # ---- tasks --------------------------------------------------------

    def enqueue(self, queue: str, payload: bytes) -> str:
        """Adds a task (``payload``: bytes-like, at most 1 MiB) to the queue
        and returns its id.  It is committed (durable) when this returns.
        ``UnknownQueueError`` if no service ever created the queue in this
        database."""
        return self.enqueue_many(queue, [payload])[0]

    def enqueue_many(self, queue: str, payloads: Iterable[bytes]) -> List[str]:
        """Adds several tasks in one transaction; returns their ids in order.
        All or none are added."""
        name = _check_queue_name(queue)
        if isinstance(payloads, (str, bytes, bytearray, memoryview)):
            raise TypeError("payloads must be an iterable of bytes-like objects, "
                            f"not one {type(payloads).__name__}")
        tasks = [(uuid.uuid4().hex, _check_payload(p)) for p in payloads]
        self._check_open()
        if tasks:
            self._store.enqueue_many(name, tasks, self._now())
            if name in self._queues:
                with self._cond:
                    self._kick_locked()
        return [task_id for task_id, _ in tasks]

    def get(self, task_id: str) -> TaskInfo:
        """The task's status, message and attempt.  ``UnknownTaskError``
        (a ``KeyError``) for an id never issued or already swept."""
        task_id = _check_task_id(task_id)
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
        task_id = _check_task_id(task_id)
        self._check_open()
        status = self._store.cancel(task_id, self._now())
        if status is None:
            raise UnknownTaskError(task_id)
        if status not in ("pending", "suspended"):
            raise TaskNotCancellableError(task_id, status)

    # ---- durable callbacks --------------------------------------------

    def send_callback_success(self, callback_id: str, result: bytes) -> None:
        """Signals success to a task's callback: the task, if suspended
        waiting for it, becomes due now and replays; its ``callback_result``
        returns ``result`` (bytes-like, at most 1 MiB).  The signal is
        committed when this returns; any service on the database may send
        it (one that created no queue only writes the store).  Raises
        ``UnknownCallbackError`` for an id never issued (or swept with its
        task) and ``CallbackAlreadyCompletedError`` once the callback has
        succeeded, failed, timed out or its task ended: of concurrent or
        duplicate signals exactly one is applied."""
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
        if self._worker is not None:
            self._kick()

    # ---- dispatching --------------------------------------------------

    def _kick(self) -> None:
        with self._cond:
            self._kick_locked()

    def _kick_locked(self) -> None:
        self._kicked = True
        self._cond.notify_all()

    def _wake_from_store(self, queue: Optional[str]) -> None:
        """The store's waker: another process may have made work due."""
        with self._cond:
            if queue is None or queue in self._queues:
                self._kick_locked()

    def _dispatch_loop(self) -> None:
        renew_every = self._lease_ms / 3000
        next_renewal = next_sweep = 0.0
        while True:
            with self._cond:
                if self._closed:
                    return
                self._kicked = False
            try:
                mono = time.monotonic()
                if mono >= next_renewal:
                    self._maintain(sweep=mono >= next_sweep)
                    next_renewal = mono + renew_every
                    next_sweep = next_sweep if mono < next_sweep else mono + _SWEEP_EVERY_S
                _, wait_ms = self._claim_and_start()
            except Exception:
                log.exception("task dispatcher: pass failed; retrying")
                wait_ms = self._poll_ms
            wait_ms = min(wait_ms, max(0.0, next_renewal - time.monotonic()) * 1000)
            with self._cond:
                if not self._kicked and not self._closed and wait_ms > 0:
                    self._cond.wait(wait_ms / 1000)

    def _maintain(self, sweep: bool) -> None:
        """Renews this service's leases, takes back expired ones in its
        queues and, with ``sweep``, deletes tasks past their retention."""
        now = self._now()
        self._store.renew_leases(self._owner, now + self._lease_ms)
        with self._cond:
            queues = list(self._queues.values())
        for q in queues:
            if self._store.recover(q.name, now=now, max_attempts=q.config.max_retries + 1):
                log.info("queue %r: recovered tasks whose lease expired", q.name)
            if sweep:
                self._store.sweep(q.name, now - q.config.retention_ms)

    def _claim_and_start(self) -> Tuple[int, float]:
        """Claims due tasks up to each queue's free slots and starts them.
        Returns how many started and how long (ms) until more may be due."""
        with self._cond:
            free = [(q, q.config.concurrency + self._prefetch - q.in_flight)
                    for q in self._queues.values()]
        started, wait_ms = 0, float(self._poll_ms)
        for queue, slots in free:
            if slots <= 0:
                continue  # a finishing handler kicks the dispatcher
            now = self._now()
            claimed = self._store.claim(queue.name, owner=self._owner, limit=slots, now=now,
                                        lease_ms=self._lease_ms, delay_ms=queue.config.delay_ms)
            self._start(queue, claimed)
            started += len(claimed)
            if len(claimed) < slots:
                due = self._store.next_due(queue.name)
                if due is not None:
                    wait_ms = min(wait_ms, max(0, due - now))
        return started, wait_ms

    def _start(self, queue: _Queue, claimed: List[ClaimedTask]) -> None:
        if not claimed:
            return
        assert self._worker is not None and self._committer is not None
        attempts = [_Attempt(self, queue, task) for task in claimed]
        with self._cond:
            self._unstarted.update(attempts)
            queue.in_flight += len(claimed)
        for attempt in attempts:
            try:
                self._worker.run_detached(attempt, route=queue.route)
            except Exception:
                with self._cond:
                    taken = attempt in self._unstarted  # else close() released it
                    if taken:
                        self._unstarted.discard(attempt)
                        queue.in_flight -= 1
                if taken:  # the job never ran: give the attempt back
                    task = attempt.task
                    self._committer.put(Outcome(task.id, task.token, "release", "", self._now()))
                if not self._closed:
                    raise

    def _run(self, attempt: _Attempt) -> None:
        """Runs one claimed task's handler (``_Attempt.run``, on a C thread)."""
        queue, task = attempt.queue, attempt.task
        with self._cond:
            self._unstarted.discard(attempt)
            closing = self._closed
        outcome: Optional[Outcome] = None
        try:
            if closing:  # close() has begun: no handler starts any more
                outcome = Outcome(task.id, task.token, "release", "", self._now())
            else:
                outcome = self._attempt(queue, task)
        finally:
            if outcome is None:  # interrupted by a BaseException
                outcome = self._failure(queue, task, "interrupted: the handler did not return")
            assert self._committer is not None
            self._committer.put(outcome)
            with self._cond:
                queue.in_flight -= 1
                self._kick_locked()

    def _attempt(self, queue: _Queue, task: ClaimedTask) -> Outcome:
        view = memoryview(task.payload)
        _running.task = TaskContext(task.id, queue.name, task.attempt)
        _running.durable = None
        outcome: Outcome
        unwound = False  # by SuspendJob, as callback_result suspends
        try:
            message = queue.handler(view)
            if message is not None and not isinstance(message, str):
                raise TypeError(f"the handler must return a str or None, "
                                f"not {type(message).__name__}")
        except SuspendJob:
            unwound = True
            outcome = self._failure(queue, task, "SuspendJob: raised outside callback_result")
        except NoRetry as exc:
            outcome = Outcome(task.id, task.token, "fail", f"NoRetry: {exc.message}", self._now())
        except Retry as exc:
            outcome = self._failure(queue, task, f"Retry: {exc}", exc.delay_ms)
        except Exception as exc:
            outcome = self._failure(queue, task, f"{type(exc).__name__}: {exc}")
        else:
            outcome = Outcome(task.id, task.token, "complete", message or "", self._now())
        finally:
            durable: Optional[DurableRun] = _running.durable
            _running.task = _running.durable = None
            try:
                view.release()
            except BufferError:
                pass  # the handler kept an export; the bytes stay valid anyway
        if durable is not None and durable.suspended_on is not None:
            if not unwound:  # the handler caught SuspendJob: the wait still stands
                log.warning("task %s: the handler went on after callback_result suspended it; "
                            "its outcome is ignored and the task stays suspended", task.id)
            return Outcome(task.id, task.token, "suspend", "", self._now(),
                           awaiting=durable.suspended_on)
        return outcome

    def _failure(self, queue: _Queue, task: ClaimedTask, text: str,
                 delay_ms: Optional[int] = None) -> Outcome:
        """A failed attempt: retried after ``delay_ms`` (None: the backoff)
        while retries are left, else failed."""
        now = self._now()
        if task.attempt <= queue.config.max_retries:
            if delay_ms is None:
                delay_ms = retry_delay_ms(queue.config.backoff_ms, task.attempt)
            run_at = now + delay_ms
            return Outcome(task.id, task.token, "retry", text, run_at)
        return Outcome(task.id, task.token, "fail", text, now)

    def _dispatch_once(self) -> int:
        """Test hook (documented, for ``background=False``): one full pass,
        synchronously.  Renews leases, recovers expired ones, sweeps
        retention, claims every due task that fits the free slots, runs them
        and commits their outcomes before returning.  Returns how many tasks
        ran."""
        self._check_open()
        if self._worker is None:
            return 0
        self._maintain(sweep=True)
        started, _ = self._claim_and_start()
        with self._cond:
            while any(q.in_flight for q in self._queues.values()):
                self._cond.wait()
        assert self._committer is not None
        self._committer.flush()
        return started


def _open_store(dsn: "str | os.PathLike[str]", durability: str) -> TaskStore:
    if not isinstance(dsn, (str, os.PathLike)):
        raise TypeError(f"dsn must be a path or a URL string, not {type(dsn).__name__}")
    if isinstance(dsn, str) and dsn.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresTaskStore  # psycopg is an optional extra

        return PostgresTaskStore(dsn, durability=durability)
    return SQLiteTaskStore(dsn, durability=durability)


_live_services: "weakref.WeakSet[TaskService]" = weakref.WeakSet()


def _close_all_at_exit() -> None:
    """Closes live services before the workers' own exit hook (atexit runs
    hooks last-registered first), so claimed tasks are settled or given
    back instead of waiting for their leases to expire."""
    for service in list(_live_services):
        try:
            service.close()
        except Exception:
            log.exception("closing %r at exit", service)


atexit.register(_close_all_at_exit)
