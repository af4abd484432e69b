"""The Worker, one test per documented behaviour of the callbackworker reference
(seeds/callbackworker-plugin-reference.txt) and of SPEC.md section 2.

Ordering is made deterministic with ``threading.Event``: a ``Gate`` callback
occupies a worker thread until the test releases it, so "queued" and
"running" are states the test controls, never a race.  Sleeps are only used
as the (short) timeout of a wait that is expected to time out.
"""

from __future__ import annotations

import array
import os
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import pytest

import callbackworker
from callbackworker import (
    CallbackWorkerError,
    JobCancelledError,
    JobFailedError,
    JobMetaKey,
    JobNotCompleteError,
    JobTimeoutError,
    Phase,
    Profile,
    RouteMetaKey,
    ShutdownError,
    State,
    Status,
    UnknownJobError,
    WaitTimeoutError,
    Worker,
    WorkerClosedError,
)
from callbackworker.asyncmeta import supports_blob_job

WAIT_MS = 10_000          # "should complete": generous, never reached when all is well
WAIT_S = WAIT_MS / 1000
SHORT_MS = 50             # the timeout of a wait that is expected to time out
REQ = bytes([65, 66, 67])  # the reference's $req


# ---------------------------------------------------------------- helpers


_open_gates: list = []


class Gate:
    """A callback that signals when it starts, then blocks until released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        _open_gates.append(self)

    def __call__(self, request: memoryview) -> None:
        self.started.set()
        if not self.release.wait(WAIT_S):
            raise RuntimeError("gate never released")


def occupy(w: Worker) -> tuple:
    """Starts a Gate job and waits until it is running on a worker thread."""
    gate = Gate()
    jid = w.start(gate, b"gate", WAIT_MS)
    assert gate.started.wait(WAIT_S), "the gate job never started"
    return gate, jid


def echo(request: memoryview) -> int:
    """The reference's Echo: leaves the bytes as they are, returns 1."""
    return 1


def noop(request: memoryview) -> None:
    return None


def fail_value_error(request: memoryview) -> None:
    raise ValueError("boom")


def release_gates() -> None:
    while _open_gates:
        _open_gates.pop().release.set()


@pytest.fixture
def worker():
    w = Worker()
    try:
        yield w
    finally:
        release_gates()
        w.close()


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)


def completed_job(w: Worker, kind: str) -> int:
    """A job completed in one of the four ways a job can complete in place."""
    if kind == "success":
        jid = w.start(echo, REQ, 5000)
    elif kind == "error":
        jid = w.start(fail_value_error, REQ, 5000)
    elif kind == "timeout":
        never = threading.Event()

        def spin(request: memoryview) -> None:
            while True:
                never.wait(0.005)

        jid = w.start(spin, REQ, 100)
    elif kind == "cancelled":
        gate, _ = occupy(w)
        jid = w.start(echo, REQ, 5000)
        assert w.cancel(jid) is True
        gate.release.set()
    else:  # pragma: no cover
        raise AssertionError(kind)
    assert w.wait_complete(jid, WAIT_MS) is True
    return jid


# ---------------------------------------------------------------- Capabilities


def test_capabilities_is_profile_blob_job_3701(worker):
    caps = worker.capabilities()
    assert type(caps) is int
    # The reference: 3701 = ProfileBlobJob.  SPEC: always a superset of it; a
    # worker with routes reports Profile.ROUTE_SERVICE (4095).
    assert caps & 3701 == 3701
    assert caps & Profile.BLOB_JOB == Profile.BLOB_JOB
    assert supports_blob_job(caps)
    assert caps == Profile.ROUTE_SERVICE == 4095


def test_capabilities_fixed_for_worker_life(worker):
    before = worker.capabilities()
    gate, jid = occupy(worker)
    queued = worker.start(echo, REQ, 5000)
    assert worker.capabilities() == before
    gate.release.set()
    worker.wait(queued, WAIT_MS)
    worker.wait(jid, WAIT_MS)
    assert worker.capabilities() == before
    assert Worker(concurrency=3).capabilities() == before


def test_reference_capabilities_example(worker):
    # printf("%d\n", Capabilities()); printf("%d\n", Capabilities() == ProfileBlobJob())
    # -> "3701 1": with routes the Python worker reports 4095, which holds 3701.
    caps = worker.capabilities()
    assert int((caps & Profile.BLOB_JOB) == Profile.BLOB_JOB) == 1


# ---------------------------------------------------------------- Start


def test_start_returns_positive_job_id(worker):
    jid = worker.start(echo, REQ, 5000)
    assert type(jid) is int
    assert jid > 0
    assert int(jid > 0) == 1  # the reference prints ($jobId > 0) -> 1


def test_job_ids_unique_and_never_reused(worker):
    seen = set()
    for _ in range(20):
        jid = worker.start(noop, b"x")
        assert jid not in seen
        seen.add(jid)
        worker.wait(jid, WAIT_MS)  # destroyed: its id must still never come back
    ids = worker.start_many(noop, [b"a"] * 20)
    assert not seen & set(ids)
    assert len(set(ids)) == 20
    for jid in ids:
        worker.wait(jid, WAIT_MS)


def test_start_copies_request(worker):
    gate, _ = occupy(worker)
    request = bytearray(b"abc")
    jid = worker.start(noop, request, 5000)
    request[:] = b"XYZ"  # the job was started already: it has its own copy
    request.extend(b"more")
    gate.release.set()
    assert worker.wait(jid, WAIT_MS) == b"abc"
    assert request == bytearray(b"XYZmore")


def test_start_does_not_modify_callers_request(worker):
    request = bytearray(b"abc")

    def upper(req: memoryview) -> None:
        req[:] = bytes(req).upper()

    assert worker.wait(worker.start(upper, request), WAIT_MS) == b"ABC"
    assert request == bytearray(b"abc")


