"""Tasks as functions: ``@svc.task``, ``Task.enqueue`` and what runs a call.

DESIGN

* Registration.  ``svc.task(...)`` wraps a function in a ``Task`` and files
  it in the service's ``FunctionRegistry`` under its name (by default
  ``module.qualname``).  A name is registered once per service: a second
  registration is a ``ValueError`` at once, not a surprise at run time.
  Registering serves nothing, so a web application imports its task
  module just to enqueue.
* Arguments and results.  A call is stored as the JSON text of
  ``[args, kwargs]`` (stdlib ``json``, ASCII output: lone surrogates and
  NUL travel as escapes, so every store holds the text), encoded before
  anything is stored: what JSON cannot encode raises ``TypeError`` in the
  producer, so no task is ever stored that a worker could not decode.  The
  return value is stored the same way; one JSON cannot encode, or over
  ``MAX_RESULT`` bytes, fails that task alone, at once, saying why.
* Running.  The task runtime hands a claimed call to ``run``, which looks
  its name up when the task runs (so tasks registered after ``serve`` run
  too).  A name no one registered in this process fails the task at once
  with a message saying so: retrying could not help.  What the function
  raises goes back to the runtime, which applies ``Retry``, ``NoRetry`` and
  the retry policy (``limits``: the task's options over its queue's).
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
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .config import QueueConfig, check_int, check_queue_name
from .storage import ClaimedTask

__all__ = ["Task", "TaskCall", "FunctionRegistry", "CallResult", "Submit", "MAX_TASK_NAME",
           "MAX_RESULT", "check_task_name", "check_priority", "check_dedup_key", "encode_arguments",
           "decode_arguments", "run_to_completion"]

MAX_TASK_NAME = 255
"""Longest task name, in UTF-8 bytes."""

MAX_RESULT = 1 << 20
"""Largest JSON text of a task's return value, in bytes (1 MiB)."""

_PRIORITY_MIN, _PRIORITY_MAX = -(2**31), 2**31 - 1
_TIMEOUT_MAX = 2**31 - 1
_RETRIES_MAX = 2**31 - 1
_BACKOFF_MAX = 604_800_000

Submit = Callable[..., str]
"""How a ``Task`` enqueues: ``TaskClient.enqueue_task``'s signature."""


def check_task_name(name: object) -> str:
    """``name`` if it is a valid task name: a str of 1..``MAX_TASK_NAME``
    UTF-8 bytes without NUL."""
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, not {type(name).__name__}")
    size = len(name.encode("utf-8", "surrogatepass"))
    if not 0 < size <= MAX_TASK_NAME or "\0" in name:
        raise ValueError(f"task name must be 1..{MAX_TASK_NAME} UTF-8 bytes without NUL, "
                         f"not {size} bytes")
    return name


def check_priority(priority: object) -> int:
    """``priority`` if it is a 32-bit signed int."""
    return check_int(priority, "priority", _PRIORITY_MIN, _PRIORITY_MAX)


def _check_optional(value: object, name: str, low: int, high: int) -> Optional[int]:
    return None if value is None else check_int(value, name, low, high)


