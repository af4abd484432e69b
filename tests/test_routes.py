"""Named routes: concurrency, retries with backoff, delay between starts, route
control and the nine RouteMeta keys (SPEC section 3, seed:
asyncmeta-plugin-reference, issue 4).

``open_route(name, *, concurrency=1, timeout_ms=-1, max_retries=0,
backoff_ms=1000, delay_ms=0)`` adds a FIFO route run by ``concurrency``
threads.  A job whose callback raises runs again from a fresh copy of its
original request, up to ``max_retries`` more times; attempt n + 1 falls due
``backoff_ms * 2**(n-1)`` ms (at most one hour) after attempt n failed, and
meanwhile the job is pending (QUEUED, status PENDING).  ``delay_ms`` is the
least time between two consecutive starts on the route.

Retry and delay timers are checked against the worker's manual clock
(``Worker(manual_clock=True)``, moved only by ``advance_clock``), never
against real time.  Jobs are held running with ``threading.Event`` gates;
route counts are read from one ``route_info`` snapshot.  Every wait is
bounded; no test asserts that anything is fast.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from callbackworker import (
    CallbackWorkerError,
    JobCancelledError,
    JobFailedError,
    JobMetaKey,
    JobTimeoutError,
    Phase,
    Profile,
    RouteClosedError,
    RouteMetaKey,
    RouteState,
    ShutdownError,
    State,
    Status,
    UnknownRouteError,
    Worker,
    WorkerClosedError,
    current_job,
)
from callbackworker.asyncmeta import supports_route_service

from heapcheck import settle

LONG = 10.0
LONG_MS = 10_000
HOUR_MS = 3_600_000


# ---- helpers -------------------------------------------------------------------


class Holder:
    """A callback that runs until ``release`` is set, counting how many of its
    jobs run at once (``peak``) and in which order they started."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.cond = threading.Condition()
        self.running = 0
        self.peak = 0
        self.order: List[bytes] = []

    def __call__(self, request: memoryview) -> None:
        with self.cond:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.order.append(bytes(request))
            self.cond.notify_all()
        try:
            self.release.wait(LONG)
        finally:
            with self.cond:
                self.running -= 1

    def started(self, n: int) -> bool:
        """True once n jobs have started."""
        with self.cond:
            return self.cond.wait_for(lambda: len(self.order) >= n, LONG)


class Flaky:
    """Fails its first ``fails`` attempts (after scribbling over the request),
    then upper-cases the request.  Records what every attempt saw."""

    def __init__(self, fails: int) -> None:
        self.fails = fails
        self.attempts: List[int] = []
        self.seen: List[bytes] = []

    def __call__(self, request: memoryview) -> None:
        attempt = current_job().attempt
        self.seen.append(bytes(request))
        self.attempts.append(attempt)
        if attempt <= self.fails:
            request[:] = b"X" * len(request)
            raise ValueError(f"attempt {attempt}")
        request[:] = bytes(request).upper()


@pytest.fixture
def holders() -> Iterator[List[Holder]]:
    """Holders whose jobs are all released at teardown (before the worker
    closes: request this fixture after the worker)."""
    made: List[Holder] = []
    try:
        yield made
    finally:
        for h in made:
            h.release.set()


def new_holder(holders: List[Holder]) -> Holder:
    h = Holder()
    holders.append(h)
    return h


@pytest.fixture
def mw() -> Iterator[Worker]:
    """A Worker on the manual clock, closed after the test."""
    w = Worker(manual_clock=True)
    try:
        yield w
    finally:
        w.close()


def info_of(w: Worker, name: str) -> Dict[str, str]:
    return dict(p.split("=", 1) for p in w.route_info(name).split())


def counts(w: Worker, name: str) -> Tuple[int, int, int]:
    """(pending, queued, running) from one snapshot of the route."""
    d = info_of(w, name)
    return int(d["pending"]), int(d["queued"]), int(d["running"])


WAITING_RETRY = (1, 0, 0)  # one job on the route: pending, not ready, not running


def failed_attempts(w: Worker, name: str, cb: Flaky, n: int) -> bool:
    """True once attempt n of the route's only job has failed and its retry
    waits (pending, not queued, not running)."""
    return settle(lambda: len(cb.attempts) == n and counts(w, name) == WAITING_RETRY)


def noop(request: memoryview) -> None:
    return None


# ---- opening routes ------------------------------------------------------------


def test_default_route_is_id_1_named_default() -> None:
    with Worker(concurrency=3) as w:
        d = info_of(w, "default")
        assert d["id"] == "1" and d["name"] == "default"
        assert d["concurrency"] == "3"
        assert d["timeout_ms"] == "-1"


def test_open_route_returns_new_ids_from_2(worker) -> None:
    assert worker.open_route("a") == 2
    assert worker.open_route("b") == 3
    assert info_of(worker, "b")["id"] == "3"


