"""Task progress: ``current_task().progress(value)``, persisted and throttled.

DESIGN

* The runtime opens a ``ProgressReporter`` on the thread that runs an
  attempt (``reporting``) and closes it when the attempt ends, before its
  outcome is settled.  ``report_progress`` finds it through a thread-local,
  so only that thread reports for that task.
* A value is encoded as JSON at once (``TypeError`` in the task for what
  JSON cannot encode; text every store holds, as ``json`` writes ASCII).
  It is written to the store (``TaskStore.set_progress``, under the
  attempt's lease token) at most once every ``PROGRESS_EVERY_MS``; a value
  reported sooner waits, replaced by any later one, and the last waiting
  value is written when the attempt ends.  A write that fails is logged and
  dropped: progress never fails a task.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Optional

__all__ = ["PROGRESS_EVERY_MS", "MAX_PROGRESS", "ProgressReporter", "reporting", "report_progress"]

log = logging.getLogger(__name__)

PROGRESS_EVERY_MS = 200
"""The least time between two progress writes of one task."""

MAX_PROGRESS = 64 * 1024
"""Largest JSON text of one progress value, in bytes."""

_current = threading.local()


class ProgressReporter:
    """Throttled progress writes of one attempt: ``write(json_text)``
    stores a value; ``clock`` is monotonic seconds."""

    def __init__(self, task_id: str, write: Callable[[str], object],
                 clock: Callable[[], float] = time.monotonic,
                 every_ms: int = PROGRESS_EVERY_MS) -> None:
        self.task_id = task_id
        self._write = write
        self._clock = clock
        self._every_s = every_ms / 1000
        self._last_write: Optional[float] = None
        self._waiting: Optional[str] = None

    def report(self, value: Any) -> None:
        """Encodes ``value`` and writes it now, or when the throttle allows."""
        try:
            text = json.dumps(value, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"progress must be JSON-encodable: {exc}") from None
        if len(text) > MAX_PROGRESS:
            raise ValueError(f"progress is {len(text)} bytes of JSON; the limit is {MAX_PROGRESS}")
        now = self._clock()
        if self._last_write is not None and now - self._last_write < self._every_s:
            self._waiting = text
            return
        self._waiting = None
        self._last_write = now
        self._store(text)

    def close(self) -> None:
        """Writes the value still waiting for the throttle, if any."""
        text, self._waiting = self._waiting, None
        if text is not None:
            self._store(text)

    def _store(self, text: str) -> None:
        try:
            self._write(text)
        except Exception:
            log.exception("task %s: could not store its progress", self.task_id)


class reporting:  # noqa: N801 - used as a function: ``with reporting(r):``
    """Makes ``reporter`` the calling thread's for the block; closes it at
    the end (writing the last value).  A class, not a generator: it runs
    once per task."""

    __slots__ = ("_reporter",)

    def __init__(self, reporter: ProgressReporter) -> None:
        self._reporter = reporter

    def __enter__(self) -> ProgressReporter:
        _current.reporter = self._reporter
        return self._reporter

    def __exit__(self, *exc: object) -> None:
        _current.reporter = None
        self._reporter.close()


def report_progress(task_id: str, value: Any) -> None:
    """``TaskContext.progress``: reports through the calling thread's
    reporter, which must be that task's."""
    reporter: Optional[ProgressReporter] = getattr(_current, "reporter", None)
    if reporter is None or reporter.task_id != task_id:
        raise RuntimeError("progress() must be called from the thread running the task")
    reporter.report(value)
