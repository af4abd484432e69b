"""``Worker.wait_many`` (and ``callbackworker.wait_many``): the responses of
many jobs in order, as ``[wait(j) for j in ids]`` would return them, with one
deadline for the whole call.

Ordering is made deterministic with ``threading.Event``: a gate job occupies
the worker's only thread until the test releases it.  Short timeouts are only
ever expected to expire.
"""

from __future__ import annotations

import threading
import time
from typing import List, Tuple

import pytest

import callbackworker
from callbackworker import (
    JobCancelledError,
    JobFailedError,
    Phase,
    UnknownJobError,
    WaitTimeoutError,
    Worker,
    WorkerClosedError,
)

WAIT_S = 10.0
SHORT_MS = 50


def upper(request: memoryview) -> None:
    request[:] = bytes(request).upper()


def fail(request: memoryview) -> None:
    raise ValueError(f"bad {bytes(request).decode()}")


def grow(request: memoryview) -> bytes:
    return bytes(request) * 100  # longer than the request: a replaced response


def occupy(w: Worker) -> Tuple[threading.Event, int]:
    """A job holding the worker's only thread until the event is set."""
    started, release = threading.Event(), threading.Event()

    def gate(request: memoryview) -> None:
        started.set()
        release.wait(WAIT_S)

    jid = w.start(gate, b"gate")
    assert started.wait(WAIT_S)
    return release, jid


def test_wait_many_returns_responses_in_order_and_destroys_the_jobs(worker: Worker) -> None:
    requests = [b"job %d" % i for i in range(1000)]  # several chunks of the core call
    ids = [worker.start(upper, r) for r in requests]
    out = worker.wait_many(reversed(ids))
    assert out == [r.upper() for r in reversed(requests)]
    assert all(type(b) is bytes for b in out)
    assert not any(worker.job_known(j) for j in ids)


def test_wait_many_returns_replaced_and_empty_responses(worker: Worker) -> None:
    ids = [worker.start(grow, b"ab"), worker.start(upper, b""), worker.start(grow, b"")]
    assert worker.wait_many(ids) == [b"ab" * 100, b"", b""]


def test_wait_many_of_no_ids_is_an_empty_list(worker: Worker) -> None:
    assert worker.wait_many([]) == []


def test_wait_many_blocks_until_every_job_completes(worker: Worker) -> None:
    release, gate = occupy(worker)
    ids = [worker.start(upper, b"x") for _ in range(3)]
    result: List[List[bytes]] = []
    waiter = threading.Thread(target=lambda: result.append(worker.wait_many([gate, *ids])))
    waiter.start()
    assert worker.phase(ids[0]) == Phase.QUEUED
    release.set()
    waiter.join(WAIT_S)
    assert result == [[b"gate", b"X", b"X", b"X"]]


def test_wait_many_failed_job_raises_its_error_and_stops_there(worker: Worker) -> None:
    ids = [worker.start(upper, b"a"), worker.start(fail, b"b"), worker.start(upper, b"c")]
    worker.wait_complete(ids[2], int(WAIT_S * 1000))
    with pytest.raises(JobFailedError, match="ValueError: bad b") as excinfo:
        worker.wait_many(ids)
    assert isinstance(excinfo.value.__cause__, ValueError)  # the callback's own exception
    # Before it: destroyed.  It: destroyed, as wait destroys a failed job.
    # After it: untouched.
    assert [worker.job_known(j) for j in ids] == [False, False, True]
    assert worker.wait(ids[2]) == b"C"


def test_wait_many_reports_a_failure_while_a_later_job_still_runs() -> None:
    """A failed job is reported as soon as it has failed: not once every
    later job of the call has completed."""
    with Worker(concurrency=2) as w:
        started, release = threading.Event(), threading.Event()

        def blocked(request: memoryview) -> None:
            started.set()
            release.wait(WAIT_S)

        slow = w.start(blocked, b"slow")
        assert started.wait(WAIT_S)
        failing = w.start(fail, b"x")
        try:
            with pytest.raises(JobFailedError, match="bad x"):
                w.wait_many([failing, slow])
            assert not release.is_set() and w.phase(slow) == Phase.RUNNING
        finally:
            release.set()
        assert w.wait(slow) == b"slow"


def test_wait_many_sleeps_while_its_jobs_run() -> None:
    """Waiting for a batch of long jobs costs the waiting thread almost no
    CPU: it looks at the batch for a failure less and less often while
    nothing completes, instead of every millisecond (which took ~65 ms of
    CPU per second of waiting).  There is no count of wake-ups to test, so
    this measures the waiting thread's CPU time, against a generous bound:
    a quarter of the old cost."""
    with Worker(concurrency=2) as w:
        ids = [w.start(lambda m: time.sleep(2.0), b"") for _ in range(2)]
        cpu = time.thread_time()
        assert w.wait_many(ids) == [b"", b""]
        cpu = time.thread_time() - cpu
    assert cpu < 0.05, f"wait_many used {cpu:.3f} s of CPU waiting 2 s for its jobs"


