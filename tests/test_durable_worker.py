"""Durable external callbacks on a ``Worker`` (in memory).

A job suspends in ``callback_result`` until ``send_callback_*`` signals
its callback, or the callback times out; it is then replayed from the
start, earlier operations answered from its log.  Timeouts use
``Worker(manual_clock=True)`` and ``advance_clock``, so no test sleeps for
behaviour (waiting for a job to reach a state polls with a deadline).
"""

from __future__ import annotations

import sys
import threading
from typing import Iterator, List, Optional

import pytest

import callbackworker
from callbackworker import (
    CallbackAlreadyCompletedError,
    CallbackFailedError,
    CallbackTimeoutError,
    JobFailedError,
    NonDeterminismError,
    ShutdownError,
    State,
    Status,
    UnknownCallbackError,
    Worker,
)
from callbackworker.asyncmeta import Phase

from helpers import wait_for


class Approval:
    """A job that charges once (a step), asks for an approval and returns
    ``approved <result>`` (or how the callback ended)."""

    def __init__(self, timeout_ms: int = 0, heartbeat_timeout_ms: int = 0) -> None:
        self.timeout_ms = timeout_ms
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.ids: List[str] = []
        self.runs = 0
        self.charges = 0
        self.created = threading.Event()

    def charge(self) -> int:
        self.charges += 1
        return 7

    def __call__(self, request: memoryview) -> bytes:
        self.runs += 1
        ctx = callbackworker.current_job()
        receipt = ctx.step("charge", self.charge)
        handle = ctx.create_callback("approval", timeout_ms=self.timeout_ms,
                                     heartbeat_timeout_ms=self.heartbeat_timeout_ms)
        self.ids.append(handle.callback_id)
        self.created.set()
        try:
            result = ctx.callback_result(handle)
        except CallbackFailedError as exc:
            return f"declined {exc.error}".encode()
        except CallbackTimeoutError as exc:
            return f"timed out {exc.reason}".encode()
        return b"approved %d " % receipt + result

    @property
    def callback_id(self) -> str:
        return self.ids[-1]


@pytest.fixture
def clocked() -> Iterator[Worker]:
    w = Worker(manual_clock=True)
    try:
        yield w
    finally:
        w.close()


def suspended(w: Worker, job: Approval) -> int:
    jid = w.start(job, b"req")
    wait_for(lambda: w.state(jid) == State.SUSPENDED)
    return jid


# ---- suspension -----------------------------------------------------------

def test_a_waiting_job_is_suspended_and_queued(worker: Worker) -> None:
    job = Approval()
    jid = suspended(worker, job)
    assert worker.phase(jid) == Phase.QUEUED
    assert worker.status(jid) == Status.PENDING
    assert worker.wait_complete(jid, 0) is False


def test_the_route_runs_other_jobs_while_one_is_suspended(worker: Worker) -> None:
    suspended(worker, Approval())  # the default route has one thread
    assert worker.wait(worker.start(lambda r: b"other", b""), 5000) == b"other"


def test_create_callback_alone_never_suspends(worker: Worker) -> None:
    def job(request: memoryview) -> bytes:
        return callbackworker.current_job().create_callback("x").callback_id.encode()

    assert len(worker.wait(worker.start(job, b""), 5000)) == 32


# ---- outcomes -------------------------------------------------------------

def test_success_replays_the_job_with_the_result(worker: Worker) -> None:
    job = Approval()
    jid = suspended(worker, job)
    worker.send_callback_success(job.callback_id, b"by carol")
    assert worker.wait(jid, 5000) == b"approved 7 by carol"
    assert job.runs == 2 and job.ids[0] == job.ids[1]


def test_failure_raises_callback_failed_in_the_job(worker: Worker) -> None:
    job = Approval()
    jid = suspended(worker, job)
    worker.send_callback_failure(job.callback_id, "too expensive")
    assert worker.wait(jid, 5000) == b"declined too expensive"


def test_an_uncaught_callback_failure_fails_the_job(worker: Worker) -> None:
    handles: List[callbackworker.CallbackHandle] = []

    def job(request: memoryview) -> bytes:
        handles.append(callbackworker.current_job().create_callback("x"))
        return callbackworker.current_job().callback_result(handles[-1])

    jid = worker.start(job, b"")
    wait_for(lambda: worker.state(jid) == State.SUSPENDED)
    worker.send_callback_failure(handles[-1].callback_id, "no")
    with pytest.raises(JobFailedError) as info:
        worker.wait(jid, 5000)
    assert isinstance(info.value.__cause__, CallbackFailedError)


def test_timeout_replays_the_job_with_callback_timeout(clocked: Worker) -> None:
    job = Approval(timeout_ms=1000)
    jid = suspended(clocked, job)
    clocked.advance_clock(999)
    assert clocked.state(jid) == State.SUSPENDED
    clocked.advance_clock(1)
    assert clocked.wait(jid, 5000) == b"timed out timeout"
    with pytest.raises(CallbackAlreadyCompletedError):
        clocked.send_callback_success(job.callback_id, b"late")


def test_heartbeats_extend_the_deadline(clocked: Worker) -> None:
    job = Approval(heartbeat_timeout_ms=100)
    jid = suspended(clocked, job)
    for _ in range(4):
        clocked.advance_clock(90)
        clocked.send_callback_heartbeat(job.callback_id)
    assert clocked.state(jid) == State.SUSPENDED
    clocked.send_callback_success(job.callback_id, b"ok")
    assert clocked.wait(jid, 5000) == b"approved 7 ok"


