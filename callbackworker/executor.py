"""``Executor``: a ``concurrent.futures.Executor`` on the C core.

A drop-in for ``ThreadPoolExecutor``: the same constructor (``max_workers``,
defaulting as ``ThreadPoolExecutor``'s does, ``thread_name_prefix``,
``initializer``, ``initargs``), ``submit``, ``map`` (with ``timeout``;
``chunksize`` is accepted and, as for threads, ignored), ``shutdown(wait,
cancel_futures)`` and the context manager.  Its futures are
``concurrent.futures.Future`` objects (``result``, ``exception``,
``cancel``, ``add_done_callback``, ``concurrent.futures.wait`` and
``as_completed``, ``asyncio.wrap_future``; typed ``Future[T]``).

Calls wait in the executor's queue; jobs on C worker threads, started
with ``Worker.run_detached``, make them.  A submit starts a job only while
fewer than ``max_workers`` of the executor's jobs are running, and a job
makes queued calls one after another until the queue is empty (the shape
of ThreadPoolExecutor's threads, with the core's threads and wake-ups): a
burst of calls costs a few jobs, not one each, and an idle pool's first
call starts at once.  On a named route each call is a job of its own, so
the route's ``timeout_ms`` applies to each: an overdue call is interrupted
and its future fails with ``JobTimeoutError``.
``Executor(max_workers=N)`` owns a worker with N threads; with
``route="name"`` it submits to that route of the default worker instead
(opening it with ``concurrency=max_workers`` if it does not exist), and
``shutdown`` leaves that shared worker open.

Cost: a stdlib ``Future`` makes a ``threading.Condition`` (a lock, a
reentrant lock and a Python object) when it is created.  This Executor's
futures make theirs only when a thread has to block on one (``result()``
before the call ended, ``wait()``, ``as_completed()``); until then their
state changes under one module-wide lock (see ``_CallFuture``), and making
one runs no Python code.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from concurrent import futures
from concurrent.futures.thread import BrokenThreadPool
from typing import Any, Callable, Deque, Iterator, Optional, Set, Tuple

from ._validate import check_concurrency, check_int
from .errors import (
    CallbackInterrupt,
    CallbackWorkerError,
    JobTimeoutError,
    RouteClosedError,
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

_WAKE_STARTS = 1024
"""How many submits may start an extra job while a started one has not
begun (see ``Executor._start_job``)."""
_ASLEEP_S = 0.001
"""An idle pool's threads sleep after this long (the core's threads spin for
50 us first)."""

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
    """The Future of one submitted call.

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
    lock: a finished future never changes again.

    Making one runs no Python code: every attribute starts as the class's
    default below and becomes the instance's own when it first changes."""

    # Not Future.__init__: no condition until one is needed, and no
    # attribute stored until one changes.
    __init__ = object.__init__  # type: ignore[assignment]
    _state = _PENDING
    _result: Any = None
    _exception: Optional[BaseException] = None
    _cond: Optional[threading.Condition] = None
    _waiters: Any = ()  # made with the condition (wait() appends to it)
    _done_callbacks: Any = ()  # a list with the first callback or the condition

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

    def _claim(self, strict: bool = False) -> bool:
        """For whoever took the call off the queue: PENDING becomes RUNNING
        (True: make the call).  A cancelled future becomes
        CANCELLED_AND_NOTIFIED unless ``cancel`` did that already (False:
        nobody makes the call).  ``strict``: any other state is a
        RuntimeError, as ``set_running_or_notify_cancel`` says."""
        with _guard:
            if self._cond is None:
                state = self._state
                if state == _PENDING:
                    self._state = _RUNNING
                    return True
                if state == _CANCELLED:
                    self._state = _NOTIFIED
                elif strict:
                    raise RuntimeError(f"Future in unexpected state: {state}")
                return False
        with self._cond:  # reentrant: the stdlib's method takes it again
            if not strict and self._state not in (_PENDING, _CANCELLED):
                return False
            return super().set_running_or_notify_cancel()

    def _make_call(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> bool:
        """Runs on a worker thread: makes the call unless the future was
        cancelled.  False if the job's interrupt (a route's run-time limit,
        interpreter exit) cut the call short: the job is over."""
        if not self._claim():
            return True
        try:
            result = fn(*args, **kwargs)
        except CallbackInterrupt:  # the job's time is up
            self.set_exception(_overdue())
            return False
        except BaseException as exc:  # the future carries every outcome
            self.set_exception(exc)
        else:
            self.set_result(result)
        return True

    def _fail_broken(self, why: str) -> None:
        """The executor broke before this call could start."""
        try:
            self.set_exception(BrokenThreadPool(why))
        except futures.InvalidStateError:
            pass  # cancelled meanwhile

    # ---- the stdlib Future's methods, with the condition made lazily ------

    def cancel(self) -> bool:
        """As the stdlib's; a future cancelled here is also notified at
        once (``wait()`` and ``as_completed()`` count it as done), since no
        call will run it: whoever takes it off the queue skips it."""
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
        self._claim()
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
        return self._claim(strict=True)

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


_Call = Tuple[_CallFuture, Callable[..., Any], tuple, dict]
"""A queued call: its future, the callable and its arguments."""


class _Drain:
    """The work item of every job an ``Executor`` starts (see
    ``Executor._drain``)."""

    __slots__ = ("executor",)

    def __init__(self, executor: "Executor") -> None:
        self.executor = executor

    def run(self) -> None:
        self.executor._drain()


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
        self._idle = threading.Condition(self._lock)  # notified when _jobs drops to 0
        self._shutdown = False
        self._broken: Optional[str] = None  # why, once an initializer failed
        self._queue: Deque[_Call] = deque()  # calls submitted, not yet taken by a job
        self._jobs = 0  # jobs started (by submit) that have not ended
        self._waking = 0  # extra starts left while no started job has begun
        self._idle_since = -math.inf  # when the last running job ended
        self._ready: Set[int] = set()  # idents of threads set up for our calls
        self._setup_lock = threading.Lock()
        if route is None:
            self._worker = Worker(concurrency=max_workers)
            self._owns_worker = True
            self._max_jobs = max_workers
        else:
            from ._default import default_worker

            self._worker = default_worker()
            self._owns_worker = False
            self._max_jobs = sys.maxsize  # one job per call: the route's limits apply to each
            try:
                self._worker.route_meta(route, 1)
            except UnknownRouteError:
                self._worker.open_route(route, concurrency=max_workers)
        self._route = route

    def _thread_ready(self) -> bool:
        """Called by every job: on a thread's first job, names the thread
        and runs the initializer.  False once the executor is broken."""
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
        why = ("A thread initializer failed, the thread pool "
               "is not usable anymore")
        with self._lock:
            self._broken = why
        for call in _take_all(self._queue):
            call[0]._fail_broken(why)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        """Schedules ``fn(*args, **kwargs)``; returns its Future."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        future = _CallFuture()
        with self._lock:
            if self._broken is not None:
                raise BrokenThreadPool(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            call = (future, fn, args, kwargs)
            self._queue.append(call)
            if self._jobs < self._max_jobs or self._waking > 0:
                self._start_job(call)
        return future

    submit.__doc__ = futures.Executor.submit.__doc__

    def _start_job(self, call: _Call) -> None:
        """Starts a job that will make queued calls; ``_lock`` held.

        When the pool has been idle long enough for its threads to sleep,
        then until one of the started jobs has begun, the next submits (at
        most ``_WAKE_STARTS``) start one more each: a start is what lets a
        thread woken on an idle route take the interpreter lock for its
        first job while the producer waits (see csrc/cbw_thread.c, prompt
        start), so an idle pool's first call starts at once even while the
        producer keeps submitting.  An extra job finds the queue taken, or
        drains it too.  A pool whose last job ended moments ago has a
        thread still awake, which that rule does not concern: it starts
        no extra jobs."""
        if self._jobs < self._max_jobs:
            if self._jobs == 0 and time.monotonic() - self._idle_since > _ASLEEP_S:
                self._waking = _WAKE_STARTS
        else:
            self._waking -= 1
        self._jobs += 1
        try:
            self._worker.run_detached(_Drain(self), route=self._route)
        except BaseException as exc:  # refused (closed, route gone, memory) or interrupted
            self._job_ended()
            try:
                self._queue.remove(call)
            except ValueError:
                return  # a running job took it: it runs
            if isinstance(exc, (WorkerClosedError, RouteClosedError, UnknownRouteError)):
                raise RuntimeError(f"cannot schedule new futures: {exc}") from None
            raise

    def _drain(self) -> None:
        """One job's work, on a worker thread: takes calls off the queue and
        makes them until the queue is empty, so that a burst of submits
        costs a few jobs, not one each (at most ``max_workers`` jobs run at
        once).  On a named route each job makes one call, so that the
        route's run-time limit applies to each call.  A job whose interrupt
        cut a call short (a route's limit, interpreter exit) ends there.

        A job leaves only after finding the queue empty under ``_lock``,
        where submit appends and decides whether to start a job: no call is
        ever queued with no job to take it."""
        self._waking = 0
        queue, one_call = self._queue, self._route is not None
        call: Optional[_Call] = None
        counted = True
        try:
            if not self._thread_ready():
                return
            while True:
                try:
                    call = queue.popleft()
                except IndexError:
                    if one_call:
                        return
                    with self._lock:
                        if queue:
                            continue
                        self._job_ended()
                        counted = False
                    return
                if self._broken is not None:
                    call[0]._fail_broken(self._broken)
                elif not call[0]._make_call(call[1], call[2], call[3]) or one_call:
                    return
        finally:
            if counted:
                with self._lock:
                    self._job_ended()
            # The job's interrupt may land outside fn, in this method (it is
            # raised once per job, so not twice): leave no future of it
            # unresolved, nor a waiter asleep.
            if call is not None:
                future = call[0]
                if one_call or future._cond is not None or future._state not in _ENDED:
                    _resolve_interrupted(future)

    def _job_ended(self) -> None:
        """``_lock`` held."""
        self._jobs -= 1
        if self._jobs <= 0:
            self._idle_since = time.monotonic()
            self._idle.notify_all()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions.  ``cancel_futures=True`` cancels every call
        that has not started.  ``wait=True`` returns once every call that
        was not cancelled has finished."""
        with self._lock:
            self._shutdown = True
        if cancel_futures:
            for call in _take_all(self._queue):
                call[0].cancel()
        if not self._owns_worker:
            if wait:
                with self._lock:
                    while self._jobs > 0:
                        self._idle.wait()
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


def _take_all(queue: Deque[_Call]) -> Iterator[_Call]:
    """Takes the queued calls off the queue, one by one, until it is empty."""
    while True:
        try:
            yield queue.popleft()
        except IndexError:
            return
