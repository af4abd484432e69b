"""Bad input at every public entry point: one table, one row per mistake.

Every row names the exact exception type and a fragment of its message (so
that messages stay useful), and, for a job that fails because of its
callback, the type of the ``__cause__``.  SPEC.md section 2: wrong argument
types raise ``TypeError``, bad values ``ValueError``; "No input, from any
thread, may crash or hang the process."
"""

from __future__ import annotations

import re
import sys
import threading
from typing import Any, Callable, Optional

import pytest

from callbackworker import (
    CallbackWorkerError,
    DeadlockError,
    JobCancelledError,
    JobFailedError,
    JobMetaKey,
    JobNotCompleteError,
    JobTimeoutError,
    RouteMetaKey,
    UnknownJobError,
    UnknownRouteError,
    WaitTimeoutError,
    Worker,
    WorkerClosedError,
)
from callbackworker import asyncmeta

WAIT_MS = 10_000
WAIT_S = WAIT_MS / 1000


def noop(request: memoryview) -> None:
    return None


class Env:
    """One fresh worker per row, and the job states a row may need."""

    def __init__(self) -> None:
        self.w = Worker()
        self._releases: list = []
        self._others: list = []

    def running(self) -> int:
        """A job running on the worker's only thread until teardown."""
        started, release = threading.Event(), threading.Event()
        self._releases.append(release)

        def gate(request: memoryview) -> None:
            started.set()
            release.wait(WAIT_S)

        jid = self.w.start(gate, b"gate", WAIT_MS)
        assert started.wait(WAIT_S)
        return jid

    def queued(self) -> int:
        self.running()
        return self.w.start(noop, b"queued", 5000)

    def completed(self, callback: Callable = noop) -> int:
        jid = self.w.start(callback, b"abc", 5000)
        assert self.w.wait_complete(jid, WAIT_MS)
        return jid

    def destroyed(self) -> int:
        jid = self.w.start(noop, b"abc", 5000)
        self.w.wait(jid, WAIT_MS)
        return jid

    def run(self, callback: Callable, request: Any = b"abc", timeout_ms: int = 5000) -> bytes:
        """Starts a job and waits for it: raises its failure."""
        return self.w.wait(self.w.start(callback, request, timeout_ms), WAIT_MS)

    def closed(self) -> tuple:
        """A closed worker and the id of a job it had completed."""
        w = Worker()
        self._others.append(w)
        jid = w.start(noop, b"abc", 5000)
        assert w.wait_complete(jid, WAIT_MS)
        w.close()
        return w, jid

    def release(self) -> None:
        for release in self._releases:
            release.set()

    def close(self) -> None:
        self.release()
        self.w.close()
        for w in self._others:
            w.close()


def on_closed(fn: Callable[[Worker, int], Any]) -> Callable[[Env], Any]:
    return lambda e: fn(*e.closed())


def cb_raises(exc: BaseException) -> Callable[[memoryview], None]:
    def callback(request: memoryview) -> None:
        raise exc
    return callback


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


_kept: list = []


def cb_escape_returned_slice(request: memoryview) -> memoryview:
    part = request[0:2]
    _kept.append(part)  # keeps a view into the job's memory after returning
    return part


def cb_escape_kept_slice(request: memoryview) -> None:
    _kept.append(request[1:])


def cb_escape_kept_cast(request: memoryview) -> None:
    _kept.append(request.cast("c"))


def cb_escape_slice_after_release(request: memoryview) -> None:
    _kept.append(request[1:])
    request.release()  # the slice still refers to the job's memory


def cb_escape_slice_from_with(request: memoryview) -> None:
    with request:
        _kept.append(request[1:])


never = threading.Event()


def cb_spin(request: memoryview) -> None:
    while True:
        never.wait(0.005)


def cb_wait_behind(e: "Env") -> Callable[[memoryview], None]:
    def callback(request: memoryview) -> None:
        later = e.w.start(noop, b"later")  # queued behind this job, one thread
        e.w.wait(later, -1)
    return callback


TIMEOUT_RANGE = r"timeout_ms must be -1 \(infinite\) or 0\.\.2147483647"
TIMEOUT_TYPE = "timeout_ms must be an int"
JOB_ID_TYPE = "job_id must be an int"
UNKNOWN = "unknown job id"
CLOSED = "worker is closed"
NOT_DONE = "has not completed"
ROUTE_NAME = re.escape("route name must be 1..128 UTF-8 bytes")
ROUTE_TYPE = "route name must be a str"


def cb_returns_released_view(request: memoryview) -> memoryview:
    view = memoryview(b"abc")
    view.release()
    return view


