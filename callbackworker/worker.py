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

import itertools
import threading
import time
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Tuple, Union

from . import _lifecycle
from . import jobcontext as _progress
from ._asyncwait import AsyncWaits
from ._jobquery import JobQueries
from ._memdurable import DurableSignals, MemoryDurableBackend
from ._native import CallbackTable, ffi, lib, raise_for
from ._routes import RouteVerbs
from ._validate import (
    JOB_ID_MAX,
    TIMEOUT_MAX,
    check_bool,
    check_callable,
    check_concurrency,
    check_id,
    check_timeout,
    is_buffer,
    may_be_job_id,
)
from .asyncmeta import Profile
from .durable import DurableBackend
from .errors import DeadlockError, failure_for_status
from .jobcontext import ProgressCallback, progress_state
from .states import Status

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


_TIMEOUT_ROUTE = int(lib.CBW_TIMEOUT_ROUTE)
_ETIMEDOUT = int(lib.CBW_ETIMEDOUT)
_EDEADLOCK = int(lib.CBW_EDEADLOCK)
_EENCODE = int(lib.CBWPY_EENCODE)
_DEFAULT_ROUTE = int(lib.CBW_DEFAULT_ROUTE)
_STATUS_OK = int(lib.CBW_STATUS_OK)
_MAIN_SLICE_MS = 50

_start = lib.cbw_start
_wait_copy = lib.cbw_wait_copy
_wait_many = lib.cbwpy_wait_many
_start_many = lib.cbwpy_start_many
_read_ids = lib.cbwpy_read_ids
_EBADREQUEST = int(lib.CBWPY_EBADREQUEST)
_WAIT_CHUNK = int(lib.CBWPY_WAIT_CHUNK)
_EFAILED = int(lib.CBWPY_EFAILED)
_unpack = ffi.unpack
_EMORE = int(lib.CBW_EMORE)
_SCRATCH_SIZE = 256
_main_ident = threading.main_thread().ident
_local = threading.local()
_main_waiting = [False]  # the main thread's wait() is using its scratch buffers


def _scratch() -> Any:
    """This thread's buffers for cbw_wait_copy: one for small responses, one
    result record for everything else."""
    try:
        return _local.scratch
    except AttributeError:
        _local.scratch = (ffi.new("char[]", _SCRATCH_SIZE), ffi.new("cbw_result *"))
        return _local.scratch


class _RouteTimeout(int):
    """The default of the start verbs' ``timeout_ms``: -1 (no limit) on the
    default route, the route's own ``timeout_ms`` on a named route.  An
    explicit -1 always means no limit."""

    def __repr__(self) -> str:
        return "-1"


_UNSET = _RouteTimeout(-1)