@pytest.mark.parametrize("request_obj, expected", [
    (b"abc", b"abc"),
    (bytearray(b"abc"), b"abc"),
    (memoryview(b"xabcx")[1:4], b"abc"),
    (array.array("B", [97, 98, 99]), b"abc"),
    (b"", b""),
], ids=["bytes", "bytearray", "memoryview-slice", "array", "empty"])
def test_start_accepts_any_bytes_like(worker, request_obj, expected):
    assert worker.wait(worker.start(noop, request_obj, 5000), WAIT_MS) == expected


def test_start_text_passes_utf8(worker):
    seen = []

    def record(request: memoryview) -> None:
        seen.append(bytes(request))

    for text in ["hello", "", "héllo wörld", "日本語", "emoji \U0001F600"]:
        assert worker.wait(worker.start_text(record, text, 5000), WAIT_MS) == text.encode("utf-8")
        assert seen.pop() == text.encode("utf-8")


def test_start_text_in_place_edit_becomes_response(worker):
    def upper(request: memoryview) -> None:
        request[:] = bytes(request).upper()

    assert worker.wait(worker.start_text(upper, "hello", 5000), WAIT_MS) == b"HELLO"


def test_reference_start_borrowed_text_example(worker):
    jid = worker.start_text(echo, "hello", 5000)
    assert int(jid > 0) == 1


def test_start_many_returns_ids_in_order(worker):
    gate, _ = occupy(worker)
    requests = [bytes([i]) * (i + 1) for i in range(10)]
    ids = worker.start_many(noop, requests, 5000)
    assert type(ids) is list and len(ids) == 10
    assert all(type(i) is int and i > 0 for i in ids)
    assert ids == sorted(ids)
    for jid in ids:
        assert worker.phase(jid) == Phase.QUEUED
        assert worker.job_timeout(jid) == 5000
    gate.release.set()
    assert [worker.wait(jid, WAIT_MS) for jid in ids] == requests


def test_start_many_same_semantics_as_start(worker):
    def double(request: memoryview) -> bytes:
        return bytes(request) * 2

    ids = worker.start_many(double, iter([b"a", bytearray(b"bc"), memoryview(b"d")]))
    assert [worker.wait(j, WAIT_MS) for j in ids] == [b"aa", b"bcbc", b"dd"]
    assert [worker.job_known(j) for j in ids] == [False] * 3


def test_start_many_reads_every_kind_of_buffer(worker):
    """Each request is copied as its bytes, whatever object exports them."""

    class Blob(bytes):
        pass

    requests = [b"", Blob(b"sub"), bytearray(b"ba"), array.array("H", [1, 2]),
                memoryview(b"abcdef")[1:4], memoryview(bytearray(b"wxyz")).cast("I")]
    ids = worker.start_many(noop, requests)
    assert worker.wait_many(ids, WAIT_MS) == [bytes(memoryview(r)) for r in requests]


def test_start_many_with_a_non_contiguous_request_starts_nothing(worker):
    gate, _ = occupy(worker)
    with pytest.raises(BufferError, match="request 1 \\(memoryview\\) is not"):
        worker.start_many(noop, [b"a", memoryview(b"abcd")[::2], b"c"])
    assert worker.route_meta("default", RouteMetaKey.QUEUED) == 0
    gate.release.set()


def test_start_many_empty_returns_empty_list(worker):
    assert worker.start_many(noop, []) == []


# ---------------------------------------------------------------- callbacks


def test_callback_gets_writable_memoryview_format_b(worker):
    seen = {}

    def inspect_view(request: memoryview) -> None:
        seen["type"] = type(request)
        seen["format"] = request.format
        seen["readonly"] = request.readonly
        seen["len"] = len(request)
        seen["bytes"] = request.tobytes()

    worker.wait(worker.start(inspect_view, REQ, 5000), WAIT_MS)
    assert seen == {"type": memoryview, "format": "B", "readonly": False, "len": 3,
                    "bytes": REQ}


def test_in_place_edit_becomes_response(worker):
    def edit(request: memoryview) -> None:
        request[0] = ord("x")
        request[2] = ord("z")

    assert worker.wait(worker.start(edit, REQ, 5000), WAIT_MS) == b"xBz"


@pytest.mark.parametrize("result", [b"a much longer response than the request",
                                    b"", b"q"], ids=["longer", "empty", "shorter"])
def test_returning_bytes_replaces_response_even_longer(worker, result):
    def replace(request: memoryview) -> bytes:
        request[0] = 0  # in-place edits are overridden by the returned object
        return result

    jid = worker.start(replace, REQ, 5000)
    assert worker.wait_complete(jid, WAIT_MS)
    assert worker.job_blob_result_size(jid) == len(result)
    assert worker.take(jid) == result


@pytest.mark.parametrize("make", [bytearray, lambda b: memoryview(b),
                                  lambda b: array.array("B", b)],
                         ids=["bytearray", "memoryview", "array"])
def test_returning_bytes_like_replaces_response(worker, make):
    assert worker.wait(worker.start(lambda r: make(b"new!"), REQ), WAIT_MS) == b"new!"


def test_returning_the_request_view_keeps_response(worker):
    def same(request: memoryview) -> memoryview:
        request[1] = ord("b")
        return request

    assert worker.wait(worker.start(same, REQ), WAIT_MS) == b"AbC"


def test_returning_int_is_recorded_in_info(worker):
    jid = worker.start(lambda r: 7, REQ, 5000)
    assert worker.wait_complete(jid, WAIT_MS)
    fields = dict(p.split("=", 1) for p in worker.info(jid).split())
    assert "7" in fields.values()
    assert worker.status(jid) == Status.OK
    assert worker.take(jid) == REQ  # otherwise ignored


def test_returning_none_keeps_request_as_response(worker):
    jid = worker.start(noop, REQ, 5000)
    assert worker.wait(jid, WAIT_MS) == REQ


