"""Tasks as functions: ``@svc.task``, ``Task.enqueue`` and ``svc.serve``.

DESIGN

* Registration.  ``svc.task(...)`` wraps a function in a ``Task`` and files
  it in the service's ``FunctionRegistry`` under its name (by default
  ``module.qualname``).  A name is registered once per service: a second
  registration is a ``ValueError`` at once, not a surprise at run time.
  Registering serves nothing, so a web application imports its task
  module just to enqueue.
* Arguments.  ``enqueue`` encodes ``(args, kwargs)`` as JSON (stdlib
  ``json``, ASCII output: lone surrogates and NUL travel as escapes, so any
  store holds the text) before anything is stored.  What JSON cannot
  encode raises ``TypeError`` in the producer: no task is ever stored that
  a worker could not decode.
* Serving.  ``svc.serve(queues)`` creates each queue with a handler that
  looks the task's name up in the registry when the task runs, so tasks
  registered after ``serve`` on a served queue run too.  ``close()`` stops.
* Calling.  Calling a ``Task`` runs its function inline.  An ``async def``
  function runs to completion on an event loop of its own (a helper thread
  runs it when the calling thread already runs a loop).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..errors import NoRetry, UnknownQueueError
from .service import QueueConfig, _check_int, _check_queue_name

if TYPE_CHECKING:
    from .service import TaskService

__all__ = ["Task", "TaskCall", "FunctionRegistry", "MAX_TASK_NAME", "check_task_name",
           "encode_arguments", "decode_arguments", "run_to_completion"]

MAX_TASK_NAME = 255
"""Longest task name, in UTF-8 bytes."""

_PRIORITY_MIN, _PRIORITY_MAX = -(2**31), 2**31 - 1
_TIMEOUT_MAX = 2**31 - 1
_RETRIES_MAX = 2**31 - 1
_BACKOFF_MAX = 604_800_000


def check_task_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, not {type(name).__name__}")
    size = len(name.encode("utf-8", "surrogatepass"))
    if not 0 < size <= MAX_TASK_NAME or "\0" in name:
        raise ValueError(f"task name must be 1..{MAX_TASK_NAME} UTF-8 bytes without NUL, "
                         f"not {size} bytes")
    return name


def _check_optional(value: object, name: str, low: int, high: int) -> Optional[int]:
    return None if value is None else _check_int(value, name, low, high)


def _check_priority(priority: object) -> int:
    return _check_int(priority, "priority", _PRIORITY_MIN, _PRIORITY_MAX)


def encode_arguments(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """``(args, kwargs)`` of a call to task ``name`` as JSON text (ASCII).
    ``TypeError`` if JSON cannot encode them (NaN and infinities included:
    they are not JSON)."""
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a mapping, not {type(kwargs).__name__}")
    try:
        return json.dumps([list(args), dict(kwargs)], allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the arguments of task {name!r} cannot be encoded as JSON: {exc}") from None


def decode_arguments(text: str) -> Tuple[List[Any], Dict[str, Any]]:
    """The ``(args, kwargs)`` that ``encode_arguments`` encoded."""
    args, kwargs = json.loads(text)
    return args, kwargs


def _run_coroutine(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # This thread runs a loop already, which cannot be re-entered: run the
    # coroutine on a loop of its own in a helper thread, and wait for it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="callbackworker-task-async") as pool:
        return pool.submit(asyncio.run, coro).result()


def run_to_completion(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """Calls ``fn(*args, **kwargs)``; a coroutine it returns (an ``async
    def`` function) is run to completion on an event loop."""
    value = fn(*args, **kwargs)
    if inspect.iscoroutine(value):
        return _run_coroutine(value)
    return value


class Task:
    """A function registered with ``TaskService.task``.

    Calling it runs the function inline (to completion, for an ``async
    def`` function).  ``enqueue(*args, **kwargs)`` stores a call for a
    worker to run and returns the task id; ``options(...)`` sets per-call
    options first.  ``name``, ``queue``, ``max_retries``, ``backoff_ms``,
    ``timeout_ms`` and ``priority`` are as registered (None: the queue's
    config decides).
    """

    def __init__(self, registry: "FunctionRegistry", fn: Callable[..., Any], name: str,
                 queue: str, max_retries: Optional[int], backoff_ms: Optional[int],
                 timeout_ms: Optional[int], priority: int) -> None:
        self._registry = registry
        self.fn = fn
        self.name = name
        self.queue = queue
        self.max_retries = max_retries
        self.backoff_ms = backoff_ms
        self.timeout_ms = timeout_ms
        self.priority = priority
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<callbackworker.Task {self.name!r} queue={self.queue!r}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return run_to_completion(self.fn, args, kwargs)

    def enqueue(self, *args: Any, **kwargs: Any) -> str:
        """Stores a call of this task with these (JSON-encodable) arguments
        and returns its task id; committed when this returns.  ``TypeError``
        if JSON cannot encode the arguments (nothing is stored)."""
        return self._registry.enqueue(self.name, self.queue, args, kwargs)

    def options(self, *, queue: Optional[str] = None) -> "TaskCall":
        """This task with options for one call: ``queue`` (None: the
        task's)."""
        return TaskCall(self, self.queue if queue is None else _check_queue_name(queue))


class TaskCall:
    """A ``Task`` with per-call options (``Task.options``)."""

    def __init__(self, task: Task, queue: str) -> None:
        self._task = task
        self._queue = queue

    def __repr__(self) -> str:
        return f"<callbackworker.TaskCall {self._task.name!r} queue={self._queue!r}>"

    def enqueue(self, *args: Any, **kwargs: Any) -> str:
        """As ``Task.enqueue``, with these options."""
        return self._task._registry.enqueue(self._task.name, self._queue, args, kwargs)


class FunctionRegistry:
    """A service's registered task functions, and the handlers that run
    them on the queues it serves."""

    def __init__(self, service: "TaskService") -> None:
        self._service = service
        self._lock = threading.Lock()
        self._tasks: Dict[str, Task] = {}
        self._configs: Dict[str, QueueConfig] = {}
        self._known_queues: set = set()  # exist in the store, as far as this process knows
        self._served: set = set()

    # ---- registration ---------------------------------------------------

    def register(self, fn: Callable[..., Any], name: Optional[str], queue: str,
                 max_retries: Optional[int], backoff_ms: Optional[int],
                 timeout_ms: Optional[int], priority: int) -> Task:
        """Files ``fn`` as a task; ``ValueError`` if the name is taken."""
        if not callable(fn):
            raise TypeError(f"a task must be a callable, not {type(fn).__name__}")
        if name is None:
            name = f"{fn.__module__}.{fn.__qualname__}"
        name = check_task_name(name)
        queue = _check_queue_name(queue)
        task = Task(self, fn, name, queue,
                    _check_optional(max_retries, "max_retries", 0, _RETRIES_MAX),
                    _check_optional(backoff_ms, "backoff_ms", 0, _BACKOFF_MAX),
                    _check_optional(timeout_ms, "timeout_ms", -1, _TIMEOUT_MAX),
                    _check_priority(priority))
        with self._lock:
            if name in self._tasks:
                raise ValueError(f"a task named {name!r} is already registered with this "
                                 "service; give one of them another name (task(name=...))")
            self._tasks[name] = task
        return task

    def task_named(self, name: str) -> Optional[Task]:
        """The task registered under ``name``, or None."""
        with self._lock:
            return self._tasks.get(name)

    # ---- producing --------------------------------------------------------

    def enqueue(self, name: str, queue: str, args: Sequence[Any],
                kwargs: Mapping[str, Any]) -> str:
        """Stores a call of task ``name`` on ``queue``, creating the queue
        on first use; returns the task id."""
        payload = json.dumps({"task": name, "call": encode_arguments(name, args, kwargs)},
                             separators=(",", ":")).encode("ascii")
        if queue not in self._known_queues:
            self.declare_queue(queue, None)
        try:
            return self._service.enqueue(queue, payload)
        except UnknownQueueError:  # deleted since this process created it
            self.declare_queue(queue, None)
            return self._service.enqueue(queue, payload)

    def declare_queue(self, queue: str, config: Optional[QueueConfig]) -> None:
        """Creates ``queue`` in the store if needed; a ``config`` becomes the
        one this service serves it with."""
        self._service._store.ensure_queue(queue)
        with self._lock:
            self._known_queues.add(queue)
            if config is not None:
                self._configs[queue] = config

    # ---- serving ----------------------------------------------------------

    def serve(self, queues: Optional[Iterable[str]]) -> List[str]:
        """Starts serving ``queues`` (None: every queue of a registered
        task); returns the queues newly served."""
        with self._lock:
            registered = {t.queue for t in self._tasks.values()}
        if queues is None:
            wanted = sorted(registered)
        else:
            if isinstance(queues, str):
                raise TypeError("queues must be an iterable of queue names, not one str "
                                "(write queues=[name])")
            wanted = [_check_queue_name(q) for q in queues]
            stray = [q for q in wanted if q not in registered]
            if stray:
                raise ValueError(f"no registered task uses queue {stray[0]!r}; register one "
                                 "with task(queue=...) before serving it")
        started = []
        for queue in wanted:
            with self._lock:
                if queue in self._served:
                    continue
                self._served.add(queue)
                config = self._configs.get(queue)
            try:
                self._service.create_queue(queue, config, self._handler)
            except BaseException:
                with self._lock:
                    self._served.discard(queue)
                raise
            started.append(queue)
        return started

    def _handler(self, payload: memoryview) -> str:
        """Runs one stored call: decodes it, calls the registered function
        and returns its result as JSON text."""
        envelope = json.loads(bytes(payload))
        name = envelope["task"]
        task = self.task_named(name)
        if task is None:
            raise NoRetry(f"no task named {name!r} is registered in this process; "
                          "import the module that defines it in the worker")
        args, kwargs = decode_arguments(envelope["call"])
        result = run_to_completion(task.fn, args, kwargs)
        return json.dumps(result, allow_nan=False, separators=(",", ":"))