def test_job_meta_route_is_the_route_id(worker) -> None:
    rid = worker.open_route("r")
    seen: List[int] = []
    on_route = worker.start(lambda m: seen.append(current_job().route), b"", route="r")
    on_default = worker.start(noop, b"")
    assert worker.wait_complete(on_route, LONG_MS) and worker.wait_complete(on_default, LONG_MS)
    assert worker.job_meta(on_route, JobMetaKey.ROUTE) == rid == 2
    assert worker.job_meta(on_default, JobMetaKey.ROUTE) == 1
    assert seen == [rid]


def test_capabilities_are_the_route_service_profile(worker) -> None:
    assert worker.capabilities() == Profile.ROUTE_SERVICE == 4095
    assert supports_route_service(worker.capabilities())


def test_start_without_timeout_takes_the_route_timeout(worker) -> None:
    worker.open_route("r", timeout_ms=5000)
    assert worker.job_timeout(worker.start(noop, b"", route="r")) == 5000
    assert worker.job_timeout(worker.start(noop, b"", -1, route="r")) == -1
    assert worker.job_timeout(worker.start(noop, b"", 700, route="r")) == 700


def test_a_route_runs_while_another_route_is_busy(worker, holders) -> None:
    h = new_holder(holders)
    worker.open_route("side")
    blocked = worker.start(h, b"", route="default")
    assert h.started(1)
    assert worker.wait(worker.start(lambda m: b"ran", b"", route="side"), LONG_MS) == b"ran"
    assert worker.phase(blocked) == Phase.RUNNING


# ---- RouteMeta keys --------------------------------------------------------------


def test_route_meta_state_is_open_then_closed(worker) -> None:
    worker.open_route("r")
    assert worker.route_meta("r", RouteMetaKey.STATE) == RouteState.OPEN == 1
    assert worker.route_meta("default", RouteMetaKey.STATE) == RouteState.OPEN
    worker.close_route("r")
    assert worker.route_meta("r", RouteMetaKey.STATE) == RouteState.CLOSED == 0


def test_route_meta_timeout_is_the_route_timeout(worker) -> None:
    worker.open_route("limited", timeout_ms=1234)
    worker.open_route("unlimited")
    assert worker.route_meta("limited", RouteMetaKey.TIMEOUT) == 1234
    assert worker.route_meta("unlimited", RouteMetaKey.TIMEOUT) == -1
    assert worker.route_meta("default", RouteMetaKey.TIMEOUT) == -1


def test_route_meta_pending_counts_jobs_not_started(worker, holders) -> None:
    h = new_holder(holders)
    worker.open_route("r")
    assert worker.route_meta("r", RouteMetaKey.PENDING) == 0
    first = worker.start(h, b"1", route="r")
    assert h.started(1)
    rest = [worker.start(h, b"%d" % i, route="r") for i in (2, 3)]
    assert worker.route_meta("r", RouteMetaKey.PENDING) == 2  # the running one is not
    h.release.set()
    for j in [first] + rest:
        worker.wait(j, LONG_MS)
    assert worker.route_meta("r", RouteMetaKey.PENDING) == 0


def test_route_meta_pending_counts_waiting_retries_and_queued_does_not(mw) -> None:
    mw.open_route("r", max_retries=1)
    cb = Flaky(fails=1)
    job = mw.start(cb, b"x", route="r")
    assert failed_attempts(mw, "r", cb, 1)
    assert mw.route_meta("r", RouteMetaKey.PENDING) == 1
    assert mw.route_meta("r", RouteMetaKey.QUEUED) == 0
    assert mw.route_meta("r", RouteMetaKey.RUNNING) == 0
    mw.advance_clock(1000)
    assert mw.wait(job, LONG_MS) == b"X"


def test_route_meta_queued_counts_ready_jobs_run_in_fifo_order(worker, holders) -> None:
    h = new_holder(holders)
    worker.open_route("r")
    jobs = [worker.start(h, b"%d" % i, route="r") for i in range(4)]
    assert h.started(1)
    assert worker.route_meta("r", RouteMetaKey.QUEUED) == 3
    h.release.set()
    for j in jobs:
        worker.wait(j, LONG_MS)
    assert worker.route_meta("r", RouteMetaKey.QUEUED) == 0
    assert h.order == [b"0", b"1", b"2", b"3"]


def test_route_meta_running_counts_jobs_in_their_callbacks(worker, holders) -> None:
    h = new_holder(holders)
    worker.open_route("r", concurrency=3)
    jobs = [worker.start(h, b"", route="r") for _ in range(5)]
    assert h.started(3)
    assert worker.route_meta("r", RouteMetaKey.RUNNING) == 3
    assert worker.route_meta("r", RouteMetaKey.QUEUED) == 2
    h.release.set()
    for j in jobs:
        worker.wait(j, LONG_MS)
    assert worker.route_meta("r", RouteMetaKey.RUNNING) == 0