def test_callback_exception_fails_job_with_cause_and_traceback(worker):
    def deep() -> None:
        raise LookupError("missing thing")

    def callback(request: memoryview) -> None:
        deep()

    jid = worker.start(callback, REQ, 5000)
    with pytest.raises(JobFailedError) as excinfo:
        worker.wait(jid, WAIT_MS)
    err = excinfo.value
    assert type(err) is JobFailedError
    assert err.job_id == jid
    assert err.status == Status.ERROR
    assert err.error_text == "LookupError: missing thing"
    cause = err.__cause__
    assert type(cause) is LookupError and str(cause) == "missing thing"
    frames = [f.name for f in traceback.extract_tb(cause.__traceback__)]
    assert "callback" in frames and "deep" in frames
    assert worker.job_known(jid) is False  # wait destroyed the failed job


def test_error_text_is_exc_type_and_message(worker):
    jid = completed_job(worker, "error")
    assert worker.error_text(jid) == "ValueError: boom"
    assert worker.status(jid) == Status.ERROR


def test_error_text_empty_on_success_and_before_completion(worker):
    gate, running = occupy(worker)
    queued = worker.start(echo, REQ, 5000)
    assert worker.error_text(running) == ""
    assert worker.error_text(queued) == ""
    gate.release.set()
    assert worker.wait_complete(queued, WAIT_MS)
    assert worker.error_text(queued) == ""


def test_memoryview_released_when_callback_returns(worker):
    kept = []

    def keep(request: memoryview) -> None:
        kept.append(request)

    assert worker.wait(worker.start(keep, REQ), WAIT_MS) == REQ
    with pytest.raises(ValueError, match="released"):
        kept[0][0]


def test_methods_callable_from_inside_callback(worker):
    seen = {}

    def inner(request: memoryview) -> None:
        seen["caps"] = worker.capabilities()
        other = worker.start(echo, b"inner", 5000)
        seen["other"] = other
        seen["phase"] = worker.phase(other)  # queued behind this one (FIFO, 1 thread)
        seen["known"] = worker.job_known(other)

    worker.wait(worker.start(inner, REQ), WAIT_MS)
    assert seen["caps"] == worker.capabilities()
    assert seen["phase"] == Phase.QUEUED and seen["known"] is True
    assert worker.wait(seen["other"], WAIT_MS) == b"inner"


# ---------------------------------------------------------------- Wait


def test_wait_returns_response_and_destroys_job(worker):
    jid = worker.start(echo, REQ, 5000)
    resp = worker.wait(jid, 5000)
    assert type(resp) is bytes and resp == REQ
    assert worker.job_known(jid) is False
    assert worker.job_meta(jid, JobMetaKey.KNOWN) == 0
    with pytest.raises(UnknownJobError):
        worker.phase(jid)
    with pytest.raises(UnknownJobError):
        worker.wait(jid, 0)


def test_wait_blocks_until_completion(worker):
    gate, jid = occupy(worker)
    result = {}

    def waiter() -> None:
        result["resp"] = worker.wait(jid, WAIT_MS)

    t = threading.Thread(target=waiter)
    t.start()
    assert worker.phase(jid) == Phase.RUNNING
    gate.release.set()
    t.join(WAIT_S)
    assert not t.is_alive()
    assert result["resp"] == b"gate"


def test_wait_default_timeout_is_infinite(worker):
    assert worker.wait(worker.start(echo, REQ)) == REQ


def test_wait_timeout_raises_wait_timeout_error_and_leaves_job(worker):
    gate, jid = occupy(worker)
    queued = worker.start(echo, REQ, 5000)
    with pytest.raises(WaitTimeoutError) as excinfo:
        worker.wait(queued, SHORT_MS)
    assert isinstance(excinfo.value, TimeoutError)
    assert isinstance(excinfo.value, CallbackWorkerError)
    with pytest.raises(WaitTimeoutError):
        worker.wait(jid, 0)
    assert worker.job_known(queued) and worker.phase(queued) == Phase.QUEUED
    assert worker.job_known(jid) and worker.phase(jid) == Phase.RUNNING
    gate.release.set()
    assert worker.wait(queued, WAIT_MS) == REQ  # may be waited for again
    assert worker.wait(jid, WAIT_MS) == b"gate"


def test_wait_failed_job_raises_and_destroys(worker):
    jid = completed_job(worker, "error")
    with pytest.raises(JobFailedError, match="ValueError: boom"):
        worker.wait(jid, WAIT_MS)
    assert worker.job_known(jid) is False


# ---------------------------------------------------------------- WaitComplete


def test_wait_complete_does_not_destroy(worker):
    jid = worker.start(echo, REQ, 5000)
    assert worker.wait_complete(jid, 5000) is True
    assert worker.job_known(jid) is True
    assert worker.phase(jid) == Phase.COMPLETED
    assert worker.wait_complete(jid, 5000) is True  # again: still there
    assert worker.wait_complete(jid, 0) is True
    assert worker.info(jid)
    assert worker.take(jid) == REQ


def test_wait_complete_timeout_returns_false_and_leaves_job(worker):
    gate, jid = occupy(worker)
    assert worker.wait_complete(jid, SHORT_MS) is False
    assert worker.wait_complete(jid, 0) is False
    assert worker.phase(jid) == Phase.RUNNING
    gate.release.set()
    assert worker.wait_complete(jid, WAIT_MS) is True


def test_wait_complete_on_failed_job_returns_true_without_raising(worker):
    jid = worker.start(fail_value_error, REQ, 5000)
    assert worker.wait_complete(jid, WAIT_MS) is True
    assert worker.status(jid) == Status.ERROR
    assert worker.job_known(jid)


# ---------------------------------------------------------------- Take / TakeBlob


def test_take_returns_response_and_destroys_job(worker):
    jid = completed_job(worker, "success")
    assert worker.take(jid) == REQ
    assert worker.job_known(jid) is False
    with pytest.raises(UnknownJobError):
        worker.take(jid)


def test_take_is_synonym_of_take_blob(worker):
    a = completed_job(worker, "success")
    b = completed_job(worker, "success")
    assert worker.take(a) == worker.take_blob(b) == REQ
    assert worker.job_known(a) is worker.job_known(b) is False
    for verb in (worker.take, worker.take_blob):
        with pytest.raises(UnknownJobError):
            verb(a)
    gate, running = occupy(worker)
    for verb in (worker.take, worker.take_blob):
        with pytest.raises(JobNotCompleteError):
            verb(running)
    gate.release.set()
    for verb in (worker.take, worker.take_blob):
        failed = completed_job(worker, "error")
        with pytest.raises(JobFailedError, match="ValueError: boom"):
            verb(failed)


