"""``Worker``: run Python callbacks on C threads and track them as jobs.

A job is a callback plus a private copy of an input blob.  ``start`` copies
the request into the C core and returns a job id at once; a C thread of the
job's route later calls ``callback(request)`` with a writable ``memoryview``
of that copy, holding the interpreter lock only while callbacks run.  The
caller queries the job (``phase``, ``status``, ``state``, ``job_meta``,
``info``...), waits for it, takes its response, or cancels it while queued.

Threads: every method may be called from any thread, including from inside a
callback.  Blocking waits happen in C with the interpreter lock released; on
the main thread they wake up every 50 ms so that Ctrl-C interrupts them
(the job is untouched).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
import time
import weakref
from urllib.parse import quote
from typing import Any, Callable, Dict, Iterable, List, NoReturn, Optional, Protocol, Tuple, Union

from . import _native
from ._native import CallbackTable, ffi, lib, raise_for
from .asyncmeta import JobMetaKey, Phase, Profile, RouteMetaKey, RouteState
from .durable import (
    DurableBackend,
    DurableRun,
    MemoryDurableStore,
    SuspendJob,
    check_callback_id,
    check_error,
    check_result,
)
from .errors import (
    CallbackWorkerError,
    DeadlockError,
    WorkerClosedError,
    failure_for_status,
)
from . import jobcontext as _progress
from .jobcontext import ProgressCallback, ProgressState
from .states import PHASE_TEXT, STATE_TEXT, STATUS_TEXT, State, Status

__all__ = ["Worker", "WorkItem", "Callback", "Request"]

Request = Union[bytes, bytearray, memoryview, Any]
"""Any object supporting the buffer protocol (C-contiguous)."""

Callback = Callable[[memoryview], Any]
"""``callback(request: memoryview) -> None | int | bytes-like``."""


class WorkItem(Protocol):
    """What ``Worker.run_detached`` runs: an object with a ``run()`` method
    (the shape of ``concurrent.futures``' work items).  ``run`` reports its
    outcome its own way (a future, a task store); what it returns or raises
    is dropped."""

    def run(self) -> None: ...


_TIMEOUT_MAX = int(lib.CBW_TIMEOUT_MAX)
_TIMEOUT_ROUTE = int(lib.CBW_TIMEOUT_ROUTE)
_ETIMEDOUT = int(lib.CBW_ETIMEDOUT)
_EDEADLOCK = int(lib.CBW_EDEADLOCK)
_EENCODE = -100  # cbwpy_start_text: the str cannot be encoded
_INT64_MAX = (1 << 63) - 1
_DEFAULT_ROUTE = int(lib.CBW_DEFAULT_ROUTE)
_STATUS_OK = int(lib.CBW_STATUS_OK)
_MAIN_SLICE_MS = 50
_EXIT_GRACE_MS = 200
_ROUTE_NAME_MAX = int(lib.CBW_ROUTE_NAME_MAX)

_start = lib.cbw_start
_wait_copy = lib.cbw_wait_copy
_unpack = ffi.unpack
_EMORE = int(lib.CBW_EMORE)
_SCRATCH_SIZE = 256
_main_ident = threading.main_thread().ident
_local = threading.local()
_main_waiting = [False]  # the main thread's wait() is using its scratch buffers
_EMPTY = b""


def _scratch() -> Any:
    """This thread's buffers for cbw_wait_copy: one for small responses, one
    result record for everything else."""
    try:
        return _local.scratch
    except AttributeError:
        _local.scratch = (ffi.new("char[]", _SCRATCH_SIZE), ffi.new("cbw_result *"))
        return _local.scratch


def _check_timeout(value: object, name: str = "timeout_ms") -> int:
    if type(value) is not int:
        if isinstance(value, int) and not isinstance(value, bool):
            value = int(value)  # an int subclass such as IntEnum
        else:
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value != -1 and not 0 <= value <= _TIMEOUT_MAX:
        raise ValueError(f"{name} must be -1 (infinite) or 0..{_TIMEOUT_MAX}, not {value}")
    return value


def _check_id(job_id: object) -> int:
    if type(job_id) is not int:
        if isinstance(job_id, int) and not isinstance(job_id, bool):
            return int(job_id)
        raise TypeError(f"job_id must be an int, not {type(job_id).__name__}")
    return job_id


def _known_id(job_id: int) -> bool:
    """Only ids in 1..2**63-1 can have been issued."""
    return 0 < job_id <= _INT64_MAX


class _RouteTimeout(int):
    """The default of the start verbs' ``timeout_ms``: -1 (no limit) on the
    default route, the route's own ``timeout_ms`` on a named route.  An
    explicit -1 always means no limit."""

    def __repr__(self) -> str:
        return "-1"


_UNSET = _RouteTimeout(-1)


def _is_buffer(obj: object) -> bool:
    try:
        memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def _check_callback(callback: object) -> None:
    if not callable(callback):
        raise TypeError(f"callback must be callable, not {type(callback).__name__}")


def _check_positive(value: object, name: str) -> int:
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 1 <= value <= 1024:
        raise ValueError(f"{name} must be between 1 and 1024, not {value}")
    return value


def _check_count(value: object, name: str) -> int:
    """A non-negative int that fits the core's 32-bit fields."""
    if type(value) is not int:
        if isinstance(value, int) and not isinstance(value, bool):
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= _TIMEOUT_MAX:
        raise ValueError(f"{name} must be between 0 and {_TIMEOUT_MAX}, not {value}")
    return value


def _route_name(name: object) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"route name must be a str, not {type(name).__name__}")
    raw = name.encode("utf-8")
    if not 0 < len(raw) <= _ROUTE_NAME_MAX or "\0" in name:
        raise ValueError(f"route name must be 1..{_ROUTE_NAME_MAX} UTF-8 bytes without NUL")
    return raw


