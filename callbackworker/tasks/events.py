"""What happens to tasks in this process, logged and told to observers.

DESIGN

* One seam.  The client tells its ``TaskEvents`` of every enqueue; the
  runtime of every attempt that starts, every outcome it hands to the
  committer and every lease it takes back.  ``TaskEvents`` writes the log
  lines and calls each subscribed ``TaskObserver`` (``metrics.py``
  subscribes one); nothing else in the task layer logs these events.
* Loggers.  Everything goes to ``callbackworker.tasks.events``: a start
  at DEBUG, a completion at INFO, a retried attempt at WARNING and a
  failed task at ERROR, both with the attempt's traceback in the record's
  ``exc_text`` (so every standard formatter prints it under the line),
  a lease taken back at WARNING.  Each record carries the task's fields as
  attributes (``task_id``, ``queue``, ``task_name``, ``attempt``,
  ``duration_ms``, ``outcome``) for structured formatters (``logs.py``).
* What is never logged: a task's payload, arguments, result or progress,
  callback ids, lease tokens.  A failure's message and traceback are the
  handler's own text: they are what an operator needs, and are stored
  with the task anyway.
* Observers are called on the thread the event happened on (a handler's
  thread, the dispatcher, a producer); an observer must be quick and must
  not raise (what it raises is logged and dropped).  They are held
  weakly: an observer nobody else refers to any more (the metrics of an
  HTTP app that is gone) stops being called, without unsubscribing.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Dict, List, Optional, Protocol, Tuple

__all__ = ["TaskEvents", "TaskObserver", "LOGGER_NAME"]

LOGGER_NAME = "callbackworker.tasks.events"
"""The logger every task event goes to."""

log = logging.getLogger(LOGGER_NAME)

_LEVELS = {"complete": logging.INFO, "retry": logging.WARNING, "fail": logging.ERROR}


class TaskObserver(Protocol):
    """Told of what happens to tasks in one process; see ``TaskEvents``.
    ``name`` is a task function's registered name, None for a raw task."""

    def enqueued(self, queue: str, name: Optional[str], count: int) -> None:
        """``count`` tasks were committed into ``queue``."""

    def started(self, queue: str, name: Optional[str]) -> None:
        """An attempt of a task of ``queue`` began running."""

    def finished(self, queue: str, name: Optional[str], outcome: str, seconds: float) -> None:
        """An attempt ended after ``seconds``: ``outcome`` is ``"complete"``,
        ``"retry"``, ``"fail"``, ``"release"`` or ``"suspend"``."""


class TaskEvents:
    """Logs what happens to tasks and tells subscribed observers.
    Thread-safe; a ``TaskService`` has one (``TaskService.events``), shared
    by its client and its runtime."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._observers: List["weakref.ref[TaskObserver]"] = []

    def subscribe(self, observer: TaskObserver) -> None:
        """Calls ``observer`` on every later event (once, however often it
        is subscribed) while the caller keeps a reference to it."""
        with self._lock:
            live = [ref for ref in self._observers if ref() is not None]
            if all(ref() is not observer for ref in live):
                live.append(weakref.ref(observer))
            self._observers = live

    def unsubscribe(self, observer: TaskObserver) -> None:
        """Stops calling ``observer``; nothing if it was not subscribed."""
        with self._lock:
            self._observers = [ref for ref in self._observers
                               if ref() is not None and ref() is not observer]

    def _tell(self, method: str, *args: Any) -> None:
        for ref in self._observers:  # a snapshot: replaced, never mutated
            observer = ref()
            if observer is None:
                continue
            try:
                getattr(observer, method)(*args)
            except Exception:
                log.exception("task observer %r failed on %s", observer, method)

    def enqueued(self, queue: str, name: Optional[str], count: int) -> None:
        """``count`` tasks were committed into ``queue`` by this process."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%d task(s) enqueued in queue %r", count, queue,
                      extra={"queue": queue, "task_name": name})
        self._tell("enqueued", queue, name, count)

    def started(self, task_id: str, queue: str, name: Optional[str], attempt: int) -> None:
        """Attempt ``attempt`` of the task began running in this process."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s%s started (queue %r, attempt %d)", task_id, _called(name), queue,
                      attempt, extra=_fields(task_id, queue, name, attempt))
        self._tell("started", queue, name)

    def finished(self, task_id: str, queue: str, name: Optional[str], attempt: int,
                 outcome: str, seconds: float, message: str = "",
                 traceback: Optional[str] = None) -> None:
        """An attempt ended with ``outcome`` (an ``Outcome.kind``) after
        ``seconds``; ``message`` and ``traceback`` are a failed attempt's."""
        level = _LEVELS.get(outcome, logging.DEBUG)
        if log.isEnabledFor(level):
            fields = _fields(task_id, queue, name, attempt)
            fields.update(duration_ms=round(seconds * 1000, 3), outcome=outcome)
            if outcome == "complete":
                text = "task %s%s completed in %.0f ms (queue %r, attempt %d)"
                args: Tuple[object, ...] = (task_id, _called(name), seconds * 1000, queue, attempt)
            elif outcome in ("retry", "fail"):
                text = ("task %s%s failed on attempt %d (queue %r); "
                        + ("it will be retried: %s" if outcome == "retry" else "no retry: %s"))
                args = (task_id, _called(name), attempt, queue, message)
            else:
                text = "task %s%s: attempt %d ended with %s (queue %r)"
                args = (task_id, _called(name), attempt, outcome, queue)
            record = log.makeRecord(log.name, level, __file__, 0, text, args, None,
                                    extra=fields)
            if traceback:
                record.exc_text = traceback.rstrip("\n")
            log.handle(record)
        self._tell("finished", queue, name, outcome, seconds)

    def recovered(self, queue: str, count: int, why: str) -> None:
        """``count`` running tasks of ``queue`` were taken back from lost
        workers (``why`` says how they were found lost)."""
        log.warning("queue %r: took back %d running task(s) of lost workers (%s): they run "
                    "again, or fail when no attempt is left", queue, count, why,
                    extra={"queue": queue, "recovered": count})


def _called(name: Optional[str]) -> str:
    return "" if name is None else f" ({name})"


def _fields(task_id: str, queue: str, name: Optional[str], attempt: int) -> Dict[str, Any]:
    return {"task_id": task_id, "queue": queue, "task_name": name, "attempt": attempt}