def encode_arguments(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """``(args, kwargs)`` of a call to task ``name`` as JSON text (ASCII).
    ``TypeError`` if JSON cannot encode them (NaN and infinities included:
    they are not JSON)."""
    if not isinstance(args, (list, tuple)):
        raise TypeError(f"args must be a list or tuple, not {type(args).__name__}")
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a mapping, not {type(kwargs).__name__}")
    try:
        return json.dumps([list(args), dict(kwargs)], allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the arguments of task {name!r} cannot be encoded as JSON: "
                        f"{exc}") from None


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


def run_to_completion(fn: Callable[..., Any], args: Sequence[Any],
                      kwargs: Mapping[str, Any]) -> Any:
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

    def __init__(self, submit: Submit, fn: Callable[..., Any], name: str, queue: str,
                 max_retries: Optional[int], backoff_ms: Optional[int],
                 timeout_ms: Optional[int], priority: int) -> None:
        self._submit = submit
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
        return self._submit(self.name, args, kwargs, queue=self.queue, priority=self.priority)

    def options(self, *, delay_ms: int = 0, run_at_ms: Optional[int] = None,
                priority: Optional[int] = None, dedup_key: Optional[str] = None,
                queue: Optional[str] = None) -> "TaskCall":
        """This task with options for one call, checked here: ``delay_ms``
        or ``run_at_ms`` (epoch ms) to start no earlier, ``priority`` (None:
        the task's), ``dedup_key`` (while an unfinished task of the queue
        has it, enqueue returns that task's id and stores nothing),
        ``queue`` (None: the task's).  Then call ``.enqueue(...)``."""
        options = {"delay_ms": check_int(delay_ms, "delay_ms", 0, 2**62),
                   "run_at_ms": _check_optional(run_at_ms, "run_at_ms", 0, 2**62),
                   "priority": self.priority if priority is None else check_priority(priority),
                   "dedup_key": check_dedup_key(dedup_key),
                   "queue": self.queue if queue is None else check_queue_name(queue)}
        if delay_ms and run_at_ms is not None:
            raise ValueError("give delay_ms or run_at_ms, not both")
        return TaskCall(self, options)


def check_dedup_key(key: object) -> Optional[str]:
    if key is None:
        return None
    if not isinstance(key, str):
        raise TypeError(f"dedup_key must be a str or None, not {type(key).__name__}")
    if not 0 < len(key) <= 1024 or "\0" in key:
        raise ValueError("dedup_key must be 1..1024 characters without NUL")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("dedup_key must be valid Unicode text (no lone surrogates)") from None
    return key


class TaskCall:
    """A ``Task`` with per-call options (``Task.options``)."""

    def __init__(self, task: Task, options: Dict[str, Any]) -> None:
        self._task = task
        self._options = options

    def __repr__(self) -> str:
        return f"<callbackworker.TaskCall {self._task.name!r} {self._options}>"

    def enqueue(self, *args: Any, **kwargs: Any) -> str:
        """As ``Task.enqueue``, with these options."""
        return self._task._submit(self._task.name, args, kwargs, **self._options)


class CallResult(NamedTuple):
    """How ``FunctionRegistry.run`` ended without the function raising:
    ``result`` (the return value's JSON text), or ``refusal`` (a message:
    the task fails at once, no attempt could do better)."""

    result: Optional[str]
    refusal: Optional[str] = None


class FunctionRegistry:
    """A service's registered task functions and declared queue configs,
    and what runs a stored call.  Thread-safe."""

    def __init__(self, submit: Submit) -> None:
        self._submit = submit
        self._lock = threading.Lock()
        self._tasks: Dict[str, Task] = {}
        self._configs: Dict[str, QueueConfig] = {}

    def register(self, fn: Callable[..., Any], name: Optional[str], queue: str,
                 max_retries: Optional[int], backoff_ms: Optional[int],
                 timeout_ms: Optional[int], priority: int) -> Task:
        """Files ``fn`` as a task; ``ValueError`` if the name is taken."""
        if not callable(fn):
            raise TypeError(f"a task must be a callable, not {type(fn).__name__}")
        if name is None:
            name = f"{fn.__module__}.{fn.__qualname__}"
        task = Task(self._submit, fn, check_task_name(name), check_queue_name(queue),
                    _check_optional(max_retries, "max_retries", 0, _RETRIES_MAX),
                    _check_optional(backoff_ms, "backoff_ms", 0, _BACKOFF_MAX),
                    _check_optional(timeout_ms, "timeout_ms", -1, _TIMEOUT_MAX),
                    check_priority(priority))
        with self._lock:
            if task.name in self._tasks:
                raise ValueError(f"a task named {task.name!r} is already registered with this "
                                 "service; give one of them another name (task(name=...))")
            self._tasks[task.name] = task
        return task

    def task_named(self, name: Optional[str]) -> Optional[Task]:
        """The task registered under ``name``, or None."""
        with self._lock:
            return self._tasks.get(name) if name is not None else None

    def most_retries(self, config: QueueConfig) -> int:
        """The most retries any call may be given: the queue's, or more where
        a registered task asks for more.  Lease recovery counts attempts
        against it, so that no task fails before its own limit; a call past
        its own limit is failed when claimed (``past_limit``)."""
        with self._lock:
            own = [t.max_retries for t in self._tasks.values() if t.max_retries is not None]
        return max([config.max_retries, *own])

    def queues(self) -> List[str]:
        """Every queue a registered task uses, sorted."""
        with self._lock:
            return sorted({t.queue for t in self._tasks.values()})

    def declare(self, queue: str, config: QueueConfig) -> None:
        """Makes ``config`` the one this service serves ``queue`` with."""
        with self._lock:
            self._configs[queue] = config

    def declared(self, queue: str) -> Optional[QueueConfig]:
        """The config this service declared for ``queue``, or None."""
        with self._lock:
            return self._configs.get(queue)

    def limits(self, name: Optional[str], config: QueueConfig) -> Tuple[int, int]:
        """``(max_retries, backoff_ms)`` of a call of task ``name``: its
        registered options over the queue's ``config``."""
        task = self.task_named(name)
        if task is None:
            return config.max_retries, config.backoff_ms
        return (config.max_retries if task.max_retries is None else task.max_retries,
                config.backoff_ms if task.backoff_ms is None else task.backoff_ms)

    def timeout_ms(self, name: Optional[str]) -> Optional[int]:
        """The registered ``timeout_ms`` of task ``name`` (None: the queue's)."""
        task = self.task_named(name)
        return None if task is None else task.timeout_ms

    def run(self, claimed: ClaimedTask) -> CallResult:
        """Runs one stored call: decodes its arguments, calls the registered
        function and encodes its return value.  What the function raises
        propagates."""
        task = self.task_named(claimed.name)
        if task is None:
            return CallResult(None, f"no task named {claimed.name!r} is registered in this "
                                    "process: import the module that defines it in the worker")
        args, kwargs = decode_arguments(claimed.args or "[[],{}]")
        value = run_to_completion(task.fn, args, kwargs)
        try:
            text = json.dumps(value, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            return CallResult(None, f"the return value of task {task.name!r} cannot be encoded "
                                    f"as JSON: {exc}")
        if len(text) > MAX_RESULT:
            return CallResult(None, f"the return value of task {task.name!r} is {len(text)} "
                                    f"bytes of JSON; the limit is {MAX_RESULT} (1 MiB): store "
                                    "big results elsewhere and return a reference")
        return CallResult(text)
