"""Durable external callbacks: a job suspends until an outside system signals it.

Inside a job (``ctx = callbackworker.current_job()``):

* ``ctx.create_callback(name, timeout_ms=0, heartbeat_timeout_ms=0)`` records
  a callback and returns a ``CallbackHandle`` whose ``callback_id`` (random,
  unguessable) the outside system is given.  It never suspends.
* ``ctx.callback_result(handle)`` returns the result once the callback was
  signalled with success, raises ``CallbackFailedError`` after a failure
  signal and ``CallbackTimeoutError`` once ``timeout_ms`` passed without a
  signal, or ``heartbeat_timeout_ms`` without a heartbeat (0: no limit).
  Otherwise it suspends the job: the job leaves its thread (the route runs
  other jobs meanwhile), reports ``State.SUSPENDED``, and is run again from
  the start when the callback is signalled or times out.
* ``ctx.step(name, fn)`` runs ``fn()`` once; when the job is replayed it
  returns the recorded value instead of running ``fn`` again.

Replay: every durable operation of a job gets a sequence number (1st, 2nd,
...).  The first run records each one's outcome in the job's operation log;
a replay answers the operations from the log, by sequence number, until it
passes the last recorded one.  A replay that asks for a different
operation (another kind or name) at some number than the log holds fails
with ``NonDeterminismError``: durable jobs must issue the same operations
in the same order every time.  Code between operations runs again on every
replay, so side effects belong in ``step``.  A replayed job sees its
request as it was at its first durable operation (edits it made to the
request before that are kept; edits after it are not).

Signals come from outside the job: ``Worker.send_callback_success(id,
result)``, ``send_callback_failure(id, error)``, ``send_callback_heartbeat
(id)``.  Exactly one terminal signal is applied per callback; later ones, and
signals for callbacks that timed out or whose job ended, raise
``CallbackAlreadyCompletedError``; ids never issued raise
``UnknownCallbackError``.

This module keeps a ``Worker``'s log in memory (``MemoryDurableStore``): it
lives as long as the job.  ``DurableStore`` is the contract a persistent
store implements.
"""

from __future__ import annotations

import re
import secrets
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, NoReturn, Optional, Tuple, TypeVar

from .errors import (
    CallbackAlreadyCompletedError,
    CallbackFailedError,
    CallbackTimeoutError,
    NonDeterminismError,
    UnknownCallbackError,
)

__all__ = [
    "CallbackHandle", "CallbackRecord", "DurableStore", "MemoryDurableStore", "DurableRun",
    "DurableBackend", "SuspendJob", "check_callback_id", "check_result",
]

T = TypeVar("T")

CALLBACK_ID_RE = re.compile(r"^[A-Za-z0-9_-]{32}$")
MAX_RESULT_BYTES = 1 << 20
MAX_ERROR_CHARS = 64 * 1024


class SuspendJob(BaseException):
    """Ends the run of a durable job that must wait for an outside signal.

    ``callback_result`` raises it once the job's suspension is arranged (a
    ``Worker``'s job is parked in the core; a task's attempt settles as
    suspended).  A ``BaseException``, so that ``except Exception`` in user
    code lets it pass."""


class CallbackHandle(NamedTuple):
    """What ``create_callback`` returns: give ``callback_id`` to the outside
    system, pass the handle to ``callback_result``."""

    callback_id: str
    name: str


@dataclass
class CallbackRecord:
    """One callback's state.  Times are milliseconds on the store's clock."""

    callback_id: str
    owner: str
    name: str
    created_ms: int
    timeout_ms: int = 0
    heartbeat_timeout_ms: int = 0
    state: str = "pending"  # pending, succeeded, failed, timed_out, closed
    result: Optional[bytes] = None
    error: Optional[str] = None
    reason: Optional[str] = None  # why it timed out: "timeout" or "heartbeat"
    last_beat_ms: int = field(default=0)

    def expiry(self) -> Tuple[Optional[int], str]:
        """When a pending callback times out, and why (None: never)."""
        limits = []
        if self.timeout_ms > 0:
            limits.append((self.created_ms + self.timeout_ms, "timeout"))
        if self.heartbeat_timeout_ms > 0:
            limits.append((max(self.last_beat_ms, self.created_ms) + self.heartbeat_timeout_ms,
                           "heartbeat"))
        if not limits:
            return None, ""
        return min(limits)

    def expire_if_due(self, now_ms: int) -> None:
        """Moves a pending callback past its limit to ``timed_out``."""
        at, reason = self.expiry()
        if self.state == "pending" and at is not None and now_ms >= at:
            self.state = "timed_out"
            self.reason = reason