def test_route_meta_drained_is_1_only_with_nothing_pending_or_running(worker, holders) -> None:
    h = new_holder(holders)
    worker.open_route("r")
    assert worker.route_meta("r", RouteMetaKey.DRAINED) == 1
    job = worker.start(h, b"", route="r")
    assert h.started(1)
    assert worker.route_meta("r", RouteMetaKey.DRAINED) == 0  # running
    queued = worker.start(h, b"", route="r")
    assert worker.route_meta("r", RouteMetaKey.DRAINED) == 0  # running and queued
    h.release.set()
    worker.wait(job, LONG_MS)
    worker.wait(queued, LONG_MS)
    assert worker.route_meta("r", RouteMetaKey.DRAINED) == 1


def test_route_meta_drained_is_0_while_a_retry_waits(mw) -> None:
    mw.open_route("r", max_retries=1)
    cb = Flaky(fails=1)
    job = mw.start(cb, b"x", route="r")
    assert failed_attempts(mw, "r", cb, 1)
    assert mw.route_meta("r", RouteMetaKey.DRAINED) == 0
    mw.advance_clock(1000)
    mw.wait(job, LONG_MS)
    assert mw.route_meta("r", RouteMetaKey.DRAINED) == 1


def test_route_meta_known_tells_an_unknown_route_from_a_zero(worker) -> None:
    worker.open_route("r")
    assert worker.route_meta("r", RouteMetaKey.KNOWN) == 1
    assert worker.route_meta("default", RouteMetaKey.KNOWN) == 1
    assert worker.route_meta("nope", RouteMetaKey.KNOWN) == 0
    worker.close_route("r")
    assert worker.route_meta("r", RouteMetaKey.KNOWN) == 1  # closed, still known


@pytest.mark.parametrize("key", [k for k in RouteMetaKey if k is not RouteMetaKey.KNOWN])
def test_route_meta_other_keys_raise_for_an_unknown_route(worker, key) -> None:
    with pytest.raises(UnknownRouteError, match="nope"):
        worker.route_meta("nope", key)


def test_route_meta_close_accepted_is_1_once_close_route_was_called(worker, holders) -> None:
    h = new_holder(holders)
    worker.open_route("r")
    job = worker.start(h, b"", route="r")
    assert h.started(1)
    assert worker.route_meta("r", RouteMetaKey.CLOSE_ACCEPTED) == 0
    assert worker.close_route("r") is True
    assert worker.route_meta("r", RouteMetaKey.CLOSE_ACCEPTED) == 1  # while still running
    h.release.set()
    worker.wait(job, LONG_MS)
    assert worker.route_meta("r", RouteMetaKey.CLOSE_ACCEPTED) == 1


def test_route_meta_closed_queued_is_1_while_a_closed_route_still_has_work(worker,
                                                                           holders) -> None:
    h = new_holder(holders)
    worker.open_route("r")
    running = worker.start(h, b"", route="r")
    assert h.started(1)
    queued = worker.start(h, b"", route="r")
    assert worker.route_meta("r", RouteMetaKey.CLOSED_QUEUED) == 0  # open
    worker.close_route("r")
    assert worker.route_meta("r", RouteMetaKey.CLOSED_QUEUED) == 1
    h.release.set()
    worker.wait(running, LONG_MS)
    worker.wait(queued, LONG_MS)
    assert worker.route_meta("r", RouteMetaKey.CLOSED_QUEUED) == 0  # closed and drained


def test_route_meta_closed_queued_counts_a_waiting_retry(mw) -> None:
    mw.open_route("r", max_retries=1)
    cb = Flaky(fails=1)
    job = mw.start(cb, b"x", route="r")
    assert failed_attempts(mw, "r", cb, 1)
    mw.close_route("r")
    assert mw.route_meta("r", RouteMetaKey.CLOSED_QUEUED) == 1
    mw.advance_clock(1000)
    assert mw.wait(job, LONG_MS) == b"X"
    assert mw.route_meta("r", RouteMetaKey.CLOSED_QUEUED) == 0


# ---- concurrency -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3])
def test_concurrency_is_a_ceiling_that_is_reached(worker, holders, n) -> None:
    h = new_holder(holders)
    worker.open_route("r", concurrency=n)
    jobs = [worker.start(h, b"%d" % i, route="r") for i in range(3 * n + 1)]
    assert h.started(n)
    assert worker.route_meta("r", RouteMetaKey.RUNNING) == n
    assert h.running == n
    h.release.set()
    for j in jobs:
        worker.wait(j, LONG_MS)
    assert h.peak == n
    assert len(h.order) == 3 * n + 1
    assert int(info_of(worker, "r")["threads"]) <= n


# ---- close_route and wait_drained ----------------------------------------------------


def test_close_route_is_true_the_first_time_only(worker) -> None:
    worker.open_route("r")
    assert worker.close_route("r") is True
    assert worker.close_route("r") is False


