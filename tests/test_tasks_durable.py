"""Durable external callbacks in persistent task handlers (``TaskService``).

The handlers call ``callbackworker.current_job().create_callback`` /
``callback_result`` / ``step`` as a Worker job does; their log lives in the
task database.  Every test drives a fake clock with ``background=False``
and ``_dispatch_once()``, so none sleeps, and runs on both backends (SQLite
and, when a server is available, PostgreSQL).
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Iterator, List, Optional

import pytest

import callbackworker
from callbackworker import (
    CallbackAlreadyCompletedError,
    CallbackFailedError,
    CallbackTimeoutError,
    ServiceClosedError,
    TaskInfo,
    TaskService,
    UnknownCallbackError,
)
from callbackworker.durable import MAX_RESULT_BYTES

from helpers import FakeClock, wait_for


class Approval:
    """A handler that asks for one approval, and remembers what it saw:
    ``ids`` (the callback id of every run), ``events`` (what each run did)."""

    def __init__(self, timeout_ms: int = 0, heartbeat_timeout_ms: int = 0) -> None:
        self.timeout_ms = timeout_ms
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.ids: List[str] = []
        self.events: List[str] = []
        self.charges = 0

    def charge(self) -> str:
        self.charges += 1
        return "receipt-1"

    def __call__(self, payload: memoryview) -> str:
        ctx = callbackworker.current_job()
        receipt = ctx.step("charge", self.charge)
        handle = ctx.create_callback("approval", timeout_ms=self.timeout_ms,
                                     heartbeat_timeout_ms=self.heartbeat_timeout_ms)
        self.ids.append(handle.callback_id)
        self.events.append("created")
        try:
            result = ctx.callback_result(handle)
        except CallbackFailedError as exc:
            return f"declined: {exc.error}"
        except CallbackTimeoutError as exc:
            return f"timed out: {exc.reason}"
        self.events.append("resumed")
        return f"{receipt} approved {result.decode()}"

    @property
    def callback_id(self) -> str:
        return self.ids[-1]


@pytest.fixture
def open_service(db: str, clock: FakeClock) -> Iterator[Callable[[], TaskService]]:
    opened: List[TaskService] = []

    def make() -> TaskService:
        opened.append(TaskService(db, clock=clock, background=False))
        return opened[-1]

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def service(open_service: Callable[[], TaskService]) -> TaskService:
    return open_service()


def suspended_task(service: TaskService, handler: Approval) -> str:
    service.create_queue("q", handler=handler)
    task = service.enqueue("q", b"order")
    assert service._dispatch_once() == 1
    assert service.get(task)[:3] == ("suspended", "", 1)
    return task


# ---- the reference's two invocations ----------------------------------

def test_reference_two_invocations(service: TaskService) -> None:
    """Invocation 1: create_callback records the callback and returns its
    handle, callback_result suspends.  The outside system signals.
    Invocation 2: both operations replay from the log (same callback id)
    and the workflow continues."""
    handler = Approval()
    task = suspended_task(service, handler)
    assert handler.events == ["created"]
    service.send_callback_success(handler.callback_id, b"by alice")
    assert service.get(task).status == "pending"
    assert service._dispatch_once() == 1
    assert handler.events == ["created", "created", "resumed"]
    assert handler.ids[0] == handler.ids[1]
    assert service.get(task)[:3] == ("completed", "receipt-1 approved by alice", 1)


def test_callback_ids_are_unguessable_and_distinct(service: TaskService) -> None:
    handler = Approval()
    service.create_queue("q", handler=handler)
    service.enqueue_many("q", [b"a", b"b"])
    service._dispatch_once()
    service._dispatch_once()
    assert len(set(handler.ids)) == 2
    assert all(len(i) == 32 for i in handler.ids)


# ---- outcomes ---------------------------------------------------------

def test_failure_signal_raises_callback_failed_in_the_handler(service: TaskService) -> None:
    handler = Approval()
    task = suspended_task(service, handler)
    service.send_callback_failure(handler.callback_id, "over budget")
    service._dispatch_once()
    assert service.get(task)[:3] == ("completed", "declined: over budget", 1)


def test_an_uncaught_callback_failure_fails_the_task(service: TaskService) -> None:
    def handler(payload: memoryview) -> str:
        ctx = callbackworker.current_job()
        handles.append(ctx.create_callback("x"))
        return ctx.callback_result(handles[-1]).decode()

    handles: List[callbackworker.CallbackHandle] = []
    service.create_queue("q", handler=handler)
    task = service.enqueue("q", b"")
    service._dispatch_once()
    service.send_callback_failure(handles[-1].callback_id, "nope")
    service._dispatch_once()
    info = service.get(task)
    assert info.status == "failed" and info.message.startswith("CallbackFailedError:")


def test_timeout_wakes_the_task_and_raises_in_the_handler(service: TaskService,
                                                          clock: FakeClock) -> None:
    handler = Approval(timeout_ms=5000)
    task = suspended_task(service, handler)
    clock.advance(4999)
    assert service._dispatch_once() == 0
    clock.advance(1)
    assert service._dispatch_once() == 1
    assert service.get(task)[:3] == ("completed", "timed out: timeout", 1)
    with pytest.raises(CallbackAlreadyCompletedError) as info:
        service.send_callback_success(handler.callback_id, b"late")
    assert info.value.state == "closed"


def test_a_late_signal_after_the_timeout_is_refused_as_timed_out(service: TaskService,
                                                                  clock: FakeClock) -> None:
    handler = Approval(timeout_ms=100)
    suspended_task(service, handler)
    clock.advance(100)
    with pytest.raises(CallbackAlreadyCompletedError) as info:
        service.send_callback_success(handler.callback_id, b"late")
    assert info.value.state == "timed_out"


def test_heartbeats_keep_a_callback_alive(service: TaskService, clock: FakeClock) -> None:
    handler = Approval(heartbeat_timeout_ms=100)
    task = suspended_task(service, handler)
    for _ in range(5):
        clock.advance(90)
        service.send_callback_heartbeat(handler.callback_id)
        assert service._dispatch_once() == 0
    assert service.get(task).status == "suspended"
    service.send_callback_success(handler.callback_id, b"finally")
    service._dispatch_once()
    assert service.get(task).message == "receipt-1 approved finally"


def test_a_missing_heartbeat_times_the_callback_out(service: TaskService,
                                                    clock: FakeClock) -> None:
    handler = Approval(heartbeat_timeout_ms=100)
    task = suspended_task(service, handler)
    clock.advance(90)
    service.send_callback_heartbeat(handler.callback_id)
    clock.advance(99)
    assert service._dispatch_once() == 0
    clock.advance(1)
    assert service._dispatch_once() == 1
    assert service.get(task)[:3] == ("completed", "timed out: heartbeat", 1)


def test_a_heartbeat_does_not_extend_the_overall_timeout(service: TaskService,
                                                         clock: FakeClock) -> None:
    handler = Approval(timeout_ms=150, heartbeat_timeout_ms=100)
    task = suspended_task(service, handler)
    clock.advance(90)
    service.send_callback_heartbeat(handler.callback_id)
    clock.advance(60)
    service._dispatch_once()
    assert service.get(task).message == "timed out: timeout"


def test_duplicate_success_is_rejected_not_applied(service: TaskService) -> None:
    handler = Approval()
    task = suspended_task(service, handler)
    service.send_callback_success(handler.callback_id, b"first")
    with pytest.raises(CallbackAlreadyCompletedError) as info:
        service.send_callback_success(handler.callback_id, b"second")
    assert info.value.state == "succeeded"
    with pytest.raises(CallbackAlreadyCompletedError):
        service.send_callback_failure(handler.callback_id, "too late")
    service._dispatch_once()
    assert service.get(task).message == "receipt-1 approved first"


# ---- replay ------------------------------------------------------------

def test_a_step_runs_once_across_replays(service: TaskService) -> None:
    handler = Approval()
    suspended_task(service, handler)
    service.send_callback_success(handler.callback_id, b"ok")
    service._dispatch_once()
    assert handler.charges == 1
    assert handler.events == ["created", "created", "resumed"]


def test_step_values_survive_pickling(service: TaskService) -> None:
    seen: List[object] = []
    handles: List[callbackworker.CallbackHandle] = []

    def handler(payload: memoryview) -> None:
        ctx = callbackworker.current_job()
        value = ctx.step("fetch", lambda: {"body": b"\x00raw", "n": (1, 2.5)})
        seen.append(value)
        handles.append(ctx.create_callback("go"))
        ctx.callback_result(handles[-1])

    service.create_queue("q", handler=handler)
    service.enqueue("q", b"")
    service._dispatch_once()
    service.send_callback_success(handles[-1].callback_id, b"")
    service._dispatch_once()
    assert seen == [{"body": b"\x00raw", "n": (1, 2.5)}] * 2


def test_several_callbacks_in_one_task(service: TaskService) -> None:
    handles: List[callbackworker.CallbackHandle] = []

    def handler(payload: memoryview) -> str:
        ctx = callbackworker.current_job()
        first = ctx.create_callback("first")
        second = ctx.create_callback("second")
        handles[:] = [first, second]
        return ctx.callback_result(first).decode() + ctx.callback_result(second).decode()

    service.create_queue("q", handler=handler)
    task = service.enqueue("q", b"")
    service._dispatch_once()
    service.send_callback_success(handles[1].callback_id, b"B")
    assert service.get(task).status == "suspended", "it waits for the first one"
    service.send_callback_success(handles[0].callback_id, b"A")
    service._dispatch_once()
    assert service.get(task)[:3] == ("completed", "AB", 1)


def test_a_different_order_on_replay_is_a_non_determinism_error(service: TaskService) -> None:
    runs: List[int] = []
    handles: List[callbackworker.CallbackHandle] = []

    def handler(payload: memoryview) -> None:
        ctx = callbackworker.current_job()
        runs.append(1)
        ctx.step("first" if len(runs) == 1 else "renamed", lambda: 1)
        handles.append(ctx.create_callback("cb"))
        ctx.callback_result(handles[-1])

    service.create_queue("q", handler=handler)
    task = service.enqueue("q", b"")
    service._dispatch_once()
    service.send_callback_success(handles[-1].callback_id, b"")
    service._dispatch_once()
    info = service.get(task)
    assert info.status == "failed"
    assert info.message.startswith("NonDeterminismError:") and "renamed" in info.message


def test_a_signal_before_callback_result_is_not_lost(service: TaskService) -> None:
    """The outside system answers while the handler is still running,
    before it asks for the result: no suspension at all."""
    def handler(payload: memoryview) -> str:
        handle = callbackworker.current_job().create_callback("fast")
        service.send_callback_success(handle.callback_id, b"quick")
        return callbackworker.current_job().callback_result(handle).decode()

    service.create_queue("q", handler=handler)
    task = service.enqueue("q", b"")
    service._dispatch_once()
    assert service.get(task)[:3] == ("completed", "quick", 1)


def test_a_handler_that_swallows_the_suspension_stays_suspended(service: TaskService) -> None:
    handles: List[callbackworker.CallbackHandle] = []

    def handler(payload: memoryview) -> str:
        ctx = callbackworker.current_job()
        handles.append(ctx.create_callback("cb"))
        try:
            ctx.callback_result(handles[-1])
        except BaseException:  # noqa: BLE001 - the case under test
            pass
        return "should not complete"

    service.create_queue("q", handler=handler)
    task = service.enqueue("q", b"")
    service._dispatch_once()
    assert service.get(task).status == "suspended"


# ---- restarts, signals from other services -----------------------------

def test_a_suspended_task_survives_a_restart(open_service: Callable[[], TaskService]) -> None:
    handler = Approval()
    first = open_service()
    task = suspended_task(first, handler)
    first.close()

    signaller = open_service()  # creates no queue: it only writes the store
    assert signaller.get(task).status == "suspended"
    signaller.send_callback_success(handler.callback_id, b"after restart")
    signaller.close()

    server = open_service()
    server.create_queue("q", handler=handler)
    assert server._dispatch_once() == 1
    assert server.get(task)[:3] == ("completed", "receipt-1 approved after restart", 1)
    assert handler.charges == 1


def test_a_signal_from_another_service_resumes_the_serving_one(
        open_service: Callable[[], TaskService]) -> None:
    handler = Approval()
    server = open_service()
    task = suspended_task(server, handler)
    open_service().send_callback_success(handler.callback_id, b"remote")
    server._dispatch_once()
    assert server.get(task).message == "receipt-1 approved remote"


def test_a_background_service_resumes_as_soon_as_signalled(db: str) -> None:
    done = threading.Event()
    handles: List[callbackworker.CallbackHandle] = []
    created = threading.Event()

    def handler(payload: memoryview) -> str:
        handles.append(callbackworker.current_job().create_callback("cb"))
        created.set()
        result = callbackworker.current_job().callback_result(handles[-1])
        done.set()
        return result.decode()

    with TaskService(db, poll_ms=60_000) as service:  # only a kick can wake it in time
        service.create_queue("q", handler=handler)
        task = service.enqueue("q", b"")
        assert created.wait(10)
        wait_for(lambda: service.get(task).status == "suspended")
        service.send_callback_success(handles[0].callback_id, b"now")
        assert done.wait(10)
        wait_for(lambda: service.get(task).status == "completed")
        assert service.get(task).message == "now"


# ---- concurrency --------------------------------------------------------

def test_concurrent_signals_for_one_id_exactly_one_wins(service: TaskService) -> None:
    handler = Approval()
    task = suspended_task(service, handler)
    results: Dict[int, Optional[str]] = {}
    start = threading.Barrier(8)

    def send(n: int) -> None:
        start.wait()
        try:
            if n % 2:
                service.send_callback_success(handler.callback_id, b"%d" % n)
            else:
                service.send_callback_failure(handler.callback_id, f"{n}")
            results[n] = None
        except CallbackAlreadyCompletedError as exc:
            results[n] = exc.state

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, state in results.items() if state is None]
    assert len(winners) == 1
    service._dispatch_once()
    message = service.get(task).message
    n = winners[0]
    assert message == (f"receipt-1 approved {n}" if n % 2 else f"declined: {n}")


# ---- management ---------------------------------------------------------

def test_cancel_a_suspended_task_closes_its_callback(service: TaskService) -> None:
    handler = Approval()
    task = suspended_task(service, handler)
    service.cancel(task)
    assert service.get(task).status == "cancelled"
    with pytest.raises(CallbackAlreadyCompletedError) as info:
        service.send_callback_success(handler.callback_id, b"")
    assert info.value.state == "closed"


def test_clear_queue_cancels_suspended_tasks(service: TaskService) -> None:
    task = suspended_task(service, Approval())
    assert service.clear_queue("q") == 1
    assert service.get(task).status == "cancelled"


def test_counts_show_suspended_tasks(service: TaskService) -> None:
    suspended_task(service, Approval())
    assert service.counts()["q"]["suspended"] == 1


# ---- bad input ------------------------------------------------------------

@pytest.mark.parametrize("callback_id", ["", "short", "x" * 33, "bad id with spaces......1234",
                                         "../../etc/passwd" + "a" * 16])
def test_malformed_ids_are_unknown(service: TaskService, callback_id: str) -> None:
    with pytest.raises(UnknownCallbackError):
        service.send_callback_success(callback_id, b"")


def test_well_formed_but_unknown_id(service: TaskService) -> None:
    with pytest.raises(UnknownCallbackError):
        service.send_callback_heartbeat("A" * 32)


@pytest.mark.parametrize("call, args, error", [
    ("send_callback_success", (1234, b""), TypeError),
    ("send_callback_success", ("A" * 32, "text"), TypeError),
    ("send_callback_success", ("A" * 32, b"x" * (MAX_RESULT_BYTES + 1)), ValueError),
    ("send_callback_failure", ("A" * 32, b"bytes"), TypeError),
])
def test_bad_signal_arguments(service: TaskService, call: str, args: tuple,
                              error: type) -> None:
    with pytest.raises(error):
        getattr(service, call)(*args)


def test_signals_after_close_raise(service: TaskService) -> None:
    service.close()
    with pytest.raises(ServiceClosedError):
        service.send_callback_success("A" * 32, b"")