def test_take_before_completion_raises_job_not_complete(worker):
    gate, running = occupy(worker)
    queued = worker.start(echo, REQ, 5000)
    for jid in (running, queued):
        with pytest.raises(JobNotCompleteError):
            worker.take(jid)
        with pytest.raises(JobNotCompleteError):
            worker.take_blob(jid)
        assert worker.job_known(jid) is True  # untouched
    gate.release.set()
    assert worker.wait_complete(queued, WAIT_MS)
    assert worker.take(queued) == REQ
    assert worker.take(running) == b"gate"


def test_take_failed_job_raises_and_destroys(worker):
    jid = completed_job(worker, "error")
    with pytest.raises(JobFailedError) as excinfo:
        worker.take(jid)
    assert type(excinfo.value.__cause__) is ValueError
    assert worker.job_known(jid) is False


# ---------------------------------------------------------------- Cancel


def test_cancel_running_job_returns_false(worker):
    gate, running = occupy(worker)
    assert worker.cancel(running) is False
    assert worker.phase(running) == Phase.RUNNING
    gate.release.set()
    assert worker.wait(running, WAIT_MS) == b"gate"


def test_cancel_queued_job_completes_cancelled(worker):
    ran = []
    gate, _ = occupy(worker)
    queued = worker.start(lambda r: ran.append(1), REQ, 5000)
    assert worker.cancel(queued) is True
    assert worker.phase(queued) == Phase.COMPLETED
    assert worker.status(queued) == Status.CANCELLED
    assert worker.status_text(queued) == "cancelled"
    assert worker.state(queued) == State.CANCELLED
    assert worker.job_has_blob_result(queued) is False
    assert worker.wait_complete(queued, 0) is True
    assert worker.cancel(queued) is False  # no longer queued
    gate.release.set()
    after = worker.start(noop, b"after", 5000)
    worker.wait(after, WAIT_MS)
    assert ran == []  # the cancelled job never ran
    with pytest.raises(JobCancelledError) as excinfo:
        worker.wait(queued, WAIT_MS)
    assert excinfo.value.status == Status.CANCELLED
    assert excinfo.value.job_id == queued
    assert worker.job_known(queued) is False


def test_cancel_completed_job_returns_false(worker):
    jid = completed_job(worker, "success")
    assert worker.cancel(jid) is False
    assert worker.take(jid) == REQ


def test_reference_cancel_example(worker):
    # The reference prints 0 for Cancel right after Start because Echo is
    # already running.  Deterministically: occupy the single thread, then a
    # queued job cancels (1) and the running one does not (0).
    gate, running = occupy(worker)
    queued = worker.start(echo, REQ, 5000)
    assert int(worker.cancel(queued)) == 1
    assert int(worker.cancel(running)) == 0
    gate.release.set()
    worker.wait(running, WAIT_MS)


# ---------------------------------------------------------------- phase / status / state


def test_phase_and_phase_text_queued_running_completed(worker):
    gate, running = occupy(worker)
    queued = worker.start(echo, REQ, 5000)
    assert worker.phase(queued) is Phase.QUEUED and worker.phase_text(queued) == "queued"
    assert worker.phase(running) is Phase.RUNNING and worker.phase_text(running) == "running"
    gate.release.set()
    assert worker.wait_complete(queued, WAIT_MS)
    assert worker.phase(queued) is Phase.COMPLETED
    assert worker.phase_text(queued) == "completed"


def test_status_state_pending_before_completion(worker):
    gate, running = occupy(worker)
    queued = worker.start(echo, REQ, 5000)
    for jid in (running, queued):
        assert worker.status(jid) is Status.PENDING
        assert worker.status_text(jid) == "pending"
        assert worker.job_has_blob_result(jid) is False
    assert worker.state(queued) is State.QUEUED
    assert worker.state(running) is State.RUNNING
    gate.release.set()


@pytest.mark.parametrize("kind, status, text, state, has_result, error", [
    ("success", Status.OK, "success", State.SUCCEEDED, True, None),
    ("error", Status.ERROR, "error", State.FAILED, False, JobFailedError),
    ("timeout", Status.TIMEOUT, "timeout", State.TIMED_OUT, False, JobTimeoutError),
    ("cancelled", Status.CANCELLED, "cancelled", State.CANCELLED, False, JobCancelledError),
], ids=["success", "error", "timeout", "cancelled"])
def test_completion_kind_status_state_texts(worker, kind, status, text, state, has_result,
                                            error):
    jid = completed_job(worker, kind)
    assert worker.phase(jid) is Phase.COMPLETED
    assert worker.status(jid) is status
    assert worker.status_text(jid) == text
    assert worker.state(jid) is state
    assert worker.job_has_blob_result(jid) is has_result
    assert worker.job_meta(jid, JobMetaKey.STATUS) == status
    assert worker.job_meta(jid, JobMetaKey.HAS_BLOB_RESULT) == int(has_result)
    assert (worker.error_text(jid) == "") is has_result
    if error is None:
        assert worker.take(jid) == REQ
    else:
        with pytest.raises(error) as excinfo:
            worker.take(jid)
        assert type(excinfo.value) is error
        assert excinfo.value.status == status
        assert excinfo.value.job_id == jid
        assert excinfo.value.error_text


def test_status_and_state_enum_values():
    assert [(s.name, int(s)) for s in Status] == [
        ("OK", 0), ("PENDING", 1), ("ERROR", 2), ("TIMEOUT", 3), ("SHUTDOWN", 4),
        ("CANCELLED", 5)]
    assert [(s.name, int(s)) for s in State] == [
        ("QUEUED", 0), ("RUNNING", 1), ("SUCCEEDED", 2), ("FAILED", 3), ("TIMED_OUT", 4),
        ("CANCELLED", 5), ("SHUT_DOWN", 6), ("SUSPENDED", 7)]


