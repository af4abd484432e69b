"""How the ``worker`` command stops.

The first SIGINT or SIGTERM asks for a graceful stop: the service closes
(no new claims, running handlers finish and their outcomes are committed,
claimed tasks not yet started go back to pending).  The close runs on a
thread of its own while the main thread waits in slices, so the signal
handlers stay responsive whatever the close is blocked on.  A second signal,
or ``--shutdown-timeout`` passing, ends the process at once with
``os._exit``: the handlers still running are abandoned mid-call, and their
tasks run again, here or elsewhere, once their leases expire.  Before
exiting the command says on stderr which tasks it left running;
``WatchedService`` keeps that list by wrapping every handler.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from typing import Dict, List, NoReturn, Optional

from .tasks import QueueConfig, TaskService, current_task
from .tasks.service import Handler

__all__ = ["WatchedService", "WorkerShutdown"]

_SHOWN_IDS = 10  # an abandoning worker names at most this many tasks
_JOIN_SLICE_S = 0.2


class WatchedService(TaskService):
    """A ``TaskService`` that knows which tasks its handlers are running."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._running_lock = threading.Lock()
        self._running: Dict[str, str] = {}  # task id -> queue name

    def create_queue(self, name: str, config: Optional[QueueConfig] = None,
                     handler: Optional[Handler] = None) -> None:
        """``TaskService.create_queue``, with ``handler`` watched."""
        super().create_queue(name, config,
                             handler=None if handler is None else self._watched(name, handler))

    def _watched(self, queue: str, handler: Handler) -> Handler:
        @functools.wraps(handler)
        def watched(payload: memoryview) -> Optional[str]:
            task = current_task()
            task_id = task.id if task is not None else "?"
            with self._running_lock:
                self._running[task_id] = queue
            try:
                return handler(payload)
            finally:
                with self._running_lock:
                    self._running.pop(task_id, None)

        return watched

    def running(self) -> Dict[str, str]:
        """The tasks whose handlers run now: task id -> queue name."""
        with self._running_lock:
            return dict(self._running)


class WorkerShutdown:
    """The worker command's signal handling and bounded close.

    ``install()`` sets the SIGINT/SIGTERM handlers; ``requested`` is set by
    the first signal; ``close(service)`` closes the service gracefully
    unless a second signal comes or ``timeout_s`` (None: no bound) passes,
    in which case the process exits with ``exit_status`` after one line on
    stderr naming the tasks left running.
    """

    def __init__(self, lease_ms: int, timeout_s: Optional[float], exit_status: int) -> None:
        self.requested = threading.Event()
        self._lease_ms = lease_ms
        self._timeout_s = timeout_s
        self._exit_status = exit_status
        self._signals = 0
        self._service: Optional[WatchedService] = None

    def install(self) -> None:
        """Sets the handlers of SIGINT and SIGTERM (main thread only)."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def watch(self, service: WatchedService) -> None:
        """Names the service whose running tasks an abandoning exit reports."""
        self._service = service

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1
        self.requested.set()
        if self._signals > 1:
            self._abandon(f"second {signal.Signals(signum).name}")

    def close(self, service: TaskService) -> None:
        """Closes ``service`` on another thread and waits for it in slices
        (signals stay deliverable); exits the process when the timeout
        passes first.  Re-raises what the close raised."""
        failure: List[BaseException] = []

        def close_service() -> None:
            try:
                service.close()
            except BaseException as exc:
                failure.append(exc)

        closer = threading.Thread(target=close_service, name="cbw-worker-shutdown", daemon=True)
        closer.start()
        deadline = None if self._timeout_s is None else time.monotonic() + self._timeout_s
        while closer.is_alive():
            if deadline is None:
                closer.join(_JOIN_SLICE_S)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                self._abandon(f"--shutdown-timeout {self._timeout_s:g} s passed")
            closer.join(min(left, _JOIN_SLICE_S))
        if failure:
            raise failure[0]

    def _abandon(self, why: str) -> NoReturn:
        """Ends the process at once, saying which tasks it leaves running."""
        running = self._service.running() if self._service is not None else {}
        shown = ", ".join(f"{task_id} ({queue})" for task_id, queue
                          in list(running.items())[:_SHOWN_IDS])
        more = f" and {len(running) - _SHOWN_IDS} more" if len(running) > _SHOWN_IDS else ""
        left = (f"left {len(running)} task(s) running: {shown}{more}; they run again once "
                f"their leases expire (within {self._lease_ms} ms)" if running
                else "no handler was running")
        line = f"callbackworker worker: {why}: exiting at once; {left}\n"
        try:  # a signal handler may interrupt a print: write the bytes directly
            sys.stdout.flush()
        except (OSError, ValueError, RuntimeError):
            pass
        os.write(sys.stderr.fileno(), line.encode("utf-8", "backslashreplace"))
        os._exit(self._exit_status)