class Worker:
    """Runs jobs (a callback plus a copied input blob) on C threads.

    ``concurrency`` is the number of threads of the default route (route 1,
    ``"default"``); with 1, jobs run one at a time in start order.

    Use it as a context manager, or call ``close()``; an open worker is
    closed at interpreter exit.
    """

    def __init__(self, concurrency: int = 1, *, manual_clock: bool = False,
                 durable_backend: Optional[DurableBackend] = None) -> None:
        self._concurrency = _check_positive(concurrency, "concurrency")
        if not isinstance(manual_clock, bool):
            raise TypeError(f"manual_clock must be a bool, not {type(manual_clock).__name__}")
        if durable_backend is not None and not isinstance(durable_backend, DurableBackend):
            raise TypeError(f"durable_backend must be a DurableBackend, "
                            f"not {type(durable_backend).__name__}")
        self._manual_clock = manual_clock
        self._durable_backend = durable_backend
        self._table = CallbackTable()
        self._closed = False
        self._w = self._new_native()
        self._finalizer = self._track_native()
        self._routes: dict[str, int] = {"default": _DEFAULT_ROUTE}
        self._progress: Dict[int, int] = {}  # tracked job id -> progress tag
        self._items: Dict[int, WorkItem] = {}  # detached job id -> its item, until it runs
        self._items_lock = threading.Lock()
        self._run_item_cb = self._run_item  # one callable for every detached job
        _live_workers.add(self)

    def _new_native(self) -> Any:
        err = ffi.new("int *")
        native = lib.cbwpy_worker_new(self._table.handle,
                                      ffi.cast("void *", id(self._table.callbacks)),
                                      ffi.cast("void *", id(self._table)),
                                      self._concurrency, err)
        if native == ffi.NULL:
            raise_for(err[0])
        if self._manual_clock:
            lib.cbw_worker_use_manual_clock(native)  # cannot fail: no job yet
        self._table.durable = self._durable_backend or _MemoryDurable(native, self._table)
        return native

    # ---- lifecycle ----------------------------------------------------

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<callbackworker.Worker {state} concurrency={self._concurrency}>"

    def capabilities(self) -> int:
        """The worker's asyncmeta capability mask: ``Profile.ROUTE_SERVICE``
        (4095), which contains ``Profile.BLOB_JOB`` (3701).  Fixed for the
        worker's life."""
        return int(Profile.ROUTE_SERVICE)

    def close(self, drain: bool = False) -> int:
        """Shuts the worker down and returns 0.

        No job starts afterwards.  Queued jobs complete with SHUTDOWN (with
        ``drain=True``, every queued job runs first, and so does every retry
        when its backoff has passed; suspended durable jobs are not waited
        for: they complete with SHUTDOWN); blocked waiters wake
        with ``ShutdownError``; a running callback may finish, bounded by its
        timeout; all C threads are joined before this returns (except the
        caller's own thread when called from inside a callback).  Every other
        verb then raises ``WorkerClosedError``.  Calling it again returns 0.
        """
        if type(drain) is not bool:
            raise TypeError(f"drain must be a bool, not {type(drain).__name__}")
        return self._close(lib.CBW_CLOSE_DRAIN if drain else 0, 0)

    def _close(self, flags: int, grace_ms: int) -> int:
        if self._closed:
            return 0
        rc = lib.cbw_worker_close(self._w, flags, grace_ms)
        if rc == _EDEADLOCK:
            raise DeadlockError("close(drain=True) cannot be called from inside one of "
                                "the worker's own callbacks: that callback keeps it busy")
        self._closed = True
        # The callbacks stay: a close that returned early (a callback's, while
        # another thread drains) must not take them from queued jobs; the
        # core releases each one as its last job goes.  Items of detached
        # jobs still queued will never run.
        self._table.failures.clear()
        with self._items_lock:
            self._items.clear()
        for tag in self._progress.values():
            _progress.STATES.pop(tag, None)
        self._progress.clear()
        _live_workers.discard(self)
        return 0

    def _reset_after_fork(self) -> None:
        """In a forked child: the parent's C threads do not exist here, so the
        parent's core state is abandoned (never touched again) and this worker
        starts over, empty, with the same configuration."""
        self._finalizer.detach()
        self._table = CallbackTable()
        self._routes = {"default": _DEFAULT_ROUTE}
        self._progress = {}
        self._items = {}
        self._items_lock = threading.Lock()
        if self._closed:
            self._w = ffi.NULL
            return
        self._w = self._new_native()
        self._finalizer = self._track_native()

    def _track_native(self) -> "weakref.finalize":
        """Frees the core worker when this object is collected.  Not at
        interpreter exit: _close_all_at_exit closes workers then, and memory
        is left to the process's end."""
        finalizer = weakref.finalize(self, _release_native, self._w, self._table)
        finalizer.atexit = False
        return finalizer

    # ---- starting jobs ------------------------------------------------

    def _route_id(self, route: str) -> int:
        rid = self._routes.get(route) if type(route) is str else None
        if rid is None:
            rid = lib.cbw_route_find(self._w, _route_name(route))
            if rid < 0:
                raise_for(rid, route)
            self._routes[route] = rid
        return rid

    def _prepare(self, callback: object, timeout_ms: object,
                 route: Optional[str]) -> "tuple[int, int]":
        """Checks the arguments every start verb shares; returns the route id
        and the timeout to pass to the core (a start on a named route that
        gives no timeout takes the route's)."""
        _check_callback(callback)
        if timeout_ms is _UNSET:
            timeout_ms = _TIMEOUT_ROUTE if route is not None else -1
        else:
            timeout_ms = _check_timeout(timeout_ms)
        rid = self._route_id(route) if route is not None else _DEFAULT_ROUTE
        if self._closed:
            raise_for(lib.CBW_ECLOSED)
        return rid, timeout_ms  # type: ignore[return-value]

    def start(self, callback: Callback, request: Request, timeout_ms: int = _UNSET,
              *, route: Optional[str] = None, on_progress: Optional[ProgressCallback] = None,
              store_response: bool = False,
              callback_data: Optional[Dict[str, Any]] = None) -> int:
        """Schedules ``callback(request)`` and returns the new job id (> 0).

        ``request`` (any bytes-like object) is copied; the callback receives a
        writable memoryview of the copy, and its in-place edits become the
        response.  Returning a bytes-like object replaces the response; an
        int or None is recorded (``info``) and otherwise ignored; raising
        fails the job.  ``timeout_ms`` is the callback's run-time limit
        (-1 = none): past it the job completes with TIMEOUT at once and the
        callback is interrupted.  ``route`` names a route from ``open_route``.

        ``on_progress``, ``store_response`` and ``callback_data`` track the
        job's progress reports (see ``callbackworker.jobcontext``).
        """
        if (route is None and callable(callback) and not self._closed
                and (timeout_ms is _UNSET
                     or (type(timeout_ms) is int and -1 <= timeout_ms <= _TIMEOUT_MAX))
                and on_progress is None and store_response is False and callback_data is None):
            rid = _DEFAULT_ROUTE
            if timeout_ms is _UNSET:
                timeout_ms = -1
            state = None
        else:
            rid, timeout_ms = self._prepare(callback, timeout_ms, route)
            state = _progress_state(on_progress, store_response, callback_data)
        if type(request) is bytes:
            data = request
        else:
            try:
                data = ffi.from_buffer(request)
            except TypeError:
                raise TypeError(f"request must be a bytes-like object, not "
                                f"{type(request).__name__}") from None
        if state is None:
            jid = _start(self._w, rid, id(callback), data, len(data), timeout_ms)
        else:
            tag = _progress.register(state)
            jid = lib.cbw_start_ex(self._w, rid, id(callback), data, len(data), timeout_ms, 0, tag)
            if jid > 0:
                self._progress[jid] = tag
            else:
                _progress.STATES.pop(tag, None)
        if jid < 0:
            raise_for(jid, route)
        return jid

    def run_detached(self, item: WorkItem, *, route: Optional[str] = None,
                     timeout_ms: int = _UNSET) -> int:
        """Runs ``item.run()`` on one of the route's threads, as a detached
        job: the extension seam that ``Executor`` and ``TaskService`` are
        built on.

        The job takes ``timeout_ms`` as its run-time limit, or when none is
        given its route's (an overdue ``run`` is interrupted with
        ``CallbackInterrupt``, as any callback is), and its route's retry
        policy.  It is destroyed as soon as it completes, so it is
        never waited for: ``item.run`` reports its outcome its own way.  The
        returned id is good for ``cancel`` only: a cancel that returns True
        (the job was still queued) means ``item.run`` will never be called,
        and neither will it for a job still queued when the worker closes.
        """
        run = getattr(item, "run", None)
        if not callable(run):
            raise TypeError(f"item must have a run() method, not be a {type(item).__name__}")
        rid, timeout_ms = self._prepare(self._run_item_cb, timeout_ms, route)
        with self._items_lock:
            jid = lib.cbw_start_ex(self._w, rid, id(self._run_item_cb), _EMPTY, 0, timeout_ms,
                                   lib.CBW_JOB_DETACHED, 0)
            if jid < 0:
                raise_for(jid, route)
            self._items[jid] = item
        return jid

    def _run_item(self, request: memoryview) -> None:
        """The callback of every detached job: runs the job's item."""
        jid = lib.cbw_current_run().id
        with self._items_lock:
            item = self._items.pop(jid, None)
        if item is not None:
            item.run()

    def start_text(self, callback: Callback, text: str, timeout_ms: int = _UNSET,
                   *, route: Optional[str] = None) -> int:
        """Like ``start``, with a ``str`` request: the callback receives its
        UTF-8 bytes (copied once, straight from the string for ASCII text)."""
        rid, timeout_ms = self._prepare(callback, timeout_ms, route)
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        jid = lib.cbwpy_start_text(self._w, rid, id(callback), ffi.cast("void *", id(text)),
                                   timeout_ms)
        if jid == _EENCODE:
            text.encode("utf-8")  # raises the UnicodeEncodeError
            raise ValueError("text could not be encoded as UTF-8")
        if jid < 0:
            raise_for(jid, route)
        return jid

    def start_many(self, callback: Callback, requests: Iterable[Request],
                   timeout_ms: int = _UNSET, *, route: Optional[str] = None) -> List[int]:
        """Starts one job per request with one call into the core; all or
        none.  Same semantics as ``start`` for each; ids are in order."""
        rid, timeout_ms = self._prepare(callback, timeout_ms, route)
        requests = list(requests)
        try:
            # Views pin every buffer's size until the call returns: the blob
            # and the sizes are taken from the same, unchangeable bytes.
            views = [r if type(r) is bytes else memoryview(r) for r in requests]
        except TypeError:
            bad = next(r for r in requests if not _is_buffer(r))
            raise TypeError(f"every request must be a bytes-like object, not "
                            f"{type(bad).__name__}") from None
        n = len(views)
        if n == 0:
            return []
        blob = b"".join(views)
        sizes = ffi.new("size_t[]", [len(v) if type(v) is bytes else v.nbytes for v in views])
        ids = ffi.new("int64_t[]", n)
        rc = lib.cbw_start_many(self._w, rid, id(callback), blob, sizes, n, timeout_ms, ids)
        if rc < 0:
            raise_for(rc, route)
        return list(ids)

    # ---- waiting and taking -------------------------------------------

    def _blocking(self, call: Callable[..., int], job_id: int, timeout_ms: int,
                  *extra: Any, timed_out: int = _ETIMEDOUT) -> int:
        """Runs a blocking core call; on the main thread in slices, so that
        signal handlers (Ctrl-C) run while it waits."""
        if timeout_ms == 0 or threading.get_ident() != _main_ident:
            return call(self._w, job_id, timeout_ms, *extra)
        deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
        while True:
            if deadline is None:
                slice_ms = _MAIN_SLICE_MS
            else:
                left = int((deadline - time.monotonic()) * 1000 + 0.999)
                slice_ms = max(0, min(_MAIN_SLICE_MS, left))
            rc = call(self._w, job_id, slice_ms, *extra)
            if rc != timed_out or (deadline is not None and time.monotonic() >= deadline):
                return rc

    def wait(self, job_id: int, timeout_ms: int = -1) -> bytes:
        """Blocks until the job completes and returns its response; the job
        is destroyed.  A failed job raises its ``JobFailedError`` (and is
        destroyed); ``WaitTimeoutError`` if ``timeout_ms`` passes first (the
        job is untouched)."""
        jid = job_id if type(job_id) is int else _check_id(job_id)
        if type(timeout_ms) is not int or timeout_ms < -1 or timeout_ms > _TIMEOUT_MAX:
            timeout_ms = _check_timeout(timeout_ms)
        if self._closed:
            raise_for(lib.CBW_ECLOSED)
        if not 0 < jid <= _INT64_MAX:
            raise_for(lib.CBW_EUNKNOWN, job_id)
        if timeout_ms == 0 or threading.get_ident() != _main_ident:
            scratch, slow = _scratch()
            n = _wait_copy(self._w, jid, timeout_ms, scratch, _SCRATCH_SIZE, slow)
            return self._finish_wait(jid, n, scratch, slow)
        if not _main_waiting[0]:
            # A job that has completed is taken at once, with the thread's
            # buffers; a signal handler that waits meanwhile uses its own.
            _main_waiting[0] = True
            try:
                scratch, slow = _scratch()
                n = _wait_copy(self._w, jid, 0, scratch, _SCRATCH_SIZE, slow)
                if n != _ETIMEDOUT:
                    return self._finish_wait(jid, n, scratch, slow)
            finally:
                _main_waiting[0] = False
        # The main thread waits in slices, so Ctrl-C can interrupt; the job
        # is only taken once it has completed, with buffers of this call's
        # own (a signal handler may wait too).
        rc = self._blocking(lib.cbw_wait_complete, jid, timeout_ms, timed_out=0)
        if rc < 0:
            raise_for(rc, jid)
        if rc == 0:
            raise_for(_ETIMEDOUT, jid)
        scratch, slow = ffi.new("char[]", _SCRATCH_SIZE), ffi.new("cbw_result *")
        n = _wait_copy(self._w, jid, 0, scratch, _SCRATCH_SIZE, slow)
        return self._finish_wait(jid, n, scratch, slow)

    def _finish_wait(self, jid: int, n: int, scratch: Any, slow: Any) -> bytes:
        """After cbw_wait_copy: the response (n bytes in scratch, or the
        detached result in slow), or the error it reported."""
        if n >= 0 or n == _EMORE:  # the job is destroyed (or detached)
            if self._progress:
                self._forget_progress(jid)
            if n < 0:
                return self._consume(slow)
            if self._table.failures:  # an earlier attempt's, if it was retried
                self._table.failures.pop(jid, None)
            return _unpack(scratch, n)
        raise_for(n, jid)

    async def wait_complete_async(self, job_id: int, timeout_ms: int = -1) -> bool:
        """``wait_complete`` for asyncio: True once the job has completed,
        False if ``timeout_ms`` passed first.  The core reports the
        completion and the event loop is woken with ``call_soon_threadsafe``;
        nothing polls.  Never destroys the job."""
        jid = self._job_id(job_id)
        timeout_ms = _check_timeout(timeout_ms)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def notify() -> None:  # called on whichever thread completed the job
            loop.call_soon_threadsafe(_resolve, done)

        watchers = self._table.watchers
        watchers.setdefault(jid, []).append(notify)  # before the watch: it may fire at once
        try:
            rc = lib.cbw_job_watch(self._w, jid)
            if rc < 0:
                raise_for(rc, jid)
            if rc == 1:
                return True
            if timeout_ms < 0:
                await done
            else:
                await asyncio.wait_for(done, timeout_ms / 1000)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            _discard_watcher(watchers, jid, notify)

    async def wait_async(self, job_id: int, timeout_ms: int = -1) -> bytes:
        """``wait`` for asyncio: the job's response once it has completed
        (the job is destroyed; a failed job raises its ``JobFailedError``);
        ``WaitTimeoutError`` if ``timeout_ms`` passes first."""
        if not await self.wait_complete_async(job_id, timeout_ms):
            raise_for(_ETIMEDOUT, job_id)
        return self.wait(job_id, 0)

    def wait_complete(self, job_id: int, timeout_ms: int = -1) -> bool:
        """Blocks until the job completes; True if it did, False if
        ``timeout_ms`` passed first.  Never destroys the job."""
        jid = _check_id(job_id)
        timeout_ms = _check_timeout(timeout_ms)
        if self._closed:
            raise_for(lib.CBW_ECLOSED)
        if not _known_id(jid):
            raise_for(lib.CBW_EUNKNOWN, job_id)
        rc = self._blocking(lib.cbw_wait_complete, jid, timeout_ms, timed_out=0)
        if rc < 0:
            raise_for(rc, jid)
        return rc == 1

    def take(self, job_id: int) -> bytes:
        """Returns the response of a completed job and destroys the job.
        ``JobNotCompleteError`` if it has not completed (the job is
        untouched); a failed job raises its ``JobFailedError`` and is
        destroyed."""
        jid = self._job_id(job_id)
        res = ffi.new("cbw_result *")
        rc = lib.cbw_take(self._w, jid, res)
        if rc < 0:
            raise_for(rc, jid)
        self._forget_progress(jid)
        return self._consume(res)

    take_blob = take

    def _consume(self, res: Any) -> bytes:
        """Copies out a detached result, releases it, raises for failure."""
        try:
            status = res.status
            if status == _STATUS_OK:
                if self._table.failures:  # an earlier attempt's, if it was retried
                    self._table.failures.pop(res.id, None)
                return ffi.buffer(res.data, res.size)[:] if res.size else b""
            error_text = ffi.string(res.error).decode("utf-8", "replace")
            jid = res.id
        finally:
            lib.cbw_result_release(res)
        cause = self._table.failures.pop(jid, None)
        raise failure_for_status(jid, Status(status), error_text, cause)

    def cancel(self, job_id: int) -> bool:
        """Removes a job that is still queued: True, and the job completes
        with status CANCELLED.  False if it is running or has completed."""
        jid = self._job_id(job_id)
        rc = lib.cbw_cancel(self._w, jid, ffi.NULL)
        if rc < 0:
            raise_for(rc, jid)
        if rc == 1 and self._items:
            with self._items_lock:
                self._items.pop(jid, None)  # a detached job's item never runs now
        return rc == 1

    # ---- queries ------------------------------------------------------

    def _job_id(self, job_id: object) -> int:
        """Checks an id argument: TypeError for a non-int, WorkerClosedError
        once closed, UnknownJobError for an int that was never an id."""
        jid = _check_id(job_id)
        if self._closed:
            raise_for(lib.CBW_ECLOSED)
        if not _known_id(jid):
            raise_for(lib.CBW_EUNKNOWN, job_id)
        return jid

    def _info(self, job_id: object) -> Any:
        jid = self._job_id(job_id)
        out = ffi.new("cbw_job_info *")
        rc = lib.cbw_job_info_get(self._w, jid, out)
        if rc < 0:
            raise_for(rc, jid)
        return out

    def phase(self, job_id: int) -> Phase:
        """``Phase.QUEUED``, ``RUNNING`` or ``COMPLETED``."""
        return Phase(self._info(job_id).phase)

    def phase_text(self, job_id: int) -> str:
        """"queued", "running" or "completed"."""
        return PHASE_TEXT[self._info(job_id).phase]

    def status(self, job_id: int) -> Status:
        """``Status.PENDING`` until the job completes, then how it did."""
        return Status(self._info(job_id).status)

    def status_text(self, job_id: int) -> str:
        """"success", "pending", "error", "timeout", "shutdown" or
        "cancelled"."""
        return STATUS_TEXT[Status(self._info(job_id).status)]

    def state(self, job_id: int) -> State:
        """Phase and status in one code (``State``)."""
        return State(self._info(job_id).state)

    def error_text(self, job_id: int) -> str:
        """"" on success (or while the job is not completed); otherwise what
        went wrong, "ExcType: message" after a callback exception."""
        info = self._info(job_id)
        if info.error_len == 0:
            return ""
        buf = ffi.new("char[]", info.error_len + 1)
        rc = lib.cbw_job_error_text(self._w, info.id, buf, len(buf))
        if rc < 0:
            raise_for(rc, info.id)
        return ffi.string(buf).decode("utf-8", "replace")

    def job_known(self, job_id: int) -> bool:
        """True while the job exists (not yet destroyed by wait/take)."""
        jid = _check_id(job_id)
        if self._closed:
            raise_for(lib.CBW_ECLOSED)
        if not _known_id(jid):
            return False
        out = ffi.new("cbw_job_info *")
        rc = lib.cbw_job_info_get(self._w, jid, out)
        if rc == lib.CBW_EUNKNOWN:
            return False
        if rc < 0:
            raise_for(rc, jid)
        return True

    def job_timeout(self, job_id: int) -> int:
        """The run-time limit the job was started with (-1 = infinite)."""
        return int(self._info(job_id).timeout_ms)

    def job_has_blob_result(self, job_id: int) -> bool:
        """True if the job completed successfully (it has a response)."""
        return bool(self._info(job_id).has_result)

    def job_blob_result_size(self, job_id: int) -> int:
        """The response size in bytes.  ``JobNotCompleteError`` before the
        job completes; the job's ``JobFailedError`` if it did not succeed
        (the job is not destroyed)."""
        info = self._info(job_id)
        if info.phase != Phase.COMPLETED:
            raise_for(lib.CBW_ENOTDONE, info.id)
        if not info.has_result:
            raise failure_for_status(info.id, Status(info.status), self.error_text(info.id),
                                     self._table.failures.get(info.id))
        return int(info.result_size)

    def job_meta(self, job_id: int, key: int) -> int:
        """One field by ``JobMetaKey``.  ``KNOWN`` gives 0 for an unknown id;
        every other key raises ``UnknownJobError`` for one."""
        if not isinstance(key, int) or isinstance(key, bool):
            raise TypeError(f"key must be an int, not {type(key).__name__}")
        if not 1 <= key <= 7:
            raise ValueError(f"key must be a JobMetaKey (1..7), not {key}")
        key = JobMetaKey(int(key))
        if key is JobMetaKey.KNOWN:
            return int(self.job_known(job_id))
        info = self._info(job_id)
        if key is JobMetaKey.PHASE:
            return int(info.phase)
        if key is JobMetaKey.STATUS:
            return int(info.status)
        if key is JobMetaKey.ROUTE:
            return int(info.route)
        if key is JobMetaKey.TIMEOUT:
            return int(info.timeout_ms)
        if key is JobMetaKey.HAS_BLOB_RESULT:
            return int(info.has_result)
        return int(info.result_size)

    def info(self, job_id: int) -> str:
        """One line of space-separated ``key=value`` pairs with stable keys:
        id phase status state timeout_ms route attempt result_size rc."""
        i = self._info(job_id)
        return (f"id={i.id} phase={PHASE_TEXT[i.phase]} status={STATUS_TEXT[Status(i.status)]} "
                f"state={STATE_TEXT[State(i.state)]} timeout_ms={i.timeout_ms} "
                f"route={i.route} attempt={i.attempt} result_size={i.result_size} rc={i.rc}")

    # ---- progress -----------------------------------------------------

    def _forget_progress(self, jid: int) -> None:
        tag = self._progress.pop(jid, None)
        if tag is not None:
            _progress.STATES.pop(tag, None)

    def _progress_of(self, job_id: object) -> Optional[ProgressState]:
        jid = self._job_id(job_id)
        if not self.job_known(jid):
            raise_for(lib.CBW_EUNKNOWN, jid)
        tag = self._progress.get(jid)
        return None if tag is None else _progress.STATES.get(tag)

    def progress(self, job_id: int) -> Any:
        """The latest progress report of a job started with ``on_progress``,
        ``store_response`` or ``callback_data``; None before the first (and
        for jobs started without those options)."""
        state = self._progress_of(job_id)
        return None if state is None else state.latest

    def query(self, job_id: int) -> Dict[str, Any]:
        """The job's response store: ``callback_data`` merged with every
        dict progress report in order (later keys win) when the job was
        started with ``store_response=True``; ``callback_data`` alone
        otherwise ({} without it).  A new dict each call."""
        state = self._progress_of(job_id)
        return {} if state is None else state.snapshot()

    # ---- durable external callbacks ----------------------------------

    def send_callback_success(self, callback_id: str, result: bytes) -> None:
        """Signals success: the suspended job is replayed and its
        ``callback_result`` returns ``result`` (bytes-like, at most 1 MiB).
        Raises ``UnknownCallbackError`` for an id never issued and
        ``CallbackAlreadyCompletedError`` once the callback has succeeded,
        failed, timed out or its job ended (a duplicate is never applied)."""
        self._signal(check_callback_id(callback_id), "succeeded", check_result(result), None)

    def send_callback_failure(self, callback_id: str, error: str) -> None:
        """Signals failure: the job's ``callback_result`` raises
        ``CallbackFailedError`` carrying ``error``.  Errors as
        ``send_callback_success``."""
        self._signal(check_callback_id(callback_id), "failed", None, check_error(error))

    def send_callback_heartbeat(self, callback_id: str) -> None:
        """Tells a callback with ``heartbeat_timeout_ms`` that the outside
        system is still at work: its heartbeat deadline moves to now plus
        that interval.  Errors as ``send_callback_success``."""
        self._signal(check_callback_id(callback_id), "pending", None, None)

    def _signal(self, callback_id: str, state: str, result: Optional[bytes],
                error: Optional[str]) -> None:
        if self._closed:
            raise_for(lib.CBW_ECLOSED)
        self._table.durable.signal(callback_id, state, result, error)

    # ---- routes -------------------------------------------------------

    def open_route(self, name: str, *, concurrency: int = 1, timeout_ms: int = -1,
                   max_retries: int = 0, backoff_ms: int = 1000, delay_ms: int = 0) -> int:
        """Adds a named FIFO route and returns its id.

        ``concurrency`` threads run its jobs; ``timeout_ms`` is the run-time
        limit of jobs started on it without one.  A job whose callback
        raises is run again, from a fresh copy of its original request, up
        to ``max_retries`` more times: attempt n + 1 starts
        ``backoff_ms * 2**(n-1)`` ms (at most one hour) after attempt n
        failed, meanwhile the job is pending and its waiters keep waiting.
        Only the last attempt's error is reported.  A timed-out, cancelled
        or shut-down job is not retried.  ``delay_ms`` is the least time
        between two consecutive starts on the route (a rate limit, across
        all its threads).  Retry and delay timers live in the C core.
        """
        raw = _route_name(name)
        concurrency = _check_positive(concurrency, "concurrency")
        config = ffi.new("cbw_route_config *")
        config.concurrency = concurrency
        config.timeout_ms = _check_timeout(timeout_ms)
        config.max_retries = _check_count(max_retries, "max_retries")
        config.backoff_ms = _check_count(backoff_ms, "backoff_ms")
        config.delay_ms = _check_count(delay_ms, "delay_ms")
        if self._closed:
            raise_for(lib.CBW_ECLOSED)
        rid = lib.cbw_route_open_config(self._w, raw, config)
        if rid < 0:
            raise_for(rid, name)
        self._routes[name] = rid
        return rid

    def advance_clock(self, ms: int) -> None:
        """Moves the route clock of a worker made with ``manual_clock=True``
        forward by ``ms`` milliseconds (for tests of retry backoff and
        ``delay_ms`` without sleeping).  Retries that fall due are queued
        before this returns.  Run-time limits always use the real clock."""
        ms = _check_count(ms, "ms")
        if not self._manual_clock:
            raise RuntimeError("advance_clock() needs a Worker(manual_clock=True)")
        if self._closed:
            raise_for(lib.CBW_ECLOSED)
        rc = lib.cbw_worker_advance_clock(self._w, ms)
        if rc < 0:
            raise_for(rc)

    def close_route(self, name: str) -> bool:
        """Stops the route accepting jobs (queued and running ones finish);
        True if it was open."""
        if self._closed:
            raise_for(lib.CBW_ECLOSED)
        rc = lib.cbw_route_close(self._w, self._route_id(name))
        if rc < 0:
            raise_for(rc, name)
        return rc == 1

    def wait_drained(self, name: str, timeout_ms: int = -1) -> bool:
        """Blocks until the route has no queued or running job; False if
        ``timeout_ms`` passed first."""
        timeout_ms = _check_timeout(timeout_ms)
        if self._closed:
            raise_for(lib.CBW_ECLOSED)
        rid = self._route_id(name)
        rc = self._blocking(lib.cbw_route_wait_drained, rid, timeout_ms, timed_out=0)
        if rc == lib.CBW_ESHUTDOWN:
            raise WorkerClosedError(f"the worker was closed while waiting for route "
                                    f"{name!r} to drain")
        if rc < 0:
            raise_for(rc, name)
        return rc == 1

    def _route_info(self, name: str) -> Any:
        if self._closed:
            raise_for(lib.CBW_ECLOSED)
        out = ffi.new("cbw_route_info *")
        rc = lib.cbw_route_info_get(self._w, self._route_id(name), out)
        if rc < 0:
            raise_for(rc, name)
        return out

    def route_meta(self, name: str, key: int) -> int:
        """One route field by ``RouteMetaKey``; ``KNOWN`` gives 0 for an
        unknown route, other keys raise ``UnknownRouteError``."""
        if not isinstance(key, int) or isinstance(key, bool):
            raise TypeError(f"key must be an int, not {type(key).__name__}")
        if not 1 <= key <= 9:
            raise ValueError(f"key must be a RouteMetaKey (1..9), not {key}")
        key = RouteMetaKey(int(key))
        if key is RouteMetaKey.KNOWN:
            _route_name(name)
            if self._closed:
                raise_for(lib.CBW_ECLOSED)
            return int(name in self._routes or lib.cbw_route_find(self._w, name.encode()) > 0)
        r = self._route_info(name)
        busy = r.queued + r.delayed + r.running
        return int({
            RouteMetaKey.STATE: r.state,
            RouteMetaKey.TIMEOUT: r.timeout_ms,
            RouteMetaKey.PENDING: r.queued + r.delayed,
            RouteMetaKey.QUEUED: r.queued,
            RouteMetaKey.RUNNING: r.running,
            RouteMetaKey.DRAINED: busy == 0,
            RouteMetaKey.CLOSE_ACCEPTED: r.close_accepted,
            RouteMetaKey.CLOSED_QUEUED: r.state == RouteState.CLOSED and busy > 0,
        }[key])

    def route_info(self, name: str) -> str:
        """One line of ``key=value`` pairs describing the route."""
        r = self._route_info(name)
        state = "open" if r.state == RouteState.OPEN else "closed"
        return (f"id={r.id} name={quote(name, safe='')} state={state} "
                f"concurrency={r.concurrency} timeout_ms={r.timeout_ms} "
                f"max_retries={r.max_retries} backoff_ms={r.backoff_ms} "
                f"delay_ms={r.delay_ms} pending={r.queued + r.delayed} "
                f"queued={r.queued} running={r.running} threads={r.threads} "
                f"close_accepted={r.close_accepted}")


