"""``callbackworker.Executor``: a ``concurrent.futures.Executor`` on the C core
(SPEC section 3), checked as a drop-in for ``ThreadPoolExecutor``.

The topics follow CPython's own executor tests (Lib/test/test_concurrent_futures):
submit, result/exception, map, shutdown, cancellation, done callbacks, the
context manager, argument checks and asyncio integration.  The tests are
written here, not copied.

Most behaviours are checked by ``TestDropIn``, which is parametrized over
``callbackworker.Executor`` and ``concurrent.futures.ThreadPoolExecutor``: a
test that passes for the real thing and fails for ours is a drop-in breach.
Tests specific to callbackworker (routes on the default worker, the core's
jobs) follow.

Timing rules: the machine is shared and noisy.  No test asserts that
something is fast.  "Slow" calls are calls blocked on a ``threading.Event``
that the test sets; every wait on an event or a thread is bounded (``LONG``)
so that a bug fails a test instead of hanging the run.  The few short
timeouts used (``SHORT``) are only ever expected to *expire*, so a slow
machine cannot make them fail.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import traceback
from typing import Any, Callable, Iterator, List

import pytest

import callbackworker
from callbackworker import Executor, RouteMetaKey, current_job
from callbackworker.executor import _resolve_interrupted
from concurrent.futures.thread import BrokenThreadPool

LONG = 10.0    # upper bound for anything that must happen
SHORT = 0.05   # a timeout that is expected to expire

EXECUTORS = [
    pytest.param(Executor, id="callbackworker"),
    pytest.param(cf.ThreadPoolExecutor, id="ThreadPoolExecutor"),
]


# ---- helpers -----------------------------------------------------------------


def mul(x: int, y: int) -> int:
    return x * y


def capture(*args: Any, **kwargs: Any) -> tuple:
    return args, kwargs


class Boom(Exception):
    pass


def raise_boom(msg: str) -> None:
    raise Boom(msg)


def until(predicate: Callable[[], bool], what: str) -> None:
    """Polls ``predicate`` (for states nothing signals) within the bound."""
    pause = threading.Event()
    for _ in range(int(LONG / 0.005)):
        if predicate():
            return
        pause.wait(0.005)
    raise AssertionError(f"{what}: not within {LONG} s")


def _raises(exc_type: type, fn: Callable[..., Any], *args: Any) -> bool:
    try:
        fn(*args)
    except exc_type:
        return True
    return False


def join(thread: threading.Thread) -> None:
    thread.join(LONG)
    assert not thread.is_alive(), "thread did not finish within the bound"


class Gate:
    """A call that blocks until the test opens the gate (bounded)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.go = threading.Event()

    def __call__(self, value: Any = None) -> Any:
        self.started.set()
        if not self.go.wait(LONG):
            raise AssertionError("gate was never opened")
        return value

    def wait_started(self) -> None:
        assert self.started.wait(LONG), "the gated call never started"


@pytest.fixture
def gates() -> Iterator[Callable[[], Gate]]:
    made: List[Gate] = []

    def make() -> Gate:
        g = Gate()
        made.append(g)
        return g

    try:
        yield make
    finally:
        for g in made:  # never leave a call blocked behind a failed assertion
            g.go.set()


@pytest.fixture(params=EXECUTORS)
def make_executor(request: pytest.FixtureRequest) -> Iterator[Callable[..., cf.Executor]]:
    """Builds executors of the class under test; shuts all of them down
    (without waiting) at teardown."""
    cls = request.param
    made: List[cf.Executor] = []

    def make(*args: Any, **kwargs: Any) -> cf.Executor:
        ex = cls(*args, **kwargs)
        made.append(ex)
        return ex

    try:
        yield make
    finally:
        for ex in made:
            ex.shutdown(wait=False, cancel_futures=True)


# ---- behaviours shared with ThreadPoolExecutor --------------------------------