def row(id: str, action: Callable[[Env], Any], exc: type, match: str,
        cause: Optional[type] = None, raised: bool = True) -> Any:
    """``cause``: the type of ``__cause__``; ``raised``: the callback raised
    it, so it carries the callback's traceback (False when the worker made
    it up, e.g. for a wrong return type)."""
    return pytest.param(action, exc, match, cause, raised, id=id)


QUERY_VERBS = ["phase", "phase_text", "status", "status_text", "state", "error_text",
               "job_timeout", "job_has_blob_result", "job_blob_result_size", "info"]

ROWS = [
    # ---- Worker(concurrency)
    row("Worker-concurrency-0", lambda e: Worker(0), ValueError,
        "concurrency must be between 1 and 1024, not 0"),
    row("Worker-concurrency--1", lambda e: Worker(-1), ValueError, "between 1 and 1024"),
    row("Worker-concurrency-1025", lambda e: Worker(1025), ValueError, "not 1025"),
    row("Worker-concurrency-2**63", lambda e: Worker(2**63), ValueError, "between 1 and 1024"),
    row("Worker-concurrency-1.5", lambda e: Worker(1.5), TypeError,
        "concurrency must be an int, not float"),
    row("Worker-concurrency-True", lambda e: Worker(True), TypeError, "not bool"),
    row("Worker-concurrency-str", lambda e: Worker("2"), TypeError, "not str"),
    row("Worker-concurrency-None", lambda e: Worker(None), TypeError, "not NoneType"),
    row("Worker-concurrency-kw-0", lambda e: Worker(concurrency=0), ValueError, "concurrency"),

    # ---- start
    row("start-callback-None", lambda e: e.w.start(None, b"x"), TypeError,
        "callback must be callable, not NoneType"),
    row("start-callback-int", lambda e: e.w.start(42, b"x"), TypeError, "must be callable"),
    row("start-callback-str-name", lambda e: e.w.start("Echo", b"x"), TypeError,
        "must be callable, not str"),
    row("start-request-str", lambda e: e.w.start(noop, "abc"), TypeError,
        "request must be a bytes-like object, not str"),
    row("start-request-list", lambda e: e.w.start(noop, [65, 66, 67]), TypeError,
        "bytes-like object, not list"),
    row("start-request-None", lambda e: e.w.start(noop, None), TypeError, "not NoneType"),
    row("start-request-int", lambda e: e.w.start(noop, 3), TypeError, "not int"),
    row("start-timeout-str", lambda e: e.w.start(noop, b"x", "5000"), TypeError,
        TIMEOUT_TYPE + ", not str"),
    row("start-timeout-float", lambda e: e.w.start(noop, b"x", 5000.0), TypeError,
        TIMEOUT_TYPE + ", not float"),
    row("start-timeout-float--1.0", lambda e: e.w.start(noop, b"x", -1.0), TypeError,
        TIMEOUT_TYPE),
    row("start-route-timeout--1.0",
        lambda e: (e.w.open_route("r"), e.w.start(noop, b"x", -1.0, route="r")), TypeError,
        TIMEOUT_TYPE),
    row("start-timeout-None", lambda e: e.w.start(noop, b"x", None), TypeError,
        "not NoneType"),
    row("start-timeout-True", lambda e: e.w.start(noop, b"x", True), TypeError, "not bool"),
    row("start-timeout--2", lambda e: e.w.start(noop, b"x", -2), ValueError,
        TIMEOUT_RANGE + ", not -2"),
    row("start-timeout-2**31", lambda e: e.w.start(noop, b"x", 2**31), ValueError,
        TIMEOUT_RANGE),
    row("start-timeout-2**63", lambda e: e.w.start(noop, b"x", 2**63), ValueError,
        TIMEOUT_RANGE),
    row("start-timeout--2**63", lambda e: e.w.start(noop, b"x", -2**63), ValueError,
        TIMEOUT_RANGE),
    row("start-route-unknown", lambda e: e.w.start(noop, b"x", route="nope"),
        UnknownRouteError, "unknown route 'nope'"),
    row("start-route-int", lambda e: e.w.start(noop, b"x", route=5), TypeError, ROUTE_TYPE),
    row("start-route-empty", lambda e: e.w.start(noop, b"x", route=""), ValueError,
        ROUTE_NAME),

    # ---- start_text
    row("start_text-text-int", lambda e: e.w.start_text(noop, 5), TypeError,
        "text must be a str, not int"),
    row("start_text-text-bytes", lambda e: e.w.start_text(noop, b"abc"), TypeError,
        "text must be a str, not bytes"),
    row("start_text-text-None", lambda e: e.w.start_text(noop, None), TypeError,
        "not NoneType"),
    row("start_text-lone-surrogate", lambda e: e.w.start_text(noop, "a\ud800b"),
        UnicodeEncodeError, "surrogates not allowed"),
    row("start_text-callback-None", lambda e: e.w.start_text(None, "x"), TypeError,
        "must be callable"),
    row("start_text-timeout-1.5", lambda e: e.w.start_text(noop, "x", 1.5), TypeError,
        TIMEOUT_TYPE),
    row("start_text-timeout--1.0", lambda e: e.w.start_text(noop, "x", -1.0), TypeError,
        TIMEOUT_TYPE),
    row("start_text-timeout--2", lambda e: e.w.start_text(noop, "x", -2), ValueError,
        TIMEOUT_RANGE),

    # ---- start_many
    row("start_many-requests-None", lambda e: e.w.start_many(noop, None), TypeError,
        "not iterable"),
    row("start_many-request-str-inside", lambda e: e.w.start_many(noop, [b"a", "b"]),
        TypeError, "every request must be a bytes-like object, not str"),
    row("start_many-request-None-inside", lambda e: e.w.start_many(noop, [None]), TypeError,
        "not NoneType"),
    row("start_many-request-not-contiguous",
        lambda e: e.w.start_many(noop, [b"a", memoryview(b"abcd")[::2]]), BufferError,
        "every request must be a C-contiguous buffer; request 1 \\(memoryview\\) is not"),
    row("start_many-requests-bytes", lambda e: e.w.start_many(noop, b"ab"), TypeError,
        "not int"),
    row("start_many-callback-str", lambda e: e.w.start_many("cb", [b"a"]), TypeError,
        "must be callable"),
    row("start_many-timeout--2", lambda e: e.w.start_many(noop, [b"a"], -2), ValueError,
        TIMEOUT_RANGE),
    row("start_many-timeout-bool", lambda e: e.w.start_many(noop, [b"a"], False), TypeError,
        "not bool"),
    row("start_many-timeout--1.0", lambda e: e.w.start_many(noop, [b"a"], -1.0), TypeError,
        TIMEOUT_TYPE),

    # ---- wait: job ids
    row("wait-id-str", lambda e: e.w.wait("1"), TypeError, JOB_ID_TYPE + ", not str"),
    row("wait-id-float", lambda e: e.w.wait(1.0), TypeError, "not float"),
    row("wait-id-None", lambda e: e.w.wait(None), TypeError, "not NoneType"),
    row("wait-id-True", lambda e: e.w.wait(True), TypeError, "not bool"),
    row("wait-id-0", lambda e: e.w.wait(0, 0), UnknownJobError, UNKNOWN + " 0"),
    row("wait-id--1", lambda e: e.w.wait(-1, 0), UnknownJobError, UNKNOWN + " -1"),
    row("wait-id-never-issued", lambda e: e.w.wait(10**6, 0), UnknownJobError,
        UNKNOWN + " 1000000"),
    row("wait-id-2**63", lambda e: e.w.wait(2**63, 0), UnknownJobError, UNKNOWN),
    row("wait-id-2**64", lambda e: e.w.wait(2**64, 0), UnknownJobError,
        UNKNOWN + " 18446744073709551616"),
    row("wait-id-destroyed", lambda e: e.w.wait(e.destroyed(), 0), UnknownJobError,
        "already destroyed"),
    row("wait-twice", lambda e: [e.w.wait(j, WAIT_MS) for j in [e.w.start(noop, b"")] * 2],
        UnknownJobError, UNKNOWN),
    # ---- wait: timeouts
    row("wait-timeout-True", lambda e: e.w.wait(e.completed(), True), TypeError, "not bool"),
    row("wait-timeout-1.5", lambda e: e.w.wait(e.completed(), 1.5), TypeError,
        TIMEOUT_TYPE + ", not float"),
    row("wait-timeout-None", lambda e: e.w.wait(e.completed(), None), TypeError,
        "not NoneType"),
    row("wait-timeout-str", lambda e: e.w.wait(e.completed(), "5"), TypeError, "not str"),
    row("wait-timeout--2", lambda e: e.w.wait(e.completed(), -2), ValueError, TIMEOUT_RANGE),
    row("wait-timeout-2**31", lambda e: e.w.wait(e.completed(), 2**31), ValueError,
        TIMEOUT_RANGE),
    row("wait-timeout-2**63", lambda e: e.w.wait(e.completed(), 2**63), ValueError,
        TIMEOUT_RANGE),
    row("wait-timeout-expires", lambda e: e.w.wait(e.running(), 20), WaitTimeoutError,
        "did not complete within the wait timeout"),
    row("wait-timeout-0-queued", lambda e: e.w.wait(e.queued(), 0), WaitTimeoutError,
        "did not complete"),

    # ---- wait_complete
    row("wait_complete-id-str", lambda e: e.w.wait_complete("1", 0), TypeError, JOB_ID_TYPE),
    row("wait_complete-id-0", lambda e: e.w.wait_complete(0, 0), UnknownJobError, UNKNOWN),
    row("wait_complete-id-destroyed", lambda e: e.w.wait_complete(e.destroyed(), 0),
        UnknownJobError, UNKNOWN),
    row("wait_complete-id-2**64", lambda e: e.w.wait_complete(2**64, 0), UnknownJobError,
        UNKNOWN),
    row("wait_complete-timeout--2", lambda e: e.w.wait_complete(e.completed(), -2),
        ValueError, TIMEOUT_RANGE),
    row("wait_complete-timeout-2**63", lambda e: e.w.wait_complete(e.completed(), 2**63),
        ValueError, TIMEOUT_RANGE),
    row("wait_complete-timeout-None", lambda e: e.w.wait_complete(e.completed(), None),
        TypeError, TIMEOUT_TYPE),
    row("wait_complete-timeout-0.5", lambda e: e.w.wait_complete(e.completed(), 0.5),
        TypeError, TIMEOUT_TYPE),

    # ---- take / take_blob
    row("take-running", lambda e: e.w.take(e.running()), JobNotCompleteError, NOT_DONE),
    row("take-queued", lambda e: e.w.take(e.queued()), JobNotCompleteError, NOT_DONE),
    row("take_blob-running", lambda e: e.w.take_blob(e.running()), JobNotCompleteError,
        NOT_DONE),
    row("take-twice", lambda e: [e.w.take(j) for j in [e.completed()] * 2],
        UnknownJobError, UNKNOWN),
    row("take_blob-after-take", lambda e: [f(j) for j in [e.completed()]
                                           for f in (e.w.take, e.w.take_blob)],
        UnknownJobError, UNKNOWN),
    row("take-after-wait", lambda e: e.w.take(e.destroyed()), UnknownJobError, UNKNOWN),
    row("take-never-issued", lambda e: e.w.take(777), UnknownJobError, UNKNOWN + " 777"),
    row("take-id-None", lambda e: e.w.take(None), TypeError, JOB_ID_TYPE),
    row("take_blob-id-2**64", lambda e: e.w.take_blob(2**64), UnknownJobError, UNKNOWN),
    row("take_blob-id-str", lambda e: e.w.take_blob("3"), TypeError, JOB_ID_TYPE),
    row("take-cancelled", lambda e: e.w.take([e.w.cancel(j) and j for j in [e.queued()]][0]),
        JobCancelledError, "was cancelled"),

    # ---- cancel
    row("cancel-id-str", lambda e: e.w.cancel("1"), TypeError, JOB_ID_TYPE),
    row("cancel-id-float", lambda e: e.w.cancel(1.5), TypeError, "not float"),
    row("cancel-id-bool", lambda e: e.w.cancel(False), TypeError, "not bool"),
    row("cancel-id-unknown", lambda e: e.w.cancel(12345), UnknownJobError, UNKNOWN),
    row("cancel-id-destroyed", lambda e: e.w.cancel(e.destroyed()), UnknownJobError,
        UNKNOWN),
    row("cancel-id--1", lambda e: e.w.cancel(-1), UnknownJobError, UNKNOWN),

    # ---- query verbs: unknown and mistyped ids
    *[row(f"{verb}-id-unknown", lambda e, verb=verb: getattr(e.w, verb)(424242),
          UnknownJobError, UNKNOWN + " 424242") for verb in QUERY_VERBS],
    *[row(f"{verb}-id-destroyed", lambda e, verb=verb: getattr(e.w, verb)(e.destroyed()),
          UnknownJobError, UNKNOWN) for verb in QUERY_VERBS],
    *[row(f"{verb}-id-str", lambda e, verb=verb: getattr(e.w, verb)("1"), TypeError,
          JOB_ID_TYPE) for verb in QUERY_VERBS + ["job_known"]],
    row("job_known-id-None", lambda e: e.w.job_known(None), TypeError, "not NoneType"),
    row("job_blob_result_size-running", lambda e: e.w.job_blob_result_size(e.running()),
        JobNotCompleteError, NOT_DONE),
    row("job_blob_result_size-failed",
        lambda e: e.w.job_blob_result_size(e.completed(cb_raises(ValueError("boom")))),
        JobFailedError, "ValueError: boom", ValueError),

    # ---- job_meta
    row("job_meta-key-0", lambda e: e.w.job_meta(e.completed(), 0), ValueError,
        re.escape("key must be a JobMetaKey (1..7), not 0")),
    row("job_meta-key-8", lambda e: e.w.job_meta(e.completed(), 8), ValueError,
        re.escape("(1..7), not 8")),
    row("job_meta-key--1", lambda e: e.w.job_meta(e.completed(), -1), ValueError,
        "JobMetaKey"),
    row("job_meta-key-str-1", lambda e: e.w.job_meta(e.completed(), "1"), TypeError,
        "key must be an int, not str"),
    row("job_meta-key-float", lambda e: e.w.job_meta(e.completed(), 1.0), TypeError,
        "not float"),
    row("job_meta-key-None", lambda e: e.w.job_meta(e.completed(), None), TypeError,
        "not NoneType"),
    # an IntEnum member is an int: out of 1..7 it is a bad value (SPEC), not a bad type
    row("job_meta-key-RouteMetaKey-9", lambda e: e.w.job_meta(e.completed(),
                                                               RouteMetaKey.CLOSED_QUEUED),
        ValueError, "JobMetaKey"),
    row("job_meta-key-0-unknown-id", lambda e: e.w.job_meta(999, 0), ValueError, "JobMetaKey"),
    row("job_meta-phase-unknown-id", lambda e: e.w.job_meta(999, JobMetaKey.PHASE),
        UnknownJobError, UNKNOWN + " 999"),
    row("job_meta-size-destroyed",
        lambda e: e.w.job_meta(e.destroyed(), JobMetaKey.BLOB_RESULT_SIZE),
        UnknownJobError, UNKNOWN),
    row("job_meta-known-id-str", lambda e: e.w.job_meta("1", JobMetaKey.KNOWN), TypeError,
        JOB_ID_TYPE),

    # ---- routes
    row("open_route-empty", lambda e: e.w.open_route(""), ValueError, ROUTE_NAME),
    row("open_route-129-bytes", lambda e: e.w.open_route("r" * 129), ValueError, ROUTE_NAME),
    row("open_route-65-two-byte-chars", lambda e: e.w.open_route("é" * 65), ValueError,
        ROUTE_NAME),
    row("open_route-NUL", lambda e: e.w.open_route("a\0b"), ValueError, "without NUL"),
    row("open_route-int", lambda e: e.w.open_route(5), TypeError, ROUTE_TYPE + ", not int"),
    row("open_route-None", lambda e: e.w.open_route(None), TypeError, ROUTE_TYPE),
    row("open_route-bytes", lambda e: e.w.open_route(b"r"), TypeError, "not bytes"),
    row("open_route-default-exists", lambda e: e.w.open_route("default"), ValueError,
        "exists already"),
    row("open_route-twice", lambda e: [e.w.open_route("r") for _ in range(2)], ValueError,
        "a route named 'r' exists already"),
    row("open_route-concurrency-0", lambda e: e.w.open_route("r", concurrency=0), ValueError,
        "concurrency must be between 1 and 1024"),
    row("open_route-concurrency-True", lambda e: e.w.open_route("r", concurrency=True),
        TypeError, "concurrency must be an int, not bool"),
    row("open_route-timeout--2", lambda e: e.w.open_route("r", timeout_ms=-2), ValueError,
        TIMEOUT_RANGE),
    row("open_route-timeout-float", lambda e: e.w.open_route("r", timeout_ms=1.0), TypeError,
        TIMEOUT_TYPE),
    row("close_route-unknown", lambda e: e.w.close_route("nope"), UnknownRouteError,
        "unknown route 'nope'"),
    row("close_route-empty", lambda e: e.w.close_route(""), ValueError, ROUTE_NAME),
    row("close_route-129-bytes", lambda e: e.w.close_route("r" * 129), ValueError,
        ROUTE_NAME),
    row("close_route-int", lambda e: e.w.close_route(1), TypeError, ROUTE_TYPE),
    row("close_route-None", lambda e: e.w.close_route(None), TypeError, ROUTE_TYPE),
    row("wait_drained-unknown", lambda e: e.w.wait_drained("nope", 0), UnknownRouteError,
        "unknown route"),
    row("wait_drained-None", lambda e: e.w.wait_drained(None, 0), TypeError, ROUTE_TYPE),
    row("wait_drained-timeout--2", lambda e: e.w.wait_drained("default", -2), ValueError,
        TIMEOUT_RANGE),
    row("wait_drained-timeout-1.5", lambda e: e.w.wait_drained("default", 1.5), TypeError,
        TIMEOUT_TYPE),
    row("route_meta-unknown", lambda e: e.w.route_meta("nope", RouteMetaKey.STATE),
        UnknownRouteError, "unknown route 'nope'"),
    row("route_meta-key-0", lambda e: e.w.route_meta("default", 0), ValueError,
        re.escape("key must be a RouteMetaKey (1..9), not 0")),
    row("route_meta-key-10", lambda e: e.w.route_meta("default", 10), ValueError,
        "RouteMetaKey"),
    row("route_meta-key-str", lambda e: e.w.route_meta("default", "1"), TypeError,
        "key must be an int, not str"),
    row("route_meta-known-too-long", lambda e: e.w.route_meta("r" * 129, RouteMetaKey.KNOWN),
        ValueError, ROUTE_NAME),
    row("route_meta-known-int", lambda e: e.w.route_meta(3, RouteMetaKey.KNOWN), TypeError,
        ROUTE_TYPE),
    row("route_meta-None", lambda e: e.w.route_meta(None, RouteMetaKey.STATE), TypeError,
        ROUTE_TYPE),
    row("route_info-unknown", lambda e: e.w.route_info("nope"), UnknownRouteError,
        "unknown route 'nope'"),
    row("route_info-empty", lambda e: e.w.route_info(""), ValueError, ROUTE_NAME),
    row("route_info-int", lambda e: e.w.route_info(3), TypeError, ROUTE_TYPE),
    row("route_info-None", lambda e: e.w.route_info(None), TypeError, ROUTE_TYPE),
    row("route_info-list", lambda e: e.w.route_info(["default"]), TypeError, ROUTE_TYPE),

    # ---- close(drain=...)
    row("close-drain-str", lambda e: e.w.close(drain="yes"), TypeError,
        "drain must be a bool, not str"),
    row("close-drain-int", lambda e: e.w.close(drain=1), TypeError, "not int"),
    row("close-drain-None", lambda e: e.w.close(drain=None), TypeError, "not NoneType"),

    # ---- every verb after close
    row("closed-start", on_closed(lambda w, j: w.start(noop, b"x", 5000)), WorkerClosedError,
        CLOSED),
    row("closed-start_text", on_closed(lambda w, j: w.start_text(noop, "x")),
        WorkerClosedError, CLOSED),
    row("closed-start_many", on_closed(lambda w, j: w.start_many(noop, [b"x"])),
        WorkerClosedError, CLOSED),
    row("closed-wait", on_closed(lambda w, j: w.wait(j, 0)), WorkerClosedError, CLOSED),
    row("closed-wait_complete", on_closed(lambda w, j: w.wait_complete(j, 0)),
        WorkerClosedError, CLOSED),
    row("closed-take", on_closed(lambda w, j: w.take(j)), WorkerClosedError, CLOSED),
    row("closed-take_blob", on_closed(lambda w, j: w.take_blob(j)), WorkerClosedError,
        CLOSED),
    row("closed-cancel", on_closed(lambda w, j: w.cancel(j)), WorkerClosedError, CLOSED),
    *[row(f"closed-{verb}", on_closed(lambda w, j, verb=verb: getattr(w, verb)(j)),
          WorkerClosedError, CLOSED) for verb in QUERY_VERBS + ["job_known"]],
    row("closed-job_meta", on_closed(lambda w, j: w.job_meta(j, JobMetaKey.PHASE)),
        WorkerClosedError, CLOSED),
    row("closed-job_meta-known", on_closed(lambda w, j: w.job_meta(j, JobMetaKey.KNOWN)),
        WorkerClosedError, CLOSED),
    row("closed-open_route", on_closed(lambda w, j: w.open_route("r")), WorkerClosedError,
        CLOSED),
    row("closed-close_route", on_closed(lambda w, j: w.close_route("default")),
        WorkerClosedError, CLOSED),
    row("closed-wait_drained", on_closed(lambda w, j: w.wait_drained("default", 0)),
        WorkerClosedError, CLOSED),
    row("closed-route_meta", on_closed(lambda w, j: w.route_meta("default", 1)),
        WorkerClosedError, CLOSED),
    row("closed-route_info", on_closed(lambda w, j: w.route_info("default")),
        WorkerClosedError, CLOSED),
    row("closed-wait-unknown-id", on_closed(lambda w, j: w.wait(j + 1000, 0)),
        WorkerClosedError, CLOSED),

    # ---- asyncmeta helpers
    row("has_capability-mask-str", lambda e: asyncmeta.has_capability("1", 1), TypeError,
        "mask must be an int, not str"),
    row("has_capability-capability-None", lambda e: asyncmeta.has_capability(1, None),
        TypeError, "capability must be an int, not NoneType"),
    row("has_all_capabilities-mask-float", lambda e: asyncmeta.has_all_capabilities(1.0, 1),
        TypeError, "mask must be an int, not float"),
    row("has_all_capabilities-required-bool",
        lambda e: asyncmeta.has_all_capabilities(4095, True), TypeError,
        "required must be an int, not bool"),
    row("supports_job_inspect-None", lambda e: asyncmeta.supports_job_inspect(None),
        TypeError, "mask must be an int"),
    row("supports_blob_job-str", lambda e: asyncmeta.supports_blob_job("3701"), TypeError,
        "not str"),
    row("supports_route_control-bool", lambda e: asyncmeta.supports_route_control(True),
        TypeError, "not bool"),
    row("supports_route_service-float", lambda e: asyncmeta.supports_route_service(4095.0),
        TypeError, "not float"),

    # ---- callbacks that misbehave: the job fails, the waiter gets the cause
    row("callback-raises-ValueError", lambda e: e.run(cb_raises(ValueError("boom"))),
        JobFailedError, "ValueError: boom", ValueError),
    row("callback-raises-KeyError", lambda e: e.run(cb_raises(KeyError("k"))),
        JobFailedError, "KeyError: 'k'", KeyError),
    row("callback-raises-cbw-error", lambda e: e.run(cb_raises(UnknownJobError(5))),
        JobFailedError, "UnknownJobError: unknown job id 5", UnknownJobError),
    row("callback-raises-SystemExit", lambda e: e.run(cb_raises(SystemExit(3))),
        JobFailedError, "SystemExit: 3", SystemExit),
    row("callback-raises-KeyboardInterrupt", lambda e: e.run(cb_raises(KeyboardInterrupt())),
        JobFailedError, "KeyboardInterrupt", KeyboardInterrupt),
    row("callback-raises-unprintable", lambda e: e.run(cb_raises(BadStr())), JobFailedError,
        "BadStr", BadStr),
    row("callback-returns-str", lambda e: e.run(lambda r: "text"), JobFailedError,
        "callback returned str; expected None, an int or a bytes-like object", TypeError, raised=False),
    row("callback-returns-list", lambda e: e.run(lambda r: [1, 2]), JobFailedError,
        "callback returned list", TypeError, raised=False),
    row("callback-returns-float", lambda e: e.run(lambda r: 1.5), JobFailedError,
        "callback returned float", TypeError, raised=False),
    row("callback-returns-dict", lambda e: e.run(lambda r: {}), JobFailedError,
        "callback returned dict", TypeError, raised=False),
    row("callback-returns-non-contiguous-view",
        lambda e: e.run(lambda r: memoryview(b"abcdef")[::2]), JobFailedError,
        r"TypeError: callback returned a memoryview that cannot be the response "
        r"\(memoryview: underlying buffer is not C-contiguous\)", TypeError, raised=False),
    row("callback-returns-released-view", lambda e: e.run(cb_returns_released_view),
        JobFailedError, "callback returned a memoryview that cannot be the response "
        r"\(operation forbidden on released memoryview object\)", TypeError, raised=False),
    row("callback-signature-no-args", lambda e: e.run(lambda: None), JobFailedError,
        "takes 0 positional arguments but 1 was given", TypeError),
    row("callback-signature-two-args", lambda e: e.run(lambda a, b: None), JobFailedError,
        "missing 1 required positional argument", TypeError),
    row("callback-returns-kept-slice", lambda e: e.run(cb_escape_returned_slice),
        JobFailedError, "kept a view of its request", BufferError, raised=False),
    row("callback-keeps-slice", lambda e: e.run(cb_escape_kept_slice), JobFailedError,
        "kept a view of its request", BufferError, raised=False),
    row("callback-keeps-cast", lambda e: e.run(cb_escape_kept_cast), JobFailedError,
        "kept a view", BufferError, raised=False),
    row("callback-keeps-slice-releases-view", lambda e: e.run(cb_escape_slice_after_release),
        JobFailedError, "kept a view of its request", BufferError, raised=False),
    row("callback-keeps-slice-from-with", lambda e: e.run(cb_escape_slice_from_with),
        JobFailedError, "kept a view of its request", BufferError, raised=False),
    row("callback-writes-past-end", lambda e: e.run(lambda r: r.__setitem__(3, 0)),
        JobFailedError, "IndexError", IndexError),
    row("callback-resizes-view", lambda e: e.run(lambda r: r.__setitem__(slice(0, 3), b"x")),
        JobFailedError, "ValueError", ValueError),
    row("callback-runs-past-timeout", lambda e: e.run(cb_spin, b"", 50), JobTimeoutError,
        "timed out"),
    # waits that could never end raise instead of hanging
    row("callback-waits-for-job-queued-behind-it", lambda e: e.run(cb_wait_behind(e)),
        JobFailedError, "DeadlockError: waiting for job", DeadlockError),
    row("callback-close-drain-own-worker", lambda e: e.run(lambda r: e.w.close(drain=True)),
        JobFailedError, r"DeadlockError: close\(drain=True\) cannot be called", DeadlockError),
    row("cancelled-job-wait", lambda e: e.w.wait([e.w.cancel(j) and j
                                                  for j in [e.queued()]][0], 0),
        JobCancelledError, "was cancelled"),
]


