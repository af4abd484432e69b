"""asyncio waits: ``Worker.wait_async`` and ``Worker.wait_complete_async``
(SPEC section 3: "await worker.wait_async(job_id), await
worker.wait_complete_async(job_id); no polling loops").

They are the async forms of ``wait`` and ``wait_complete`` (SPEC section 2):
``wait_async`` returns the response and destroys the job, or raises the
job's ``JobFailedError`` (and destroys it); ``wait_complete_async`` returns
True once the job has completed, False when its timeout passes first, and
never destroys the job.

Every test runs its coroutine under ``asyncio.run`` with a bounded
``asyncio.wait_for`` around everything, so a lost wake-up fails the test
instead of hanging the run.  Callbacks that must stay "running" block on a
``threading.Event`` the test sets; those waits are bounded too.  No test
asserts that anything is fast.

Closing while awaiting (documented behaviour, checked below): ``close()``
completes queued jobs with SHUTDOWN and reports their completion, so a
pending ``wait_complete_async`` wakes and returns True.  A pending
``wait_async`` wakes too, but its job can no longer be collected: it raises
``WorkerClosedError`` (a ``RuntimeError``), not the ``ShutdownError`` that a
thread blocked in the synchronous ``wait`` gets.  Both are accepted by the
close test below (SPEC names ``ShutdownError`` for blocked waiters and
``WorkerClosedError`` for every verb after close); which one comes is
asserted separately, so a change is visible.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Callable, Iterator, List

import pytest

import callbackworker
from callbackworker import (
    JobFailedError,
    Phase,
    ShutdownError,
    Status,
    UnknownJobError,
    WaitTimeoutError,
    Worker,
    WorkerClosedError,
)

LONG = 10.0         # seconds: upper bound for anything that must happen
BOUND = 30.0        # seconds: the wait_for around a whole test coroutine
SHORT_MS = 50       # a wait timeout that is expected to expire


def run(coro: Awaitable[Any], bound: float = BOUND) -> Any:
    return asyncio.run(asyncio.wait_for(coro, bound))


def upper(request: memoryview) -> None:
    request[:] = bytes(request).upper()


class Boom(Exception):
    pass


def boom(request: memoryview) -> None:
    raise Boom(f"bad {bytes(request)!r}")


class Blocker:
    """A callback that blocks until ``go`` is set (bounded), then echoes."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.go = threading.Event()

    def __call__(self, request: memoryview) -> bytes:
        self.started.set()
        if not self.go.wait(LONG):
            raise AssertionError("blocker never released")
        return b"released:" + bytes(request)


@pytest.fixture
def blockers() -> Iterator[Callable[[], Blocker]]:
    made: List[Blocker] = []

    def make() -> Blocker:
        b = Blocker()
        made.append(b)
        return b

    try:
        yield make
    finally:
        for b in made:
            b.go.set()


async def until_started(blocker: Blocker) -> None:
    """Waits for a blocker's callback to start without blocking the loop."""
    ok = await asyncio.get_running_loop().run_in_executor(None, blocker.started.wait, LONG)
    assert ok, "the blocking callback never started"


# ---- wait_async ---------------------------------------------------------------


def test_wait_async_returns_the_response_and_destroys_the_job(worker):
    async def main() -> None:
        job = worker.start(upper, b"hello")
        assert await worker.wait_async(job) == b"HELLO"
        assert not worker.job_known(job)
        with pytest.raises(UnknownJobError):
            worker.wait(job, 0)
        with pytest.raises(UnknownJobError):
            await worker.wait_async(job)

    run(main())


def test_wait_async_returns_a_replaced_and_an_empty_response(worker):
    async def main() -> None:
        longer = worker.start(lambda r: bytes(r) * 1000, b"ab")
        empty = worker.start(lambda r: b"", b"xyz")
        assert await worker.wait_async(longer) == b"ab" * 1000
        assert await worker.wait_async(empty) == b""

    run(main())


def test_wait_async_raises_the_job_failure_and_destroys_it(worker):
    async def main() -> None:
        job = worker.start(boom, b"in")
        with pytest.raises(JobFailedError) as info:
            await worker.wait_async(job)
        err = info.value
        assert err.job_id == job
        assert err.status == Status.ERROR
        assert err.error_text.startswith("Boom:")
        assert isinstance(err.__cause__, Boom)
        assert err.__cause__.__traceback__ is not None
        assert not worker.job_known(job)

    run(main())