class TestDropIn:
    # submit / result / exception

    def test_is_a_concurrent_futures_executor(self, make_executor):
        ex = make_executor(max_workers=1)
        assert isinstance(ex, cf.Executor)
        fut = ex.submit(mul, 2, 3)
        assert isinstance(fut, cf.Future)
        assert fut.result(LONG) == 6

    def test_submit_positional_args(self, make_executor):
        ex = make_executor(max_workers=2)
        assert ex.submit(pow, 2, 8).result(LONG) == 256

    def test_submit_keyword_args(self, make_executor):
        ex = make_executor(max_workers=2)
        assert ex.submit(mul, 2, y=8).result(LONG) == 16
        # keyword names that clash with submit's own parameters reach fn
        assert ex.submit(capture, 1, self=2, fn=3).result(LONG) == ((1,), {"self": 2, "fn": 3})

    def test_submit_no_args(self, make_executor):
        ex = make_executor(max_workers=1)
        assert ex.submit(lambda: "x").result(LONG) == "x"
        assert ex.submit(capture).result(LONG) == ((), {})

    def test_result_returns_any_object(self, make_executor):
        ex = make_executor(max_workers=1)
        obj = object()
        assert ex.submit(lambda: obj).result(LONG) is obj
        assert ex.submit(lambda: None).result(LONG) is None
        big = bytes(1 << 20)
        assert ex.submit(lambda: big).result(LONG) is big

    def test_exception_is_the_raised_instance(self, make_executor):
        ex = make_executor(max_workers=1)
        fut = ex.submit(raise_boom, "bad")
        exc = fut.exception(LONG)
        assert isinstance(exc, Boom) and str(exc) == "bad"
        with pytest.raises(Boom, match="bad") as info:
            fut.result(LONG)
        assert info.value is exc
        assert ex.submit(mul, 1, 1).exception(LONG) is None

    def test_exception_keeps_its_traceback(self, make_executor):
        ex = make_executor(max_workers=1)
        fut = ex.submit(raise_boom, "tb")
        exc = fut.exception(LONG)
        frames = [f.name for f in traceback.extract_tb(exc.__traceback__)]
        assert "raise_boom" in frames
        with pytest.raises(Boom) as info:
            fut.result(LONG)
        assert "raise_boom" in [f.name for f in traceback.extract_tb(info.value.__traceback__)]

    def test_base_exceptions_are_carried_by_the_future(self, make_executor):
        ex = make_executor(max_workers=1)

        def leave() -> None:
            raise SystemExit(3)

        fut = ex.submit(leave)
        assert isinstance(fut.exception(LONG), SystemExit)
        # the executor still works afterwards
        assert ex.submit(mul, 3, 3).result(LONG) == 9

    def test_result_timeout_on_a_blocked_call(self, make_executor, gates):
        ex = make_executor(max_workers=1)
        gate = gates()
        fut = ex.submit(gate, "late")
        # concurrent.futures.TimeoutError, which is the builtin TimeoutError
        # only from Python 3.11 on: a caller catching the builtin misses it on 3.9.
        with pytest.raises(cf.TimeoutError):
            fut.result(timeout=SHORT)
        with pytest.raises(cf.TimeoutError):
            fut.exception(timeout=SHORT)
        assert not fut.done()
        gate.go.set()
        assert fut.result(LONG) == "late"

    def test_running_and_done_states(self, make_executor, gates):
        ex = make_executor(max_workers=1)
        gate = gates()
        fut = ex.submit(gate, 1)
        gate.wait_started()
        assert fut.running() and not fut.done() and not fut.cancelled()
        gate.go.set()
        assert fut.result(LONG) == 1
        assert fut.done() and not fut.running() and not fut.cancelled()

    # map

    def test_map_keeps_input_order(self, make_executor, gates):
        ex = make_executor(max_workers=2)
        gate = gates()

        def first_waits(i: int) -> int:
            if i == 0:  # the first call finishes after the others
                gate(None)
            return i * i

        it = ex.map(first_waits, range(20))
        gate.wait_started()
        gate.go.set()
        assert list(it) == [i * i for i in range(20)]

    def test_map_several_iterables_shortest_wins(self, make_executor):
        ex = make_executor(max_workers=2)
        assert list(ex.map(mul, [1, 2, 3, 4], [10, 20, 30])) == [10, 40, 90]
        assert list(ex.map(pow, range(10), itertools.repeat(2))) == [i ** 2 for i in range(10)]

    def test_map_empty(self, make_executor):
        ex = make_executor(max_workers=1)
        assert list(ex.map(mul, [], [])) == []

    def test_map_chunksize_is_accepted(self, make_executor):
        ex = make_executor(max_workers=2)
        for chunksize in (1, 3, 100):
            assert list(ex.map(abs, range(-10, 10), chunksize=chunksize)) == \
                [abs(i) for i in range(-10, 10)]

    def test_map_raises_the_call_exception_in_order(self, make_executor):
        ex = make_executor(max_workers=2)

        def f(i: int) -> int:
            if i == 3:
                raise Boom(f"at {i}")
            return i

        it = ex.map(f, range(6))
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(Boom, match="at 3"):
            next(it)

    def test_map_timeout(self, make_executor, gates):
        ex = make_executor(max_workers=2)
        gate = gates()

        def f(i: int) -> int:
            if i == 0:  # the first result is the one that never comes in time
                gate(None)
            return i

        it = ex.map(f, [0, 1, 2], timeout=SHORT)
        with pytest.raises(cf.TimeoutError):
            next(it)
        gate.go.set()

    def test_map_timeout_after_some_results(self, make_executor, gates):
        """Results that are ready are yielded; the blocked one times out.  The
        timeout counts from the map() call, but a finished call's result is
        returned whatever time is left, so only the blocked one can time out:
        with one thread, once the third call has started the first two have
        finished."""
        ex = make_executor(max_workers=1)
        gate = gates()

        def f(i: int) -> int:
            if i == 2:
                gate(None)
            return i

        it = ex.map(f, [0, 1, 2], timeout=SHORT)
        gate.wait_started()
        assert [next(it), next(it)] == [0, 1]
        with pytest.raises(cf.TimeoutError):
            next(it)
        gate.go.set()

    def test_map_timeout_is_not_hit_by_fast_calls(self, make_executor):
        ex = make_executor(max_workers=2)
        assert list(ex.map(mul, range(5), range(5), timeout=LONG)) == [i * i for i in range(5)]

    def test_map_submits_everything_up_front(self, make_executor, gates):
        """Like the stdlib, map() schedules all calls before the first result
        is asked for."""
        ex = make_executor(max_workers=1)
        seen: List[int] = []
        done = threading.Event()

        def f(i: int) -> int:
            seen.append(i)
            if len(seen) == 5:
                done.set()
            return i

        it = ex.map(f, range(5))  # not iterated yet
        assert done.wait(LONG)
        assert sorted(seen) == list(range(5))
        assert list(it) == list(range(5))

    # shutdown

    def test_submit_after_shutdown_raises_runtime_error(self, make_executor):
        ex = make_executor(max_workers=1)
        ex.submit(mul, 1, 1).result(LONG)
        ex.shutdown(wait=True)
        with pytest.raises(RuntimeError):
            ex.submit(mul, 1, 1)
        ex.shutdown(wait=True)  # idempotent
        ex.shutdown(wait=False)

    def test_submit_after_shutdown_nowait_raises_runtime_error(self, make_executor):
        ex = make_executor(max_workers=1)
        ex.shutdown(wait=False)
        with pytest.raises(RuntimeError):
            ex.submit(mul, 1, 1)

    def test_shutdown_wait_waits_for_running_and_queued_calls(self, make_executor, gates):
        ex = make_executor(max_workers=1)
        gate = gates()
        ran: List[int] = []

        def record(i: int) -> int:
            ran.append(i)
            return i

        running = ex.submit(gate, "first")
        queued = [ex.submit(record, i) for i in range(10)]
        gate.wait_started()
        observed: List[Any] = []

        def shut() -> None:
            ex.shutdown(wait=True)
            observed.append([f.done() for f in [running, *queued]])
            observed.append(list(ran))

        t = threading.Thread(target=shut, daemon=True)
        t.start()
        t.join(SHORT)  # cannot return: the first call is still blocked
        assert t.is_alive(), "shutdown(wait=True) returned while a call was running"
        gate.go.set()
        join(t)
        assert observed[0] == [True] * 11
        assert observed[1] == list(range(10))
        assert running.result(0) == "first"
        assert [f.result(0) for f in queued] == list(range(10))

    def test_shutdown_nowait_returns_at_once_and_calls_finish(self, make_executor, gates):
        ex = make_executor(max_workers=1)
        gate = gates()
        running = ex.submit(gate, "first")
        queued = [ex.submit(mul, i, 2) for i in range(10)]
        gate.wait_started()
        t = threading.Thread(target=ex.shutdown, kwargs={"wait": False}, daemon=True)
        t.start()
        join(t)  # returns although a call is blocked
        assert not running.done()
        gate.go.set()
        assert running.result(LONG) == "first"
        assert [f.result(LONG) for f in queued] == [i * 2 for i in range(10)]
        assert not any(f.cancelled() for f in queued)

    def test_shutdown_nowait_then_wait(self, make_executor, gates):
        ex = make_executor(max_workers=1)
        gate = gates()
        running = ex.submit(gate, "first")
        queued = [ex.submit(mul, i, 3) for i in range(5)]
        gate.wait_started()
        ex.shutdown(wait=False)
        t = threading.Thread(target=ex.shutdown, kwargs={"wait": True}, daemon=True)
        t.start()
        gate.go.set()
        join(t)
        assert running.done() and all(f.done() for f in queued)
        assert [f.result(0) for f in queued] == [i * 3 for i in range(5)]

    @pytest.mark.parametrize("wait", [False, True])
    def test_shutdown_cancel_futures(self, make_executor, gates, wait):
        ex = make_executor(max_workers=1)
        gate = gates()
        ran: List[int] = []
        running = ex.submit(gate, "first")
        queued = [ex.submit(ran.append, i) for i in range(20)]
        gate.wait_started()
        t = threading.Thread(target=ex.shutdown, kwargs={"wait": wait, "cancel_futures": True},
                             daemon=True)
        t.start()
        if wait:
            # the cancellations happen before shutdown starts waiting; see them
            # before letting the running call go.  (Not with cf.wait: a future
            # cancelled by shutdown is never "notified", for either class.)
            until(lambda: all(f.cancelled() for f in queued), "queued futures cancelled")
            gate.go.set()
            join(t)
        else:
            join(t)  # returns at once, the call still blocked
            gate.go.set()
        assert running.result(LONG) == "first"
        assert not running.cancelled()
        for f in queued:
            assert f.cancelled() and f.done()
            with pytest.raises(cf.CancelledError):
                f.result(0)
        ex.shutdown(wait=True)
        assert ran == []  # no cancelled call ever ran

    def test_shutdown_cancel_futures_with_nothing_queued(self, make_executor):
        ex = make_executor(max_workers=2)
        futs = [ex.submit(mul, i, i) for i in range(5)]
        cf.wait(futs, LONG)
        ex.shutdown(wait=True, cancel_futures=True)
        assert [f.result(0) for f in futs] == [i * i for i in range(5)]

    # cancel

    def test_cancel_a_queued_future(self, make_executor, gates):
        ex = make_executor(max_workers=1)
        gate = gates()
        ran: List[str] = []
        running = ex.submit(gate, "first")
        gate.wait_started()
        victim = ex.submit(ran.append, "victim")
        after = ex.submit(ran.append, "after")
        assert victim.cancel() is True
        assert victim.cancelled() and victim.done() and not victim.running()
        assert victim.cancel() is True  # cancelling again is still True
        with pytest.raises(cf.CancelledError):
            victim.result(0)
        with pytest.raises(cf.CancelledError):
            victim.exception(0)
        gate.go.set()
        assert running.result(LONG) == "first"
        assert after.result(LONG) is None
        ex.shutdown(wait=True)
        assert ran == ["after"]

    def test_cancel_running_or_finished_future_is_false(self, make_executor, gates):
        ex = make_executor(max_workers=1)
        gate = gates()
        running = ex.submit(gate, "r")
        gate.wait_started()
        assert running.cancel() is False
        assert not running.cancelled()
        gate.go.set()
        assert running.result(LONG) == "r"
        assert running.cancel() is False
        failed = ex.submit(raise_boom, "x")
        cf.wait([failed], LONG)
        assert failed.cancel() is False
        assert isinstance(failed.exception(0), Boom)

    def test_cancelled_futures_count_as_done_for_wait(self, make_executor, gates):
        """A future cancelled while queued counts as done for cf.wait() and
        as_completed() once the executor reaches it: ThreadPoolExecutor's
        worker calls set_running_or_notify_cancel() on it (state
        CANCELLED_AND_NOTIFIED), which is what wait/as_completed look for."""
        ex = make_executor(max_workers=1)
        gate = gates()
        running = ex.submit(gate)
        gate.wait_started()
        queued = [ex.submit(mul, i, i) for i in range(6)]
        for f in queued[::2]:
            assert f.cancel()
        gate.go.set()
        # one thread, FIFO: once the last call has run, every earlier queued
        # future has been reached
        assert queued[-1].result(LONG) == 25
        done, not_done = cf.wait([running, *queued], timeout=1.0)
        assert not not_done, f"{len(not_done)} cancelled future(s) never counted as done"
        assert [f.cancelled() for f in queued] == [True, False] * 3
        assert [f.result(0) for f in queued[1::2]] == [1, 9, 25]
        assert len(list(cf.as_completed(queued, timeout=1.0))) == 6

    # done callbacks

    def test_add_done_callback_fires(self, make_executor, gates):
        ex = make_executor(max_workers=1)
        gate = gates()
        fired = threading.Event()
        got: List[Any] = []

        def cb(f: cf.Future) -> None:
            got.append((f, f.result()))
            fired.set()

        fut = ex.submit(gate, 42)
        fut.add_done_callback(cb)
        gate.go.set()
        assert fired.wait(LONG)
        assert got == [(fut, 42)]

    def test_add_done_callback_after_completion_fires_at_once(self, make_executor):
        ex = make_executor(max_workers=1)
        fut = ex.submit(mul, 6, 7)
        assert fut.result(LONG) == 42
        got: List[Any] = []
        fut.add_done_callback(lambda f: got.append((threading.get_ident(), f.result())))
        assert got == [(threading.get_ident(), 42)]  # synchronously, in this thread

    def test_done_callbacks_for_exception_and_cancel(self, make_executor, gates):
        ex = make_executor(max_workers=1)
        gate = gates()
        seen: List[str] = []
        events = [threading.Event() for _ in range(2)]
        running = ex.submit(gate)
        gate.wait_started()
        failing = ex.submit(raise_boom, "cb")
        cancelled = ex.submit(mul, 1, 1)

        def on_fail(f: cf.Future) -> None:
            seen.append(type(f.exception()).__name__)
            events[0].set()

        def on_cancel(f: cf.Future) -> None:
            seen.append("cancelled" if f.cancelled() else "not cancelled")
            events[1].set()

        failing.add_done_callback(on_fail)
        cancelled.add_done_callback(on_cancel)
        assert cancelled.cancel()
        assert events[1].wait(LONG)
        gate.go.set()
        assert events[0].wait(LONG)
        assert seen == ["cancelled", "Boom"]
        running.result(LONG)

    def test_several_done_callbacks_run_in_order(self, make_executor, gates):
        ex = make_executor(max_workers=1)
        gate = gates()
        order: List[int] = []
        last = threading.Event()
        fut = ex.submit(gate, None)
        for i in range(5):
            fut.add_done_callback(lambda f, i=i: order.append(i))
        fut.add_done_callback(lambda f: last.set())
        gate.go.set()
        assert last.wait(LONG)
        assert order == [0, 1, 2, 3, 4]

    # context manager

    def test_context_manager_shuts_down_and_waits(self, make_executor):
        with make_executor(max_workers=2) as ex:
            futs = [ex.submit(mul, i, 10) for i in range(50)]
        assert all(f.done() for f in futs)
        assert [f.result(0) for f in futs] == [i * 10 for i in range(50)]
        with pytest.raises(RuntimeError):
            ex.submit(mul, 1, 1)

    def test_context_manager_returns_the_executor(self, make_executor):
        ex = make_executor(max_workers=1)
        with ex as entered:
            assert entered is ex

    def test_context_manager_exit_on_exception_still_waits(self, make_executor, gates):
        gate = gates()
        with pytest.raises(Boom):
            with make_executor(max_workers=1) as ex:
                fut = ex.submit(gate, "v")
                gate.go.set()
                raise Boom("inside with")
        assert fut.done() and fut.result(0) == "v"

    # constructor

    @pytest.mark.parametrize("bad", [0, -1])
    def test_max_workers_not_positive_is_value_error(self, make_executor, bad):
        with pytest.raises(ValueError):
            make_executor(max_workers=bad)

    def test_max_workers_str_is_type_error(self, make_executor):
        with pytest.raises(TypeError):
            make_executor(max_workers="2")

    def test_initializer_runs_on_each_thread_before_its_first_call(self, make_executor):
        inited: List[int] = []
        lock = threading.Lock()

        def init(tag: str) -> None:
            with lock:
                inited.append(threading.get_ident())
            threading.current_thread().tag = tag  # type: ignore[attr-defined]

        ex = make_executor(max_workers=2, initializer=init, initargs=("ready",))
        barrier = threading.Barrier(2)

        def call() -> tuple:
            barrier.wait(LONG)  # both threads take a call
            return threading.get_ident(), threading.current_thread().tag  # type: ignore[attr-defined]

        seen = [f.result(LONG) for f in [ex.submit(call) for _ in range(2)]]
        seen += [ex.submit(lambda: (threading.get_ident(), "again")).result(LONG) for _ in range(5)]
        assert sorted(inited) == sorted({ident for ident, _ in seen})  # once per thread
        assert [tag for _, tag in seen[:2]] == ["ready", "ready"]

    def test_failing_initializer_breaks_the_executor(self, make_executor, caplog):
        """The call that ran into it and every call not yet started fail
        with BrokenThreadPool; the error is logged; submit raises."""
        entered, release = threading.Event(), threading.Event()

        def init() -> None:
            entered.set()
            release.wait(LONG)  # calls queue up behind the first meanwhile
            raise ValueError("no setup today")

        ex = make_executor(max_workers=1, initializer=init)
        with caplog.at_level(logging.CRITICAL, logger="concurrent.futures"):
            futs = [ex.submit(mul, 2, 3)]
            assert entered.wait(LONG)
            futs += [ex.submit(mul, 2, 3) for _ in range(2)]
            release.set()
            for f in futs:
                with pytest.raises(BrokenThreadPool):
                    f.result(LONG)
        assert any(r.exc_info and "no setup today" in str(r.exc_info[1]) for r in caplog.records)
        with pytest.raises(BrokenThreadPool):
            ex.submit(mul, 1, 1)

    def test_initializer_not_callable_is_type_error(self, make_executor):
        with pytest.raises(TypeError):
            make_executor(max_workers=1, initializer=3)

    def test_thread_name_prefix_names_the_threads(self, make_executor):
        ex = make_executor(max_workers=2, thread_name_prefix="Special")
        name = ex.submit(lambda: threading.current_thread().name).result(LONG)
        assert re.fullmatch(r"Special_[01]", name), name

    # concurrency

    def test_many_submissions_from_several_threads(self, make_executor):
        ex = make_executor(max_workers=2)
        per_thread, nthreads = 250, 8
        results: List[List[cf.Future]] = [[] for _ in range(nthreads)]
        errors: List[BaseException] = []
        start = threading.Barrier(nthreads)

        def submitter(t: int) -> None:
            try:
                start.wait(LONG)
                for i in range(per_thread):
                    results[t].append(ex.submit(mul, t * per_thread + i, 2))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=submitter, args=(t,), daemon=True) for t in range(nthreads)]
        for th in threads:
            th.start()
        for th in threads:
            join(th)
        assert errors == []
        flat = [f for futs in results for f in futs]
        done, not_done = cf.wait(flat, LONG * 3)
        assert not not_done
        assert [f.result(0) for f in flat] == [n * 2 for n in range(per_thread * nthreads)]

    def test_max_workers_calls_run_at_the_same_time(self, make_executor):
        """Two workers really run two calls at once: each call waits (bounded)
        for the other to arrive."""
        ex = make_executor(max_workers=2)
        barrier = threading.Barrier(2)
        futs = [ex.submit(barrier.wait, LONG) for _ in range(2)]
        assert sorted(f.result(LONG * 2) for f in futs) == [0, 1]

    def test_calls_can_submit_more_calls(self, make_executor):
        ex = make_executor(max_workers=2)

        def outer(n: int) -> int:
            return ex.submit(mul, n, n).result(LONG) + 1

        assert ex.submit(outer, 7).result(LONG * 2) == 50

    def test_waiters_blocked_before_completion_wake(self, make_executor, gates):
        """wait(), as_completed() and result() from other threads, all
        blocked before the call ends, wake when it does."""
        ex = make_executor(max_workers=1)
        gate = gates()
        fut = ex.submit(gate, "v")
        gate.wait_started()
        got: List[Any] = []
        threads = [
            threading.Thread(target=lambda: got.append(cf.wait([fut], LONG).done == {fut})),
            threading.Thread(target=lambda: got.append(
                [f.result() for f in cf.as_completed([fut], LONG)] == ["v"])),
            threading.Thread(target=lambda: got.append(fut.result(LONG) == "v")),
        ]
        for th in threads:
            th.start()
        until(lambda: not fut.done() and all(th.is_alive() for th in threads), "all blocked")
        gate.go.set()
        for th in threads:
            join(th)
        assert got == [True, True, True]

    def test_done_callback_added_while_another_thread_waits(self, make_executor, gates):
        ex = make_executor(max_workers=1)
        gate = gates()
        fut = ex.submit(gate, 5)
        gate.wait_started()
        waiter = threading.Thread(target=fut.result, args=(LONG,))
        waiter.start()
        seen: List[Any] = []
        fut.add_done_callback(lambda f: seen.append(f.result()))
        gate.go.set()
        join(waiter)
        assert seen == [5]

    def test_as_completed_and_wait(self, make_executor):
        ex = make_executor(max_workers=2)
        futs = [ex.submit(mul, i, 3) for i in range(30)]
        assert sorted(f.result() for f in cf.as_completed(futs, timeout=LONG)) == \
            [i * 3 for i in range(30)]
        done, not_done = cf.wait(futs, timeout=LONG, return_when=cf.ALL_COMPLETED)
        assert len(done) == 30 and not not_done

    # asyncio

    def test_asyncio_wrap_future(self, make_executor, gates):
        ex = make_executor(max_workers=2)
        gate = gates()

        async def main() -> Any:
            loop = asyncio.get_running_loop()
            results = await asyncio.gather(
                *(asyncio.wrap_future(ex.submit(mul, i, i)) for i in range(20)))
            with pytest.raises(Boom, match="async"):
                await asyncio.wrap_future(ex.submit(raise_boom, "async"))
            # a call that completes only after the loop has started waiting
            blocked = asyncio.wrap_future(ex.submit(gate, "late"))
            await asyncio.sleep(0)
            assert not blocked.done()
            loop.call_soon(gate.go.set)
            late = await blocked
            # run_in_executor, the other stdlib entry point
            via_loop = await loop.run_in_executor(ex, mul, 5, 5)
            return results, late, via_loop

        results, late, via_loop = asyncio.run(asyncio.wait_for(main(), LONG))
        assert results == [i * i for i in range(20)]
        assert late == "late"
        assert via_loop == 25

    def test_asyncio_cancel_wrapped_queued_future(self, make_executor, gates):
        ex = make_executor(max_workers=1)
        gate = gates()
        ran: List[int] = []

        async def main() -> None:
            running = asyncio.wrap_future(ex.submit(gate))
            queued_cf = ex.submit(ran.append, 1)
            queued = asyncio.wrap_future(queued_cf)
            await asyncio.sleep(0)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            # cancelling the asyncio future cancels the concurrent one (from a
            # done callback the loop runs soon); see it before the gate opens
            for _ in range(100):
                if queued_cf.done():
                    break
                await asyncio.sleep(0)
            assert queued_cf.cancelled()
            gate.go.set()
            assert await running is None

        asyncio.run(asyncio.wait_for(main(), LONG))
        ex.shutdown(wait=True)
        assert ran == []


