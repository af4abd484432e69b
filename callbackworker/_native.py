"""The one module that touches the compiled core (``callbackworker._cbw_native``).

It provides three things to the rest of the package:

* ``ffi`` and the C functions the worker calls, re-exported by name;
* ``CallbackTable``, the Python half of the executor: it keeps every callback
  that queued jobs refer to alive, and settles what a callback left that the
  bridge (ffibuild/bridge.c) does not settle itself: exceptions, return
  values, views kept past the call.  A callback's exception is stored with
  its traceback (``CallbackTable.failures``) and re-raised to whoever waits
  for the job;
* ``raise_for``, which turns the core's negative error codes into the
  exceptions of ``callbackworker.errors``.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any, Callable, Dict, List, NoReturn, Optional

from ._cbw_native import ffi, lib
from .durable import DurableBackend, SuspendJob
from .errors import (
    CallbackInterrupt,
    CallbackWorkerError,
    DeadlockError,
    JobNotCompleteError,
    RouteClosedError,
    ShutdownError,
    UnknownJobError,
    UnknownRouteError,
    WaitTimeoutError,
    WorkerClosedError,
)
from .states import Status

__all__ = ["ffi", "lib", "CallbackInterrupt", "CallbackTable", "raise_for"]

log = logging.getLogger("callbackworker")

STATUS_OK = int(lib.CBW_STATUS_OK)
STATUS_ERROR = int(lib.CBW_STATUS_ERROR)
_INT32_MIN = -(1 << 31)
_INT32_MAX = (1 << 31) - 1


# The bridge keeps its own reference to the class (CPython's id() is the
# object's address).
if lib.cbwpy_init(ffi.cast("void *", id(CallbackInterrupt))) != lib.CBW_OK:
    raise MemoryError("callbackworker: the bridge could not start")


def current_table() -> Optional["CallbackTable"]:
    """The ``CallbackTable`` of the worker whose job the calling thread runs
    (None on any other thread)."""
    handle = lib.cbwpy_current_table()
    return None if handle == ffi.NULL else ffi.from_handle(handle)  # type: ignore[no-any-return]


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not break the job's bookkeeping
        text = "<unprintable exception>"
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


FORK_GENERATION = [0]
"""Bumped in every forked child (by the fork hook in _lifecycle.py)."""


def _exit_forked_child(failure: Optional[BaseException]) -> None:
    """The callback forked and this is the child, a copy of one worker
    thread: the parent's core state is not ours to touch, so the child ends
    when the callback returns, as SystemExit says, 1 after any other
    exception, 0 otherwise."""
    code = 0
    if isinstance(failure, SystemExit):
        code = failure.code if isinstance(failure.code, int) else (failure.code is not None)
        if failure.code is not None and not isinstance(failure.code, int):
            print(failure.code, file=sys.stderr)
    elif failure is not None:
        traceback.print_exception(type(failure), failure, failure.__traceback__)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed stream must not keep the child alive
            pass
    os._exit(int(code))


class CallbackTable:
    """The Python half of one worker's executor.

    ``callbacks`` maps a callback token (the callable's ``id``) to the
    callable.  The C core counts the jobs that may still run each token and
    the bridge adds and removes entries under the interpreter lock
    (``ffibuild/bridge.c``, ``csrc/cbw_token.c``); Python only looks them up.
    ``failures`` maps a job id to the exception its callback raised, until
    ``wait``/``take`` consumes it (a retried job's entry is its latest
    failed attempt's; a success after it drops it).
    """

    __slots__ = ("callbacks", "failures", "watchers", "handle", "generation", "durable",
                 "closed", "__weakref__")

    def __init__(self) -> None:
        self.generation = FORK_GENERATION[0]
        self.callbacks: Dict[int, Callable[..., Any]] = {}
        self.failures: Dict[int, BaseException] = {}
        self.watchers: Dict[int, List[Callable[[], None]]] = {}
        self.handle = ffi.new_handle(self)
        self.durable: Optional[DurableBackend] = None
        """Where the worker's durable jobs keep their logs; the worker sets it."""
        self.closed = False
        """Set once the worker's ``close()`` returned: releasing it then
        waits for no callback."""

    def clear(self) -> None:
        self.callbacks.clear()
        self.failures.clear()

    def watch(self, native: Any, jid: int, notify: Callable[[], None]) -> bool:
        """Has ``notify()`` called, on whichever thread completes it, when
        job ``jid`` of the core worker ``native`` completes.  Returns True
        instead if the job has completed already (``notify`` is then never
        called); raises for an unknown job."""
        self.watchers.setdefault(jid, []).append(notify)  # first: it may fire at once
        rc = lib.cbw_job_watch(native, jid)
        if rc == 0:
            return False
        self.unwatch(jid, notify)
        if rc < 0:
            raise_for(rc, jid)
        return True

    def unwatch(self, jid: int, notify: Callable[[], None]) -> None:
        """Takes back a watcher no longer needed (its waiter gave up)."""
        entries = self.watchers.get(jid)
        if entries is not None:
            try:
                entries.remove(notify)
            except ValueError:
                pass
            if not entries:
                self.watchers.pop(jid, None)

    def completed(self, ids: Any, n: int) -> None:
        """Watched jobs completed: call their watchers (any thread).  The
        core has already forgotten these ids, so one failing watcher must
        not cost the others their report."""
        for i in range(n):
            for notify in self.watchers.pop(ids[i], ()):
                try:
                    notify()
                except BaseException:  # e.g. call_soon_threadsafe on a closed loop
                    log.exception("callbackworker: a completion watcher failed")

    def fail(self, run: Any, exc: BaseException) -> int:
        """After the callback raised ``exc``.  Past the deadline the job is
        (or is about to be) completed as TIMEOUT and may already have been
        consumed, so nothing is recorded that nobody could ever collect."""
        if isinstance(exc, (CallbackInterrupt, SuspendJob)) or lib.cbw_run_overdue(run):
            return STATUS_ERROR
        return self._record_failure(run, exc)

    def outcome(self, run_addr: int, out: Any, exc: Optional[BaseException]) -> int:
        """Settles what the callback left that the bridge's fast path does
        not handle (ffibuild/bridge.c): an exception ``exc``, a return value
        ``out`` other than None, or any outcome in a forked child.  Called on
        the worker thread, interpreter lock held, with the request view
        still open (``out`` may be a slice of it).  Returns the status."""
        if FORK_GENERATION[0] != self.generation:
            _exit_forked_child(exc)
        if exc is not None:
            if exc.__traceback__ is None:  # raised before the callback's frame began
                exc = _with_traceback(exc)
            return self.fail(_cast_run(run_addr), exc)
        return self.record_return(_cast_run(run_addr), out)

    def escaped(self, run_addr: int, status: int, exc: Optional[BaseException]) -> int:
        """Something still refers to the job's memory after the callback
        (a slice of the view, an export of it).  The bridge has already
        kept that memory alive for good (``cbw_run_keep_alive``), before
        calling this.  A successful job fails, since its response could
        still change under the caller; so does a job that was suspending
        (``exc`` is the ``SuspendJob`` it raised), since its request cannot
        be replaced under the view.  Returns the status."""
        suspending = isinstance(exc, SuspendJob)
        if status == STATUS_OK or suspending:
            why = ", so the job could not suspend" if suspending else ""
            status = self._record_failure(_cast_run(run_addr), BufferError(
                f"the callback kept a view of its request after returning{why}; "
                "copy it (bytes(request)) to keep the data"))
        return status

    def record_return(self, run: Any, out: Any) -> int:
        """After the callback returned ``out`` (not None, not the view)."""
        if isinstance(out, int):
            run.rc = min(max(out, _INT32_MIN), _INT32_MAX)
            return STATUS_OK
        try:
            data = out if isinstance(out, bytes) else ffi.from_buffer(out)
        except TypeError:
            return self._record_failure(run, TypeError(
                f"callback returned {type(out).__name__}; expected None, an int "
                "or a bytes-like object"))
        except (BufferError, ValueError) as exc:  # not contiguous, or released
            failure = TypeError(
                f"callback returned a {type(out).__name__} that cannot be the response "
                f"({exc}); return bytes(...) of it instead")
            failure.__cause__ = exc
            return self._record_failure(run, failure)
        if lib.cbw_run_set_result(run, data, len(data)) != lib.CBW_OK:
            return self._record_failure(run, MemoryError("no memory for the callback's result"))
        return STATUS_OK

    def _record_failure(self, run: Any, exc: BaseException) -> int:
        self.failures[run.id] = exc
        lib.cbw_run_set_error(run, _describe(exc).encode("utf-8", "replace"))
        return STATUS_ERROR


def _cast_run(run_addr: int) -> Any:
    return ffi.cast("cbw_run *", run_addr)


def _with_traceback(exc: BaseException) -> BaseException:
    """Gives an exception raised outside any Python frame (calling the
    callback failed, e.g. a wrong signature) a traceback, as every other
    callback exception has one."""
    try:
        raise exc
    except BaseException:
        return exc


def _report_error(exc_type: type, exc: BaseException, tb: Any) -> None:
    log.error("callbackworker: error while reporting completions",
              exc_info=(exc_type, exc, tb))


@ffi.def_extern(onerror=_report_error)
def cbwpy_completed(ctx: Any, ids: Any, n: int) -> None:
    """The core reports completions of watched jobs."""
    table: CallbackTable = ffi.from_handle(ctx)
    table.completed(ids, n)


_SIMPLE_ERRORS = {
    int(lib.CBW_ECLOSED): lambda what: WorkerClosedError("the worker is closed"),
    int(lib.CBW_EUNKNOWN): UnknownJobError,
    int(lib.CBW_ENOTDONE): lambda what: JobNotCompleteError(f"job {what} has not completed"),
    int(lib.CBW_ETIMEDOUT): lambda what: WaitTimeoutError(
        f"job {what} did not complete within the wait timeout"),
    int(lib.CBW_EDEADLOCK): lambda what: DeadlockError(
        f"waiting for job {what} from this callback could never end: it is the "
        "caller's own job, or is queued behind it on the same route with no "
        "other thread free to run it"),
    int(lib.CBW_ESHUTDOWN): lambda what: ShutdownError(
        what, Status.SHUTDOWN, "the worker was closed while waiting"),
    int(lib.CBW_ENOMEM): lambda what: MemoryError("callbackworker: out of memory"),
    int(lib.CBW_ETHREAD): lambda what: CallbackWorkerError(
        "callbackworker: could not start a worker thread"),
    int(lib.CBW_ENOROUTE): UnknownRouteError,
    int(lib.CBW_EROUTECLOSED): lambda what: RouteClosedError(f"route {what!r} is closed"),
    int(lib.CBW_EEXIST): lambda what: ValueError(f"a route named {what!r} exists already"),
    int(lib.CBW_EINVAL): lambda what: ValueError(f"invalid argument ({what!r})"),
}


def raise_for(code: int, what: Optional[object] = None) -> NoReturn:
    """Raises the exception for a negative core error code; ``what`` is the
    job id or route name the call was about."""
    factory = _SIMPLE_ERRORS.get(code)
    if factory is None:
        raise CallbackWorkerError(f"callbackworker: unexpected core error {code}")
    raise factory(what)