def test_wait_async_with_timeout(worker, blockers):
    b = blockers()

    async def main() -> None:
        job = worker.start(b, b"x")
        with pytest.raises(WaitTimeoutError):
            await worker.wait_async(job, SHORT_MS)
        assert worker.job_known(job)  # untouched
        b.go.set()
        assert await worker.wait_async(job, int(LONG * 1000)) == b"released:x"

    run(main())


def test_wait_async_argument_errors(worker):
    async def main() -> None:
        with pytest.raises(TypeError):
            await worker.wait_async("1")
        with pytest.raises(ValueError):
            await worker.wait_async(worker.start(upper, b"a"), -2)
        with pytest.raises(UnknownJobError):
            await worker.wait_async(10 ** 12)
        with pytest.raises(UnknownJobError):
            await worker.wait_complete_async(0)

    run(main())


# ---- wait_complete_async ---------------------------------------------------------


def test_wait_complete_async_true_and_false(worker, blockers):
    b = blockers()

    async def main() -> None:
        job = worker.start(b, b"payload")
        await until_started(b)
        assert await worker.wait_complete_async(job, SHORT_MS) is False
        # the job is untouched by the timed-out wait
        assert worker.job_known(job)
        assert worker.phase(job) == Phase.RUNNING
        assert worker.status(job) == Status.PENDING
        assert await worker.wait_complete_async(job, 0) is False
        b.go.set()
        assert await worker.wait_complete_async(job) is True
        # never destroys
        assert worker.job_known(job)
        assert worker.phase(job) == Phase.COMPLETED
        assert await worker.wait_complete_async(job, 0) is True
        assert worker.take(job) == b"released:payload"

    run(main())


def test_wait_complete_async_on_a_failed_job_is_true(worker):
    async def main() -> None:
        job = worker.start(boom, b"z")
        assert await worker.wait_complete_async(job, int(LONG * 1000)) is True
        assert worker.status(job) == Status.ERROR
        with pytest.raises(JobFailedError):
            await worker.wait_async(job)

    run(main())


def test_await_an_already_completed_job(worker):
    job = worker.start(upper, b"done")
    assert worker.wait_complete(job, int(LONG * 1000))

    async def main() -> None:
        assert await worker.wait_complete_async(job) is True
        assert await worker.wait_complete_async(job, 0) is True
        assert await worker.wait_async(job) == b"DONE"

    run(main())


def test_the_loop_is_not_blocked_while_awaiting(worker, blockers):
    """Other tasks make progress while a wait is pending (no blocking call
    on the loop thread); the job is released by one of them."""
    b = blockers()

    async def main() -> None:
        job = worker.start(b, b"q")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            for _ in range(5):
                ticks += 1
                await asyncio.sleep(0)
            b.go.set()

        waiter = asyncio.ensure_future(worker.wait_async(job))
        await ticker()
        assert ticks == 5
        assert await waiter == b"released:q"

    run(main())


# ---- many and several awaits ---------------------------------------------------


def test_many_concurrent_awaits_all_resolve():
    n = 500

    async def main(w: Worker) -> None:
        jobs = [w.start(upper, b"job %d" % i) for i in range(n)]
        results = await asyncio.gather(*(w.wait_async(j) for j in jobs))
        assert results == [b"JOB %d" % i for i in range(n)]
        assert not any(w.job_known(j) for j in jobs)

    with Worker(concurrency=2) as w:
        run(main(w))


def test_many_concurrent_complete_awaits_then_waits():
    n = 500

    async def main(w: Worker) -> None:
        jobs = w.start_many(upper, [b"m%d" % i for i in range(n)])
        flags = await asyncio.gather(*(w.wait_complete_async(j, int(LONG * 1000))
                                       for j in jobs))
        assert flags == [True] * n
        assert all(w.phase(j) == Phase.COMPLETED for j in jobs)
        assert [w.take(j) for j in jobs] == [b"M%d" % i for i in range(n)]

    with Worker(concurrency=2) as w:
        run(main(w))


def test_many_awaits_with_a_mix_of_outcomes():
    async def main(w: Worker) -> None:
        jobs = [w.start(boom if i % 7 == 0 else upper, b"x%d" % i) for i in range(200)]
        results = await asyncio.gather(*(w.wait_async(j) for j in jobs),
                                       return_exceptions=True)
        for i, r in enumerate(results):
            if i % 7 == 0:
                assert isinstance(r, JobFailedError) and isinstance(r.__cause__, Boom)
            else:
                assert r == b"X%d" % i

    with Worker(concurrency=2) as w:
        run(main(w))