def test_at_least_45_rows():
    assert len(ROWS) >= 45


@pytest.mark.parametrize("action, exc, match, cause, raised", ROWS)
def test_bad_input(action, exc, match, cause, raised):
    env = Env()
    try:
        with pytest.raises(exc, match=match) as excinfo:
            action(env)
        assert isinstance(excinfo.value, exc)
        if issubclass(exc, CallbackWorkerError) or exc in (TypeError, ValueError):
            # the exact class, not merely a subclass
            assert type(excinfo.value) is exc, type(excinfo.value)
        if cause is not None:
            assert type(excinfo.value.__cause__) is cause, repr(excinfo.value.__cause__)
            if raised:
                assert excinfo.value.__cause__.__traceback__ is not None
        # whatever the mistake, the worker (if still open) keeps working
        if not env.w._closed:
            env.release()
            ok = env.w.start_text(lambda r: bytes(r).upper(), "ok")
            assert env.w.wait_complete(ok, WAIT_MS) is True
    finally:
        env.close()
        _kept.clear()


def test_a_non_contiguous_response_fails_with_its_reason_and_logs_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason is in error_text, the BufferError behind it is kept as
    the cause's cause, and nothing is reported as an ignored exception."""
    unraisable: list = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    w = Worker()
    try:
        jid = w.start(lambda r: memoryview(b"abcdef")[::2], b"abc")
        with pytest.raises(JobFailedError) as excinfo:
            w.wait(jid, WAIT_MS)
    finally:
        w.close()
    assert "not C-contiguous" in excinfo.value.error_text
    assert type(excinfo.value.__cause__) is TypeError
    assert type(excinfo.value.__cause__.__cause__) is BufferError
    assert unraisable == []