def test_wait_many_reports_a_job_cancelled_while_it_waits_for_later_jobs(
        worker: Worker) -> None:
    """A job of the call cancelled while the call waits is reported at
    once, with the later jobs still queued."""
    release, _ = occupy(worker)
    cancelled = worker.start(upper, b"c")
    last = worker.start(upper, b"l")
    outcome: List[BaseException] = []

    def wait_many() -> None:
        try:
            worker.wait_many([cancelled, last])
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    waiter = threading.Thread(target=wait_many)
    try:
        waiter.start()
        threading.Event().wait(SHORT_MS / 1000)  # lets it block, if it can
        assert worker.cancel(cancelled)
        waiter.join(WAIT_S)
        assert not waiter.is_alive(), "wait_many waited for the later job"
        assert [type(e) for e in outcome] == [JobCancelledError]
        assert worker.phase(last) == Phase.QUEUED
    finally:
        release.set()
        waiter.join(WAIT_S)
    assert worker.wait(last) == b"L"


def test_wait_many_cancelled_job_raises_job_cancelled_error(worker: Worker) -> None:
    release, gate = occupy(worker)
    queued = worker.start(upper, b"q")
    assert worker.cancel(queued)
    release.set()
    with pytest.raises(JobCancelledError):
        worker.wait_many([gate, queued])
    assert not worker.job_known(gate) and not worker.job_known(queued)


def test_wait_many_timeout_bounds_the_whole_call_and_leaves_the_rest(worker: Worker) -> None:
    done = worker.start(upper, b"d")
    worker.wait_complete(done, int(WAIT_S * 1000))
    release, gate = occupy(worker)
    queued = worker.start(upper, b"q")
    with pytest.raises(WaitTimeoutError):
        worker.wait_many([done, gate, queued], SHORT_MS)
    assert not worker.job_known(done)
    assert worker.phase(gate) == Phase.RUNNING  # the job it timed out on: untouched
    assert worker.phase(queued) == Phase.QUEUED
    release.set()
    assert worker.wait_many([gate, queued]) == [b"gate", b"Q"]


def test_wait_many_zero_timeout_takes_only_completed_jobs(worker: Worker) -> None:
    release, gate = occupy(worker)
    with pytest.raises(WaitTimeoutError):
        worker.wait_many([gate], 0)
    release.set()
    assert worker.wait_many([gate], int(WAIT_S * 1000)) == [b"gate"]


def test_wait_many_unknown_id_raises_and_leaves_it_and_the_rest(worker: Worker) -> None:
    first = worker.start(upper, b"a")
    last = worker.start(upper, b"c")
    with pytest.raises(UnknownJobError):
        worker.wait_many([first, first, last])  # the second time, it is gone
    assert not worker.job_known(first)
    assert worker.wait(last) == b"C"


def test_wait_many_id_that_was_never_possible_raises_before_waiting(worker: Worker) -> None:
    jid = worker.start(upper, b"a")
    with pytest.raises(UnknownJobError):
        worker.wait_many([jid, 0])
    assert worker.wait(jid) == b"A"


def test_wait_many_takes_any_iterable_of_ints_and_int_subclasses(worker: Worker) -> None:
    class JobId(int):
        pass

    ids = [worker.start(upper, b"%d" % i) for i in range(3)]
    assert worker.wait_many(iter([ids[0], JobId(ids[1])])) == [b"0", b"1"]
    assert worker.wait_many(jid for jid in ids[2:]) == [b"2"]


def test_wait_many_ids_out_of_the_cores_range_raise_before_waiting(worker: Worker) -> None:
    jid = worker.start(upper, b"a")
    for impossible in (-1, 2 ** 63, 2 ** 70, -(2 ** 70)):
        with pytest.raises(UnknownJobError):
            worker.wait_many([jid, impossible])
    assert worker.wait(jid) == b"A"


def test_wait_many_a_bool_id_is_a_type_error_before_waiting(worker: Worker) -> None:
    jid = worker.start(upper, b"a")
    with pytest.raises(TypeError, match="job_id must be an int, not bool"):
        worker.wait_many([jid, True])
    assert worker.wait(jid) == b"A"


def test_wait_many_checks_its_arguments(worker: Worker) -> None:
    with pytest.raises(TypeError, match="job_id must be an int"):
        worker.wait_many(["1"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="timeout_ms must be an int"):
        worker.wait_many([], 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_ms must be -1"):
        worker.wait_many([], -2)


def test_wait_many_after_close_raises_worker_closed_error() -> None:
    w = Worker()
    jid = w.start(upper, b"a")
    w.close()
    with pytest.raises(WorkerClosedError):
        w.wait_many([jid])


def test_wait_many_consumes_the_failures_of_retried_jobs() -> None:
    with Worker() as w:
        w.open_route("retrying", max_retries=1, backoff_ms=0)
        attempts: List[int] = []

        def flaky(request: memoryview) -> None:
            attempts.append(1)
            if len(attempts) == 1:
                raise ValueError("first attempt")

        jid = w.start(flaky, b"r", route="retrying")
        assert w.wait_many([jid]) == [b"r"]
        assert not w._table.failures  # noqa: SLF001 - nothing left behind


def test_module_level_wait_many_uses_the_default_worker() -> None:
    ids = [callbackworker.start(upper, b"m%d" % i) for i in range(3)]
    assert callbackworker.wait_many(ids) == [b"M0", b"M1", b"M2"]