def test_several_awaits_on_the_same_job_all_resolve(worker, blockers):
    b = blockers()

    async def main() -> None:
        job = worker.start(b, b"shared")
        completes = [asyncio.ensure_future(worker.wait_complete_async(job)) for _ in range(5)]
        timed = [asyncio.ensure_future(worker.wait_complete_async(job, int(LONG * 1000)))
                 for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(t.done() for t in completes + timed)
        b.go.set()
        assert await asyncio.gather(*completes, *timed) == [True] * 8
        # one wait_async collects the response; later ones find no job
        assert await worker.wait_async(job) == b"released:shared"
        with pytest.raises(UnknownJobError):
            await worker.wait_async(job)

    run(main())


def test_several_wait_async_on_the_same_job(worker, blockers):
    """Like several threads in ``wait``: exactly one gets the response, the
    others find the job destroyed (UnknownJobError); none hangs."""
    b = blockers()

    async def main() -> None:
        job = worker.start(b, b"one")
        waits = [asyncio.ensure_future(worker.wait_async(job)) for _ in range(4)]
        await asyncio.sleep(0)
        b.go.set()
        results = await asyncio.gather(*waits, return_exceptions=True)
        got = [r for r in results if r == b"released:one"]
        others = [r for r in results if r != b"released:one"]
        assert len(got) == 1
        assert all(isinstance(r, UnknownJobError) for r in others), results

    run(main())


def test_awaits_from_two_event_loops_on_two_threads(worker, blockers):
    """Each awaiting loop is woken on its own thread."""
    b = blockers()
    job = worker.start(b, b"two")
    results: List[Any] = []
    ready = threading.Barrier(3)

    def in_thread() -> None:
        async def main() -> bool:
            fut = asyncio.ensure_future(worker.wait_complete_async(job))
            await asyncio.sleep(0)
            await asyncio.get_running_loop().run_in_executor(None, ready.wait, LONG)
            return await fut

        try:
            results.append(run(main()))
        except BaseException as exc:  # pragma: no cover - reported below
            results.append(exc)

    threads = [threading.Thread(target=in_thread, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    ready.wait(LONG)
    b.go.set()
    for t in threads:
        t.join(BOUND)
        assert not t.is_alive()
    assert results == [True, True]
    assert worker.wait(job, int(LONG * 1000)) == b"released:two"


# ---- cancellation of the awaiting task -------------------------------------------


@pytest.mark.parametrize("verb", ["wait_async", "wait_complete_async"])
def test_cancelling_the_awaiting_task_leaves_the_job_intact(worker, blockers, verb):
    b = blockers()

    async def main() -> None:
        job = worker.start(b, b"keep")
        await until_started(b)
        task = asyncio.ensure_future(getattr(worker, verb)(job))
        await asyncio.sleep(0)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert worker.job_known(job)
        assert worker.phase(job) == Phase.RUNNING
        assert worker.status(job) == Status.PENDING
        b.go.set()
        # later waits still work, async and sync
        assert await worker.wait_complete_async(job) is True
        assert worker.job_known(job)
        assert await worker.wait_async(job) == b"released:keep"

    run(main())


def test_cancelled_await_then_new_await_before_completion(worker, blockers):
    b = blockers()

    async def main() -> None:
        job = worker.start(b, b"again")
        for _ in range(3):  # watch, cancel, watch again, ...
            task = asyncio.ensure_future(worker.wait_complete_async(job))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        pending = asyncio.ensure_future(worker.wait_async(job))
        await asyncio.sleep(0)
        b.go.set()
        assert await pending == b"released:again"

    run(main())


def test_wait_for_timeout_around_an_await(worker, blockers):
    """asyncio.wait_for cancels the inner await; the job is untouched."""
    b = blockers()

    async def main() -> None:
        job = worker.start(b, b"wf")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(worker.wait_async(job), SHORT_MS / 1000)
        assert worker.job_known(job)
        b.go.set()
        assert await worker.wait_async(job) == b"released:wf"

    run(main())


def test_wait_complete_async_timeout_is_not_a_wait_for_cancel(worker, blockers):
    """A timed-out wait_complete_async returns False and later awaits (with
    and without a timeout) still wake on completion."""
    b = blockers()

    async def main() -> None:
        job = worker.start(b, b"t")
        for _ in range(3):
            assert await worker.wait_complete_async(job, SHORT_MS) is False
        later = asyncio.ensure_future(worker.wait_complete_async(job, int(LONG * 1000)))
        await asyncio.sleep(0)
        b.go.set()
        assert await later is True

    run(main())


# ---- close() while awaiting ------------------------------------------------------


def _close_outcomes(w: Worker, queued_job: int, started: Callable[[], Awaitable[None]],
                    release: Callable[[], None]) -> Any:
    """Awaits ``queued_job`` (both verbs) plus a synchronous ``wait`` in a
    thread, lets ``release`` trigger the close, returns what each got."""

    async def main() -> Any:
        complete = asyncio.ensure_future(w.wait_complete_async(queued_job))
        collect = asyncio.ensure_future(w.wait_async(queued_job))
        loop = asyncio.get_running_loop()

        def sync_wait() -> Any:
            try:
                return w.wait(queued_job, int(LONG * 1000))
            except BaseException as exc:
                return exc

        sync = loop.run_in_executor(None, sync_wait)
        await started()
        await asyncio.sleep(0)
        assert not complete.done() and not collect.done()
        release()
        return await asyncio.gather(complete, collect, sync, return_exceptions=True)

    return run(main())


def test_close_from_the_running_callback_wakes_the_awaits():
    """The running job closes the worker itself: the queued job completes
    with SHUTDOWN, and both awaits on it wake."""
    w = Worker()
    go = threading.Event()
    started = threading.Event()

    def closer(request: memoryview) -> None:
        started.set()
        if go.wait(LONG):
            w.close()

    try:
        w.start(closer, b"")
        queued = w.start(upper, b"never runs")

        async def wait_started() -> None:
            ok = await asyncio.get_running_loop().run_in_executor(None, started.wait, LONG)
            assert ok

        complete, collect, sync = _close_outcomes(w, queued, wait_started, go.set)
    finally:
        go.set()
        w.close()
    assert complete is True
    assert isinstance(collect, (ShutdownError, WorkerClosedError)), collect
    assert isinstance(sync, ShutdownError), sync  # SPEC: blocked waiters wake with ShutdownError


def test_close_from_another_thread_wakes_the_awaits(blockers):
    """close() on another thread while a callback runs and a job is queued;
    the running callback is released once the close has begun."""
    b = blockers()
    w = Worker()
    closer: List[threading.Thread] = []
    try:
        running = w.start(b, b"")
        queued = w.start(upper, b"never runs")

        async def started() -> None:
            await until_started(b)

        def release() -> None:
            t = threading.Thread(target=w.close, daemon=True)
            closer.append(t)
            t.start()
            # close() marks the worker stopping before it joins its threads;
            # from then on every verb raises WorkerClosedError
            pause = threading.Event()
            for _ in range(int(LONG / 0.005)):
                try:
                    w.job_known(running)
                except WorkerClosedError:
                    break
                pause.wait(0.005)
            b.go.set()

        complete, collect, sync = _close_outcomes(w, queued, started, release)
        closer[0].join(LONG)
        assert not closer[0].is_alive()
    finally:
        b.go.set()
        w.close()
    assert complete is True
    assert isinstance(collect, (ShutdownError, WorkerClosedError)), collect
    assert isinstance(sync, ShutdownError), sync


def test_which_error_wait_async_raises_after_close():
    """Documents the current outcome: the awaited job completed with
    SHUTDOWN, but wait_async fetches it after the worker closed, so it
    raises WorkerClosedError (a RuntimeError)."""
    w = Worker()
    go = threading.Event()

    def closer(request: memoryview) -> None:
        if go.wait(LONG):
            w.close()

    try:
        w.start(closer, b"")
        queued = w.start(upper, b"q")

        async def main() -> Any:
            task = asyncio.ensure_future(w.wait_async(queued))
            await asyncio.sleep(0)
            go.set()
            return await asyncio.gather(task, return_exceptions=True)

        (outcome,) = run(main())
    finally:
        go.set()
        w.close()
    assert type(outcome) is WorkerClosedError, repr(outcome)


def test_awaits_after_close_raise_worker_closed():
    w = Worker()
    job = w.start(upper, b"a")
    assert w.wait_complete(job, int(LONG * 1000))
    w.close()

    async def main() -> None:
        with pytest.raises(WorkerClosedError):
            await w.wait_async(job)
        with pytest.raises(WorkerClosedError):
            await w.wait_complete_async(job)

    run(main())


def test_default_worker_awaits():
    """The default worker's methods are the same; awaiting through it works."""
    dw = callbackworker.default_worker()

    async def main() -> None:
        job = callbackworker.start(upper, b"default")
        assert await dw.wait_complete_async(job) is True
        assert await dw.wait_async(job) == b"DEFAULT"

    run(main())
