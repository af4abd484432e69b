"""Run-time limits (SPEC section 2, "Timeouts").

The start timeout is the callback's run-time limit: when it passes, the job
completes at once with ``Status.TIMEOUT`` (waiters wake), the callback is
interrupted at its next Python bytecode, and whatever it returns later is
discarded.  A callback stuck in C does not stall its route: its thread is
replaced after a short grace period.

Timing rules for these tests: the machine is shared and noisy, so every time
bound is a generous upper bound, chosen only to tell "works" from "stalls"
(e.g. 2-3 s against a callback that would otherwise run 5 s or forever), and
no lower bound is tighter than the thing being tested.

A note on writing busy loops here: on CPython 3.11/3.12 an asynchronous
exception delivered at the backward jump of a loop that is the *first*
statement of a ``try`` block is looked up at the instruction before the loop,
outside the ``try``, so that ``try``'s own ``except``/``finally`` clauses are
skipped (CPython gh-108214, not a callbackworker bug; the loop still stops
and the job still times out).  The loops below therefore put a statement
before the ``while`` inside each ``try``.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator, List

import pytest

import callbackworker
from callbackworker import (
    JobMetaKey,
    JobTimeoutError,
    Phase,
    RouteMetaKey,
    State,
    Status,
    WaitTimeoutError,
    Worker,
)

# Generous upper bounds (seconds).
PROMPT = 2.0      # "at once": a waiter wakes, a loop stops
REPLACED = 3.0    # the grace period has passed and a new thread took over
SETTLE = 5.0      # anything that must eventually happen


@pytest.fixture
def release() -> Iterator[List[threading.Event]]:
    """Events that stuck callbacks wait on; all set at teardown, so that no
    abandoned thread outlives the test by long."""
    events: List[threading.Event] = []
    try:
        yield events
    finally:
        for event in events:
            event.set()


def _busy_loop(started: threading.Event, stopped: threading.Event,
               counter: List[int]) -> Callable[[memoryview], None]:
    """A pure-Python busy loop that never returns by itself; sets `stopped`
    from its `finally` block and counts iterations in counter[0]."""

    def busy(request: memoryview) -> None:
        try:
            started.set()
            while True:
                counter[0] += 1
        finally:
            stopped.set()

    return busy


def _wait_until(predicate: Callable[[], bool], limit: float = SETTLE) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _counter_frozen(counter: List[int], window: float = 0.2) -> bool:
    before = counter[0]
    time.sleep(window)
    return counter[0] == before


# ---- at the deadline the job completes and waiters wake ----------------------------


def test_busy_loop_timeout_wait_raises_job_timeout_error_promptly(worker: Worker) -> None:
    started, stopped, counter = threading.Event(), threading.Event(), [0]
    job = worker.start(_busy_loop(started, stopped, counter), b"x", timeout_ms=100)
    t0 = time.monotonic()
    with pytest.raises(JobTimeoutError) as info:
        worker.wait(job)
    elapsed = time.monotonic() - t0
    assert elapsed < PROMPT, f"the waiter woke {elapsed:.2f}s after start (limit 100 ms)"
    err = info.value
    assert isinstance(err, TimeoutError)
    assert isinstance(err, callbackworker.JobFailedError)
    assert err.job_id == job
    assert err.status == Status.TIMEOUT
    assert err.error_text  # says what happened
    assert not worker.job_known(job)  # wait destroyed it
    assert started.is_set()


def test_timed_out_job_state_and_metadata(worker: Worker) -> None:
    started, stopped, counter = threading.Event(), threading.Event(), [0]
    job = worker.start(_busy_loop(started, stopped, counter), b"abc", timeout_ms=100)
    assert worker.wait_complete(job, int(SETTLE * 1000)) is True
    assert worker.phase(job) == Phase.COMPLETED
    assert worker.status(job) == Status.TIMEOUT
    assert worker.status_text(job) == "timeout"
    assert worker.state(job) == State.TIMED_OUT
    assert worker.job_has_blob_result(job) is False
    assert worker.job_meta(job, JobMetaKey.STATUS) == Status.TIMEOUT
    assert worker.job_meta(job, JobMetaKey.TIMEOUT) == 100
    assert worker.error_text(job) != ""
    info = dict(p.split("=", 1) for p in worker.info(job).split())
    assert info["status"] == "timeout" and info["timeout_ms"] == "100"
    with pytest.raises(JobTimeoutError):
        worker.job_blob_result_size(job)  # not destroyed by this
    assert worker.job_known(job)
    with pytest.raises(JobTimeoutError):
        worker.take(job)
    assert not worker.job_known(job)


def test_waiter_in_another_thread_wakes_at_the_deadline(worker: Worker) -> None:
    started, stopped, counter = threading.Event(), threading.Event(), [0]
    job = worker.start(_busy_loop(started, stopped, counter), b"x", timeout_ms=150)
    outcome: List[object] = []

    def waiter() -> None:
        t0 = time.monotonic()
        try:
            outcome.append(worker.wait_complete(job))
        except BaseException as exc:  # reported below
            outcome.append(exc)
        outcome.append(time.monotonic() - t0)

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    t.join(SETTLE)
    assert not t.is_alive(), "a waiter in another thread did not wake at the deadline"
    assert outcome[0] is True
    assert outcome[1] < PROMPT
    assert worker.status(job) == Status.TIMEOUT


def test_waiting_for_a_queued_job_behind_a_timed_out_one(worker: Worker) -> None:
    """The timed-out job frees the route: the job behind it runs next."""
    started, stopped, counter = threading.Event(), threading.Event(), [0]
    slow = worker.start(_busy_loop(started, stopped, counter), b"x", timeout_ms=100)
    nxt = worker.start(lambda m: bytes(m).upper(), b"next")
    t0 = time.monotonic()
    assert worker.wait(nxt, int(SETTLE * 1000)) == b"NEXT"
    assert time.monotonic() - t0 < REPLACED
    with pytest.raises(JobTimeoutError):
        worker.wait(slow, 0)


# ---- the callback is interrupted --------------------------------------------------


def test_busy_loop_is_interrupted_and_its_finally_runs(worker: Worker) -> None:
    started, stopped, counter = threading.Event(), threading.Event(), [0]
    job = worker.start(_busy_loop(started, stopped, counter), b"x", timeout_ms=100)
    with pytest.raises(JobTimeoutError):
        worker.wait(job)
    assert stopped.wait(PROMPT), "the callback's finally block did not run"
    assert _counter_frozen(counter), "the busy loop is still running"


def test_minimal_while_true_pass_loop_stops() -> None:
    """`while True: pass` as the whole callback: the loop actually stops (the
    thread becomes free again and stops burning CPU)."""
    with Worker() as w:
        ran = threading.Event()

        def spin(request: memoryview) -> None:
            ran.set()
            while True:
                pass

        job = w.start(spin, b"x", timeout_ms=100)
        t0 = time.monotonic()
        with pytest.raises(JobTimeoutError):
            w.wait(job)
        assert time.monotonic() - t0 < PROMPT
        assert ran.is_set()
        # The same route keeps working, and the thread that ran the loop is no
        # longer spinning: a job that needs the interpreter lock gets it.
        nxt = w.start(lambda m: b"ok", b"")
        assert w.wait(nxt, int(SETTLE * 1000)) == b"ok"
        # Nothing in this process burns CPU any more (a loop still spinning
        # would use about the whole window).
        time.sleep(0.3)  # past the grace period
        cpu0, t1 = time.process_time(), time.monotonic()
        time.sleep(0.5)
        cpu = time.process_time() - cpu0
        assert cpu < 0.6 * (time.monotonic() - t1), f"{cpu:.2f}s of CPU while idle"


def test_interrupt_is_not_an_exception_subclass(worker: Worker) -> None:
    seen: List[BaseException] = []

    def cb(request: memoryview) -> None:
        try:
            n = 0
            while True:
                n += 1
        except BaseException as exc:
            seen.append(exc)
            raise

    job = worker.start(cb, b"x", timeout_ms=100)
    with pytest.raises(JobTimeoutError):
        worker.wait(job)
    assert _wait_until(lambda: bool(seen), PROMPT)
    assert not isinstance(seen[0], Exception)
    assert isinstance(seen[0], BaseException)


def test_except_exception_does_not_swallow_the_interrupt(worker: Worker) -> None:
    swallowed: List[BaseException] = []
    counter = [0]
    left = threading.Event()

    def stubborn(request: memoryview) -> None:
        try:
            while True:  # would spin forever if the interrupt were an Exception
                try:
                    counter[0] += 1
                    while True:
                        counter[0] += 1
                except Exception as exc:  # noqa: BLE001 - the point of the test
                    swallowed.append(exc)
        finally:
            left.set()

    job = worker.start(stubborn, b"x", timeout_ms=100)
    with pytest.raises(JobTimeoutError):
        worker.wait(job)
    assert left.wait(PROMPT), "the callback did not leave"
    assert swallowed == []
    assert _counter_frozen(counter)


def test_interrupt_lands_in_nested_python_calls(worker: Worker) -> None:
    stopped = threading.Event()
    counter = [0]

    def step() -> None:
        counter[0] += 1

    def cb(request: memoryview) -> None:
        try:
            counter[0] = 0
            while True:
                step()
        finally:
            stopped.set()

    job = worker.start(cb, b"x", timeout_ms=100)
    with pytest.raises(JobTimeoutError):
        worker.wait(job)
    assert stopped.wait(PROMPT)
    assert _counter_frozen(counter)


def test_only_the_overdue_callback_is_interrupted() -> None:
    with Worker(concurrency=2) as w:
        started, stopped, counter = threading.Event(), threading.Event(), [0]
        ok_started = threading.Event()

        def steady(request: memoryview) -> bytes:
            ok_started.set()
            end = time.monotonic() + 0.6
            n = 0
            while time.monotonic() < end:  # pure Python, well past the other's deadline
                n += 1
            return b"steady"

        good = w.start(steady, b"")
        assert ok_started.wait(SETTLE)
        bad = w.start(_busy_loop(started, stopped, counter), b"", timeout_ms=100)
        with pytest.raises(JobTimeoutError):
            w.wait(bad)
        assert w.wait(good, int(SETTLE * 1000)) == b"steady"
        assert stopped.wait(PROMPT)


def test_fast_job_with_a_timeout_succeeds(worker: Worker) -> None:
    jobs = [worker.start(lambda m: bytes(m) * 2, b"%d" % i, timeout_ms=10_000)
            for i in range(50)]
    assert [worker.wait(j, int(SETTLE * 1000)) for j in jobs] == [b"%d" % i * 2 for i in range(50)]


def test_worker_keeps_working_after_many_timeouts(worker: Worker) -> None:
    def spin(request: memoryview) -> None:
        n = 0
        while True:
            n += 1

    timed = [worker.start(spin, b"", timeout_ms=20) for _ in range(5)]
    good = [worker.start(lambda m: bytes(m)[::-1], b"abc%d" % i) for i in range(20)]
    for j in timed:
        with pytest.raises(JobTimeoutError):
            worker.wait(j, int(SETTLE * 1000) * 2)
    assert [worker.wait(j, int(SETTLE * 1000)) for j in good] == \
        [(b"abc%d" % i)[::-1] for i in range(20)]


# ---- callbacks stuck in C -------------------------------------------------------


@pytest.mark.parametrize("how", ["time.sleep(5)", "Event().wait()"])
def test_callback_stuck_in_c_does_not_stall_the_queue(how: str, worker: Worker,
                                                      release: List[threading.Event]) -> None:
    entered = threading.Event()
    if how == "time.sleep(5)":
        def stuck(request: memoryview) -> None:
            entered.set()
            time.sleep(5)
    else:
        gate = threading.Event()
        release.append(gate)

        def stuck(request: memoryview) -> None:
            entered.set()
            gate.wait()  # blocks in C; an asynchronous exception cannot end it

    job = worker.start(stuck, b"", timeout_ms=100)
    nxt = worker.start(lambda m: bytes(m).upper(), b"behind")
    t0 = time.monotonic()
    with pytest.raises(JobTimeoutError):
        worker.wait(job)
    assert time.monotonic() - t0 < PROMPT
    assert worker.wait(nxt, int(SETTLE * 1000)) == b"BEHIND"
    elapsed = time.monotonic() - t0
    assert elapsed < REPLACED, f"the next job waited {elapsed:.2f}s behind a stuck callback"
    assert entered.is_set()
    # The replacement thread keeps serving the route.
    more = [worker.start(lambda m: bytes(m) + b"!", b"%d" % i) for i in range(10)]
    assert [worker.wait(j, int(SETTLE * 1000)) for j in more] == [b"%d!" % i for i in range(10)]


def test_several_stuck_callbacks_each_get_replaced(worker: Worker,
                                                   release: List[threading.Event]) -> None:
    gate = threading.Event()
    release.append(gate)
    stuck = [worker.start(lambda m: gate.wait() and None, b"", timeout_ms=50) for _ in range(3)]
    nxt = worker.start(lambda m: b"free", b"")
    t0 = time.monotonic()
    assert worker.wait(nxt, int(SETTLE * 1000) * 2) == b"free"
    # Three stuck callbacks in a row, each replaced after a short grace.
    assert time.monotonic() - t0 < 3 * REPLACED
    for j in stuck:
        assert worker.status(j) == Status.TIMEOUT


def test_close_is_not_held_up_by_an_abandoned_thread(release: List[threading.Event]) -> None:
    gate = threading.Event()
    release.append(gate)
    w = Worker()
    job = w.start(lambda m: gate.wait() and None, b"", timeout_ms=50)
    with pytest.raises(JobTimeoutError):
        w.wait(job)
    # Past the grace period the thread is abandoned; close does not join it.
    nxt = w.start(lambda m: None, b"")
    w.wait(nxt, int(SETTLE * 1000))
    t0 = time.monotonic()
    assert w.close() == 0
    assert time.monotonic() - t0 < PROMPT


# ---- late results are discarded ------------------------------------------------


def test_late_result_is_discarded(worker: Worker) -> None:
    returned = threading.Event()
    interrupted: List[BaseException] = []

    def late(request: memoryview) -> bytes:
        try:
            time.sleep(0.5)
        except BaseException as exc:  # swallow the interrupt on purpose
            interrupted.append(exc)
        request[:] = b"LATE"
        returned.set()
        return b"late result"

    job = worker.start(late, b"abcd", timeout_ms=50)
    assert worker.wait_complete(job, int(SETTLE * 1000)) is True
    assert worker.status(job) == Status.TIMEOUT
    assert returned.wait(SETTLE), "the callback never returned"
    time.sleep(0.05)  # let the thread finish its bookkeeping
    assert worker.status(job) == Status.TIMEOUT
    assert worker.state(job) == State.TIMED_OUT
    assert worker.job_has_blob_result(job) is False
    assert worker.job_meta(job, JobMetaKey.BLOB_RESULT_SIZE) == 0
    with pytest.raises(JobTimeoutError):
        worker.take(job)
    assert not worker.job_known(job)


def test_late_exception_is_discarded(worker: Worker) -> None:
    returned = threading.Event()

    def late_fail(request: memoryview) -> None:
        try:
            time.sleep(0.4)
        except BaseException:
            pass
        returned.set()
        raise ValueError("too late to matter")

    job = worker.start(late_fail, b"", timeout_ms=50)
    assert worker.wait_complete(job, int(SETTLE * 1000)) is True
    text = worker.error_text(job)
    assert returned.wait(SETTLE)
    time.sleep(0.05)
    assert worker.status(job) == Status.TIMEOUT
    assert worker.error_text(job) == text
    assert "too late" not in worker.error_text(job)
    with pytest.raises(JobTimeoutError) as info:
        worker.wait(job)
    assert info.value.status == Status.TIMEOUT


def test_late_result_after_wait_destroyed_the_job(worker: Worker) -> None:
    """wait destroys the timed-out job while its callback still runs; the
    callback's later return touches nothing and later jobs are unaffected."""
    returned = threading.Event()

    def late(request: memoryview) -> bytes:
        try:
            time.sleep(0.3)
        except BaseException:
            pass
        request[:] = b"zz"
        returned.set()
        return b"x" * 100_000

    job = worker.start(late, b"ab", timeout_ms=50)
    with pytest.raises(JobTimeoutError):
        worker.wait(job)
    assert not worker.job_known(job)
    assert returned.wait(SETTLE)
    nxt = worker.start(lambda m: bytes(m), b"fine")
    assert worker.wait(nxt, int(SETTLE * 1000)) == b"fine"


