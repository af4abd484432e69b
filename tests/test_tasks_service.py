"""``TaskService``: the reference's behaviours one by one
(seeds/persistent-task-service.go), driven by a fake clock.

Each test builds a service with ``background=False`` and a ``FakeClock``;
``service._dispatch_once()`` runs one full pass synchronously (claims the
due tasks, runs their handlers on the C core, commits the outcomes), so no
test sleeps or depends on timing.
"""

from __future__ import annotations

import os
import time
import socket
import threading
from pathlib import Path
from typing import List, Optional

import pytest

import callbackworker
from callbackworker import (
    QueueConfig,
    QueueExistsError,
    ServiceClosedError,
    TaskInfo,
    TaskNotCancellableError,
    TaskService,
    UnknownQueueError,
    UnknownTaskError,
)
from callbackworker.tasks import owners
from callbackworker.tasks import runtime as runtime_mod
from callbackworker.tasks.client import open_store as open_task_store
from callbackworker.tasks.service import retry_delay_ms
from callbackworker.tasks.storage import Outcome, TaskStore

from helpers import FakeClock


def open_store(db: str) -> TaskStore:
    """A second handle on the service's database, as another process would
    open it."""
    return open_task_store(db, "normal")


def ok(payload: memoryview) -> str:
    return "ok " + bytes(payload).decode()


def boom(payload: memoryview) -> None:
    raise ValueError(f"bad {bytes(payload).decode()}")


# ---- exports and defaults ---------------------------------------------

def test_public_names_are_exported() -> None:
    assert callbackworker.TaskService is TaskService
    assert callbackworker.QueueConfig is QueueConfig
    assert callbackworker.TaskInfo is TaskInfo


def test_queue_config_defaults_are_the_references() -> None:
    c = QueueConfig()
    assert (c.concurrency, c.max_retries, c.backoff_ms, c.delay_ms, c.retention_ms) == (
        1, 0, 1000, 0, 3_600_000)