# ---- callbackworker specifics ---------------------------------------------


_route_numbers = itertools.count(1)


def fresh_route() -> str:
    return f"ex-{os.getpid()}-{next(_route_numbers)}"


def test_executor_runs_calls_inside_core_jobs():
    """Calls run inside jobs of the executor's own worker: current_job()
    works in them.  A burst of calls shares a few jobs (each job makes
    queued calls until none is left), never more than max_workers at once."""
    with Executor(max_workers=2) as ex:
        ids = [ex.submit(lambda: current_job().id) for _ in range(10)]
        routes = [ex.submit(lambda: current_job().route) for _ in range(3)]
    assert all(f.result(0) > 0 for f in ids)
    assert 1 <= len({f.result(0) for f in ids}) <= 10
    assert [f.result(0) for f in routes] == [1, 1, 1]  # its own worker's default route


def test_executor_one_worker_runs_a_burst_in_one_job(gates):
    """With one worker, calls submitted while a call runs are made by the
    job that runs it: no job per call."""
    gate = gates()
    with Executor(max_workers=1) as ex:
        first = ex.submit(gate, "first")
        gate.wait_started()
        later = [ex.submit(lambda: current_job().id) for _ in range(20)]
        gate.go.set()
    assert first.result(0) == "first"
    assert len({f.result(0) for f in later}) == 1