# ---- timeout values --------------------------------------------------------------


@pytest.mark.parametrize("timeout_ms", [-1, 0, 1, 100, 60_000, 2_147_483_647])
def test_job_timeout_returns_the_given_value(worker: Worker, timeout_ms: int) -> None:
    gate = threading.Event()
    blocker = worker.start(lambda m: gate.wait(SETTLE) and None, b"")
    try:
        job = worker.start(lambda m: None, b"", timeout_ms=timeout_ms)
        assert worker.phase(job) == Phase.QUEUED
        assert worker.job_timeout(job) == timeout_ms
        assert worker.job_meta(job, JobMetaKey.TIMEOUT) == timeout_ms
        assert f"timeout_ms={timeout_ms}" in worker.info(job).split()
    finally:
        gate.set()
    worker.wait(blocker, int(SETTLE * 1000))
    assert worker.wait_complete(job, int(SETTLE * 1000))
    assert worker.job_timeout(job) == timeout_ms  # still, once completed


def test_job_timeout_default_is_infinite(worker: Worker) -> None:
    job = worker.start(lambda m: None, b"")
    assert worker.job_timeout(job) == -1
    job2 = worker.start_text(lambda m: None, "t")
    assert worker.job_timeout(job2) == -1
    jobs = worker.start_many(lambda m: None, [b"a", b"b"], timeout_ms=250)
    assert [worker.job_timeout(j) for j in jobs] == [250, 250]
    assert worker.job_timeout(worker.start_text(lambda m: None, "t", timeout_ms=7)) == 7