def test_error_hierarchy():
    assert issubclass(UnknownJobError, CallbackWorkerError)
    assert issubclass(UnknownJobError, KeyError)
    assert issubclass(JobNotCompleteError, CallbackWorkerError)
    assert issubclass(JobFailedError, CallbackWorkerError)
    for sub in (JobTimeoutError, JobCancelledError, ShutdownError):
        assert issubclass(sub, JobFailedError)
    assert issubclass(JobTimeoutError, TimeoutError)
    assert issubclass(WaitTimeoutError, CallbackWorkerError)
    assert issubclass(WaitTimeoutError, TimeoutError)
    assert issubclass(WorkerClosedError, CallbackWorkerError)
    assert issubclass(WorkerClosedError, RuntimeError)


# ---------------------------------------------------------------- timeouts


def test_run_timeout_completes_job_at_once_and_route_goes_on(worker):
    started = threading.Event()
    never = threading.Event()

    def spin(request: memoryview) -> None:
        started.set()
        while True:
            never.wait(0.005)

    t0 = time.monotonic()
    jid = worker.start(spin, REQ, 100)
    nxt = worker.start(echo, b"next", 5000)
    assert worker.wait_complete(jid, WAIT_MS) is True
    assert started.is_set()
    assert time.monotonic() - t0 < 5
    assert worker.status(jid) is Status.TIMEOUT
    assert worker.job_timeout(jid) == 100
    with pytest.raises(JobTimeoutError) as excinfo:
        worker.wait(jid, WAIT_MS)
    assert isinstance(excinfo.value, TimeoutError)
    assert worker.wait(nxt, WAIT_MS) == b"next"  # the route was not stalled


def test_run_timeout_discards_late_return(worker):
    finished = threading.Event()

    def stubborn(request: memoryview) -> bytes:
        try:
            while True:
                finished.wait(0.005)
        except BaseException:  # swallows the interrupt, then returns anyway
            pass
        request[:] = b"zzz"
        finished.set()
        return b"late result"

    jid = worker.start(stubborn, REQ, 100)
    assert worker.wait_complete(jid, WAIT_MS) is True
    assert finished.wait(WAIT_S)
    assert worker.status(jid) is Status.TIMEOUT
    assert worker.job_has_blob_result(jid) is False
    with pytest.raises(JobTimeoutError):
        worker.take(jid)


def test_callback_stuck_in_c_does_not_stall_route(worker):
    gate = Gate()  # blocks in C (a lock acquire), where no bytecode runs
    stuck = worker.start(gate, REQ, 100)
    nxt = worker.start(echo, b"next", 5000)
    assert gate.started.wait(WAIT_S)
    assert worker.wait_complete(stuck, WAIT_MS) is True
    assert worker.status(stuck) is Status.TIMEOUT
    # still stuck, yet the next job runs (on a replacement thread)
    assert worker.wait(nxt, WAIT_MS) == b"next"
    assert not gate.release.is_set()
    gate.release.set()


def test_timeout_bounds_accepted(worker):
    gate, _ = occupy(worker)
    a = worker.start(noop, b"", -1)
    b = worker.start(noop, b"", 2147483647)
    c = worker.start(noop, b"")
    assert worker.job_timeout(a) == -1
    assert worker.job_timeout(b) == 2147483647
    assert worker.job_timeout(c) == -1  # the default: infinite
    gate.release.set()
    for jid in (a, b, c):
        assert worker.wait(jid, 2147483647) == b""


# ---------------------------------------------------------------- job metadata


def test_job_known(worker):
    gate, running = occupy(worker)
    queued = worker.start(echo, REQ, 5000)
    assert worker.job_known(running) is True
    assert worker.job_known(queued) is True
    gate.release.set()
    worker.wait(queued, WAIT_MS)
    assert worker.job_known(queued) is False
    assert worker.job_known(10**9) is False
    assert worker.job_known(0) is False
    assert worker.job_known(-5) is False


def test_job_timeout_returns_start_value(worker):
    assert worker.job_timeout(worker.start(echo, REQ, 5000)) == 5000
    assert worker.job_timeout(worker.start(echo, REQ)) == -1
    assert worker.job_timeout(worker.start_text(echo, "t", 1234)) == 1234
    ids = worker.start_many(echo, [REQ, REQ], 777)
    assert [worker.job_timeout(j) for j in ids] == [777, 777]


def test_job_blob_result_size(worker):
    gate, running = occupy(worker)
    with pytest.raises(JobNotCompleteError):
        worker.job_blob_result_size(running)
    gate.release.set()
    assert worker.job_blob_result_size(completed_job(worker, "success")) == 3
    failed = completed_job(worker, "error")
    with pytest.raises(JobFailedError):
        worker.job_blob_result_size(failed)
    assert worker.job_known(failed)  # not destroyed


def test_job_meta_each_key(worker):
    jid = completed_job(worker, "success")
    assert worker.job_meta(jid, JobMetaKey.PHASE) == Phase.COMPLETED == 2
    assert worker.job_meta(jid, JobMetaKey.STATUS) == Status.OK == 0
    assert worker.job_meta(jid, JobMetaKey.ROUTE) == 1  # the default route
    assert worker.job_meta(jid, JobMetaKey.TIMEOUT) == 5000
    assert worker.job_meta(jid, JobMetaKey.KNOWN) == 1
    assert worker.job_meta(jid, JobMetaKey.HAS_BLOB_RESULT) == 1
    assert worker.job_meta(jid, JobMetaKey.BLOB_RESULT_SIZE) == 3
    for key in range(1, 8):  # plain ints work as well as JobMetaKey members
        assert worker.job_meta(jid, key) == worker.job_meta(jid, JobMetaKey(key))
        assert type(worker.job_meta(jid, key)) is int