class Worker(JobQueries, RouteVerbs, AsyncWaits, DurableSignals):
    """Runs jobs (a callback plus a copied input blob) on C threads.

    ``concurrency`` is the number of threads of the default route (route 1,
    ``"default"``); with 1, jobs run one at a time in start order.

    Use it as a context manager, or call ``close()``; an open worker is
    closed at interpreter exit.
    """

    def __init__(self, concurrency: int = 1, *, manual_clock: bool = False,
                 durable_backend: Optional[DurableBackend] = None) -> None:
        self._concurrency = check_concurrency(concurrency)
        check_bool(manual_clock, "manual_clock")
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
        self._items: Dict[int, list] = {}  # item key -> [item, job id], until it runs
        self._item_keys: Dict[int, int] = {}  # detached job id -> item key, for cancel
        self._next_item_key = itertools.count(1).__next__
        # One callable for every detached job; it holds the two maps, not the
        # worker, so a Worker is in no reference cycle and goes as soon as its
        # last reference does (not whenever, on whatever thread, the cyclic
        # collector runs).
        self._run_item_cb = _item_runner(self._items, self._item_keys)
        _lifecycle.live_workers.add(self)

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
        self._table.durable = self._durable_backend or MemoryDurableBackend(native, self._table)
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
        check_bool(drain, "drain")
        return self._close(lib.CBW_CLOSE_DRAIN if drain else 0, 0)

    def _close(self, flags: int, grace_ms: int, *, interruptible: bool = True) -> int:
        if self._closed:
            return 0
        if interruptible and threading.get_ident() == _main_ident:
            return _lifecycle.off_the_main_thread(lambda: self._close(flags, grace_ms, interruptible=False))
        rc = lib.cbw_worker_close(self._w, flags, grace_ms)
        if rc == _EDEADLOCK:
            raise DeadlockError("close(drain=True) cannot be called from inside one of "
                                "the worker's own callbacks: that callback keeps it busy")
        self._closed = True
        self._table.closed = True
        # The callbacks stay: a close that returned early (a callback's, while
        # another thread drains) must not take them from queued jobs; the
        # core releases each one as its last job goes.  Items of detached
        # jobs still queued will never run.
        self._table.failures.clear()
        self._items.clear()
        self._item_keys.clear()
        for tag in self._progress.values():
            _progress.STATES.pop(tag, None)
        self._progress.clear()
        _lifecycle.live_workers.discard(self)
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
        self._item_keys = {}
        self._run_item_cb = _item_runner(self._items, self._item_keys)
        if self._closed:
            self._w = ffi.NULL
            return
        self._w = self._new_native()
        self._finalizer = self._track_native()

    def _track_native(self) -> "weakref.finalize":
        """Frees the core worker when this object is collected.  Not at
        interpreter exit: the exit hook (_lifecycle.py) closes workers then,
        and memory is left to the process's end."""
        finalizer = weakref.finalize(self, _release_native, self._w, self._table)
        finalizer.atexit = False
        return finalizer

    # ---- starting jobs ------------------------------------------------

    def _prepare(self, callback: object, timeout_ms: object,
                 route: Optional[str]) -> "tuple[int, int]":
        """Checks the arguments every start verb shares; returns the route id
        and the timeout to pass to the core (a start on a named route that
        gives no timeout takes the route's)."""
        check_callable(callback, "callback")
        if timeout_ms is _UNSET:
            timeout_ms = _TIMEOUT_ROUTE if route is not None else -1
        else:
            timeout_ms = check_timeout(timeout_ms)
        rid = self._route_id(route) if route is not None else _DEFAULT_ROUTE
        self._check_open()
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
                     or (type(timeout_ms) is int and -1 <= timeout_ms <= TIMEOUT_MAX))
                and on_progress is None and store_response is False and callback_data is None):
            rid = _DEFAULT_ROUTE
            if timeout_ms is _UNSET:
                timeout_ms = -1
            state = None
        else:
            rid, timeout_ms = self._prepare(callback, timeout_ms, route)
            state = progress_state(on_progress, store_response, callback_data)
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
        # The item is found by a key that travels as the job's request,
        # stored before the start: the job may run at once, no lock may be
        # held across the start (an idle route's thread takes its first job
        # while the start waits, see csrc/cbw_thread.c), and reading the key
        # in the item runner makes no core call (which would let another thread
        # take the interpreter lock between jobs of a burst).  The holder
        # gets the job id after the start, for cancel's map; whichever of
        # the run and the start comes last empties that map's entry.
        key = self._next_item_key()
        holder = [item, 0]
        self._items[key] = holder
        jid = lib.cbw_start_ex(self._w, rid, id(self._run_item_cb), key.to_bytes(8, "little"), 8,
                               timeout_ms, lib.CBW_JOB_DETACHED, 0)
        if jid < 0:
            self._items.pop(key, None)
            raise_for(jid, route)
        holder[1] = jid
        self._item_keys[jid] = key
        if key not in self._items:  # it ran already: nothing left to cancel
            self._item_keys.pop(jid, None)
        return jid

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
        none.  Same semantics as ``start`` for each; ids are in order.  A
        request that is not a buffer is a ``TypeError``, one that is not
        C-contiguous a ``BufferError``; either way no job is started."""
        rid, timeout_ms = self._prepare(callback, timeout_ms, route)
        requests = list(requests)  # a list of our own: see bridge_verbs.c
        if not requests:
            return []
        ids: List[int] = []
        where = ffi.new("size_t *")
        # The requests are read (every buffer pinned while it is copied) and
        # the ids made in C.
        rc = _start_many(self._w, rid, id(callback), ffi.cast("void *", id(requests)),
                         timeout_ms, ffi.cast("void *", id(ids)), where)
        if rc == _EBADREQUEST:
            bad = requests[where[0]]
            if is_buffer(bad):  # start() raises the same for such a request
                raise BufferError(f"every request must be a C-contiguous buffer; request "
                                  f"{where[0]} ({type(bad).__name__}) is not")
            raise TypeError(f"every request must be a bytes-like object, not "
                            f"{type(bad).__name__}")
        if rc < 0:
            raise_for(rc, route)
        return ids

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
        if (type(job_id) is not int or type(timeout_ms) is not int or self._closed
                or not -1 <= timeout_ms <= TIMEOUT_MAX or not 0 < job_id <= JOB_ID_MAX):
            job_id, timeout_ms = self._job_and_timeout(job_id, timeout_ms)
        jid = job_id
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

    def wait_many(self, job_ids: Iterable[int], timeout_ms: int = -1) -> List[bytes]:
        """Waits for the jobs in order and returns their responses: what
        ``[wait(j) for j in job_ids]`` returns, with ``timeout_ms`` bounding
        the whole call, and far cheaper (the core waits and the bytes are
        made in C, a chunk of jobs per call).

        It stops where that loop would: at the first job that fails, which
        raises its ``JobFailedError`` and is destroyed, or whose wait fails
        (``WaitTimeoutError``, ``UnknownJobError``...), which leaves that job
        untouched.  Either way the jobs before it are destroyed (their
        responses are lost) and the jobs after it are untouched: ``wait``,
        ``take`` or ``cancel`` them by id.  An id that can never be a job's
        raises ``UnknownJobError`` before anything is waited for."""
        ids = list(job_ids)  # a list of our own: see bridge_verbs.c
        arr = ffi.new("int64_t[]", len(ids))
        unknown = None
        if ids and _read_ids(ffi.cast("void *", id(ids)), arr, len(ids)) < 0:
            # Some id is not a plain int the core could have issued: check
            # them in order, for the right error.
            ids = [j if type(j) is int else check_id(j) for j in ids]
            unknown = next((j for j in ids if not may_be_job_id(j)), None)
            if unknown is None:  # int subclasses, converted
                arr = ffi.new("int64_t[]", ids)
        if type(timeout_ms) is not int or not -1 <= timeout_ms <= TIMEOUT_MAX:
            timeout_ms = check_timeout(timeout_ms)
        self._check_open()
        if unknown is not None:
            raise_for(lib.CBW_EUNKNOWN, unknown)
        out: List[bytes] = []
        if ids:
            self._wait_many_into(ids, arr, timeout_ms, out)
        return out

    def _wait_many_into(self, ids: List[int], arr: Any, timeout_ms: int,
                        out: List[bytes]) -> None:
        """wait_many's loop: a chunk per core call; on the main thread in
        slices, so that signal handlers (Ctrl-C) run while it waits."""
        n = len(ids)
        failed, consumed = ffi.new("cbw_result *"), ffi.new("size_t *")
        sliced = timeout_ms != 0 and threading.get_ident() == _main_ident
        deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
        target = ffi.cast("void *", id(out))
        pos, budget = 0, timeout_ms
        try:
            while pos < n:
                if deadline is not None:
                    budget = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
                if sliced:
                    budget = _MAIN_SLICE_MS if budget < 0 else min(budget, _MAIN_SLICE_MS)
                rc = _wait_many(self._w, arr + pos, min(_WAIT_CHUNK, n - pos), budget,
                                target, failed, consumed)
                pos += consumed[0]
                if rc == _EFAILED:
                    self._consume(failed)  # raises the job's failure
                if rc == _ETIMEDOUT and sliced and (
                        deadline is None or time.monotonic() < deadline):
                    continue
                if rc < 0:
                    raise_for(rc, ids[pos])
        finally:
            if self._table.failures or self._progress:
                for jid in ids[:pos]:  # destroyed: nothing may outlive them
                    self._table.failures.pop(jid, None)
                    self._forget_progress(jid)

    def wait_complete(self, job_id: int, timeout_ms: int = -1) -> bool:
        """Blocks until the job completes; True if it did, False if
        ``timeout_ms`` passed first.  Never destroys the job."""
        jid, timeout_ms = self._job_and_timeout(job_id, timeout_ms)
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
        if rc == 1 and self._item_keys:
            key = self._item_keys.pop(jid, None)
            if key is not None:
                self._items.pop(key, None)  # a detached job's item never runs now
        return rc == 1

    def _forget_progress(self, jid: int) -> None:
        """A destroyed job's progress state goes with it."""
        tag = self._progress.pop(jid, None)
        if tag is not None:
            _progress.STATES.pop(tag, None)

    # ---- checks shared by the verbs ----------------------------------

    def _check_open(self) -> None:
        """``WorkerClosedError`` once the worker is closed."""
        if self._closed:
            raise_for(lib.CBW_ECLOSED)

    def _job_id(self, job_id: object) -> int:
        """Checks an id argument: TypeError for a non-int, WorkerClosedError
        once closed, UnknownJobError for an int that was never an id."""
        jid = check_id(job_id)
        self._check_open()
        if not may_be_job_id(jid):
            raise_for(lib.CBW_EUNKNOWN, job_id)
        return jid

    def _job_and_timeout(self, job_id: object, timeout_ms: object) -> Tuple[int, int]:
        """Checks a wait's arguments in the order every wait reports them:
        the id's type, the timeout, the worker open, an id that could have
        been issued."""
        jid = check_id(job_id)
        timeout_ms = check_timeout(timeout_ms)
        self._check_open()
        if not may_be_job_id(jid):
            raise_for(lib.CBW_EUNKNOWN, job_id)
        return jid, timeout_ms