def test_executor_route_runs_each_call_as_its_own_job():
    """On a route each call is a job of its own, so the route's run-time
    limit applies to each call."""
    name = fresh_route()
    with Executor(max_workers=2, route=name) as ex:
        ids = [ex.submit(lambda: current_job().id) for _ in range(10)]
    assert len({f.result(0) for f in ids}) == 10


def test_executor_default_max_workers_is_thread_pool_executors():
    with Executor() as ex:
        count = getattr(os, "process_cpu_count", os.cpu_count)()
        assert ex._max_workers == min(32, (count or 1) + 4)
        assert "concurrency=%d" % ex._max_workers in ex._worker.route_info("default")


def test_executor_with_one_worker_is_fifo():
    order: List[int] = []
    with Executor(max_workers=1) as ex:
        for i in range(50):
            ex.submit(order.append, i)
    assert order == list(range(50))


def test_executor_route_opens_the_route_on_the_default_worker():
    dw = callbackworker.default_worker()
    name = fresh_route()
    assert dw.route_meta(name, RouteMetaKey.KNOWN) == 0
    ex = Executor(max_workers=2, route=name)
    try:
        assert dw.route_meta(name, RouteMetaKey.KNOWN) == 1
        assert "concurrency=2" in dw.route_info(name)
        seen = [ex.submit(lambda: current_job().route) for _ in range(5)]
        routes = {f.result(LONG) for f in seen}
        assert len(routes) == 1
        (route_id,) = routes
        assert route_id != 1  # not the default route
        assert ex.submit(mul, 4, 5).result(LONG) == 20
    finally:
        ex.shutdown(wait=True)
    # shutdown left the default worker and the route usable
    job = callbackworker.start(lambda req: bytes(req).upper(), b"still open")
    assert callbackworker.wait(job, 10_000) == b"STILL OPEN"
    job = dw.start(lambda req: None, b"on the route", route=name)
    assert dw.wait(job, 10_000) == b"on the route"
    with pytest.raises(RuntimeError):
        ex.submit(mul, 1, 1)


