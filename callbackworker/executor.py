"""``Executor``: a ``concurrent.futures.Executor`` on the C core.

A drop-in for ``ThreadPoolExecutor``: ``submit``, ``map`` (with ``timeout``;
``chunksize`` is accepted and, as for threads, ignored), ``shutdown(wait,
cancel_futures)`` and the context manager, returning ordinary
``concurrent.futures.Future`` objects (``result``, ``exception``,
``cancel``, ``add_done_callback``, ``asyncio.wrap_future``).

Each submitted call is one job on a C worker thread, started with
``Worker.run_detached``: the future is the job's work item, its ``run()``
makes the call, and the future carries the outcome (the job record
disappears as it completes).  On a named route the route's ``timeout_ms``
applies: an overdue call is interrupted and its future fails with
``JobTimeoutError``.
``Executor(max_workers=N)`` owns a worker with N threads; with
``route="name"`` it submits to that route of the default worker instead
(opening it with ``concurrency=max_workers`` if it does not exist), and
``shutdown`` leaves that shared worker open.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any, Callable, Optional, Set

from ._validate import check_concurrency
from .errors import (
    CallbackInterrupt,
    CallbackWorkerError,
    JobTimeoutError,
    UnknownJobError,
    UnknownRouteError,
    WorkerClosedError,
)
from .states import Status
from .worker import Worker

__all__ = ["Executor"]


def _overdue() -> JobTimeoutError:
    return JobTimeoutError(0, Status.TIMEOUT, "the call ran past its route's timeout")


def _resolve_interrupted(future: futures.Future) -> None:
    """Leaves no future of a run unresolved, nor a waiter asleep, whatever
    point of the run an interrupt cut short."""
    if not future.done():
        try:
            if future.running() or future.set_running_or_notify_cancel():
                future.set_exception(_overdue())
        except (futures.InvalidStateError, RuntimeError):
            pass  # resolved meanwhile
    else:
        # set_result/set_exception may have been cut between recording the
        # outcome and waking the threads blocked in result().
        with future._condition:  # noqa: SLF001 - the stdlib Future's own lock
            future._condition.notify_all()


class _CallFuture(futures.Future):
    """The Future of one submitted call, and the work item of its job:
    ``run()`` makes the call; cancelling the future also takes its job out
    of the queue.  (A subclass, so no done-callback per call is needed to
    notice cancellation.)"""

    def __init__(self, executor: "Executor", fn: Callable[..., Any], args: tuple,
                 kwargs: dict) -> None:
        super().__init__()
        self.executor = executor
        self.call: Optional[tuple] = (fn, args, kwargs)
        self.job = 0

    def run(self) -> None:
        """Runs on a worker thread: makes the call, unless it was cancelled."""
        call, self.call = self.call, None
        try:
            if call is None or not self.set_running_or_notify_cancel():
                return
            fn, args, kwargs = call
            try:
                result = fn(*args, **kwargs)
            except CallbackInterrupt:  # the route's run-time limit passed
                self.set_exception(_overdue())
            except BaseException as exc:  # the future carries every outcome
                self.set_exception(exc)
            else:
                self.set_result(result)
        finally:
            # On a route with a run-time limit the job's interrupt may land
            # here, outside fn (it is raised once per job, so not twice).
            _resolve_interrupted(self)
            self.executor._live.discard(self)

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        self.executor._cancelled(self)
        return True


class Executor(futures.Executor):
    """Runs calls asynchronously on callbackworker's C threads."""

    def __init__(self, max_workers: int = 1, route: Optional[str] = None) -> None:
        max_workers = check_concurrency(max_workers, "max_workers")
        if route is None:
            self._worker = Worker(concurrency=max_workers)
            self._owns_worker = True
        else:
            from ._default import default_worker

            self._worker = default_worker()
            self._owns_worker = False
            try:
                self._worker.route_meta(route, 1)
            except UnknownRouteError:
                self._worker.open_route(route, concurrency=max_workers)
        self._route = route
        self._lock = threading.Lock()
        self._shutdown = False
        self._live: Set[_CallFuture] = set()  # futures whose call has not ended

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        """Schedules ``fn(*args, **kwargs)``; returns its Future."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        future = _CallFuture(self, fn, args, kwargs)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._live.add(future)
            try:
                future.job = self._worker.run_detached(future, route=self._route)
            except WorkerClosedError:
                self._live.discard(future)
                raise RuntimeError("cannot schedule new futures after the worker closed") from None
        return future

    def _cancelled(self, future: "_CallFuture") -> None:
        """A future was cancelled before its call started.  If its job was
        still queued, the call will never run: say so, as
        ThreadPoolExecutor's worker does when it reaches a cancelled item, so
        wait() and as_completed() count the future as done.  Otherwise the
        job's ``run`` says so when it finds the future cancelled."""
        with self._lock:  # submit may not have recorded the job yet
            job = future.job
        try:
            taken = self._worker.cancel(job)
        except (UnknownJobError, WorkerClosedError):
            taken = False
        if taken:
            future.call = None
            self._live.discard(future)
            future.set_running_or_notify_cancel()

    submit.__doc__ = futures.Executor.submit.__doc__

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions.  ``cancel_futures=True`` cancels every call
        that has not started.  ``wait=True`` returns once every call that
        was not cancelled has finished."""
        with self._lock:
            self._shutdown = True
            pending = list(self._live)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if not self._owns_worker:
            if wait:
                futures.wait(pending)
            return
        if wait:
            self._worker.close(drain=True)
        else:
            threading.Thread(target=self._drain_and_close, name="callbackworker-executor-shutdown",
                             daemon=True).start()

    def _drain_and_close(self) -> None:
        try:
            self._worker.close(drain=True)
        except CallbackWorkerError:
            pass