def test_start_on_a_closed_route_raises_route_closed_error(worker) -> None:
    worker.open_route("r")
    worker.close_route("r")
    with pytest.raises(RouteClosedError, match="'r' is closed"):
        worker.start(noop, b"", route="r")
    with pytest.raises(RouteClosedError):
        worker.start_many(noop, [b""], route="r")
    with pytest.raises(RouteClosedError):
        worker.start_text(noop, "x", route="r")


def test_close_route_lets_queued_jobs_run(worker, holders) -> None:
    h = new_holder(holders)
    worker.open_route("r")
    jobs = [worker.start(h, b"%d" % i, route="r") for i in range(3)]
    assert h.started(1)
    worker.close_route("r")
    h.release.set()
    assert [worker.wait(j, LONG_MS) for j in jobs] == [b"0", b"1", b"2"]
    assert worker.wait_drained("r", LONG_MS) is True


def test_wait_drained_waits_for_running_and_queued_jobs(worker, holders) -> None:
    h = new_holder(holders)
    worker.open_route("r")
    jobs = [worker.start(h, b"", route="r") for _ in range(2)]
    assert h.started(1)
    assert worker.wait_drained("r", 0) is False
    h.release.set()
    assert worker.wait_drained("r", LONG_MS) is True
    assert all(worker.phase(j) == Phase.COMPLETED for j in jobs)


def test_wait_drained_on_an_idle_route_is_true_at_once(worker) -> None:
    worker.open_route("r")
    assert worker.wait_drained("r", 0) is True


def test_wait_drained_covers_waiting_retries(mw) -> None:
    mw.open_route("r", max_retries=1)
    cb = Flaky(fails=1)
    job = mw.start(cb, b"x", route="r")
    assert failed_attempts(mw, "r", cb, 1)
    assert mw.wait_drained("r", 50) is False
    mw.advance_clock(1000)
    assert mw.wait_drained("r", LONG_MS) is True
    assert mw.wait(job, 0) == b"X"


# ---- route_info ------------------------------------------------------------------------


def test_route_info_has_every_field(worker) -> None:
    rid = worker.open_route("r", concurrency=2, timeout_ms=5000, max_retries=3,
                            backoff_ms=250, delay_ms=10)
    assert info_of(worker, "r") == {
        "id": str(rid), "name": "r", "state": "open", "concurrency": "2",
        "timeout_ms": "5000", "max_retries": "3", "backoff_ms": "250", "delay_ms": "10",
        "pending": "0", "queued": "0", "running": "0", "threads": "0",
        "close_accepted": "0",
    }


def test_route_info_counts_jobs_and_threads(worker, holders) -> None:
    h = new_holder(holders)
    worker.open_route("r", concurrency=2)
    jobs = [worker.start(h, b"", route="r") for _ in range(5)]
    assert h.started(2)
    d = info_of(worker, "r")
    assert (d["pending"], d["queued"], d["running"], d["threads"]) == ("3", "3", "2", "2")
    h.release.set()
    for j in jobs:
        worker.wait(j, LONG_MS)


def test_route_info_after_close_route(worker) -> None:
    worker.open_route("r")
    worker.close_route("r")
    d = info_of(worker, "r")
    assert d["state"] == "closed" and d["close_accepted"] == "1"


def test_route_info_quotes_the_name(worker) -> None:
    name = "a b=c"
    rid = worker.open_route(name)
    line = worker.route_info(name)
    assert len(line.split()) == 13  # the space in the name does not split a field
    d = info_of(worker, name)
    assert d["name"] == "a%20b%3Dc"
    assert d["id"] == str(rid)
    assert worker.route_meta(name, RouteMetaKey.KNOWN) == 1
    assert worker.wait(worker.start(lambda m: b"ok", b"", route=name), LONG_MS) == b"ok"


# ---- retries: backoff on the manual clock ------------------------------------------------


def test_retry_backoff_doubles_from_backoff_ms(mw) -> None:
    mw.open_route("r", max_retries=3, backoff_ms=1000)
    cb = Flaky(fails=99)
    job = mw.start(cb, b"abc", route="r")
    for n, gap in enumerate((1000, 2000, 4000), start=1):
        assert failed_attempts(mw, "r", cb, n)
        mw.advance_clock(gap - 1)
        assert counts(mw, "r") == WAITING_RETRY  # not due yet: not even queued
        assert cb.attempts == list(range(1, n + 1))
        mw.advance_clock(1)
        assert settle(lambda: len(cb.attempts) == n + 1)
    with pytest.raises(JobFailedError) as caught:
        mw.wait(job, LONG_MS)
    assert cb.attempts == [1, 2, 3, 4]
    assert caught.value.status == Status.ERROR
    assert isinstance(caught.value.__cause__, ValueError)
    assert str(caught.value.__cause__) == "attempt 4"
    assert caught.value.error_text == "ValueError: attempt 4"