class _MemoryDurable(DurableBackend):
    """A Worker's own durable backend: its jobs' logs in memory, their run
    cursors, and suspension in the core.  It holds the core worker and its
    table, not the ``Worker``, which the table must not keep alive."""

    def __init__(self, native: Any, table: CallbackTable) -> None:
        self.native = native
        self.table = table
        self.store = MemoryDurableStore(self.now_ms)
        self.lock = threading.Lock()
        self.runs: Dict[int, Tuple[int, DurableRun]] = {}  # job id -> (attempt, run)

    def now_ms(self) -> int:
        return int(lib.cbw_worker_clock_ms(self.native))

    def run_for(self, jid: int, attempt: int, request: Callable[[], bytes]) -> DurableRun:
        with self.lock:
            entry = self.runs.get(jid)
            if entry is not None and entry[0] == attempt:
                return entry[1]
            first = entry is None
        if first:
            self._forget_at_completion(jid)
        fresh = DurableRun(self.store, str(jid), request(),
                           lambda wake, req: self._suspend(jid, wake, req))
        with self.lock:
            self.runs[jid] = (attempt, fresh)
        return fresh

    def _forget_at_completion(self, jid: int) -> None:
        def forget() -> None:
            with self.lock:
                self.runs.pop(jid, None)
            self.store.forget(str(jid))

        self.table.watchers.setdefault(jid, []).append(forget)
        rc = lib.cbw_job_watch(self.native, jid)
        if rc != 0:  # cannot be 1: the job runs; an error leaves no report
            _discard_watcher(self.table.watchers, jid, forget)
            raise_for(rc, jid)

    def _suspend(self, jid: int, wake_after_ms: int, request: bytes) -> NoReturn:
        run = lib.cbw_current_run()
        if run == ffi.NULL or run.id != jid:
            raise CallbackWorkerError("callback_result() called outside its job's callback")
        rc = lib.cbw_run_suspend(run, request, len(request), wake_after_ms)
        if rc != lib.CBW_OK:
            raise_for(rc, jid)
        with self.lock:
            self.runs.pop(jid, None)  # the replay starts a new cursor
        raise SuspendJob()

    def signal(self, callback_id: str, state: str, result: Optional[bytes],
               error: Optional[str]) -> None:
        rec = self.store.signal(callback_id, state, result, error)
        if state == "pending":  # a heartbeat: the timeout wake-up moves
            at, _ = rec.expiry()
            if at is None:
                return
            wake = max(0, at - self.now_ms())
        else:
            wake = 0
        rc = lib.cbw_job_wake(self.native, int(rec.owner), wake)
        if rc < 0 and rc != lib.CBW_EUNKNOWN:
            raise_for(rc, int(rec.owner))