def check_callback_id(callback_id: object) -> str:
    """A well-formed callback id, or TypeError / UnknownCallbackError."""
    if not isinstance(callback_id, str):
        raise TypeError(f"callback_id must be a str, not {type(callback_id).__name__}")
    if not CALLBACK_ID_RE.match(callback_id):
        raise UnknownCallbackError(callback_id)
    return callback_id


def check_result(result: object) -> bytes:
    """A success signal's result: bytes-like, at most 1 MiB."""
    try:
        data = bytes(memoryview(result))  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"result must be bytes-like, not {type(result).__name__}") from None
    if len(data) > MAX_RESULT_BYTES:
        raise ValueError(f"result is {len(data)} bytes; the limit is {MAX_RESULT_BYTES}")
    return data


def check_error(error: object) -> str:
    if not isinstance(error, str):
        raise TypeError(f"error must be a str, not {type(error).__name__}")
    if len(error) > MAX_ERROR_CHARS:
        raise ValueError(f"error is {len(error)} characters; the limit is {MAX_ERROR_CHARS}")
    return error


Op = Tuple[str, str, Any]
"""One logged operation: (kind, name, recorded value).  Kinds: "callback"
(value: the callback id), "result" (value: ("ok", bytes) / ("failed", text)
/ ("timed_out", reason)), "step" (value: what fn returned)."""


class DurableStore(ABC):
    """Where durable jobs' operation logs and callbacks live.  ``owner`` is
    the key of one job (its id in a Worker, its task id in a TaskService).
    Every method is atomic with respect to the others."""

    @abstractmethod
    def now_ms(self) -> int:
        """The clock callback limits are measured with."""

    @abstractmethod
    def request(self, owner: str, current: bytes) -> bytes:
        """The owner's saved request, saving ``current`` on first use."""

    @abstractmethod
    def ops(self, owner: str) -> List[Op]:
        """The owner's operation log, in sequence order."""

    @abstractmethod
    def record(self, owner: str, seq: int, op: Op) -> None:
        """Appends operation number ``seq`` (== the log's length)."""

    @abstractmethod
    def add_callback(self, record: CallbackRecord) -> None:
        """Files a new pending callback."""

    @abstractmethod
    def callback(self, callback_id: str) -> Optional[CallbackRecord]:
        """The callback, with ``timed_out`` applied if its limit passed."""

    @abstractmethod
    def signal(self, callback_id: str, state: str, result: Optional[bytes],
               error: Optional[str]) -> CallbackRecord:
        """Applies a terminal signal (``state`` "succeeded" or "failed"), or
        a heartbeat (``state`` "pending"), exactly once; raises
        ``UnknownCallbackError`` / ``CallbackAlreadyCompletedError``."""

    @abstractmethod
    def forget(self, owner: str) -> None:
        """The owner's job ended: drop its log; its pending callbacks are
        closed (signals to them are refused)."""


class MemoryDurableStore(DurableStore):
    """The in-memory store of a ``Worker``.  A closed or finished callback
    is remembered (bounded by ``keep``) so late signals get a clear error."""

    def __init__(self, clock: Callable[[], int], keep: int = 10_000) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: Dict[str, bytes] = {}
        self._logs: Dict[str, List[Op]] = {}
        self._callbacks: Dict[str, CallbackRecord] = {}
        self._by_owner: Dict[str, List[str]] = {}
        self._finished: Dict[str, CallbackRecord] = {}
        self._keep = keep

    def now_ms(self) -> int:
        return self._clock()

    def request(self, owner: str, current: bytes) -> bytes:
        with self._lock:
            return self._requests.setdefault(owner, current)

    def ops(self, owner: str) -> List[Op]:
        with self._lock:
            return list(self._logs.get(owner, ()))

    def record(self, owner: str, seq: int, op: Op) -> None:
        with self._lock:
            log = self._logs.setdefault(owner, [])
            if seq != len(log):
                raise NonDeterminismError(
                    f"operation {seq + 1} of job {owner} was recorded twice")
            log.append(op)

    def add_callback(self, record: CallbackRecord) -> None:
        with self._lock:
            self._callbacks[record.callback_id] = record
            self._by_owner.setdefault(record.owner, []).append(record.callback_id)

    def callback(self, callback_id: str) -> Optional[CallbackRecord]:
        now = self._clock()
        with self._lock:
            rec = self._callbacks.get(callback_id) or self._finished.get(callback_id)
            if rec is not None:
                rec.expire_if_due(now)
            return rec

    def signal(self, callback_id: str, state: str, result: Optional[bytes],
               error: Optional[str]) -> CallbackRecord:
        now = self._clock()
        with self._lock:
            rec = self._callbacks.get(callback_id) or self._finished.get(callback_id)
            if rec is None:
                raise UnknownCallbackError(callback_id)
            rec.expire_if_due(now)
            if rec.state != "pending":
                raise CallbackAlreadyCompletedError(callback_id, rec.state)
            if state == "pending":
                rec.last_beat_ms = now
            else:
                rec.state, rec.result, rec.error = state, result, error
            return rec

    def forget(self, owner: str) -> None:
        with self._lock:
            self._requests.pop(owner, None)
            self._logs.pop(owner, None)
            for callback_id in self._by_owner.pop(owner, ()):
                rec = self._callbacks.pop(callback_id)
                if rec.state == "pending":
                    rec.state = "closed"
                rec.result = None  # the job has it; keep the tombstone small
                self._finished[callback_id] = rec
            while len(self._finished) > self._keep:
                del self._finished[next(iter(self._finished))]