def test_a_due_retry_is_queued_when_advance_clock_returns(mw, holders) -> None:
    h = new_holder(holders)
    mw.open_route("r", max_retries=1, backoff_ms=1000)
    cb = Flaky(fails=1)
    job = mw.start(cb, b"x", route="r")
    assert failed_attempts(mw, "r", cb, 1)
    busy = mw.start(h, b"", route="r")  # holds the route's only thread
    assert h.started(1)
    assert counts(mw, "r") == (1, 0, 1)
    mw.advance_clock(999)
    assert counts(mw, "r") == (1, 0, 1)
    mw.advance_clock(1)
    assert counts(mw, "r") == (1, 1, 1)  # due: moved to the ready queue
    assert mw.phase(job) == Phase.QUEUED
    h.release.set()
    assert mw.wait(job, LONG_MS) == b"X"
    mw.wait(busy, LONG_MS)


def test_a_waiting_retry_looks_queued_and_pending(mw) -> None:
    mw.open_route("r", max_retries=1)
    cb = Flaky(fails=1)
    job = mw.start(cb, b"x", route="r")
    assert failed_attempts(mw, "r", cb, 1)
    assert mw.phase(job) == Phase.QUEUED
    assert mw.state(job) == State.QUEUED
    assert mw.status(job) == Status.PENDING
    assert mw.job_meta(job, JobMetaKey.STATUS) == Status.PENDING
    assert mw.wait_complete(job, 0) is False
    mw.advance_clock(1000)
    assert mw.wait(job, LONG_MS) == b"X"


def test_a_waiter_keeps_waiting_through_a_retry(mw) -> None:
    mw.open_route("r", max_retries=1)
    cb = Flaky(fails=1)
    job = mw.start(cb, b"abc", route="r")
    out: List[Any] = []

    def waiter() -> None:
        try:
            out.append(mw.wait(job, LONG_MS))
        except BaseException as exc:  # reported below
            out.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    assert failed_attempts(mw, "r", cb, 1)
    mw.advance_clock(1000)
    t.join(LONG)
    assert out == [b"ABC"]


def test_a_job_that_succeeds_on_a_retry_returns_its_response(mw) -> None:
    mw.open_route("r", max_retries=3, backoff_ms=1000)
    cb = Flaky(fails=1)
    job = mw.start(cb, b"abc", route="r")
    assert failed_attempts(mw, "r", cb, 1)
    mw.advance_clock(1000)
    assert mw.wait(job, LONG_MS) == b"ABC"
    assert cb.attempts == [1, 2]


def test_attempt_counts_from_1(mw) -> None:
    mw.open_route("r", max_retries=2, backoff_ms=10)
    cb = Flaky(fails=2)
    job = mw.start(cb, b"a", route="r")
    assert failed_attempts(mw, "r", cb, 1)
    mw.advance_clock(10)
    assert failed_attempts(mw, "r", cb, 2)
    mw.advance_clock(20)
    assert mw.wait(job, LONG_MS) == b"A"
    assert cb.attempts == [1, 2, 3]


def test_backoff_is_capped_at_one_hour(mw) -> None:
    mw.open_route("r", max_retries=1, backoff_ms=2**30)
    cb = Flaky(fails=1)
    job = mw.start(cb, b"a", route="r")
    assert failed_attempts(mw, "r", cb, 1)
    mw.advance_clock(HOUR_MS - 1)
    assert counts(mw, "r") == WAITING_RETRY
    mw.advance_clock(1)
    assert mw.wait(job, LONG_MS) == b"A"


def test_backoff_stays_capped_for_late_attempts(mw) -> None:
    retries = 35  # past the point where the doubling would overflow 32 bits
    mw.open_route("r", max_retries=retries, backoff_ms=1000)
    cb = Flaky(fails=retries)
    job = mw.start(cb, b"a", route="r")
    for n in range(1, retries + 1):
        gap = min(1000 * 2 ** (n - 1), HOUR_MS)
        assert failed_attempts(mw, "r", cb, n)
        mw.advance_clock(gap - 1)
        assert counts(mw, "r") == WAITING_RETRY, f"attempt {n + 1} due before {gap} ms"
        mw.advance_clock(1)
    assert mw.wait(job, LONG_MS) == b"A"
    assert cb.attempts == list(range(1, retries + 2))


def test_backoff_0_retries_at_once(mw) -> None:
    mw.open_route("r", max_retries=2, backoff_ms=0)
    cb = Flaky(fails=2)
    assert mw.wait(mw.start(cb, b"a", route="r"), LONG_MS) == b"A"
    assert cb.attempts == [1, 2, 3]


def test_without_max_retries_a_failure_is_final(worker) -> None:
    worker.open_route("r")
    cb = Flaky(fails=1)
    with pytest.raises(JobFailedError) as caught:
        worker.wait(worker.start(cb, b"a", route="r"), LONG_MS)
    assert str(caught.value.__cause__) == "attempt 1"
    assert cb.attempts == [1]


