"""``Executor``: a ``concurrent.futures.Executor`` on the C core.

A drop-in for ``ThreadPoolExecutor``: the same constructor (``max_workers``,
defaulting as ``ThreadPoolExecutor``'s does, ``thread_name_prefix``,
``initializer``, ``initargs``), ``submit``, ``map`` (with ``timeout``;
``chunksize`` is accepted and, as for threads, ignored), ``shutdown(wait,
cancel_futures)`` and the context manager.  Its futures are
``concurrent.futures.Future`` objects (``result``, ``exception``,
``cancel``, ``add_done_callback``, ``concurrent.futures.wait`` and
``as_completed``, ``asyncio.wrap_future``; typed ``Future[T]``).

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

Cost: a stdlib ``Future`` makes a ``threading.Condition`` (a lock, a
reentrant lock and a Python object) when it is created.  This Executor's
futures make theirs only when a thread has to block on one (``result()``
before the call ended, ``wait()``, ``as_completed()``); until then their
state changes under one module-wide lock (see ``_CallFuture``).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from concurrent import futures
from concurrent.futures.thread import BrokenThreadPool
from typing import Any, Callable, Optional, Set

from ._validate import check_concurrency, check_int
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

# The futures' states, as concurrent.futures names them.
_PENDING = futures._base.PENDING  # noqa: SLF001 - the stdlib Future's own vocabulary
_RUNNING = futures._base.RUNNING  # noqa: SLF001
_CANCELLED = futures._base.CANCELLED  # noqa: SLF001
_NOTIFIED = futures._base.CANCELLED_AND_NOTIFIED  # noqa: SLF001
_FINISHED = futures._base.FINISHED  # noqa: SLF001
_ENDED = (_CANCELLED, _NOTIFIED, _FINISHED)

# ThreadPoolExecutor reports a failing initializer on this logger; so do we.
_pool_log = logging.getLogger("concurrent.futures")
_executor_numbers = itertools.count()

_get_ident = threading.get_ident
_guard = threading.Lock()
"""Guards the state of every ``_CallFuture`` that has no condition yet,
and the making of one (see ``_CallFuture``)."""


def _reset_in_child() -> None:
    """A forked child must not inherit _guard held by a thread it lacks."""
    global _guard
    _guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)

def _default_max_workers() -> int:
    """ThreadPoolExecutor's default: enough threads for I/O-bound calls,
    at most 32."""
    count = getattr(os, "process_cpu_count", os.cpu_count)()
    return min(32, (count or 1) + 4)


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
        return
    # set_result/set_exception may have been cut between recording the
    # outcome and waking the threads blocked in result().
    cond = future._cond if isinstance(future, _CallFuture) else future._condition  # noqa: SLF001
    if cond is not None:
        with cond:
            cond.notify_all()


class _CallFuture(futures.Future):
    """The Future of one submitted call, and the work item of its job:
    ``run()`` makes the call; cancelling the future also takes its job out
    of the queue.

    A stdlib ``Future`` whose condition is made on first use.  The stdlib's
    methods, and ``wait()``/``as_completed()``, reach the condition through
    ``_condition`` (and ``_waiters``, made with it), and keep working
    unchanged once it exists.  Until then nobody can be blocked on the
    future, and its state changes under the module's ``_guard`` instead.
    Every state change takes ``_guard`` and looks at ``_cond`` under it;
    ``_condition`` makes the condition under ``_guard`` too.  So a change
    happens either entirely before the condition exists (whoever then takes
    the condition sees the new state) or entirely under the condition, as in
    the stdlib.  ``result()`` and friends read a final state without any
    lock: a finished future never changes again."""

    # Slots: no instance dict (one allocation less per call).  _waiters is
    # made with the condition (wait() appends to it); _done_callbacks
    # becomes a list with the first callback or the condition.
    __slots__ = ("_state", "_result", "_exception", "_cond", "_waiters", "_done_callbacks",
                 "executor", "call", "job")

    def __init__(self, executor: "Executor", fn: Callable[..., Any], args: tuple,
                 kwargs: dict) -> None:
        # Deliberately not Future.__init__: no condition until one is needed.
        self._state = _PENDING
        self._result: Any = None
        self._exception: Optional[BaseException] = None
        self._cond: Optional[threading.Condition] = None
        self._waiters: Any = ()
        self._done_callbacks: Any = ()
        self.executor = executor
        self.call: Optional[tuple] = (fn, args, kwargs)
        self.job = 0

    @property  # type: ignore[override]
    def _condition(self) -> threading.Condition:
        cond = self._cond
        if cond is None:
            with _guard:
                cond = self._cond
                if cond is None:
                    self._waiters = []
                    if not self._done_callbacks:
                        self._done_callbacks = []  # the stdlib's methods append
                    cond = self._cond = threading.Condition()
        return cond

    def run(self) -> None:
        """Runs on a worker thread: makes the call, unless it was cancelled."""
        call, self.call = self.call, None
        executor = self.executor
        try:
            if call is None:
                return
            if ((executor._broken is not None or _get_ident() not in executor._ready)
                    and not executor._thread_ready()):
                self._fail_broken()
                return
            if not self.set_running_or_notify_cancel():
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
            # On a route with a run-time limit (or at interpreter exit) the
            # job's interrupt may land here, outside fn (it is raised once
            # per job, so not twice); without a waiter or a limit there is
            # nothing to repair.
            if (executor._route is not None or self._cond is not None
                    or self._state not in _ENDED):
                _resolve_interrupted(self)
            executor._live.discard(self)

    def _fail_broken(self) -> None:
        """The executor broke before this call could start."""
        try:
            self.set_exception(BrokenThreadPool(self.executor._broken))
        except futures.InvalidStateError:
            pass  # cancelled meanwhile

    # ---- the stdlib Future's methods, with the condition made lazily ------

    def cancel(self) -> bool:
        with _guard:
            fast = self._cond is None
            if fast:
                state = self._state
                if state in (_RUNNING, _FINISHED):
                    return False
                if state == _PENDING:
                    self._state = _CANCELLED
        if fast:
            if state == _PENDING:
                self._invoke_callbacks()
        elif not super().cancel():
            return False
        self.executor._cancelled(self)
        return True

    def cancelled(self) -> bool:
        return self._state in (_CANCELLED, _NOTIFIED)

    def running(self) -> bool:
        return self._state == _RUNNING

    def done(self) -> bool:
        return self._state in _ENDED

    def result(self, timeout: Optional[float] = None) -> Any:
        if self._state == _FINISHED:
            if self._exception is None:
                return self._result
            try:
                raise self._exception
            finally:
                self = None  # type: ignore[assignment] # no cycle via the traceback
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        if self._state == _FINISHED:
            return self._exception
        return super().exception(timeout)

    def add_done_callback(self, fn: Callable[[futures.Future], object]) -> None:
        with _guard:
            fast = self._cond is None
            if fast and self._state not in _ENDED:
                if not self._done_callbacks:
                    self._done_callbacks = []
                self._done_callbacks.append(fn)
                return
        if not fast:
            super().add_done_callback(fn)
            return
        try:
            fn(self)
        except Exception:
            futures._base.LOGGER.exception("exception calling callback for %r", self)  # noqa: SLF001

    def set_running_or_notify_cancel(self) -> bool:
        with _guard:
            if self._cond is None:
                state = self._state
                if state == _PENDING:
                    self._state = _RUNNING
                    return True
                if state == _CANCELLED:
                    self._state = _NOTIFIED
                    return False
                raise RuntimeError(f"Future in unexpected state: {state}")
        return super().set_running_or_notify_cancel()

    def _settle(self, result: Any, exception: Optional[BaseException]) -> bool:
        """set_result/set_exception while no condition exists: True if the
        outcome was recorded here, False if the stdlib's method must do it."""
        with _guard:
            if self._cond is not None:
                return False
            if self._state in _ENDED:
                raise futures.InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._exception = exception
            self._state = _FINISHED
        if self._done_callbacks:
            self._invoke_callbacks()
        return True

    def set_result(self, result: Any) -> None:
        if not self._settle(result, None):
            super().set_result(result)

    def set_exception(self, exception: Optional[BaseException]) -> None:
        if not self._settle(None, exception):
            super().set_exception(exception)


