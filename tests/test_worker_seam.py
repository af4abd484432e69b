"""The extension seam of ``Worker``: ``run_detached`` and ``durable_backend``.

``Executor`` and ``TaskService`` are built on these two alone; these tests
state what a third layer may rely on.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, List

import pytest

import callbackworker
from callbackworker import Executor, JobTimeoutError, Worker
from callbackworker.durable import DurableBackend, DurableRun, MemoryDurableStore, SuspendJob

from helpers import wait_for


class Item:
    def __init__(self, body: Callable[[], None] = lambda: None) -> None:
        self.body = body
        self.ran = threading.Event()
        self.threads: List[str] = []

    def run(self) -> None:
        self.threads.append(threading.current_thread().name)
        try:
            self.body()
        finally:
            self.ran.set()


def test_run_detached_runs_the_item_on_a_worker_thread() -> None:
    with Worker() as w:
        item = Item()
        jid = w.run_detached(item)
        assert jid > 0
        assert item.ran.wait(5)
        assert item.threads and item.threads[0] != threading.current_thread().name


def test_run_detached_jobs_leave_no_record() -> None:
    with Worker() as w:
        item = Item()
        jid = w.run_detached(item)
        assert item.ran.wait(5)
        wait_for(lambda: not w.job_known(jid))


def test_a_cancelled_detached_job_never_runs_its_item() -> None:
    with Worker() as w:
        gate = threading.Event()
        blocker = Item(gate.wait)
        w.run_detached(blocker)
        wait_for(lambda: bool(blocker.threads))
        item = Item()
        jid = w.run_detached(item)
        assert w.cancel(jid) is True
        gate.set()
        w.close(drain=True)
        assert not item.ran.is_set()
        assert w._items == {}  # noqa: SLF001 - the worker forgot the item


def test_items_of_jobs_queued_at_close_never_run() -> None:
    w = Worker()
    gate = threading.Event()

    def close_when_told() -> None:  # the close begins while `later` is queued
        gate.wait(5)
        w.close()

    blocker = Item(close_when_told)
    w.run_detached(blocker)
    wait_for(lambda: bool(blocker.threads))
    later = Item()
    w.run_detached(later)
    gate.set()
    assert blocker.ran.wait(5)
    w.close()
    assert not later.ran.is_set()
    assert w._items == {}  # noqa: SLF001 - the worker forgot the item


def test_run_detached_takes_the_routes_timeout() -> None:
    with Worker() as w:
        w.open_route("limited", timeout_ms=50)
        seen: List[BaseException] = []

        def spin() -> None:
            try:
                while True:
                    time.sleep(0.001)
            except BaseException as exc:  # the interrupt
                seen.append(exc)
                raise

        item = Item(spin)
        w.run_detached(item, route="limited")
        assert item.ran.wait(5)
        assert seen and type(seen[0]).__name__ == "CallbackInterrupt"


def test_run_detached_with_a_timeout_interrupts_that_job_only() -> None:
    with Worker() as w:
        w.open_route("unlimited")
        seen: List[BaseException] = []

        def spin() -> None:
            try:
                while True:
                    time.sleep(0.001)
            except BaseException as exc:  # the interrupt
                seen.append(exc)
                raise

        item = Item(spin)
        w.run_detached(item, route="unlimited", timeout_ms=50)
        assert item.ran.wait(5)
        assert seen and type(seen[0]).__name__ == "CallbackInterrupt"
        with pytest.raises(ValueError, match="timeout_ms"):
            w.run_detached(Item(), route="unlimited", timeout_ms=-2)


@pytest.mark.parametrize("item", [object(), 3, None, type("NoRun", (), {"run": 1})()])
def test_run_detached_refuses_what_has_no_run_method(item: object) -> None:
    with Worker() as w:
        with pytest.raises(TypeError, match="run\\(\\) method"):
            w.run_detached(item)  # type: ignore[arg-type]


def test_run_detached_on_an_unknown_route_raises() -> None:
    with Worker() as w:
        with pytest.raises(callbackworker.UnknownRouteError):
            w.run_detached(Item(), route="nope")


def test_run_detached_after_close_raises() -> None:
    w = Worker()
    w.close()
    with pytest.raises(callbackworker.WorkerClosedError):
        w.run_detached(Item())


def test_executor_on_a_route_interrupts_a_runaway_call() -> None:
    callbackworker.open_route("seam-limited", concurrency=1, timeout_ms=100)
    try:
        with Executor(route="seam-limited") as ex:
            future = ex.submit(lambda: [time.sleep(0.001) for _ in iter(int, 1)])
            with pytest.raises(JobTimeoutError):
                future.result(timeout=10)
    finally:
        callbackworker.close_route("seam-limited")


def test_durable_backend_must_be_a_durable_backend() -> None:
    with pytest.raises(TypeError, match="DurableBackend"):
        Worker(durable_backend=object())  # type: ignore[arg-type]


class RecordingBackend(DurableBackend):
    """Keeps every job's log in one memory store and never suspends."""

    def __init__(self) -> None:
        self.store = MemoryDurableStore(lambda: int(time.monotonic() * 1000))
        self.asked: List[int] = []

    def run_for(self, job_id: int, attempt: int, request: Callable[[], bytes]) -> DurableRun:
        self.asked.append(job_id)

        def suspend(wake: int, req: bytes) -> None:
            raise SuspendJob()

        return DurableRun(self.store, str(job_id), request(), suspend)  # type: ignore[arg-type]


def test_a_given_durable_backend_serves_the_jobs_durable_operations() -> None:
    backend = RecordingBackend()
    with Worker(durable_backend=backend) as w:
        def job(request: memoryview) -> bytes:
            return str(callbackworker.current_job().step("s", lambda: 41) + 1).encode()

        jid = w.start(job, b"")
        assert w.wait(jid, 5000) == b"42"
        assert backend.asked == [jid]


def test_signals_to_a_worker_with_a_foreign_backend_are_unknown() -> None:
    with Worker(durable_backend=RecordingBackend()) as w:
        with pytest.raises(callbackworker.UnknownCallbackError):
            w.send_callback_success("a" * 32, b"")


def test_a_worker_is_freed_by_its_last_reference_without_the_cyclic_collector() -> None:
    """The seam's one callable holds the item maps, not the worker: a Worker
    in a reference cycle would be freed by the collector, on whatever thread
    it runs (a route thread included), instead of where it was dropped."""
    import gc
    import weakref

    enabled = gc.isenabled()
    gc.disable()
    try:
        w = Worker()
        item = Item()
        w.run_detached(item)
        assert item.ran.wait(5)
        w.close()
        ref = weakref.ref(w)
        del w
        assert ref() is None
    finally:
        if enabled:
            gc.enable()