def test_a_retry_runs_on_a_fresh_copy_of_the_original_request(mw) -> None:
    mw.open_route("r", max_retries=2, backoff_ms=1)
    cb = Flaky(fails=2)  # every failing attempt overwrites the request with X
    job = mw.start(cb, b"abc", route="r")
    assert failed_attempts(mw, "r", cb, 1)
    mw.advance_clock(1)
    assert failed_attempts(mw, "r", cb, 2)
    mw.advance_clock(2)
    assert mw.wait(job, LONG_MS) == b"ABC"
    assert cb.seen == [b"abc", b"abc", b"abc"]


def test_a_failing_attempt_that_returned_bytes_does_not_leak_into_the_retry(mw) -> None:
    seen: List[bytes] = []

    def cb(request: memoryview) -> bytes:
        seen.append(bytes(request))
        if current_job().attempt == 1:
            request[:] = b"zz"
            return "not bytes"  # type: ignore[return-value]  # fails the attempt
        return bytes(request) + b"!"

    mw.open_route("r", max_retries=1, backoff_ms=5)
    job = mw.start(cb, b"ab", route="r")
    assert settle(lambda: len(seen) == 1 and counts(mw, "r") == WAITING_RETRY)
    mw.advance_clock(5)
    assert mw.wait(job, LONG_MS) == b"ab!"
    assert seen == [b"ab", b"ab"]


def test_only_the_last_attempts_error_is_reported(mw) -> None:
    mw.open_route("r", max_retries=1, backoff_ms=1)
    cb = Flaky(fails=5)
    job = mw.start(cb, b"a", route="r")
    assert failed_attempts(mw, "r", cb, 1)
    mw.advance_clock(1)
    assert mw.wait_complete(job, LONG_MS)
    assert mw.error_text(job) == "ValueError: attempt 2"
    assert "attempt=2" in mw.info(job).split()
    with pytest.raises(JobFailedError) as caught:
        mw.wait(job, 0)
    assert str(caught.value.__cause__) == "attempt 2"
    assert caught.value.__cause__.__traceback__ is not None


# ---- retries: what is not retried, cancel, close ---------------------------------------


def test_a_timed_out_job_is_not_retried(worker) -> None:
    stop = threading.Event()
    attempts: List[int] = []

    def spin(request: memoryview) -> None:
        attempts.append(current_job().attempt)
        while not stop.is_set():  # Python bytecode: the timeout interrupts it
            stop.wait(0.01)

    worker.open_route("r", timeout_ms=50, max_retries=3, backoff_ms=0)
    try:
        with pytest.raises(JobTimeoutError):
            worker.wait(worker.start(spin, b"", route="r"), LONG_MS)
        assert worker.wait_drained("r", LONG_MS) is True
    finally:
        stop.set()
    assert attempts == [1]


def test_a_running_job_whose_cancel_was_requested_is_not_retried(worker) -> None:
    started, gate = threading.Event(), threading.Event()
    attempts: List[int] = []
    flags: List[bool] = []

    def cb(request: memoryview) -> None:
        attempts.append(current_job().attempt)
        started.set()
        gate.wait(LONG)
        flags.append(current_job().cancel_requested)
        raise ValueError("gave up")

    worker.open_route("r", max_retries=3, backoff_ms=0)
    try:
        job = worker.start(cb, b"", route="r")
        assert started.wait(LONG)
        assert worker.cancel(job) is False
    finally:
        gate.set()
    assert worker.wait_complete(job, LONG_MS)
    assert worker.status(job) == Status.ERROR
    assert worker.wait_drained("r", LONG_MS) is True
    assert attempts == [1] and flags == [True]
    with pytest.raises(JobFailedError):
        worker.wait(job, 0)


def test_a_final_failure_before_max_retries_keeps_its_exception_as_cause(worker) -> None:
    started, gate = threading.Event(), threading.Event()

    def cb(request: memoryview) -> None:
        started.set()
        gate.wait(LONG)
        raise ValueError("gave up")

    worker.open_route("r", max_retries=3, backoff_ms=0)
    try:
        job = worker.start(cb, b"", route="r")
        assert started.wait(LONG)
        worker.cancel(job)
    finally:
        gate.set()
    with pytest.raises(JobFailedError) as caught:
        worker.wait(job, LONG_MS)
    assert caught.value.error_text == "ValueError: gave up"
    assert isinstance(caught.value.__cause__, ValueError)