class Executor(futures.Executor):
    """Runs calls asynchronously on callbackworker's C threads.

    ``max_workers`` defaults as ThreadPoolExecutor's: ``min(32, CPUs + 4)``.
    ``thread_name_prefix`` names the threads (``threading.current_thread()
    .name`` inside a call is ``f"{prefix}_{n}"``).  ``initializer(*initargs)``
    runs once on each worker thread before its first call; if it raises, the
    error is logged (on the ``concurrent.futures`` logger, as
    ThreadPoolExecutor does), the executor is broken: the call and every
    call not yet started fail with ``BrokenThreadPool``, and ``submit``
    raises it.  ``route`` submits to a route of the default worker instead
    of a worker of the executor's own.  At interpreter exit the package's
    exit policy applies (see ``_lifecycle``): unlike ThreadPoolExecutor,
    exit does not wait for calls, so it never hangs."""

    def __init__(self, max_workers: Optional[int] = None, thread_name_prefix: str = "",
                 initializer: Optional[Callable[..., object]] = None, initargs: tuple = (),
                 *, route: Optional[str] = None) -> None:
        if max_workers is None:
            max_workers = _default_max_workers()
        if check_int(max_workers, "max_workers") <= 0:
            raise ValueError("max_workers must be greater than 0")  # ThreadPoolExecutor's words
        max_workers = check_concurrency(max_workers, "max_workers")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if not isinstance(thread_name_prefix, str):
            raise TypeError(f"thread_name_prefix must be a str, not "
                            f"{type(thread_name_prefix).__name__}")
        self._max_workers = max_workers
        self._thread_name_prefix = (thread_name_prefix
                                    or f"callbackworker.Executor-{next(_executor_numbers)}")
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._lock = threading.Lock()
        self._shutdown = False
        self._broken: Optional[str] = None  # why, once an initializer failed
        self._live: Set[_CallFuture] = set()  # futures whose call has not ended
        self._ready: Set[int] = set()  # idents of threads set up for our calls
        self._setup_lock = threading.Lock()
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

    def _thread_ready(self) -> bool:
        """Called by every call's run: on a thread's first call, names the
        thread and runs the initializer.  False once the executor is
        broken."""
        if self._broken is not None:
            return False
        ident = _get_ident()
        if ident in self._ready:
            return True
        with self._setup_lock:  # not _lock: a submit holds it while it starts a job
            number = len(self._ready)
            self._ready.add(ident)
        threading.current_thread().name = f"{self._thread_name_prefix}_{number}"
        if self._initializer is None:
            return True
        try:
            self._initializer(*self._initargs)
        except BaseException:
            _pool_log.critical("Exception in initializer:", exc_info=True)
            self._initializer_failed()
            return False
        return True

    def _initializer_failed(self) -> None:
        """As ThreadPoolExecutor: no call that has not started ever will."""
        with self._lock:
            self._broken = ("A thread initializer failed, the thread pool "
                            "is not usable anymore")
            pending = list(self._live)
        for future in pending:
            if future.call is not None:
                future.call = None
                future._fail_broken()
                try:
                    self._worker.cancel(future.job)
                except (UnknownJobError, WorkerClosedError):
                    pass

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        """Schedules ``fn(*args, **kwargs)``; returns its Future."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        future = _CallFuture(self, fn, args, kwargs)
        with self._lock:
            if self._broken is not None:
                raise BrokenThreadPool(self._broken)
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