def test_executor_route_reuses_an_existing_route():
    dw = callbackworker.default_worker()
    name = fresh_route()
    rid = dw.open_route(name, concurrency=1)
    with Executor(max_workers=3, route=name) as ex:
        assert ex.submit(lambda: current_job().route).result(LONG) == rid
    assert "concurrency=1" in dw.route_info(name)  # not reopened
    # a second executor on the same route
    with Executor(route=name) as ex2:
        assert ex2.submit(mul, 2, 2).result(LONG) == 4
    assert dw.route_meta(name, RouteMetaKey.KNOWN) == 1


def test_executor_route_shutdown_waits_and_cancels(gates):
    name = fresh_route()
    gate = gates()
    ran: List[int] = []
    ex = Executor(max_workers=1, route=name)
    running = ex.submit(gate, "r")
    gate.wait_started()
    queued = [ex.submit(ran.append, i) for i in range(5)]
    t = threading.Thread(target=ex.shutdown, kwargs={"wait": True, "cancel_futures": True},
                         daemon=True)
    t.start()
    until(lambda: all(f.cancelled() for f in queued), "queued futures cancelled")
    gate.go.set()
    # shutdown(wait=True) returns once the running call has finished (which
    # takes no time at all after the gate opens: half the usual bound)
    t.join(LONG / 2)
    assert not t.is_alive(), "Executor(route=...).shutdown(wait=True, cancel_futures=True) hangs"
    assert running.result(0) == "r"
    assert ran == []
    dw = callbackworker.default_worker()
    assert dw.wait_drained(name, 10_000)
    assert dw.route_meta(name, RouteMetaKey.QUEUED) == 0