def test_timeout_zero_is_a_zero_ms_limit(worker: Worker) -> None:
    """Observed behaviour, documented: timeout_ms=0 is a run-time limit of
    0 ms, not "no limit": the deadline is the moment the job starts running,
    so every such job, even a trivial one, completes with TIMEOUT."""
    ran: List[int] = []

    def trivial(request: memoryview) -> bytes:
        ran.append(1)
        return b"never seen"

    jobs = [worker.start(trivial, b"z", timeout_ms=0) for _ in range(10)]
    for j in jobs:
        assert worker.job_timeout(j) == 0
    for j in jobs:
        with pytest.raises(JobTimeoutError) as info:
            worker.wait(j, int(SETTLE * 1000))
        assert info.value.status == Status.TIMEOUT
    # The route is fine afterwards.
    assert worker.wait(worker.start(lambda m: b"ok", b""), int(SETTLE * 1000)) == b"ok"


def test_timeout_zero_on_a_busy_loop(worker: Worker) -> None:
    started, stopped, counter = threading.Event(), threading.Event(), [0]
    job = worker.start(_busy_loop(started, stopped, counter), b"", timeout_ms=0)
    with pytest.raises(JobTimeoutError):
        worker.wait(job, int(SETTLE * 1000))
    if started.is_set():
        assert stopped.wait(PROMPT)