def test_without_heartbeats_the_callback_times_out(clocked: Worker) -> None:
    job = Approval(heartbeat_timeout_ms=100)
    jid = suspended(clocked, job)
    clocked.advance_clock(90)
    clocked.send_callback_heartbeat(job.callback_id)
    clocked.advance_clock(100)
    assert clocked.wait(jid, 5000) == b"timed out heartbeat"


# ---- replay ---------------------------------------------------------------

def test_a_step_runs_once_across_replays(worker: Worker) -> None:
    job = Approval()
    jid = suspended(worker, job)
    worker.send_callback_success(job.callback_id, b"")
    worker.wait(jid, 5000)
    assert (job.runs, job.charges) == (2, 1)


def test_a_different_order_on_replay_is_a_non_determinism_error(worker: Worker) -> None:
    handles: List[callbackworker.CallbackHandle] = []

    def job(request: memoryview) -> None:
        ctx = callbackworker.current_job()
        ctx.step("first" if not handles else "renamed", lambda: 1)
        handles.append(ctx.create_callback("cb"))
        ctx.callback_result(handles[-1])

    jid = worker.start(job, b"")
    wait_for(lambda: worker.state(jid) == State.SUSPENDED)
    worker.send_callback_success(handles[-1].callback_id, b"")
    with pytest.raises(JobFailedError) as info:
        worker.wait(jid, 5000)
    assert isinstance(info.value.__cause__, NonDeterminismError)
    assert "renamed" in str(info.value.__cause__)


def test_a_signal_before_callback_result_is_not_lost(worker: Worker) -> None:
    """The signal lands while the job still runs, between create_callback
    and callback_result: callback_result returns it without suspending."""
    job = Approval()
    gate = threading.Event()
    original = job.charge

    def slow_charge() -> int:
        gate.wait(10)
        return original()

    def run(request: memoryview) -> bytes:
        ctx = callbackworker.current_job()
        handle = ctx.create_callback("approval")
        job.ids.append(handle.callback_id)
        job.created.set()
        ctx.step("slow", slow_charge)
        return ctx.callback_result(handle)

    jid = worker.start(run, b"")
    assert job.created.wait(10)
    worker.send_callback_success(job.callback_id, b"early")
    gate.set()
    assert worker.wait(jid, 5000) == b"early"


# ---- refused signals ------------------------------------------------------

def test_a_duplicate_success_is_rejected(worker: Worker) -> None:
    job = Approval()
    jid = suspended(worker, job)
    worker.send_callback_success(job.callback_id, b"first")
    with pytest.raises(CallbackAlreadyCompletedError) as info:
        worker.send_callback_success(job.callback_id, b"second")
    assert info.value.state == "succeeded"
    assert worker.wait(jid, 5000) == b"approved 7 first"


@pytest.mark.parametrize("callback_id", ["", "short", "A" * 32, "x" * 33, "has space" * 4])
def test_unknown_and_malformed_ids(worker: Worker, callback_id: str) -> None:
    with pytest.raises(UnknownCallbackError):
        worker.send_callback_success(callback_id, b"")
    suspended(worker, Approval())
    with pytest.raises(UnknownCallbackError):
        worker.send_callback_heartbeat(callback_id)


def test_bad_signal_arguments(worker: Worker) -> None:
    with pytest.raises(TypeError):
        worker.send_callback_success(42, b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        worker.send_callback_success("A" * 32, "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        worker.send_callback_success("A" * 32, b"x" * ((1 << 20) + 1))
    with pytest.raises(TypeError):
        worker.send_callback_failure("A" * 32, b"bytes")  # type: ignore[arg-type]


def test_concurrent_signals_exactly_one_wins(worker: Worker) -> None:
    job = Approval()
    jid = suspended(worker, job)
    outcomes: List[Optional[str]] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def send(n: int) -> None:
        start.wait()
        try:
            worker.send_callback_success(job.callback_id, b"%d" % n)
            state = None
        except CallbackAlreadyCompletedError as exc:
            state = exc.state
        with lock:
            outcomes.append(state)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count(None) == 1 and outcomes.count("succeeded") == 7
    assert worker.wait(jid, 5000).startswith(b"approved 7 ")


# ---- cancel and close -----------------------------------------------------

def test_a_suspended_job_can_be_cancelled(worker: Worker) -> None:
    job = Approval()
    jid = suspended(worker, job)
    assert worker.cancel(jid) is True
    assert worker.state(jid) == State.CANCELLED
    wait_for(lambda: _refused_state(worker, job.callback_id) == "closed")


def _refused_state(worker: Worker, callback_id: str) -> Optional[str]:
    try:
        worker.send_callback_heartbeat(callback_id)
    except CallbackAlreadyCompletedError as exc:
        return exc.state
    return None


def _frame_name(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or 0)
    return "" if frame is None else frame.f_code.co_name


def test_close_shuts_down_a_suspended_job(worker: Worker) -> None:
    jid = suspended(worker, Approval())
    errors: List[BaseException] = []
    waiting = threading.Event()

    def waiter() -> None:
        waiting.set()
        try:
            worker.wait(jid)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    assert waiting.wait(10)
    wait_for(lambda: _frame_name(thread) == "wait")  # blocked in Worker.wait
    threading.Event().wait(0.05)  # past its entry checks, into the core's wait
    worker.close()
    thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], ShutdownError)


def test_close_drain_runs_what_can_run_and_does_not_wait_for_suspended_jobs(
        worker: Worker) -> None:
    suspended(worker, Approval())
    ran: List[int] = []
    worker.start(lambda r: ran.append(1), b"")
    assert worker.close(drain=True) == 0  # returns: nothing waits for the approval
    assert ran == [1]