@pytest.mark.parametrize("max_retries", [0, 2])
def test_a_kept_view_fails_the_job_without_retry_and_reports_buffer_error(worker,
                                                                        max_retries) -> None:
    kept: List[memoryview] = []
    attempts: List[int] = []

    def cb(request: memoryview) -> None:
        attempts.append(current_job().attempt)
        kept.append(request[:1])  # a slice of the view outlives the callback

    worker.open_route("r", max_retries=max_retries, backoff_ms=0)
    job = worker.start(cb, b"x", route="r")
    assert worker.wait_complete(job, LONG_MS)
    assert worker.wait_drained("r", LONG_MS)
    assert attempts == [1]
    with pytest.raises(JobFailedError) as caught:
        worker.wait(job, 0)
    assert caught.value.error_text.startswith("BufferError:")
    assert isinstance(caught.value.__cause__, BufferError)


def test_cancel_of_a_waiting_retry(mw) -> None:
    mw.open_route("r", max_retries=1, backoff_ms=1000)
    cb = Flaky(fails=1)
    job = mw.start(cb, b"x", route="r")
    assert failed_attempts(mw, "r", cb, 1)
    assert mw.cancel(job) is True
    assert mw.status(job) == Status.CANCELLED
    assert mw.state(job) == State.CANCELLED
    assert counts(mw, "r") == (0, 0, 0)
    assert mw.route_meta("r", RouteMetaKey.DRAINED) == 1
    mw.advance_clock(1000)
    assert counts(mw, "r") == (0, 0, 0)  # nothing fell due
    with pytest.raises(JobCancelledError):
        mw.wait(job, LONG_MS)
    assert cb.attempts == [1]


def test_close_during_a_waiting_retry_shuts_the_job_down() -> None:
    # The waiter must be blocked in wait() when close() runs (after close a
    # fresh wait raises WorkerClosedError instead); a waiter that lost that
    # race is detected and the scenario is run again.
    outcome: Optional[BaseException] = None
    for _ in range(5):
        w = Worker(manual_clock=True)
        out: List[Any] = []
        try:
            w.open_route("r", max_retries=1, backoff_ms=1000)
            cb = Flaky(fails=1)
            job = w.start(cb, b"x", route="r")
            assert failed_attempts(w, "r", cb, 1)
            ready = threading.Event()

            def waiter() -> None:
                ready.set()
                try:
                    out.append(w.wait(job))
                except BaseException as exc:  # checked below
                    out.append(exc)

            t = threading.Thread(target=waiter)
            t.start()
            assert ready.wait(LONG)
            t.join(0.05)  # negative check: the waiter blocks
            assert not out
            assert w.close() == 0
            t.join(LONG)
            assert not t.is_alive()
        finally:
            w.close()
        assert cb.attempts == [1]
        assert len(out) == 1 and isinstance(out[0], (ShutdownError, WorkerClosedError)), out
        outcome = out[0]
        if isinstance(outcome, ShutdownError):
            break
    assert isinstance(outcome, ShutdownError)
    assert outcome.status == Status.SHUTDOWN


# ---- delay_ms on the manual clock ---------------------------------------------------------


def test_delay_ms_spaces_consecutive_starts_across_threads(mw) -> None:
    mw.open_route("r", concurrency=2, delay_ms=100)
    starts: List[bytes] = []
    jobs = mw.start_many(lambda m: starts.append(bytes(m)), [b"1", b"2", b"3"], route="r")
    assert mw.wait_complete(jobs[0], LONG_MS)  # the first starts at once
    assert counts(mw, "r") == (2, 2, 0)
    mw.advance_clock(99)
    assert not mw.wait_complete(jobs[1], 50)  # a thread is free, but not yet
    assert counts(mw, "r") == (2, 2, 0)
    mw.advance_clock(1)
    assert mw.wait_complete(jobs[1], LONG_MS)
    assert counts(mw, "r") == (1, 1, 0)
    mw.advance_clock(99)
    assert not mw.wait_complete(jobs[2], 50)
    mw.advance_clock(1)
    assert mw.wait_complete(jobs[2], LONG_MS)
    assert starts == [b"1", b"2", b"3"]
    assert mw.wait_drained("r", LONG_MS)


def test_delay_ms_counts_from_the_previous_start(mw) -> None:
    mw.open_route("r", delay_ms=100)
    first = mw.start(noop, b"", route="r")
    assert mw.wait_complete(first, LONG_MS)
    mw.advance_clock(150)  # the gap has passed: the next start is immediate
    second = mw.start(noop, b"", route="r")
    assert mw.wait_complete(second, LONG_MS)
    third = mw.start(noop, b"", route="r")
    mw.advance_clock(99)
    assert not mw.wait_complete(third, 50)
    mw.advance_clock(1)
    assert mw.wait_complete(third, LONG_MS)


def test_delay_ms_0_starts_without_the_clock(mw) -> None:
    mw.open_route("r", concurrency=2)
    jobs = mw.start_many(noop, [b""] * 5, route="r")
    assert all(mw.wait_complete(j, LONG_MS) for j in jobs)


# ---- advance_clock ------------------------------------------------------------------------