def test_job_meta_running_job(worker):
    gate, running = occupy(worker)
    assert worker.job_meta(running, JobMetaKey.PHASE) == Phase.RUNNING
    assert worker.job_meta(running, JobMetaKey.STATUS) == Status.PENDING
    assert worker.job_meta(running, JobMetaKey.HAS_BLOB_RESULT) == 0
    gate.release.set()


def test_job_meta_known_of_unknown_id_is_0(worker):
    destroyed = worker.start(echo, REQ, 5000)
    worker.wait(destroyed, WAIT_MS)
    for jid in (destroyed, 10**9, 0, -1, 2**63 - 1, 2**64):
        assert worker.job_meta(jid, JobMetaKey.KNOWN) == 0
        assert worker.job_meta(jid, 5) == 0


@pytest.mark.parametrize("key", [k for k in JobMetaKey if k is not JobMetaKey.KNOWN],
                         ids=lambda k: k.name)
def test_job_meta_other_keys_of_unknown_id_raise(worker, key):
    destroyed = worker.start(echo, REQ, 5000)
    worker.wait(destroyed, WAIT_MS)
    for jid in (destroyed, 10**9, 0, -1):
        with pytest.raises(UnknownJobError):
            worker.job_meta(jid, key)


def test_info_is_parseable_key_value_line(worker):
    jid = completed_job(worker, "success")
    line = worker.info(jid)
    assert isinstance(line, str) and line
    assert "\n" not in line
    fields = dict(p.split("=", 1) for p in line.split())
    assert len(fields) == len(line.split())  # stable, unique keys
    for key in ("id", "phase", "status", "state", "timeout_ms", "route", "result_size"):
        assert key in fields
    assert fields["id"] == str(jid)
    assert fields["timeout_ms"] == "5000"
    assert fields["result_size"] == "3"
    assert fields["phase"] in ("completed", "2")
    assert fields["status"] in ("success", "0")
    # stable keys: the same keys for a job in another phase
    gate, running = occupy(worker)
    assert set(dict(p.split("=", 1) for p in worker.info(running).split())) == set(fields)
    gate.release.set()


def test_info_of_failed_job_has_no_spaces_in_values(worker):
    def fail_spaces(request: memoryview) -> None:
        raise RuntimeError("a message with spaces = and equals")

    jid = worker.start(fail_spaces, REQ, 5000)
    worker.wait_complete(jid, WAIT_MS)
    line = worker.info(jid)
    fields = dict(p.split("=", 1) for p in line.split())
    assert fields["id"] == str(jid)


# ---------------------------------------------------------------- ordering and concurrency


def test_fifo_order_with_concurrency_1(worker):
    order = []
    gate, _ = occupy(worker)
    ids = []
    for i in range(20):
        ids.append(worker.start(lambda r, i=i: order.append(i), b"", 5000))
    ids += worker.start_many(lambda r: order.append(bytes(r)[0]),
                             [bytes([i]) for i in range(20, 30)])
    ids.append(worker.start_text(lambda r: order.append(30), "x"))
    assert all(worker.phase(j) == Phase.QUEUED for j in ids)
    gate.release.set()
    for jid in ids:
        worker.wait(jid, WAIT_MS)
    assert order == list(range(31))


def test_concurrency_1_runs_one_job_at_a_time(worker):
    active = []
    peak = []
    lock = threading.Lock()

    def track(request: memoryview) -> None:
        with lock:
            active.append(1)
            peak.append(len(active))
        for _ in range(50):
            pass
        with lock:
            active.pop()

    ids = worker.start_many(track, [b""] * 20)
    for jid in ids:
        worker.wait(jid, WAIT_MS)
    assert max(peak) == 1


def test_concurrency_n_runs_jobs_in_parallel():
    n = 4
    barrier = threading.Barrier(n, timeout=WAIT_S)

    def meet(request: memoryview) -> None:
        barrier.wait()  # breaks (and the job fails) unless n jobs run at once

    with Worker(concurrency=n) as w:
        ids = [w.start(meet, bytes([i]), WAIT_MS) for i in range(n)]
        assert [w.wait(j, WAIT_MS) for j in ids] == [bytes([i]) for i in range(n)]


def test_concurrency_n_starts_in_fifo_order():
    with Worker(concurrency=2) as w:
        gates = [Gate(), Gate()]
        ids = [w.start(g, b"g", WAIT_MS) for g in gates]
        assert all(g.started.wait(WAIT_S) for g in gates)
        queued = w.start(noop, b"q", 5000)
        assert w.phase(queued) == Phase.QUEUED
        gates[0].release.set()
        assert w.wait(queued, WAIT_MS) == b"q"
        gates[1].release.set()
        for jid in ids:
            w.wait(jid, WAIT_MS)


