"""Waiting for a task's outcome: ``TaskService.result`` / ``result_async``.

DESIGN

* Any process may wait for any task: the waiter reads the task from the
  store until it is finished, pausing between reads with a backoff (from
  ``FIRST_PAUSE_MS``, doubling up to ``MAX_PAUSE_MS``), never past the
  caller's timeout.  A finished task is answered from its record: the
  decoded return value, ``TaskFailedError`` or ``TaskCancelledError``.
* In a process whose runtime settles outcomes, ``Completions`` cuts the
  pauses short: the group committer calls ``notify`` after every batch it
  commits, and waiters read again at once.  Its lock is held only to
  count and wake, never while reading the store.
* The asynchronous waiter does the same with ``asyncio.sleep`` between
  reads (each read runs in a thread), so a cancelled wait leaves nothing
  behind.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Awaitable, Callable, Optional

from ..errors import TaskCancelledError, TaskFailedError, WaitTimeoutError
from .config import TaskInfo, check_int

__all__ = ["Completions", "FIRST_PAUSE_MS", "MAX_PAUSE_MS", "outcome_of", "wait_for_result",
           "wait_for_result_async"]

FIRST_PAUSE_MS = 5
MAX_PAUSE_MS = 500
_FINISHED = ("completed", "failed", "cancelled")


class Completions:
    """Wakes result waiters of this process when outcomes are committed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def notify(self) -> None:
        """Outcomes were just committed: waiters read again."""
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    def count(self) -> int:
        """How many times ``notify`` was called; pass it to ``wait``."""
        with self._cond:
            return self._count

    def wait(self, seen: int, timeout_s: float) -> None:
        """Returns after ``timeout_s``, or earlier once ``notify`` was
        called after the ``count()`` that returned ``seen``."""
        with self._cond:
            self._cond.wait_for(lambda: self._count != seen, timeout_s)


def outcome_of(info: TaskInfo) -> Any:
    """A finished task's answer: its decoded return value (a raw task's
    message), or the ``TaskFailedError`` / ``TaskCancelledError`` it
    raises."""
    if info.status == "completed":
        return info.message if info.name is None else info.result
    if info.status == "cancelled":
        raise TaskCancelledError(info.id)
    raise TaskFailedError(info.id, info.message, info.traceback, info.attempt)


def _check_timeout(timeout_ms: object) -> Optional[float]:
    """The deadline (monotonic seconds) of a wait, None for no limit."""
    limit = check_int(timeout_ms, "timeout_ms", -1, 2**31 - 1)
    return None if limit == -1 else time.monotonic() + limit / 1000


def _timed_out(task_id: str, timeout_ms: int) -> WaitTimeoutError:
    return WaitTimeoutError(f"task {task_id!r} did not finish within {timeout_ms} ms "
                            "(it is untouched)")


def wait_for_result(read: Callable[[], TaskInfo], task_id: str, timeout_ms: int,
                    completions: Optional[Completions]) -> Any:
    """Reads the task with ``read`` until it is finished; see the module
    notes.  ``WaitTimeoutError`` after ``timeout_ms`` (-1: no limit)."""
    deadline = _check_timeout(timeout_ms)
    pause_ms = FIRST_PAUSE_MS
    while True:
        seen = completions.count() if completions is not None else 0
        info = read()
        if info.status in _FINISHED:
            return outcome_of(info)
        wait_s = _next_wait(pause_ms, deadline, task_id, timeout_ms)
        if completions is not None:
            completions.wait(seen, wait_s)
        else:
            time.sleep(wait_s)
        pause_ms = min(pause_ms * 2, MAX_PAUSE_MS)


def _next_wait(pause_ms: int, deadline: Optional[float], task_id: str, timeout_ms: int) -> float:
    """How long to sleep before reading the task again: the pause, cut to
    what is left of the wait; raises ``WaitTimeoutError`` once none is."""
    wait_s = pause_ms / 1000
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(task_id, timeout_ms)
        wait_s = min(wait_s, left)
    return wait_s


async def wait_for_result_async(read: Callable[[], Awaitable[TaskInfo]], task_id: str,
                                timeout_ms: int) -> Any:
    """``wait_for_result`` for a coroutine: ``read`` is awaited."""
    deadline = _check_timeout(timeout_ms)
    pause_ms = FIRST_PAUSE_MS
    while True:
        info = await read()
        if info.status in _FINISHED:
            return outcome_of(info)
        await asyncio.sleep(_next_wait(pause_ms, deadline, task_id, timeout_ms))
        pause_ms = min(pause_ms * 2, MAX_PAUSE_MS)