def test_advance_clock_needs_a_manual_clock(worker) -> None:
    with pytest.raises(RuntimeError, match="manual_clock"):
        worker.advance_clock(1)


@pytest.mark.parametrize("ms, exc", [
    (-1, ValueError),
    (1.0, TypeError),
    ("1", TypeError),
    (None, TypeError),
    (True, TypeError),
])
def test_advance_clock_rejects_bad_ms(mw, ms, exc) -> None:
    with pytest.raises(exc, match="ms"):
        mw.advance_clock(ms)


def test_advance_clock_0_is_accepted(mw) -> None:
    mw.advance_clock(0)


def test_advance_clock_on_a_closed_worker_raises_worker_closed_error() -> None:
    w = Worker(manual_clock=True)
    w.close()
    with pytest.raises(WorkerClosedError):
        w.advance_clock(1)


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["start", "start_many", "start_text", "route_meta",
                                  "route_info", "close_route", "wait_drained"])
def test_unknown_route_raises_unknown_route_error(worker, verb) -> None:
    calls = {
        "start": lambda: worker.start(noop, b"", route="nope"),
        "start_many": lambda: worker.start_many(noop, [b""], route="nope"),
        "start_text": lambda: worker.start_text(noop, "x", route="nope"),
        "route_meta": lambda: worker.route_meta("nope", RouteMetaKey.STATE),
        "route_info": lambda: worker.route_info("nope"),
        "close_route": lambda: worker.close_route("nope"),
        "wait_drained": lambda: worker.wait_drained("nope", 0),
    }
    with pytest.raises(UnknownRouteError, match="unknown route 'nope'") as caught:
        calls[verb]()
    assert isinstance(caught.value, KeyError)
    assert isinstance(caught.value, CallbackWorkerError)


@pytest.mark.parametrize("name", ["r", "default"])
def test_duplicate_route_name_raises_value_error(worker, name) -> None:
    worker.open_route("r")
    with pytest.raises(ValueError, match="exists already"):
        worker.open_route(name)


@pytest.mark.parametrize("value, exc", [
    (0, ValueError), (-1, ValueError), (1025, ValueError),
    ("2", TypeError), (2.0, TypeError), (None, TypeError), (True, TypeError),
])
def test_open_route_rejects_bad_concurrency(worker, value, exc) -> None:
    with pytest.raises(exc, match="concurrency"):
        worker.open_route("r", concurrency=value)
    assert worker.route_meta("r", RouteMetaKey.KNOWN) == 0


@pytest.mark.parametrize("field", ["max_retries", "backoff_ms", "delay_ms"])
@pytest.mark.parametrize("value, exc", [
    (-1, ValueError), (2**31, ValueError),
    (1.0, TypeError), ("1", TypeError), (None, TypeError), (True, TypeError), (False, TypeError),
])
def test_open_route_rejects_bad_counts(worker, field, value, exc) -> None:
    with pytest.raises(exc, match=field):
        worker.open_route("r", **{field: value})
    assert worker.route_meta("r", RouteMetaKey.KNOWN) == 0


@pytest.mark.parametrize("field", ["max_retries", "backoff_ms", "delay_ms"])
def test_open_route_accepts_counts_0_and_2_31_minus_1(worker, field) -> None:
    worker.open_route("zero", **{field: 0})
    worker.open_route("max", **{field: 2**31 - 1})
    assert info_of(worker, "zero")[field] == "0"
    assert info_of(worker, "max")[field] == str(2**31 - 1)


@pytest.mark.parametrize("name, exc", [
    ("", ValueError),
    ("r" * 129, ValueError),
    ("é" * 65, ValueError),  # 130 bytes
    ("a\0b", ValueError),
    (5, TypeError),
    (None, TypeError),
    (b"r", TypeError),
])
def test_open_route_rejects_bad_names(worker, name, exc) -> None:
    with pytest.raises(exc, match="route name"):
        worker.open_route(name)


def test_open_route_accepts_a_128_byte_name(worker) -> None:
    name = "é" * 64
    rid = worker.open_route(name)
    assert worker.route_meta(name, RouteMetaKey.KNOWN) == 1
    assert worker.wait(worker.start(lambda m: b"ok", b"", route=name), LONG_MS) == b"ok"
    assert rid == 2


@pytest.mark.parametrize("value", ["yes", 1, 0, None])
def test_manual_clock_must_be_a_bool(value) -> None:
    with pytest.raises(TypeError, match="manual_clock"):
        Worker(manual_clock=value)


def test_current_job_outside_a_callback_raises() -> None:
    with pytest.raises(CallbackWorkerError, match="outside a callback"):
        current_job()


def test_progress_outside_the_callback_raises(worker) -> None:
    kept: List[Any] = []
    worker.wait(worker.start(lambda m: kept.append(current_job()), b"", route=None), LONG_MS)
    with pytest.raises(CallbackWorkerError, match="outside that job's callback"):
        kept[0].progress({"late": True})