def test_executor_route_nowait_shutdown_calls_still_finish(gates):
    name = fresh_route()
    gate = gates()
    ex = Executor(max_workers=1, route=name)
    running = ex.submit(gate, "r")
    queued = [ex.submit(mul, i, i) for i in range(5)]
    gate.wait_started()
    ex.shutdown(wait=False)
    gate.go.set()
    assert running.result(LONG) == "r"
    assert [f.result(LONG) for f in queued] == [i * i for i in range(5)]


def test_executor_own_worker_jobs_are_not_left_behind():
    """Calls run as detached jobs: after shutdown nothing is left to collect
    and no call is lost."""
    with Executor(max_workers=2) as ex:
        futs = [ex.submit(mul, i, 1) for i in range(200)]
    assert [f.result(0) for f in futs] == list(range(200))
    assert ex._worker._closed  # its own worker was closed by shutdown


def test_executor_futures_make_no_condition_unless_someone_waits():
    """The cost the Executor saves: a future read after its call ended
    never makes a threading.Condition; one blocked on does."""
    with Executor(max_workers=1) as ex:
        futs = [ex.submit(mul, i, 2) for i in range(20)]
    assert [f.result() for f in futs] == [i * 2 for i in range(20)]
    assert all(f._cond is None for f in futs)
    gate = threading.Event()
    with Executor(max_workers=1) as ex:
        blocked = ex.submit(gate.wait, LONG)
        assert cf.wait([blocked], SHORT).not_done == {blocked}
        assert blocked._cond is not None
        gate.set()
    assert blocked.result(0) is True


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_executor_futures_work_in_a_child_forked_while_a_thread_held_their_lock():
    from callbackworker import executor as executor_module

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with executor_module._guard:
            held.set()
            release.wait(LONG)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(LONG)
    try:
        pid = os.fork()
        if pid == 0:  # the child: the holder thread does not exist here
            code = 1
            try:
                fut = executor_module._CallFuture()
                fut.set_running_or_notify_cancel()
                fut.set_result(6)
                code = 0 if fut.result(0) == 6 else 1
            finally:
                os._exit(code)
        for _ in range(int(LONG / 0.01)):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            threading.Event().wait(0.01)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the child hung on the futures' lock")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        join(holder)