@pytest.mark.parametrize("bad", [-2, -100, 2_147_483_648, 1 << 63])
def test_out_of_range_timeouts_raise_value_error(worker: Worker, bad: int) -> None:
    with pytest.raises(ValueError):
        worker.start(lambda m: None, b"", timeout_ms=bad)
    with pytest.raises(ValueError):
        worker.start_many(lambda m: None, [b""], timeout_ms=bad)
    with pytest.raises(ValueError):
        worker.start_text(lambda m: None, "", timeout_ms=bad)
    with pytest.raises(ValueError):
        worker.open_route("r", timeout_ms=bad)
    job = worker.start(lambda m: None, b"")
    with pytest.raises(ValueError):
        worker.wait(job, bad)
    with pytest.raises(ValueError):
        worker.wait_complete(job, bad)
    assert worker.wait(job, int(SETTLE * 1000)) == b""


@pytest.mark.parametrize("bad", [1.5, "100", None, True, b"1"])
def test_non_int_timeouts_raise_type_error(worker: Worker, bad: object) -> None:
    with pytest.raises(TypeError):
        worker.start(lambda m: None, b"", timeout_ms=bad)  # type: ignore[arg-type]
    job = worker.start(lambda m: None, b"")
    with pytest.raises(TypeError):
        worker.wait(job, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        worker.wait_complete(job, bad)  # type: ignore[arg-type]
    assert worker.wait(job, int(SETTLE * 1000)) == b""


# ---- wait timeouts ----------------------------------------------------------------


def test_wait_timeout_leaves_the_job_untouched(worker: Worker) -> None:
    gate = threading.Event()
    job = worker.start(lambda m: gate.wait(SETTLE) and None or b"done", b"")
    with pytest.raises(WaitTimeoutError) as info:
        worker.wait(job, 50)
    assert isinstance(info.value, TimeoutError)
    assert not isinstance(info.value, JobTimeoutError)
    assert worker.job_known(job)
    assert worker.status(job) == Status.PENDING
    with pytest.raises(WaitTimeoutError):
        worker.wait(job, 0)
    assert worker.wait_complete(job, 0) is False
    assert worker.wait_complete(job, 30) is False
    gate.set()
    assert worker.wait(job, int(SETTLE * 1000)) == b"done"


def test_wait_timeout_is_independent_of_the_run_timeout(worker: Worker) -> None:
    """A short wait on a job with a long run-time limit raises WaitTimeoutError,
    and the job itself still succeeds."""
    job = worker.start(lambda m: time.sleep(0.3) or b"ok", b"", timeout_ms=20_000)
    with pytest.raises(WaitTimeoutError):
        worker.wait(job, 20)
    assert worker.wait(job, int(SETTLE * 1000)) == b"ok"


# ---- route default timeouts ------------------------------------------------------------


def test_route_default_timeout_applies_when_start_gives_none(worker: Worker) -> None:
    rid = worker.open_route("limited", timeout_ms=100)
    assert worker.route_meta("limited", RouteMetaKey.TIMEOUT) == 100
    assert "timeout_ms=100" in worker.route_info("limited").split()
    started, stopped, counter = threading.Event(), threading.Event(), [0]
    job = worker.start(_busy_loop(started, stopped, counter), b"", route="limited")
    assert worker.job_timeout(job) == 100
    assert worker.job_meta(job, JobMetaKey.ROUTE) == rid
    t0 = time.monotonic()
    with pytest.raises(JobTimeoutError):
        worker.wait(job)
    assert time.monotonic() - t0 < PROMPT
    assert stopped.wait(PROMPT)


def test_route_default_timeout_for_start_text_and_start_many(worker: Worker) -> None:
    worker.open_route("limited", timeout_ms=250)
    j1 = worker.start_text(lambda m: None, "x", route="limited")
    j2, j3 = worker.start_many(lambda m: None, [b"a", b"b"], route="limited")
    assert [worker.job_timeout(j) for j in (j1, j2, j3)] == [250, 250, 250]
    for j in (j1, j2, j3):
        worker.wait(j, int(SETTLE * 1000))


def test_explicit_timeout_overrides_the_route_default(worker: Worker) -> None:
    worker.open_route("limited", timeout_ms=100)
    slow = worker.start(lambda m: time.sleep(0.4) or b"slow-ok", b"", timeout_ms=10_000,
                        route="limited")
    assert worker.job_timeout(slow) == 10_000
    assert worker.wait(slow, int(SETTLE * 1000)) == b"slow-ok"
    tight = worker.start(lambda m: None, b"", timeout_ms=0, route="limited")
    assert worker.job_timeout(tight) == 0


def test_default_route_and_infinite_routes_have_no_limit(worker: Worker) -> None:
    worker.open_route("unlimited")
    worker.open_route("limited", timeout_ms=100)
    assert worker.route_meta("default", RouteMetaKey.TIMEOUT) == -1
    assert worker.route_meta("unlimited", RouteMetaKey.TIMEOUT) == -1
    a = worker.start(lambda m: time.sleep(0.3) or b"a", b"")
    b = worker.start(lambda m: time.sleep(0.3) or b"b", b"", route="unlimited")
    c = worker.start(lambda m: time.sleep(0.3) or b"c", b"", route="default")
    assert worker.job_timeout(a) == -1
    assert worker.job_timeout(b) == -1
    assert worker.job_timeout(c) == -1
    assert [worker.wait(j, int(SETTLE * 1000)) for j in (a, b, c)] == [b"a", b"b", b"c"]


def test_route_timeout_on_stuck_callback_replaces_route_thread(
        worker: Worker, release: List[threading.Event]) -> None:
    gate = threading.Event()
    release.append(gate)
    worker.open_route("limited", timeout_ms=100)
    stuck = worker.start(lambda m: gate.wait() and None, b"", route="limited")
    nxt = worker.start(lambda m: b"after", b"", route="limited")
    t0 = time.monotonic()
    assert worker.wait(nxt, int(SETTLE * 1000)) == b"after"
    assert time.monotonic() - t0 < REPLACED
    with pytest.raises(JobTimeoutError):
        worker.wait(stuck, 0)


def test_module_level_job_timeout() -> None:
    job = callbackworker.start(lambda m: None, b"", timeout_ms=1234)
    assert callbackworker.job_timeout(job) == 1234
    callbackworker.wait(job, int(SETTLE * 1000))