_MISSING = object()


class DurableRun:
    """One run of a durable job: walks the operation log with a cursor.
    ``suspend(wake_after_ms, request)`` must end the run (raise); ``-1``
    means wake only on a signal.  Its caller (``JobContext``) has checked
    the arguments of ``create_callback`` and ``step``."""

    def __init__(self, store: DurableStore, owner: str, request: bytes,
                 suspend: Callable[[int, bytes], NoReturn]) -> None:
        self.store = store
        self.owner = owner
        self.request = store.request(owner, request)
        self._suspend = suspend
        self._cursor = 0
        self.suspended_on: Optional[str] = None
        """The callback whose ``callback_result`` suspended this run."""

    def _next(self, kind: str, name: str) -> Tuple[Any, int]:
        seq = self._cursor
        self._cursor += 1
        log = self.store.ops(self.owner)
        if seq < len(log):
            got_kind, got_name, value = log[seq]
            if (got_kind, got_name) != (kind, name):
                raise NonDeterminismError(
                    f"job {self.owner}: operation {seq + 1} was {got_kind}({got_name!r}) "
                    f"when recorded, but this run asked for {kind}({name!r})")
            return value, seq
        return _MISSING, seq

    def create_callback(self, name: str, timeout_ms: int = 0,
                        heartbeat_timeout_ms: int = 0) -> CallbackHandle:
        value, seq = self._next("callback", name)
        if value is _MISSING:
            value = secrets.token_urlsafe(24)  # 32 characters, 192 random bits
            now = self.store.now_ms()
            self.store.add_callback(CallbackRecord(
                value, self.owner, name, now, timeout_ms, heartbeat_timeout_ms,
                last_beat_ms=now))
            self.store.record(self.owner, seq, ("callback", name, value))
        return CallbackHandle(value, name)

    def callback_result(self, handle: CallbackHandle) -> bytes:
        if not isinstance(handle, CallbackHandle):
            raise TypeError(f"handle must be a CallbackHandle, not {type(handle).__name__}")
        value, seq = self._next("result", handle.callback_id)
        if value is _MISSING:
            rec = self.store.callback(handle.callback_id)
            if rec is None or rec.owner != self.owner:
                raise UnknownCallbackError(handle.callback_id)
            if rec.state == "pending":
                at, _ = rec.expiry()
                wake = -1 if at is None else max(0, at - self.store.now_ms())
                self.suspended_on = handle.callback_id
                self._suspend(wake, self.request)
            value = {"succeeded": ("ok", rec.result), "failed": ("failed", rec.error),
                     "timed_out": ("timed_out", rec.reason)}[rec.state]
            self.store.record(self.owner, seq, ("result", handle.callback_id, value))
        outcome, detail = value
        if outcome == "failed":
            raise CallbackFailedError(handle.callback_id, detail)
        if outcome == "timed_out":
            raise CallbackTimeoutError(handle.callback_id, detail)
        return bytes(detail)

    def step(self, name: str, fn: Callable[[], T]) -> T:
        value, seq = self._next("step", name)
        if value is _MISSING:
            value = fn()
            self.store.record(self.owner, seq, ("step", name, value))
        return value  # type: ignore[no-any-return]


class DurableBackend(ABC):
    """Where a worker's durable jobs keep their operation logs.

    A ``Worker`` keeps them in memory unless it is given another backend
    (``Worker(durable_backend=...)``): ``TaskService`` gives its worker one
    that keeps each task's log in the task store.  ``current_job()``'s
    durable operations ask the backend of the worker running the job for
    the job's ``DurableRun``.
    """

    @abstractmethod
    def run_for(self, job_id: int, attempt: int, request: Callable[[], bytes]) -> DurableRun:
        """The cursor of the running job ``job_id`` (its ``attempt``-th run),
        made by its first durable operation and returned again to every
        later one of the same run.  ``request()`` copies the job's request
        as it is now."""

    def signal(self, callback_id: str, state: str, result: Optional[bytes],
               error: Optional[str]) -> None:
        """Applies an outside signal (``Worker.send_callback_*``).  A backend
        whose callbacks are signalled some other way (a ``TaskService``'s
        are signalled through the service) knows none of them here."""
        raise UnknownCallbackError(callback_id)