def test_executor_is_generic_like_future():
    def typed(f: "cf.Future[int]") -> int:
        return f.result()

    with Executor(max_workers=1) as ex:
        assert typed(ex.submit(mul, 3, 3)) == 9
    assert cf.Future[int] is not None


def test_executor_first_call_starts_while_submitting():
    """An idle route starts its first call at once, even while the
    producer keeps submitting (CPython's test_cancel_futures depends on it):
    after a burst of submits, shutdown(cancel_futures=True) leaves some
    calls run, not all cancelled.  (A loaded machine may deschedule the
    thread at the wrong moment, so the first of three tries that shows it
    is enough; the old rule cancelled every call, every time.)"""
    outcomes = []
    for _ in range(3):
        ex = Executor(max_workers=2)
        futs = [ex.submit(threading.Event().wait, 0.05) for _ in range(50)]
        ex.shutdown(cancel_futures=True)
        ran = [f for f in futs if not f.cancelled()]
        assert all(f.done() and f.exception() is None for f in ran)
        outcomes.append(len(ran))
        if 0 < len(ran) < len(futs):
            return
    raise AssertionError(f"calls run out of 50, in three tries: {outcomes}")


def _run_child(code: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60)


def test_executor_submit_from_an_exit_hook_raises_runtime_error():
    child = _run_child("""
    import atexit

    @atexit.register
    def last() -> None:
        try:
            ex.submit(id, None)
        except RuntimeError as exc:
            print(exc)

    from callbackworker import Executor
    ex = Executor(5)
    """)
    assert child.stdout.startswith("cannot schedule new futures"), child


