"""A ``Worker``'s own durable backend: its jobs' operation logs in memory
(``MemoryDurableStore``), suspension and wake-ups in the C core.

A job's log lives until the job completes (a completion watcher forgets
it); a suspended job is parked in the core and woken by a signal or by its
callback's timeout.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, NoReturn, Optional, Tuple

from ._native import CallbackTable, ffi, lib, raise_for
from .durable import (
    DurableBackend,
    DurableRun,
    MemoryDurableStore,
    SuspendJob,
    check_callback_id,
    check_error,
    check_result,
)
from .errors import CallbackWorkerError

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["MemoryDurableBackend", "DurableSignals"]


class MemoryDurableBackend(DurableBackend):
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

        self.table.watch(self.native, jid, forget)  # not complete: the job runs

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


class DurableSignals:
    """The ``Worker`` verbs that signal its durable jobs' callbacks from
    outside (a mixin of ``Worker``): they go to the worker's durable
    backend."""

    def send_callback_success(self: "Worker", callback_id: str, result: bytes) -> None:
        """Signals success: the suspended job is replayed and its
        ``callback_result`` returns ``result`` (bytes-like, at most 1 MiB).
        Raises ``UnknownCallbackError`` for an id never issued and
        ``CallbackAlreadyCompletedError`` once the callback has succeeded,
        failed, timed out or its job ended (a duplicate is never applied)."""
        self._signal(check_callback_id(callback_id), "succeeded", check_result(result), None)

    def send_callback_failure(self: "Worker", callback_id: str, error: str) -> None:
        """Signals failure: the job's ``callback_result`` raises
        ``CallbackFailedError`` carrying ``error``.  Errors as
        ``send_callback_success``."""
        self._signal(check_callback_id(callback_id), "failed", None, check_error(error))

    def send_callback_heartbeat(self: "Worker", callback_id: str) -> None:
        """Tells a callback with ``heartbeat_timeout_ms`` that the outside
        system is still at work: its heartbeat deadline moves to now plus
        that interval.  Errors as ``send_callback_success``."""
        self._signal(check_callback_id(callback_id), "pending", None, None)

    def _signal(self: "Worker", callback_id: str, state: str, result: Optional[bytes],
                error: Optional[str]) -> None:
        self._check_open()
        self._table.durable.signal(callback_id, state, result, error)