@pytest.mark.parametrize("field, value", [
    ("concurrency", 0), ("concurrency", -1), ("max_retries", -1), ("backoff_ms", -1),
    ("delay_ms", -1), ("retention_ms", 59_999), ("retention_ms", 604_800_001),
])
def test_queue_config_bounds_are_value_errors(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        QueueConfig(**{field: value})


@pytest.mark.parametrize("value", [60_000, 604_800_000])
def test_retention_bounds_are_inclusive(value: int) -> None:
    assert QueueConfig(retention_ms=value).retention_ms == value


@pytest.mark.parametrize("value", [1.0, "1", True, None])
def test_queue_config_non_ints_are_type_errors(value: object) -> None:
    with pytest.raises(TypeError, match="concurrency"):
        QueueConfig(concurrency=value)  # type: ignore[arg-type]


def test_task_info_fields(service: TaskService) -> None:
    service.create_queue("q", handler=ok)
    info = service.get(service.enqueue("q", b"x"))
    assert info[:3] == ("pending", "", 0)
    assert (info.status, info.message, info.attempt) == ("pending", "", 0)


# ---- running tasks ----------------------------------------------------

def test_handler_message_completes_the_task(service: TaskService) -> None:
    service.create_queue("q", handler=ok)
    task = service.enqueue("q", b"hello")
    assert service._dispatch_once() == 1
    assert service.get(task)[:3] == ("completed", "ok hello", 1)


def test_handler_returning_none_completes_with_empty_message(service: TaskService) -> None:
    service.create_queue("q", handler=lambda p: None)
    task = service.enqueue("q", b"")
    service._dispatch_once()
    assert service.get(task)[:3] == ("completed", "", 1)


def test_handler_gets_a_memoryview_of_the_payload(service: TaskService) -> None:
    seen: List[object] = []
    service.create_queue("q", handler=lambda p: seen.append((type(p), bytes(p))))
    service.enqueue("q", bytearray(b"\x00\x01binary"))
    service._dispatch_once()
    assert seen == [(memoryview, b"\x00\x01binary")]


def test_handler_returning_a_non_str_fails_the_attempt(service: TaskService) -> None:
    service.create_queue("q", handler=lambda p: 42)
    task = service.enqueue("q", b"")
    service._dispatch_once()
    info = service.get(task)
    assert info.status == "failed" and info.message.startswith("TypeError:")


def test_exception_without_retries_fails_with_error_text(service: TaskService) -> None:
    service.create_queue("q", handler=boom)
    task = service.enqueue("q", b"x")
    service._dispatch_once()
    assert service.get(task)[:3] == ("failed", "ValueError: bad x", 1)


def test_tasks_run_oldest_first(service: TaskService) -> None:
    order: List[bytes] = []
    service.create_queue("q", handler=lambda p: order.append(bytes(p)))
    service.enqueue_many("q", [b"1", b"2", b"3"])
    for _ in range(3):
        service._dispatch_once()
    assert order == [b"1", b"2", b"3"]


def test_concurrency_bounds_tasks_per_pass(db: str, clock: FakeClock) -> None:
    with TaskService(db, clock=clock, background=False, prefetch=0) as service:
        service.create_queue("q", QueueConfig(concurrency=3), handler=ok)
        service.enqueue_many("q", [b"x"] * 7)
        assert [service._dispatch_once() for _ in range(4)] == [3, 3, 1, 0]


def test_default_prefetch_claims_the_concurrency_again(service: TaskService) -> None:
    service.create_queue("q", QueueConfig(concurrency=3), handler=ok)
    service.enqueue_many("q", [b"x"] * 7)
    assert [service._dispatch_once() for _ in range(3)] == [6, 1, 0]


def test_default_prefetch_grows_to_what_the_queue_finishes_in_the_horizon(
        service: TaskService) -> None:
    service.create_queue("q", QueueConfig(concurrency=2), handler=ok)
    runtime = service._runtime
    queue = runtime._queues["q"]
    with runtime._cond:
        assert runtime._prefetch_of(queue, 100.0) == 2  # no rate yet: the concurrency
        queue.finished = 5_000  # in the next second
        assert runtime._prefetch_of(queue, 101.0) == int(5_000 * runtime_mod.PREFETCH_HORIZON_S)
        queue.finished += 10**7
        assert runtime._prefetch_of(queue, 102.0) == runtime_mod.PREFETCH_MAX


def test_default_prefetch_grows_as_soon_as_a_few_attempts_finish(service: TaskService) -> None:
    # A queue that starts on a backlog of short tasks must not claim one or
    # two at a time for a whole rate period before its window grows.
    service.create_queue("q", QueueConfig(concurrency=1), handler=ok)
    runtime = service._runtime
    queue = runtime._queues["q"]
    few, soon = runtime_mod._RATE_MIN_COUNT, runtime_mod._RATE_MIN_S
    with runtime._cond:
        assert runtime._prefetch_of(queue, 100.0) == 1  # no rate yet
        queue.finished += few - 1  # too few to tell a rate, however soon
        assert runtime._prefetch_of(queue, 100.0 + soon) == 1
        queue.finished += 1
        assert runtime._prefetch_of(queue, 100.0 + soon / 2) == 1  # too soon
        expected = int(few / ((100.0 + soon) - 100.0) * runtime_mod.PREFETCH_HORIZON_S)
        assert runtime._prefetch_of(queue, 100.0 + soon) == expected > few
        assert soon < runtime_mod._RATE_EVERY_S


def test_one_round_of_finishes_does_not_tell_the_rate(service: TaskService) -> None:
    # Tasks that start together finish together: one finish per slot within
    # a millisecond or two says nothing of how long the next ones take.  A
    # rate read over that burst alone would claim hundreds of tasks that run
    # one round per task duration, held here while other processes idle.
    concurrency = 32
    service.create_queue("q", QueueConfig(concurrency=concurrency), handler=ok)
    runtime = service._runtime
    queue = runtime._queues["q"]
    soon = runtime_mod._RATE_MIN_S
    with runtime._cond:
        assert runtime._prefetch_of(queue, 100.0) == concurrency  # no rate yet
        queue.finished += concurrency  # every slot finishes, within 2 ms
        assert runtime._prefetch_of(queue, 100.0 + 2 * soon) == concurrency
        # a second round by then: these tasks are short, the window grows
        queue.finished += concurrency
        finished = 2 * concurrency
        expected = int(finished / (3 * soon) * runtime_mod.PREFETCH_HORIZON_S)
        assert runtime._prefetch_of(queue, 100.0 + 3 * soon) == expected > concurrency


def test_a_set_prefetch_stays_as_set(db: str, clock: FakeClock) -> None:
    with TaskService(db, clock=clock, background=False, prefetch=3) as service:
        service.create_queue("q", QueueConfig(concurrency=2), handler=ok)
        runtime = service._runtime
        queue = runtime._queues["q"]
        with runtime._cond:
            queue.finished = 10**6
            assert runtime._prefetch_of(queue, 100.0) == runtime._prefetch_of(queue, 101.0) == 3


def test_while_every_handler_is_busy_claims_wait_for_half_the_window(
        db: str, clock: FakeClock) -> None:
    with TaskService(db, clock=clock, background=False, prefetch=6) as service:
        service.create_queue("q", QueueConfig(concurrency=2), handler=ok)
        runtime = service._runtime
        queue = runtime._queues["q"]
        with runtime._cond:
            slots = []
            for in_flight in (0, 1, 2, 4, 5, 8):
                queue.in_flight = in_flight
                slots.append(runtime._slots_locked(queue, 100.0))
            queue.in_flight = 0
        # window 8: an idle handler claims at once; busy ones once 4 are free
        assert slots == [8, 7, 6, 4, 0, 0]


# ---- retries and backoff ----------------------------------------------

def test_backoff_schedule_doubles_from_backoff_ms() -> None:
    assert [retry_delay_ms(1000, a) for a in (1, 2, 3, 4)] == [1000, 2000, 4000, 8000]


def test_backoff_is_capped_at_one_hour() -> None:
    assert retry_delay_ms(1000, 13) == 3_600_000
    assert retry_delay_ms(1000, 10_000) == 3_600_000
    assert retry_delay_ms(0, 5) == 0


def test_retries_follow_the_backoff_schedule(service: TaskService, clock: FakeClock) -> None:
    service.create_queue("q", QueueConfig(max_retries=3), handler=boom)
    task = service.enqueue("q", b"x")
    service._dispatch_once()
    for attempt, wait in ((1, 1000), (2, 2000), (3, 4000)):
        assert service.get(task)[:3] == ("pending", "ValueError: bad x", attempt)
        clock.advance(wait - 1)
        assert service._dispatch_once() == 0, f"retry {attempt} ran before its backoff"
        clock.advance(1)
        assert service._dispatch_once() == 1
    assert service.get(task)[:3] == ("failed", "ValueError: bad x", 4)


def test_retry_then_success(service: TaskService, clock: FakeClock) -> None:
    calls: List[int] = []

    def flaky(payload: memoryview) -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("not yet")
        return "finally"

    service.create_queue("q", QueueConfig(max_retries=5, backoff_ms=10), handler=flaky)
    task = service.enqueue("q", b"")
    for _ in range(3):
        service._dispatch_once()
        clock.advance(1000)
    assert service.get(task)[:3] == ("completed", "finally", 3)


# ---- delay between starts ---------------------------------------------

def test_delay_ms_spaces_consecutive_starts(service: TaskService, clock: FakeClock) -> None:
    service.create_queue("q", QueueConfig(concurrency=4, delay_ms=500), handler=ok)
    service.enqueue_many("q", [b"a", b"b", b"c"])
    assert service._dispatch_once() == 1
    assert service._dispatch_once() == 0
    clock.advance(499)
    assert service._dispatch_once() == 0
    clock.advance(1)
    assert service._dispatch_once() == 1
    clock.advance(500)
    assert service._dispatch_once() == 1


def test_delay_ms_holds_across_services_on_one_file(db: str, clock: FakeClock) -> None:
    with TaskService(db, clock=clock, background=False) as a, \
            TaskService(db, clock=clock, background=False) as b:
        a.create_queue("q", QueueConfig(delay_ms=1000), handler=ok)
        b.create_queue("q", QueueConfig(delay_ms=1000), handler=ok)
        a.enqueue_many("q", [b"1", b"2"])
        assert a._dispatch_once() == 1
        assert b._dispatch_once() == 0
        clock.advance(1000)
        assert b._dispatch_once() == 1


# ---- retention ----------------------------------------------------------

def test_retention_sweeps_finished_tasks(service: TaskService, clock: FakeClock) -> None:
    service.create_queue("q", QueueConfig(retention_ms=60_000), handler=ok)
    done = service.enqueue("q", b"x")
    service._dispatch_once()
    cancelled = service.enqueue("q", b"y")
    service.cancel(cancelled)
    pending_later = service.enqueue("q", b"z")
    service.cancel(pending_later)
    clock.advance(60_000)
    service._dispatch_once()
    assert service.get(done).status == "completed"  # finished exactly retention_ms ago: kept
    clock.advance(1)
    service._dispatch_once()
    for task in (done, cancelled, pending_later):
        with pytest.raises(UnknownTaskError):
            service.get(task)


def test_retention_keeps_pending_tasks(service: TaskService, clock: FakeClock) -> None:
    service.create_queue("q", QueueConfig(retention_ms=60_000), handler=ok)
    service._dispatch_once()
    clock.advance(10**9)
    task = service.enqueue("q", b"x")
    clock.advance(10**9)
    service._runtime._maintain(sweep=True)
    assert service.get(task).status == "pending"


# ---- cancel and clear ---------------------------------------------------

def test_cancel_pending_task(service: TaskService) -> None:
    service.create_queue("q", handler=ok)
    task = service.enqueue("q", b"x")
    assert service.cancel(task) is None
    assert service.get(task).status == "cancelled"
    assert service._dispatch_once() == 0


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_cancel_refuses_finished_tasks_saying_why(service: TaskService, status: str) -> None:
    service.create_queue("q", handler=boom if status == "failed" else ok)
    task = service.enqueue("q", b"x")
    if status == "cancelled":
        service.cancel(task)
    else:
        service._dispatch_once()
    with pytest.raises(TaskNotCancellableError, match=status[:6]) as err:
        service.cancel(task)
    assert err.value.status == status


def test_cancel_refuses_a_running_task(db: str, clock: FakeClock) -> None:
    store = open_store(db)
    with TaskService(db, clock=clock, background=False) as service:
        service.create_queue("q", handler=ok)
        task = service.enqueue("q", b"x")
        store.claim("q", owner="elsewhere", limit=1, now=clock(), lease_ms=30_000)
        with pytest.raises(TaskNotCancellableError, match="running") as err:
            service.cancel(task)
        assert err.value.status == "running"
    store.close()


def test_cancel_unknown_task(service: TaskService) -> None:
    with pytest.raises(UnknownTaskError, match="unknown task"):
        service.cancel("nope")
    with pytest.raises(KeyError):
        service.get("nope")


def test_clear_queue_cancels_pending_and_returns_count(service: TaskService) -> None:
    service.create_queue("q", handler=ok)
    service.create_queue("other", handler=ok)
    service.enqueue_many("q", [b"1", b"2", b"3"])
    kept = service.enqueue("other", b"x")
    assert service.clear_queue("q") == 3
    assert service.clear_queue("q") == 0
    assert service.get(kept).status == "pending"
    assert service.counts()["q"]["cancelled"] == 3


def test_clear_unknown_queue(service: TaskService) -> None:
    with pytest.raises(UnknownQueueError):
        service.clear_queue("nope")


# ---- queues -------------------------------------------------------------

def test_create_queue_twice_is_an_error(service: TaskService) -> None:
    service.create_queue("q", handler=ok)
    with pytest.raises(QueueExistsError, match="already created"):
        service.create_queue("q", handler=ok)


def test_enqueue_to_unknown_queue(service: TaskService) -> None:
    with pytest.raises(UnknownQueueError):
        service.enqueue("nope", b"x")


def test_served_queues_are_those_this_service_created(db: str, clock: FakeClock) -> None:
    with TaskService(db, clock=clock, background=False) as other:
        other.create_queue("elsewhere", handler=ok)
        with TaskService(db, clock=clock, background=False) as service:
            assert service.served_queues() == []
            service.create_queue("b", handler=ok)
            service.create_queue("a", handler=ok)
            assert service.served_queues() == ["a", "b"]
            assert service.queues() == ["a", "b", "elsewhere"]


def test_queue_created_elsewhere_accepts_tasks(db: str, clock: FakeClock) -> None:
    with TaskService(db, clock=clock, background=False) as runner:
        runner.create_queue("q", handler=ok)
        with TaskService(db, clock=clock, background=False) as producer:
            task = producer.enqueue("q", b"remote")
        runner._dispatch_once()
        assert runner.get(task)[:3] == ("completed", "ok remote", 1)


def test_crash_recovery_on_create_queue(db: str, clock: FakeClock) -> None:
    """Running tasks left by a predecessor come back: at once if its process
    is provably gone, otherwise when its lease expires; a task whose
    attempts are used up fails."""
    store = open_store(db)
    store.ensure_queue("q")
    store.enqueue_many("q", [("dead", b"1"), ("expired", b"2"), ("live", b"3")],
                       clock() - 50_000)
    host = owners.HOST  # the host name, and on Linux its pid namespace
    gone_pid = _a_dead_pid()
    claims = [store.claim("q", owner=f"{host}/{gone_pid}/x", limit=1, now=clock(), lease_ms=10**9),
              store.claim("q", owner="otherhost/1/y", limit=1, now=clock() - 40_000,
                          lease_ms=30_000),
              store.claim("q", owner=f"{host}/{os.getppid()}/z", limit=1, now=clock(),
                          lease_ms=30_000)]
    for (task,) in claims:  # their runs started
        assert store.start(task.id, task.token, clock())
    store.close()
    with TaskService(db, clock=clock, background=False) as service:
        service.create_queue("q", QueueConfig(max_retries=1), handler=ok)
        assert service.get("dead")[:3] == ("pending", "worker lost during attempt 1; retrying", 1)
        assert service.get("expired").status == "pending"
        assert service.get("live").status == "running"
        service._dispatch_once()
        assert service.get("dead")[:3] == ("completed", "ok 1", 2)


def test_recovery_fails_a_task_with_no_attempt_left(db: str, clock: FakeClock) -> None:
    store = open_store(db)
    store.ensure_queue("q")
    store.enqueue("q", "t", b"", clock())
    (task,) = store.claim("q", owner="otherhost/1/y", limit=1, now=clock(), lease_ms=100)
    assert store.start(task.id, task.token, clock())
    store.close()
    clock.advance(100)
    with TaskService(db, clock=clock, background=False) as service:
        service.create_queue("q", handler=ok)
        info = service.get("t")
        assert (info.status, info.attempt) == ("failed", 1)
        assert "worker lost" in info.message


def test_expired_leases_are_recovered_while_serving(db: str, clock: FakeClock) -> None:
    with TaskService(db, clock=clock, background=False, lease_ms=1000) as service:
        service.create_queue("q", handler=ok)
        service.create_queue("held", QueueConfig(max_retries=2), handler=ok)
        store = open_store(db)
        store.enqueue("held", "t", b"x", clock())
        (task,) = store.claim("held", owner="otherhost/1/y", limit=1, now=clock(),
                              lease_ms=1000)
        assert store.start(task.id, task.token, clock())  # its run started
        store.close()
        assert service._dispatch_once() == 0
        clock.advance(1000)
        assert service._dispatch_once() == 1
        assert service.get("t")[:3] == ("completed", "ok x", 2)


def _a_dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


@pytest.mark.skipif(not os.path.exists("/proc/self/ns/pid"), reason="Linux pid namespaces")
def test_a_host_name_shared_with_another_machine_does_not_make_its_workers_dead() -> None:
    """Two containers or machines with one host name share a database: a
    pid that is gone here says nothing about a worker over there."""
    gone_pid = _a_dead_pid()
    assert owners.owner_is_dead(f"{owners.HOST}/{gone_pid}/x")
    twin = f"{socket.gethostname()}#000000000000"
    assert not owners.owner_is_dead(f"{twin}/{gone_pid}/x")
    assert not owners.owner_is_dead(f"{socket.gethostname()}/{gone_pid}/x")


# ---- limits and bad input -----------------------------------------------

def test_payload_limit_is_one_mib(service: TaskService) -> None:
    service.create_queue("q", handler=lambda p: str(len(p)))
    task = service.enqueue("q", bytes(1 << 20))
    with pytest.raises(ValueError, match="1 MiB"):
        service.enqueue("q", bytes((1 << 20) + 1))
    service._dispatch_once()
    assert service.get(task).message == str(1 << 20)


def test_queue_name_limit_is_128_utf8_bytes(service: TaskService) -> None:
    service.create_queue("é" * 64, handler=ok)
    with pytest.raises(ValueError, match="128"):
        service.create_queue("é" * 64 + "x", handler=ok)
    with pytest.raises(ValueError):
        service.create_queue("", handler=ok)
    service.enqueue("é" * 64, b"x")
    assert service._dispatch_once() == 1


@pytest.mark.parametrize("payload", ["text", 12, None, [1, 2]])
def test_enqueue_non_bytes_is_a_type_error(service: TaskService, payload: object) -> None:
    service.create_queue("q", handler=ok)
    with pytest.raises(TypeError, match="payload"):
        service.enqueue("q", payload)  # type: ignore[arg-type]


def test_enqueue_many_is_all_or_nothing(service: TaskService) -> None:
    service.create_queue("q", handler=ok)
    with pytest.raises(ValueError):
        service.enqueue_many("q", [b"fine", bytes((1 << 20) + 1)])
    with pytest.raises(TypeError):
        service.enqueue_many("q", b"abc")  # type: ignore[arg-type]
    assert service.counts()["q"]["pending"] == 0
    assert service.enqueue_many("q", []) == []


def test_enqueue_many_returns_unique_string_ids(service: TaskService) -> None:
    service.create_queue("q", handler=ok)
    ids = service.enqueue_many("q", [b"x"] * 100)
    assert len(set(ids)) == 100 and all(isinstance(i, str) and len(i) >= 32 for i in ids)


@pytest.mark.parametrize("call", [
    lambda s: s.create_queue(1, handler=ok),
    lambda s: s.create_queue("q", handler="not callable"),
    lambda s: s.create_queue("q", config={"concurrency": 2}, handler=ok),
    lambda s: s.enqueue(b"q", b"x"),
    lambda s: s.get(123),
    lambda s: s.cancel(None),
    lambda s: s.clear_queue(5),
])
def test_bad_argument_types_are_type_errors(service: TaskService, call: object) -> None:
    with pytest.raises(TypeError):
        call(service)  # type: ignore[operator]


@pytest.mark.parametrize("kwargs", [{"durability": "maybe"}, {"lease_ms": 0}, {"poll_ms": 0}])
def test_bad_service_options_are_value_errors(db: str, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TaskService(db, **kwargs)


# ---- lifecycle ----------------------------------------------------------

def test_closed_service_refuses_every_verb(db: str) -> None:
    service = TaskService(db)
    service.close()
    service.close()
    for call in (lambda: service.create_queue("q", handler=ok), lambda: service.enqueue("q", b""),
                 lambda: service.get("x"), lambda: service.cancel("x"),
                 lambda: service.clear_queue("q")):
        with pytest.raises(ServiceClosedError):
            call()


def test_flush_waits_for_claimed_tasks_and_commits_their_outcomes(db: str) -> None:
    gate, running = threading.Event(), threading.Event()

    def hold(payload: memoryview) -> str:
        running.set()
        gate.wait(30)
        return "done"

    with TaskService(db) as service:
        service.flush()  # serves no queue: nothing to wait for
        service.create_queue("q", handler=hold)
        task = service.enqueue("q", b"")
        assert running.wait(30)
        flusher = threading.Thread(target=service.flush)
        flusher.start()
        flusher.join(0.2)
        assert flusher.is_alive()  # the handler still runs
        gate.set()
        flusher.join(30)
        assert not flusher.is_alive()
        store = open_store(db)  # another process sees the outcome at once
        try:
            record = store.get(task)
        finally:
            store.close()
        assert record is not None and (record.status, record.message) == ("completed", "done")


def test_flush_from_a_handler_is_a_runtime_error(service: TaskService) -> None:
    def flush_myself(payload: memoryview) -> None:
        service.flush()

    service.create_queue("q", handler=flush_myself)
    task = service.enqueue("q", b"")
    service._dispatch_once()
    info = service.get(task)
    assert info.status == "failed" and info.message.startswith("RuntimeError: ")


def test_flush_on_a_closed_service_is_an_error(db: str) -> None:
    service = TaskService(db)
    service.close()
    with pytest.raises(ServiceClosedError):
        service.flush()


def test_close_gives_back_claimed_but_unstarted_tasks(service: TaskService, db: str) -> None:
    service.create_queue("q", QueueConfig(concurrency=1), handler=ok)
    task = service.enqueue("q", b"x")
    runtime = service._runtime
    (claimed,) = service._store.claim("q", owner=runtime._owner, limit=1, now=runtime._now(),
                                       lease_ms=30_000)
    with runtime._cond:  # as if handed to the worker, which has not run it yet
        runtime._track_locked(runtime._queues["q"], [claimed], runtime._now() + 30_000)
    service.close()
    store = open_store(db)
    record = store.get(task)
    store.close()
    assert record is not None and (record.status, record.attempt) == ("pending", 0)


def test_background_service_runs_tasks_without_help(db: str) -> None:
    done: List[Optional[str]] = []
    with TaskService(db) as service:
        service.create_queue("q", QueueConfig(concurrency=2), handler=lambda p: done.append("x"))
        ids = service.enqueue_many("q", [b"a"] * 50)
    with TaskService(db) as reader:
        assert all(reader.get(i).status in ("completed", "pending") for i in ids)
        assert reader.counts()["q"]["running"] == 0


def test_current_task_inside_a_handler(service: TaskService) -> None:
    from callbackworker.tasks import TaskContext, current_task

    seen: List[Optional[TaskContext]] = []
    service.create_queue("q", handler=lambda p: seen.append(current_task()))
    task = service.enqueue("q", b"")
    service._dispatch_once()
    assert seen == [TaskContext(task, "q", 1)]
    assert current_task() is None


def test_a_claim_whose_answer_never_arrived_is_taken_back_free(db: str, clock: FakeClock) -> None:
    """The runtime renews only the leases of tasks it knows it holds: a claim
    made under its owner whose answer was lost (with its connection)
    expires, and the task runs as its first attempt."""
    with TaskService(db, clock=clock, background=False, lease_ms=1000) as service:
        service.create_queue("q", handler=ok)
        store = open_store(db)
        store.enqueue("q", "t", b"x", clock())
        store.claim("q", owner=service._runtime._owner, limit=1, now=clock(), lease_ms=1000)
        store.close()
        assert service._dispatch_once() == 0
        clock.advance(1000)
        assert service._dispatch_once() == 1
        assert service.get("t")[:3] == ("completed", "ok x", 1)


def test_a_prefetched_task_whose_worker_dies_costs_no_attempt(db: str, clock: FakeClock) -> None:
    """The attempt is counted when the run starts: tasks claimed but not yet
    run when their process dies come back with every attempt left, while
    the one that ran is charged."""
    gate, running = threading.Event(), threading.Event()

    def hold(payload: memoryview) -> None:
        running.set()
        gate.wait(30)

    service = TaskService(db, clock=clock, background=False, lease_ms=1000, prefetch=2)
    service.create_queue("q", handler=hold)
    ids = service.enqueue_many("q", [b"1", b"2", b"3"])
    started, _ = service._runtime._claim_and_start()
    assert started == 3 and running.wait(30)
    service._runtime._committer.flush()  # its start goes with the next group commit
    with TaskService(db, clock=clock, background=False) as reader:
        assert [reader.get(i)[:3:2] for i in ids] == [("running", 1), ("running", 0),
                                                      ("running", 0)]
    clock.advance(1000)  # the process is gone: its leases expire unrenewed
    with TaskService(db, clock=clock, background=False) as heir:
        heir.create_queue("q", handler=ok)  # recovers the expired leases
        assert heir.get(ids[0])[:3] == ("failed", "worker lost during attempt 1 (lease expired); "
                                                  "no attempts left", 1)
        assert [heir.get(i)[:3] for i in ids[1:]] == [("pending", "", 0)] * 2
        heir._dispatch_once()
        assert [heir.get(i)[:3] for i in ids[1:]] == [("completed", "ok 2", 1),
                                                      ("completed", "ok 3", 1)]
    gate.set()
    service.close()


class HeldStarts:
    """Wraps a store: a batch holding a "start" record is committed only
    once ``released`` is set (or after ``patience_s``), so a handler can
    look at the database before its start is committed, if it runs then."""

    def __init__(self, store: TaskStore, patience_s: float = 0.5) -> None:
        self._store = store
        self.patience_s = patience_s
        self.released = threading.Event()

    def settle(self, outcomes: "List[Outcome]") -> List[bool]:
        if any(o.kind == "start" for o in outcomes):
            self.released.wait(self.patience_s)
        return self._store.settle(outcomes)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def _attempt_seen_by_handler(db: str, clock: FakeClock, task_id: str) -> List[int]:
    """Runs the queue "q" once with a handler that reads its task's counted
    attempt from the database while its start is being committed."""
    seen: List[int] = []
    service = TaskService(db, clock=clock, background=False)

    def look(payload: memoryview) -> None:
        reader = open_store(db)
        seen.append(reader.get(task_id).attempt)  # type: ignore[union-attr]
        reader.close()
        held.released.set()

    service.create_queue("q", handler=look)
    committer = service._runtime._committer
    assert committer is not None
    held = HeldStarts(committer._store)
    committer._store = held  # type: ignore[assignment]
    service._dispatch_once()
    service.close()
    return seen


def test_a_run_begins_before_its_start_is_committed(db: str, clock: FakeClock) -> None:
    """The start goes with the next group commit; the handler does not
    wait for it (the outcome counts the attempt if the start is not in)."""
    store = open_store(db)
    store.ensure_queue("q")
    store.enqueue("q", "t", b"x", clock())
    store.close()
    assert _attempt_seen_by_handler(db, clock, "t") == [0]
    with TaskService(db, clock=clock, background=False) as reader:
        assert reader.get("t")[:3] == ("completed", "", 1)


def test_a_task_taken_back_unstarted_runs_only_once_its_start_is_committed(
        db: str, clock: FakeClock) -> None:
    """A claim lost before its run's start was committed may have run
    uncounted; every later run of that task is counted before it begins,
    so a handler that kills its process is charged its attempts."""
    store = open_store(db)
    store.ensure_queue("q")
    store.enqueue("q", "t", b"x", clock())
    store.claim("q", owner="dead", limit=1, now=clock(), lease_ms=1000)
    assert store.recover("q", now=clock(), max_attempts=3, owners=["dead"]) == 1
    store.close()
    assert _attempt_seen_by_handler(db, clock, "t") == [1]


def test_a_prefetched_run_whose_lease_may_have_run_out_is_not_run_unconfirmed(
        db: str, clock: FakeClock) -> None:
    """A run that begins with more than half of its lease gone waits for
    its start; if the claim was lost meanwhile, the run does not happen."""
    gate, running = threading.Event(), threading.Event()
    ran: List[bytes] = []

    def hold(payload: memoryview) -> None:
        ran.append(bytes(payload))
        running.set()
        gate.wait(30)

    service = TaskService(db, clock=clock, background=False, lease_ms=1000, prefetch=1)
    service.create_queue("q", QueueConfig(concurrency=1), handler=hold)
    first, second = service.enqueue_many("q", [b"1", b"2"])
    started, _ = service._runtime._claim_and_start()
    assert started == 2 and running.wait(30)
    clock.advance(1000)  # unrenewed: the prefetched claim expires
    heir = open_store(db)
    assert heir.recover("q", now=clock(), max_attempts=3) == 2
    assert [t.id for t in heir.claim("q", owner="heir", limit=2, now=clock(),
                                     lease_ms=60_000)] == [first, second]
    gate.set()
    service._runtime.flush()
    assert ran == [b"1"]
    assert heir.get(second).owner == "heir"  # type: ignore[union-attr]
    heir.close()
    service.close()


def test_a_run_whose_claim_was_lost_before_it_began_ends_without_an_error(
        db: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The start of a run whose claim expired and was taken back is
    rejected: the run ends there, quietly (nothing ran, nothing to tell)."""
    errors: List[BaseException] = []
    real_run = runtime_mod._Attempt.run

    def run(attempt: "runtime_mod._Attempt") -> None:
        try:
            real_run(attempt)
        except BaseException as exc:
            errors.append(exc)
            raise

    monkeypatch.setattr(runtime_mod._Attempt, "run", run)
    store = open_task_store(db)
    store.ensure_queue("q")
    store.enqueue("q", "t", b"x", clock())
    store.close()
    service = TaskService(db, clock=clock, background=False, lease_ms=1000)
    service.create_queue("q", QueueConfig(concurrency=1), handler=ok)
    runtime = service._runtime
    real_start = runtime._start

    def start_after_the_lease(queue: object, claimed: list, lease_until: int) -> None:
        clock.advance(1000)  # unrenewed: the claim expires before the run
        heir = open_task_store(db)
        assert heir.recover("q", now=clock(), max_attempts=3) == 1
        heir.close()
        real_start(queue, claimed, lease_until)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime, "_start", start_after_the_lease)
    assert runtime.dispatch_once() == 1
    assert errors == []
    assert service.get("t")[:3] == ("pending", "", 0)
    service.close()


def test_a_failed_hand_off_gives_back_every_claimed_task_not_yet_handed_over(
        db: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    service = TaskService(db, clock=clock, background=False, prefetch=2)
    service.create_queue("q", handler=ok)
    ids = service.enqueue_many("q", [b"1", b"2", b"3"])
    runtime = service._runtime
    assert runtime._worker is not None
    real = runtime._worker.run_detached
    calls: List[object] = []

    def second_fails(item: object, **kwargs: object) -> int:
        calls.append(item)
        if len(calls) == 2:
            raise MemoryError("no room for the job")
        return real(item, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime._worker, "run_detached", second_fails)
    with pytest.raises(MemoryError):
        runtime._claim_and_start()
    with runtime._cond:  # the one handed over finishes; none is left stranded
        assert runtime._cond.wait_for(lambda: runtime._queues["q"].in_flight == 0, timeout=30)
    assert runtime._committer is not None
    runtime._committer.flush()
    assert [service.get(i)[:3] for i in ids] == [("completed", "ok 1", 1), ("pending", "", 0),
                                                 ("pending", "", 0)]
    service.close()


def test_prefetch_claims_beyond_free_slots_and_close_gives_them_back(db: str, clock: FakeClock) -> None:
    gate, running = threading.Event(), threading.Event()

    def hold(payload: memoryview) -> None:
        running.set()
        gate.wait(30)

    service = TaskService(db, clock=clock, background=False, prefetch=2)
    service.create_queue("q", handler=hold)
    ids = service.enqueue_many("q", [b"1", b"2", b"3", b"4"])
    started, _ = service._runtime._claim_and_start()
    assert started == 3  # one slot plus two prefetched
    with TaskService(db, clock=clock, background=False) as reader:
        assert [reader.get(i).status for i in ids] == ["running"] * 3 + ["pending"]
    assert running.wait(30)
    closer = threading.Thread(target=service.close)
    closer.start()
    gate.set()
    closer.join()
    with TaskService(db, clock=clock, background=False) as reader:
        assert reader.get(ids[0])[:3] == ("completed", "", 1)
        assert [reader.get(i)[:3] for i in ids[1:]] == [("pending", "", 0)] * 3


def test_claims_waiting_beyond_a_shrunken_window_are_given_back(tmp_path: Path) -> None:
    """Quick tasks raise the default prefetch; the claim after them takes
    the slow tasks queued behind by the dozen.  Those that wait beyond the
    window the queue's new rate allows are given back (pending, for any
    process) instead of being held here while one runs at a time."""
    gate = threading.Event()

    def handler(payload: memoryview) -> None:
        if bytes(payload) == b"slow":
            gate.wait(30)

    with TaskService(str(tmp_path / "shed.db"), poll_ms=20) as svc:
        svc.create_queue("q", QueueConfig(concurrency=1), handler=handler)
        svc.enqueue_many("q", [b"fast"] * 3000 + [b"slow"] * 300)
        peak, deadline = 0, time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                counts = svc.counts()["q"]
                peak = max(peak, counts["running"])
                if counts["completed"] >= 3000 and counts["running"] <= 3:
                    break
                time.sleep(0.02)
        finally:
            gate.set()
        assert peak > 3, "the prefetch never claimed beyond the window: nothing was tested"
        assert counts["running"] <= 3, counts