def test_executor_route_calls_see_the_route_id():
    """current_job().route inside an Executor call on a route equals that
    route's id, as open_route returned it."""
    dw = callbackworker.default_worker()
    name = fresh_route()
    rid = dw.open_route(name, concurrency=1)
    with Executor(route=name) as ex:
        jid, route = ex.submit(lambda: (current_job().id, current_job().route)).result(LONG)
    assert route == rid and jid > 0


class TestInterruptedRuns:
    """A route's run-time limit may interrupt a call's run outside ``fn``;
    the run's cleanup resolves the future whatever point it reached."""

    def test_a_pending_future_is_failed_with_a_timeout(self):
        fut: cf.Future = cf.Future()
        _resolve_interrupted(fut)
        assert isinstance(fut.exception(timeout=0), TimeoutError)

    def test_a_running_future_is_failed_with_a_timeout(self):
        fut: cf.Future = cf.Future()
        fut.set_running_or_notify_cancel()
        _resolve_interrupted(fut)
        assert isinstance(fut.exception(timeout=0), TimeoutError)

    def test_a_resolved_future_keeps_its_result(self):
        fut: cf.Future = cf.Future()
        fut.set_running_or_notify_cancel()
        fut.set_result(7)
        _resolve_interrupted(fut)
        assert fut.result(timeout=0) == 7

    def test_a_cancelled_future_stays_cancelled(self):
        fut: cf.Future = cf.Future()
        fut.cancel()
        _resolve_interrupted(fut)
        assert fut.cancelled()


def test_a_refused_start_on_a_route_leaves_no_job_counted() -> None:
    """A refused start (here: the route closed) is undone: no job stays
    counted and the call is not left queued, so ``shutdown(wait=True)``
    returns (it waited for ever)."""
    from callbackworker._default import default_worker

    ex = Executor(max_workers=1, route="executor-refused-start")
    assert ex.submit(lambda: 1).result(timeout=5) == 1
    default_worker().close_route("executor-refused-start")
    with pytest.raises(RuntimeError, match="cannot schedule new futures: route"):
        ex.submit(lambda: 2)
    stopper = threading.Thread(target=ex.shutdown, daemon=True)
    stopper.start()
    stopper.join(5)
    assert not stopper.is_alive(), "shutdown(wait=True) hangs on a job that never started"