def test_waits_from_many_threads(worker):
    ids = worker.start_many(lambda r: bytes(r) * 2, [bytes([i]) for i in range(16)])
    results = {}

    def waiter(jid: int) -> None:
        results[jid] = worker.wait(jid, WAIT_MS)

    threads = [threading.Thread(target=waiter, args=(j,)) for j in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert [results[j] for j in ids] == [bytes([i]) * 2 for i in range(16)]


# ---------------------------------------------------------------- lifecycle


def test_close_returns_0():
    w = Worker()
    assert w.close() == 0


def test_close_twice_returns_0():
    w = Worker()
    assert w.close() == 0
    assert w.close() == 0
    assert w.close(drain=True) == 0


def test_context_manager_closes():
    with Worker() as w:
        assert isinstance(w, Worker)
        jid = w.start(echo, REQ, 5000)
        assert w.wait(jid, WAIT_MS) == REQ
    with pytest.raises(WorkerClosedError):
        w.start(echo, REQ, 5000)
    assert w.close() == 0


def test_start_after_close_raises_worker_closed():
    w = Worker()
    w.close()
    with pytest.raises(WorkerClosedError) as excinfo:
        w.start(echo, REQ, 5000)
    assert isinstance(excinfo.value, RuntimeError)
    with pytest.raises(WorkerClosedError):
        w.start_text(echo, "hello", 5000)
    with pytest.raises(WorkerClosedError):
        w.start_many(echo, [REQ], 5000)


@pytest.mark.parametrize("verb, args", [
    ("wait", (5000,)), ("wait_complete", (5000,)), ("take", ()), ("take_blob", ()),
    ("cancel", ()), ("phase", ()), ("phase_text", ()), ("status", ()), ("status_text", ()),
    ("state", ()), ("error_text", ()), ("job_known", ()), ("job_timeout", ()),
    ("job_has_blob_result", ()), ("job_blob_result_size", ()),
    ("job_meta", (JobMetaKey.PHASE,)), ("job_meta", (JobMetaKey.KNOWN,)), ("info", ()),
], ids=lambda v: v if isinstance(v, str) else "")
def test_every_job_verb_after_close_raises_worker_closed(verb, args):
    w = Worker()
    jid = w.start(echo, REQ, 5000)
    assert w.wait_complete(jid, WAIT_MS)
    w.close()
    with pytest.raises(WorkerClosedError):
        getattr(w, verb)(jid, *args)


def test_close_shuts_down_pending_jobs():
    w = Worker()
    gate, running = occupy(w)
    ran = []
    queued = [w.start(lambda r: ran.append(1), bytes([i]), 5000) for i in range(3)]
    outcome = {}

    def waiter() -> None:
        try:
            w.wait(queued[0], WAIT_MS)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome["exc"] = exc

    waiting = threading.Thread(target=waiter)
    waiting.start()
    closer = threading.Thread(target=w.close)
    closer.start()
    # The queued jobs complete with SHUTDOWN and the blocked waiter wakes,
    # while the running callback still holds its thread (close cannot
    # return yet).
    waiting.join(WAIT_S)
    assert not waiting.is_alive()
    assert closer.is_alive()
    exc = outcome["exc"]
    assert isinstance(exc, ShutdownError), repr(exc)
    assert exc.status == Status.SHUTDOWN
    gate.release.set()  # a running callback may finish
    closer.join(WAIT_S)
    assert not closer.is_alive()
    assert ran == []
    with pytest.raises(WorkerClosedError):  # no longer accessible via Take
        w.take(queued[1])
    with pytest.raises(WorkerClosedError):
        w.start(echo, REQ, 5000)
    assert w.close() == 0


def test_close_lets_running_callback_finish():
    w = Worker()
    finished = threading.Event()
    gate = Gate()

    def slow(request: memoryview) -> None:
        gate(request)
        finished.set()

    w.start(slow, REQ, WAIT_MS)
    assert gate.started.wait(WAIT_S)
    closer = threading.Thread(target=w.close)
    closer.start()
    gate.release.set()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    assert finished.is_set()  # close joined the thread after the callback ended


def test_close_drain_runs_queued_jobs():
    w = Worker()
    gate, running = occupy(w)
    ran = []
    for i in range(5):
        w.start(lambda r, i=i: ran.append(i), b"", 5000)
    closer = threading.Thread(target=w.close, kwargs={"drain": True})
    closer.start()
    # Wait until close has begun: from then on no job can start.
    extra = 0
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            w.start(lambda r, i=5 + extra: ran.append(i), b"", 5000)
        except WorkerClosedError:
            break
        extra += 1
    else:
        pytest.fail("close(drain=True) never began")
    gate.release.set()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    assert ran == list(range(5 + extra))  # every queued job ran, in order


# ---------------------------------------------------------------- the reference examples


def test_reference_echo_example():
    w = Worker()
    job_id = w.start(echo, bytes([65, 66, 67]), 5000)
    resp = w.wait(job_id, 5000)
    assert len(resp) == 3
    assert list(resp) == [65, 66, 67]
    assert w.close() == 0


def test_reference_two_step_example(worker):
    job_id = worker.start(echo, REQ, 5000)
    worker.wait_complete(job_id, 5000)
    assert worker.status(job_id) == 0
    resp = worker.take_blob(job_id)
    assert resp == REQ


def test_reference_wait_example(worker):
    assert len(worker.wait(worker.start(echo, REQ, 5000), 5000)) == 3


def test_reference_wait_complete_example(worker):
    assert int(worker.wait_complete(worker.start(echo, REQ, 5000), 5000)) == 1


def test_reference_take_example(worker):
    job_id = worker.start(echo, REQ, 5000)
    worker.wait_complete(job_id, 5000)
    assert len(worker.take(job_id)) == 3


def test_reference_take_blob_example(worker):
    job_id = worker.start(echo, REQ, 5000)
    worker.wait_complete(job_id, 5000)
    resp = worker.take_blob(job_id)
    assert "%d %d %d" % (resp[0], resp[1], resp[2]) == "65 66 67"


@pytest.mark.parametrize("verb, printed", [
    ("phase", 2), ("phase_text", "completed"), ("status", 0), ("status_text", "success"),
    ("state", 2), ("job_has_blob_result", 1), ("job_blob_result_size", 3),
])
def test_reference_query_after_wait_complete_example(worker, verb, printed):
    job_id = worker.start(echo, REQ, 5000)
    worker.wait_complete(job_id, 5000)
    value = getattr(worker, verb)(job_id)
    assert value == printed
    if isinstance(printed, int):
        assert "%d" % value == str(printed)


def test_reference_error_text_example(worker):
    job_id = worker.start(echo, REQ, 5000)
    worker.wait_complete(job_id, 5000)
    assert len(worker.error_text(job_id)) == 0


def test_reference_job_known_example(worker):
    job_id = worker.start(echo, REQ, 5000)
    assert int(worker.job_known(job_id)) == 1


def test_reference_job_timeout_example(worker):
    job_id = worker.start(echo, REQ, 5000)
    assert worker.job_timeout(job_id) == 5000


def test_reference_job_meta_example(worker):
    job_id = worker.start(echo, REQ, 5000)
    assert worker.job_meta(job_id, JobMetaKey.TIMEOUT) == 5000
    assert worker.job_meta(job_id, JobMetaKey.KNOWN) == 1


def test_reference_info_example(worker):
    job_id = worker.start(echo, REQ, 5000)
    worker.wait_complete(job_id, 5000)
    assert int(len(worker.info(job_id)) > 0) == 1


# ---------------------------------------------------------------- module-level functions


def test_module_level_functions_act_on_default_worker():
    dw = callbackworker.default_worker()
    assert isinstance(dw, Worker)
    assert callbackworker.default_worker() is dw
    assert callbackworker.capabilities() == dw.capabilities()

    job_id = callbackworker.start(echo, REQ, 5000)
    assert job_id > 0
    assert dw.job_known(job_id)  # it lives on the default worker
    assert callbackworker.wait_complete(job_id, WAIT_MS) is True
    assert callbackworker.job_known(job_id) is True
    assert callbackworker.phase(job_id) == 2
    assert callbackworker.phase_text(job_id) == "completed"
    assert callbackworker.status(job_id) == 0
    assert callbackworker.status_text(job_id) == "success"
    assert callbackworker.state(job_id) == 2
    assert callbackworker.error_text(job_id) == ""
    assert callbackworker.job_timeout(job_id) == 5000
    assert callbackworker.job_has_blob_result(job_id) is True
    assert callbackworker.job_blob_result_size(job_id) == 3
    assert callbackworker.job_meta(job_id, JobMetaKey.TIMEOUT) == 5000
    assert callbackworker.job_meta(job_id, JobMetaKey.KNOWN) == 1
    assert len(callbackworker.info(job_id)) > 0
    assert callbackworker.cancel(job_id) is False
    assert callbackworker.take_blob(job_id) == REQ
    assert callbackworker.job_meta(job_id, JobMetaKey.KNOWN) == 0

    assert callbackworker.wait(callbackworker.start(echo, REQ, 5000), WAIT_MS) == REQ
    assert callbackworker.wait(callbackworker.start_text(echo, "hi", 5000), WAIT_MS) == b"hi"
    j = callbackworker.start(echo, REQ)
    callbackworker.wait_complete(j, WAIT_MS)
    assert callbackworker.take(j) == REQ
    ids = callbackworker.start_many(echo, [b"a", b"b"], 5000)
    assert [callbackworker.wait(i, WAIT_MS) for i in ids] == [b"a", b"b"]
    with pytest.raises(UnknownJobError):
        callbackworker.wait(ids[0], 0)


def test_module_level_close_is_final_subprocess():
    proc = run_python("""
        import callbackworker

        def Echo(request):
            return 1

        job_id = callbackworker.start(Echo, bytes([65, 66, 67]), 5000)
        resp = callbackworker.wait(job_id, 5000)
        print(len(resp), list(resp))
        print(callbackworker.capabilities() & 3701 == 3701)
        print(callbackworker.close())
        print("Close done")
        try:
            callbackworker.start(Echo, b"x", 5000)
        except callbackworker.WorkerClosedError as exc:
            print("start:", type(exc).__name__)
        try:
            callbackworker.job_known(job_id)
        except callbackworker.WorkerClosedError as exc:
            print("job_known:", type(exc).__name__)
        print(callbackworker.close())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "3 [65, 66, 67]", "True", "0", "Close done", "start: WorkerClosedError",
        "job_known: WorkerClosedError", "0"]


def test_module_level_close_shuts_down_pending_subprocess():
    proc = run_python("""
        import threading, callbackworker
        started, release = threading.Event(), threading.Event()

        def gate(request):
            started.set()
            release.wait(10)

        running = callbackworker.start(gate, b"g", 10000)
        started.wait(10)
        queued = callbackworker.start(lambda r: None, b"q", 5000)
        result = {}

        def waiter():
            try:
                callbackworker.wait(queued, 10000)
            except callbackworker.ShutdownError as exc:
                result["status"] = int(exc.status)

        t = threading.Thread(target=waiter); t.start()
        closer = threading.Thread(target=callbackworker.close); closer.start()
        t.join(10)
        release.set()
        closer.join(10)
        print(result.get("status"), closer.is_alive())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4", "False"]


# ---------------------------------------------------------------- interpreter exit, fork


def test_interpreter_exit_closes_live_workers_without_hang():
    t0 = time.monotonic()
    proc = run_python("""
        import threading, callbackworker
        w = callbackworker.Worker()
        started, never = threading.Event(), threading.Event()

        def spin(request):
            started.set()
            while True:
                never.wait(0.01)

        w.start(spin, b"", -1)          # never ends on its own, infinite timeout
        started.wait(10)
        w.start(lambda r: None, b"", -1)  # queued behind it
        callbackworker.start(lambda r: None, b"", -1)  # the default worker too
        print("exiting")
    """, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["exiting"]
    assert "Fatal" not in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 20


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_leaves_child_with_usable_empty_worker():
    proc = run_python("""
        import os, callbackworker
        w = callbackworker.Worker()
        before = w.start(lambda r: None, b"parent", 5000)
        w.wait_complete(before, 5000)
        pid = os.fork()
        if pid == 0:
            ok = (not w.job_known(before)
                  and w.wait(w.start(lambda r: bytes(r).upper(), b"child", 5000), 5000) == b"CHILD"
                  and callbackworker.wait(callbackworker.start(lambda r: None, b"d"), 5000) == b"d")
            w.close()
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), w.take(before))
        w.close()
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "b'parent'"]


@pytest.mark.parametrize("text", ["héllo wörld", "日本語テキスト", "emoji 😀 ✓", "a" * 70000 + "é"])
def test_start_text_encodes_non_ascii_utf8_exactly(worker, text):
    """StartBorrowedText with text beyond ASCII: the callback sees exactly
    the UTF-8 bytes (encoded once, straight into the job)."""
    seen = []
    job = worker.start_text(lambda request: seen.append(bytes(request)), text, 5000)
    assert worker.wait(job, 5000) == text.encode("utf-8")
    assert seen == [text.encode("utf-8")]


def test_start_text_with_a_lone_surrogate_raises_unicode_encode_error(worker):
    with pytest.raises(UnicodeEncodeError):
        worker.start_text(lambda request: None, "bad \udc80")