def test_bad_input_from_8_threads_at_once():
    """Mistakes from 8 threads on one worker: no crash, no hang, the right
    exception every time, and the worker still works afterwards."""
    w = Worker(concurrency=2)
    done = w.start(noop, b"abc", 5000)
    assert w.wait_complete(done, WAIT_MS)
    gone = w.start(noop, b"abc", 5000)
    w.wait(gone, WAIT_MS)

    calls = [
        (lambda: w.wait("1"), TypeError),
        (lambda: w.wait(0, 0), UnknownJobError),
        (lambda: w.wait(gone, 0), UnknownJobError),
        (lambda: w.wait(2**64, 0), UnknownJobError),
        (lambda: w.wait(done, -2), ValueError),
        (lambda: w.wait(done, 1.5), TypeError),
        (lambda: w.take(gone), UnknownJobError),
        (lambda: w.cancel(None), TypeError),
        (lambda: w.phase(-1), UnknownJobError),
        (lambda: w.info(10**9), UnknownJobError),
        (lambda: w.job_meta(done, 0), ValueError),
        (lambda: w.job_meta(done, "1"), TypeError),
        (lambda: w.job_meta(gone, JobMetaKey.PHASE), UnknownJobError),
        (lambda: w.start(None, b"x"), TypeError),
        (lambda: w.start(noop, "str"), TypeError),
        (lambda: w.start(noop, b"x", 2**63), ValueError),
        (lambda: w.start_text(noop, 5), TypeError),
        (lambda: w.start_many(noop, [b"a", None]), TypeError),
        (lambda: w.open_route(""), ValueError),
        (lambda: w.route_info("nope"), UnknownRouteError),
        (lambda: w.route_meta("default", 0), ValueError),
        (lambda: w.close(drain="x"), TypeError),
        (lambda: w.wait(w.start(cb_raises(ValueError("boom")), b"x"), WAIT_MS),
         JobFailedError),
        (lambda: w.wait(w.start(lambda r: "str", b"x"), WAIT_MS), JobFailedError),
        (lambda: w.wait(w.start(lambda: None, b"x"), WAIT_MS), JobFailedError),
    ]
    n_threads, rounds = 8, 40
    barrier = threading.Barrier(n_threads, timeout=WAIT_S)
    problems: list = []
    good: list = []

    def hammer(t: int) -> None:
        try:
            barrier.wait()
            for r in range(rounds):
                for i, (call, exc) in enumerate(calls):
                    try:
                        call()
                    except exc:
                        pass
                    except BaseException as other:  # noqa: BLE001
                        problems.append((t, i, repr(other)))
                    else:
                        problems.append((t, i, "no exception"))
                payload = bytes([t, r])
                good.append(w.wait(w.start(lambda req: bytes(req) * 2, payload), WAIT_MS)
                            == payload * 2)
        except BaseException as exc:  # noqa: BLE001
            problems.append((t, -1, repr(exc)))

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert problems == []
        assert good == [True] * (n_threads * rounds)
        # the completed job survived all of it, and exactly one of 8 racing takes wins
        results: list = []

        def take() -> None:
            try:
                results.append(w.take(done))
            except UnknownJobError:
                results.append("unknown")

        takers = [threading.Thread(target=take) for _ in range(n_threads)]
        for t in takers:
            t.start()
        for t in takers:
            t.join(WAIT_S)
        assert sorted(results, key=str) == [b"abc"] + ["unknown"] * (n_threads - 1)
    finally:
        assert w.close() == 0