def _item_runner(items: Dict[int, list],
                 item_keys: Dict[int, int]) -> Callable[[memoryview], None]:
    """The callback of every detached job of one worker: runs the item its
    request's key names (``Worker.run_detached``)."""

    def run_item(request: memoryview) -> None:
        holder = items.pop(int.from_bytes(request, "little"), None)
        if holder is not None:
            item_keys.pop(holder[1], None)
            holder[0].run()

    return run_item


def _release_native(native: Any, table: CallbackTable) -> None:
    """Finalizer: closes (if still open) and frees the core worker.  The
    table (and its handle) stays alive until then, so no C thread can call
    into a freed handle.  Its callbacks stay, as after ``close()``: the
    collector may run this on one of the worker's own threads, whose job
    still runs after the release returns; the core releases each callback
    as its last job goes, and the rest with the worker.  On the main thread
    Ctrl-C interrupts the wait for running callbacks; the release then goes
    on in the background, holding the table."""

    def release() -> None:
        lib.cbw_worker_release(native)
        table.failures.clear()

    if not table.closed and threading.get_ident() == _main_ident:
        _lifecycle.wait_in_finalizer(release, _release_native.__code__)  # Ctrl-C ends the wait
    else:
        release()


def _note_main_thread() -> None:
    """In a forked child: the thread that forked is the main thread now."""
    global _main_ident
    _main_ident = threading.main_thread().ident


_lifecycle.on_fork_in_child(_note_main_thread)