def _resolve(done: "asyncio.Future[None]") -> None:
    if not done.done():
        done.set_result(None)


def _discard_watcher(watchers: Dict[int, List[Callable[[], None]]], jid: int,
                     notify: Callable[[], None]) -> None:
    entries = watchers.get(jid)
    if entries is not None:
        try:
            entries.remove(notify)
        except ValueError:
            pass
        if not entries:
            watchers.pop(jid, None)


def _progress_state(on_progress: object, store_response: object,
                    callback_data: object) -> Optional[ProgressState]:
    """Checks the progress options of a start; None when none is used."""
    if on_progress is not None and not callable(on_progress):
        raise TypeError(f"on_progress must be callable, not {type(on_progress).__name__}")
    if type(store_response) is not bool:
        raise TypeError(f"store_response must be a bool, not {type(store_response).__name__}")
    if callback_data is not None and not isinstance(callback_data, dict):
        raise TypeError(f"callback_data must be a dict, not {type(callback_data).__name__}")
    if on_progress is None and not store_response and callback_data is None:
        return None
    return ProgressState(on_progress, store_response, callback_data)  # type: ignore[arg-type]


def _release_native(native: Any, table: CallbackTable) -> None:
    """Finalizer: closes (if still open) and frees the core worker.  The
    table (and its handle) stays alive until then, so no C thread can call
    into a freed handle."""
    lib.cbw_worker_release(native)
    table.clear()


_live_workers: "weakref.WeakSet[Worker]" = weakref.WeakSet()


def _close_all_at_exit() -> None:
    """Closes every open worker before the interpreter finalizes: queued jobs
    are shut down, running callbacks are interrupted, and threads still busy
    after a short grace period are abandoned, so exit never hangs."""
    for worker in list(_live_workers):
        try:
            worker._close(lib.CBW_CLOSE_INTERRUPT, _EXIT_GRACE_MS)
        except Exception:  # exit must go on whatever one worker does
            _native.log.exception("callbackworker: error closing a worker at exit")


def _after_fork_in_child() -> None:
    global _main_ident
    _native.FORK_GENERATION[0] += 1
    lib.cbwpy_forked()
    _main_ident = threading.main_thread().ident
    for worker in list(_live_workers):
        worker._reset_after_fork()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
