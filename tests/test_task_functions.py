"""Tasks as functions (SPEC section 7), on both backends.

Each test builds a service with ``background=False`` and a ``FakeClock``;
``service._dispatch_once()`` runs one full pass synchronously, so no test
sleeps or depends on timing.  The ``db`` fixture runs every test on SQLite
and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, List

import pytest

import callbackworker
from callbackworker import (NoRetry, QueueConfig, Retry, ServiceClosedError, Task, TaskInfo,
                            TaskService)

from helpers import FakeClock


def result_of(service: TaskService, task_id: str) -> Any:
    info = service.get(task_id)
    assert info.status == "completed", info
    return info.result


def drain(service: TaskService) -> int:
    """Runs passes until one finds nothing due; returns how many tasks ran."""
    ran = 0
    while True:
        n = service._dispatch_once()
        if n == 0:
            return ran
        ran += n


def add(a: int, b: int) -> int:
    return a + b


# ---- registration and inline calls ----------------------------------------

def test_public_names_are_exported() -> None:
    assert callbackworker.Task is Task
    assert callbackworker.Retry is Retry and callbackworker.NoRetry is NoRetry
    assert issubclass(callbackworker.TaskFailedError, callbackworker.TaskError)
    assert issubclass(callbackworker.TaskCancelledError, callbackworker.TaskError)


def test_task_returns_a_task_that_keeps_the_functions_identity(service: TaskService) -> None:
    task = service.task(add)
    assert isinstance(task, Task)
    assert task.__name__ == "add" and task.__wrapped__ is add
    assert (task.queue, task.priority, task.max_retries, task.backoff_ms, task.timeout_ms) == (
        "default", 0, None, None, None)


def test_task_name_defaults_to_module_and_qualname(service: TaskService) -> None:
    assert service.task(add).name == f"{__name__}.add"
    assert service.task(name="custom")(add).name == "custom"


def test_calling_a_task_runs_the_function_inline(service: TaskService) -> None:
    task = service.task(add)
    assert task(2, b=3) == 5
    assert service.counts() == {}


def test_async_task_called_inline_runs_to_completion(service: TaskService) -> None:
    @service.task
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    assert double(21) == 42


def test_async_task_called_inside_a_running_loop_runs_to_completion(service: TaskService) -> None:
    @service.task
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    async def caller() -> int:
        return double(4)

    assert asyncio.run(caller()) == 8


def test_registering_a_name_twice_is_a_value_error(service: TaskService) -> None:
    service.task(name="once")(add)
    with pytest.raises(ValueError, match="'once' is already registered"):
        service.task(name="once")(lambda: None)


@pytest.mark.parametrize("name, error", [("", ValueError), ("x" * 256, ValueError),
                                         ("a\0b", ValueError), (b"bytes", TypeError)])
def test_bad_task_names_are_rejected_at_registration(service: TaskService, name: Any,
                                                     error: type) -> None:
    with pytest.raises(error, match="task name"):
        service.task(name=name)(add)


@pytest.mark.parametrize("option, value, error", [
    ("max_retries", -1, ValueError), ("backoff_ms", -1, ValueError),
    ("timeout_ms", -2, ValueError), ("priority", 2**31, ValueError), ("priority", 1.5, TypeError),
])
def test_bad_task_options_are_rejected_at_registration(service: TaskService, option: str,
                                                       value: Any, error: type) -> None:
    with pytest.raises(error, match=option):
        service.task(**{option: value})(add)


def test_task_on_a_closed_service_raises(service: TaskService) -> None:
    service.close()
    with pytest.raises(ServiceClosedError):
        service.task(add)


# ---- enqueueing -------------------------------------------------------------

def test_registering_serves_nothing(service: TaskService) -> None:
    task_id = service.task(add).enqueue(1, 2)
    assert service._dispatch_once() == 0
    assert service.get(task_id).status == "pending"


def test_enqueue_into_a_queue_that_does_not_exist_creates_it(service: TaskService) -> None:
    service.task(queue="fresh")(add).enqueue(1, 2)
    assert service.counts()["fresh"]["pending"] == 1


def test_enqueue_stores_the_call_and_a_worker_runs_it(service: TaskService) -> None:
    task = service.task(add)
    task_id = task.enqueue(2, b=40)
    service.serve()
    assert service._dispatch_once() == 1
    assert result_of(service, task_id) == 42


def test_enqueue_task_by_name_runs_the_registered_function(db: str, clock: FakeClock) -> None:
    with TaskService(db, clock=clock, background=False) as producer:
        task_id = producer.enqueue_task(f"{__name__}.add", [1], {"b": 2})
    with TaskService(db, clock=clock, background=False) as worker:
        worker.task(add)
        worker.serve()
        worker._dispatch_once()
        assert result_of(worker, task_id) == 3


@pytest.mark.parametrize("args", [(object(),), ({1, 2},), (float("nan"),), (b"bytes",)])
def test_enqueue_of_arguments_json_cannot_encode_is_a_type_error(service: TaskService,
                                                                 args: tuple) -> None:
    task = service.task(add)
    with pytest.raises(TypeError, match="cannot be encoded as JSON"):
        task.enqueue(*args)
    assert sum(service.counts().get("default", {}).values()) == 0


def test_enqueue_task_checks_its_arguments(service: TaskService) -> None:
    with pytest.raises(TypeError, match="args must be a list or tuple"):
        service.enqueue_task("t", "ab")
    with pytest.raises(TypeError, match="kwargs must be a mapping"):
        service.enqueue_task("t", [], ["x"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot be encoded as JSON"):
        service.enqueue_task("t", [], {"x": object()})


def test_text_arguments_survive_the_store_whatever_they_hold(service: TaskService) -> None:
    echo = service.task(name="echo")(lambda s: s)
    task_id = echo.enqueue("nul \0, lone \ud800, snow \u2603")
    service.serve()
    service._dispatch_once()
    assert result_of(service, task_id) == "nul \0, lone \ud800, snow \u2603"


def test_options_queue_sends_one_call_to_another_queue(service: TaskService) -> None:
    task = service.task(add)
    task_id = task.options(queue="other").enqueue(1, 1)
    assert service.counts()["other"]["pending"] == 1
    assert service.get(task_id).status == "pending"


# ---- serving ----------------------------------------------------------------

def test_several_tasks_share_a_queue(service: TaskService) -> None:
    first = service.task(name="first")(lambda: "one")
    second = service.task(name="second")(lambda: "two")
    ids = [first.enqueue(), second.enqueue()]
    service.serve()
    assert drain(service) == 2
    assert [result_of(service, i) for i in ids] == ["one", "two"]


def test_async_task_runs_on_a_worker(service: TaskService) -> None:
    @service.task
    async def later(x: int) -> List[int]:
        await asyncio.sleep(0)
        return [x, x]

    task_id = later.enqueue(7)
    service.serve()
    service._dispatch_once()
    assert result_of(service, task_id) == [7, 7]


def test_serve_runs_every_queue_of_the_registered_tasks(service: TaskService) -> None:
    ids = [service.task(name=f"on {q}", queue=q)(add).enqueue(q, "!") for q in ("a", "b")]
    service.serve()
    assert service._dispatch_once() == 2
    assert [result_of(service, i) for i in ids] == ["a!", "b!"]


def test_serve_named_queues_serves_only_those(service: TaskService) -> None:
    in_a = service.task(name="in a", queue="a")(add).enqueue(1, 1)
    in_b = service.task(name="in b", queue="b")(add).enqueue(1, 1)
    service.serve(["a"])
    service._dispatch_once()
    assert service.get(in_a).status == "completed"
    assert service.get(in_b).status == "pending"


def test_serve_a_queue_without_a_registered_task_is_a_value_error(service: TaskService) -> None:
    with pytest.raises(ValueError, match="no registered task uses queue 'nobody'"):
        service.serve(["nobody"])
    with pytest.raises(TypeError, match="not one str"):
        service.serve("nobody")


def test_serve_twice_serves_each_queue_once(service: TaskService) -> None:
    task_id = service.task(add).enqueue(1, 1)
    service.serve()
    service.serve()
    service._dispatch_once()
    assert result_of(service, task_id) == 2


def test_tasks_registered_after_serve_on_a_served_queue_run(service: TaskService) -> None:
    service.task(add)
    service.serve()
    task_id = service.task(name="late")(lambda: "late").enqueue()
    service._dispatch_once()
    assert result_of(service, task_id) == "late"


def test_declare_queue_config_is_what_serve_uses(service: TaskService, clock: FakeClock) -> None:
    service.declare_queue("flaky", QueueConfig(max_retries=1, backoff_ms=10))
    calls: List[int] = []

    @service.task(queue="flaky")
    def fails_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first")
        return "second"

    task_id = fails_once.enqueue()
    service.serve()
    service._dispatch_once()
    clock.advance(10)
    service._dispatch_once()
    assert result_of(service, task_id) == "second"


def test_a_task_no_process_registered_fails_at_once_saying_so(db: str, clock: FakeClock) -> None:
    with TaskService(db, clock=clock, background=False) as service:
        service.declare_queue("default", QueueConfig(max_retries=5))
        task_id = service.enqueue_task("nowhere.to.be.found")
        service.task(add)
        service.serve()
        service._dispatch_once()
        info = service.get(task_id)
        assert (info.status, info.attempt) == ("failed", 1)
        assert "no task named 'nowhere.to.be.found' is registered" in info.message


# ---- Retry and NoRetry --------------------------------------------------------

def test_retry_runs_the_task_again_after_its_delay(service: TaskService, clock: FakeClock) -> None:
    service.declare_queue("default", QueueConfig(max_retries=1, backoff_ms=60_000))
    calls: List[int] = []

    @service.task
    def again() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise Retry(delay_ms=5)
        return len(calls)

    task_id = again.enqueue()
    service.serve()
    service._dispatch_once()
    assert service.get(task_id).status == "pending"
    clock.advance(4)
    assert service._dispatch_once() == 0
    clock.advance(1)
    service._dispatch_once()
    assert result_of(service, task_id) == 2
    assert service.get(task_id).attempt == 2


def test_retry_without_a_delay_waits_the_backoff(service: TaskService, clock: FakeClock) -> None:
    service.declare_queue("default", QueueConfig(max_retries=1, backoff_ms=50))

    @service.task
    def later() -> None:
        raise Retry()

    task_id = later.enqueue()
    service.serve()
    service._dispatch_once()
    clock.advance(49)
    assert service._dispatch_once() == 0
    clock.advance(1)
    assert service._dispatch_once() == 1
    assert service.get(task_id)[:3] == ("failed", "Retry: retry requested", 2)


def test_retry_counts_an_attempt_and_fails_when_none_is_left(service: TaskService) -> None:
    service.declare_queue("default", QueueConfig(max_retries=2))

    @service.task
    def forever() -> None:
        raise Retry(delay_ms=0)

    task_id = forever.enqueue()
    service.serve()
    assert drain(service) == 3
    info = service.get(task_id)
    assert (info.status, info.attempt) == ("failed", 3)
    assert info.message == "Retry: retry requested in 0 ms"


def test_no_retry_fails_the_task_at_once(service: TaskService) -> None:
    service.declare_queue("default", QueueConfig(max_retries=5))

    @service.task
    def hopeless() -> None:
        try:
            {}["missing"]
        except KeyError as exc:
            raise NoRetry("the record is gone") from exc

    task_id = hopeless.enqueue()
    service.serve()
    assert drain(service) == 1
    info = service.get(task_id)
    assert (info.status, info.attempt, info.message) == ("failed", 1, "NoRetry: the record is gone")


@pytest.mark.parametrize("delay, error", [(-1, ValueError), (1.0, TypeError)])
def test_retry_delay_must_be_a_non_negative_int(delay: Any, error: type) -> None:
    with pytest.raises(error, match="delay_ms"):
        Retry(delay_ms=delay)


# ---- per-call options -----------------------------------------------------------

def test_delay_ms_starts_the_task_no_earlier(service: TaskService, clock: FakeClock) -> None:
    task = service.task(add)
    task_id = task.options(delay_ms=100).enqueue(1, 1)
    service.serve()
    clock.advance(99)
    assert service._dispatch_once() == 0
    clock.advance(1)
    assert service._dispatch_once() == 1
    assert result_of(service, task_id) == 2


def test_run_at_ms_starts_the_task_no_earlier(service: TaskService, clock: FakeClock) -> None:
    task_id = service.enqueue_task(f"{__name__}.add", [2, 2], run_at_ms=clock.now + 50)
    service.task(add)
    service.serve()
    assert service._dispatch_once() == 0
    clock.advance(50)
    assert service._dispatch_once() == 1
    assert result_of(service, task_id) == 4


def test_delay_ms_and_run_at_ms_together_are_a_value_error(service: TaskService) -> None:
    task = service.task(add)
    with pytest.raises(ValueError, match="not both"):
        task.options(delay_ms=1, run_at_ms=5)
    with pytest.raises(ValueError, match="not both"):
        service.enqueue_task("t", delay_ms=1, run_at_ms=5)


def test_higher_priority_runs_first_and_equal_priority_keeps_fifo(service: TaskService) -> None:
    order: List[str] = []
    record = service.task(name="record")(order.append)
    for label, priority in [("a0", 0), ("b5", 5), ("c0", 0), ("d5", 5), ("e1", 1)]:
        record.options(priority=priority).enqueue(label)
    service.serve()
    assert drain(service) == 5
    assert order == ["b5", "d5", "e1", "a0", "c0"]


def test_a_tasks_priority_is_the_default_of_its_calls(service: TaskService) -> None:
    order: List[str] = []
    low = service.task(name="low")(lambda: order.append("low"))
    high = service.task(name="high", priority=3)(lambda: order.append("high"))
    low.enqueue()
    high.enqueue()
    service.serve()
    drain(service)
    assert order == ["high", "low"]


def test_dedup_key_returns_the_unfinished_tasks_id_and_stores_nothing(
        service: TaskService) -> None:
    task = service.task(add)
    first = task.options(dedup_key="sum:1+1").enqueue(1, 1)
    assert task.options(dedup_key="sum:1+1").enqueue(1, 1) == first
    assert service.enqueue_task(task.name, [1, 1], dedup_key="sum:1+1") == first
    assert service.counts()["default"]["pending"] == 1
    service.serve()
    drain(service)
    assert task.options(dedup_key="sum:1+1").enqueue(1, 1) != first  # the first one finished


@pytest.mark.parametrize("option, value, error", [
    ("delay_ms", -1, ValueError), ("run_at_ms", -1, ValueError), ("priority", 2**31, ValueError),
    ("dedup_key", "", ValueError), ("dedup_key", 5, TypeError), ("queue", "", ValueError),
])
def test_bad_options_are_rejected_before_anything_is_stored(service: TaskService, option: str,
                                                            value: Any, error: type) -> None:
    with pytest.raises(error):
        service.task(add).options(**{option: value})
    assert service.counts() == {}


# ---- queues ----------------------------------------------------------------------

def test_declare_queue_creates_the_queue_without_serving_it(service: TaskService) -> None:
    service.declare_queue("declared", QueueConfig(concurrency=2))
    assert service.queues() == ["declared"]
    assert service.served_queues() == []


def test_a_declared_config_is_used_by_every_service_that_serves_the_queue(
        db: str, clock: FakeClock) -> None:
    with TaskService(db, clock=clock, background=False) as web:
        web.declare_queue("emails", QueueConfig(max_retries=1, backoff_ms=0))
        task_id = web.enqueue_task("flaky", queue="emails")
    calls: List[int] = []
    with TaskService(db, clock=clock, background=False) as worker:
        @worker.task(name="flaky", queue="emails")
        def flaky() -> str:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("first")
            return "second"

        worker.serve()
        assert drain(worker) == 2
        assert result_of(worker, task_id) == "second"


def test_declare_queue_again_updates_the_stored_config(db: str) -> None:
    from callbackworker.tasks.client import open_store
    from callbackworker.tasks.config import config_from_json

    with TaskService(db) as service:
        service.declare_queue("q", QueueConfig(concurrency=3))
        service.declare_queue("q", QueueConfig(timeout_ms=500))
    store = open_store(db)
    try:
        assert config_from_json(store.queue_config("q") or "") == QueueConfig(timeout_ms=500)
    finally:
        store.close()


def test_raw_payloads_on_a_queue_served_for_functions_fail_saying_so(
        service: TaskService) -> None:
    service.task(add)
    service.serve()
    task_id = service.enqueue("default", b"raw")
    service._dispatch_once()
    info = service.get(task_id)
    assert info.status == "failed" and "serves task functions only" in info.message


def test_a_queue_with_a_raw_handler_runs_function_calls_too(service: TaskService) -> None:
    service.create_queue("mixed", handler=lambda payload: "raw ok")
    service.task(queue="mixed")(add)
    ids = [service.enqueue("mixed", b"x"), service.enqueue_task(f"{__name__}.add", [3, 4],
                                                                 queue="mixed")]
    assert drain(service) == 2
    assert service.get(ids[0]).message == "raw ok"
    assert result_of(service, ids[1]) == 7


# ---- TaskInfo ----------------------------------------------------------------------

def test_task_info_fields_follow_status_message_and_attempt() -> None:
    assert TaskInfo._fields == ("status", "message", "attempt", "id", "name", "queue", "result",
                                "progress", "traceback", "created_at_ms", "finished_at_ms")


def test_get_reports_id_name_queue_result_and_times(service: TaskService,
                                                    clock: FakeClock) -> None:
    task = service.task(queue="math")(add)
    task_id = task.enqueue(20, 22)
    created = clock.now
    info = service.get(task_id)
    assert (info.id, info.name, info.queue, info.result, info.created_at_ms,
            info.finished_at_ms) == (task_id, task.name, "math", None, created, None)
    service.serve()
    clock.advance(7)
    service._dispatch_once()
    info = service.get(task_id)
    assert (info.status, info.result, info.finished_at_ms, info.traceback) == (
        "completed", 42, created + 7, None)


def test_raw_tasks_have_no_name_and_no_result(service: TaskService) -> None:
    service.create_queue("raw", handler=lambda payload: "done")
    task_id = service.enqueue("raw", b"x")
    service._dispatch_once()
    info = service.get(task_id)
    assert (info.name, info.result, info.message) == (None, None, "done")


def test_the_last_failed_attempts_traceback_is_stored(service: TaskService) -> None:
    @service.task
    def broken(x: int) -> None:
        raise ValueError(f"bad {x}")

    task_id = broken.enqueue(3)
    service.serve()
    service._dispatch_once()
    info = service.get(task_id)
    assert (info.status, info.message) == ("failed", "ValueError: bad 3")
    assert info.traceback is not None
    assert "Traceback (most recent call last)" in info.traceback
    assert 'raise ValueError(f"bad {x}")' in info.traceback


def test_raw_handler_failures_store_a_traceback_too(service: TaskService) -> None:
    def fails(payload: memoryview) -> str:
        raise KeyError("gone")

    service.create_queue("raw", handler=fails)
    task_id = service.enqueue("raw", b"x")
    service._dispatch_once()
    assert "KeyError: 'gone'" in (service.get(task_id).traceback or "")


# ---- results ---------------------------------------------------------------------

def test_result_returns_the_decoded_return_value(service: TaskService) -> None:
    task_id = service.task(name="pair")(lambda: {"a": [1, "two"]}).enqueue()
    service.serve()
    service._dispatch_once()
    assert service.result(task_id) == {"a": [1, "two"]}


def test_result_of_a_failed_task_raises_task_failed_error(service: TaskService) -> None:
    @service.task
    def broken() -> None:
        raise OSError("disk on fire")

    task_id = broken.enqueue()
    service.serve()
    service._dispatch_once()
    with pytest.raises(callbackworker.TaskFailedError) as caught:
        service.result(task_id)
    err = caught.value
    assert (err.message, err.attempt) == ("OSError: disk on fire", 1)
    assert err.traceback is not None and "OSError: disk on fire" in err.traceback


def test_result_of_a_cancelled_task_raises_task_cancelled_error(service: TaskService) -> None:
    task_id = service.task(add).enqueue(1, 2)
    service.cancel(task_id)
    with pytest.raises(callbackworker.TaskCancelledError):
        service.result(task_id)


def test_result_wait_times_out_and_leaves_the_task(service: TaskService) -> None:
    task_id = service.task(add).enqueue(1, 2)
    with pytest.raises(callbackworker.WaitTimeoutError, match="did not finish within 20 ms"):
        service.result(task_id, timeout_ms=20)
    assert service.get(task_id).status == "pending"


def test_result_of_an_unknown_task_raises(service: TaskService) -> None:
    with pytest.raises(callbackworker.UnknownTaskError):
        service.result("nope", timeout_ms=0)


def test_result_async_awaits_the_value(service: TaskService) -> None:
    task_id = service.task(add).enqueue(5, 6)
    service.serve()
    service._dispatch_once()
    assert asyncio.run(service.result_async(task_id, timeout_ms=5000)) == 11


def test_result_blocks_until_a_worker_in_another_service_finishes(db: str) -> None:
    with TaskService(db) as producer, TaskService(db, poll_ms=10) as worker:
        worker.task(add)
        task_id = producer.enqueue_task(f"{__name__}.add", [40, 2])
        worker.serve()
        assert producer.result(task_id, timeout_ms=30_000) == 42


def test_a_result_json_cannot_encode_fails_only_that_task(service: TaskService) -> None:
    bad = service.task(name="bad")(lambda: {1, 2})
    good = service.task(name="good")(lambda: "fine")
    ids = [bad.enqueue(), good.enqueue()]
    service.declare_queue("default", QueueConfig(max_retries=3, concurrency=2))
    service.serve()
    service._dispatch_once()
    info = service.get(ids[0])
    assert (info.status, info.attempt) == ("failed", 1)
    assert "the return value of task 'bad' cannot be encoded as JSON" in info.message
    assert result_of(service, ids[1]) == "fine"


def test_a_result_over_one_mib_fails_its_task_clearly(service: TaskService) -> None:
    task_id = service.task(name="huge")(lambda: "x" * (1 << 20)).enqueue()
    service.serve()
    service._dispatch_once()
    info = service.get(task_id)
    assert info.status == "failed"
    assert "bytes of JSON; the limit is 1048576 (1 MiB)" in info.message


# ---- retry policy of a task --------------------------------------------------------

def test_a_tasks_max_retries_and_backoff_override_its_queues(service: TaskService,
                                                             clock: FakeClock) -> None:
    @service.task(max_retries=1, backoff_ms=30)
    def flaky() -> None:
        raise RuntimeError("again")

    task_id = flaky.enqueue()
    service.serve()  # the queue's config: no retries
    service._dispatch_once()
    assert service.get(task_id).status == "pending"
    clock.advance(29)
    assert service._dispatch_once() == 0
    clock.advance(1)
    service._dispatch_once()
    assert service.get(task_id)[:3] == ("failed", "RuntimeError: again", 2)


# ---- time limits --------------------------------------------------------------------

def _spin() -> None:
    while True:
        pass


def test_a_tasks_timeout_interrupts_the_attempt_and_says_so(service: TaskService) -> None:
    task_id = service.task(name="spin", timeout_ms=50)(_spin).enqueue()
    service.serve()
    service._dispatch_once()
    info = service.get(task_id)
    assert (info.status, info.attempt) == ("failed", 1)
    assert info.message == ("TimeoutError: the attempt ran past its time limit of 50 ms "
                            "and was interrupted")


def test_a_queues_timeout_applies_to_its_tasks_and_retries_under_the_policy(
        service: TaskService, clock: FakeClock) -> None:
    calls: List[int] = []

    @service.task(queue="limited")
    def slow_then_fast() -> str:
        calls.append(1)
        if len(calls) == 1:
            _spin()
        return "second attempt"

    service.declare_queue("limited", QueueConfig(timeout_ms=50, max_retries=1, backoff_ms=0))
    task_id = slow_then_fast.enqueue()
    service.serve()
    service._dispatch_once()
    assert service.get(task_id).message.startswith("TimeoutError: the attempt ran past")
    service._dispatch_once()
    assert result_of(service, task_id) == "second attempt"


def test_timeout_ms_must_be_an_int_of_the_workers_range() -> None:
    with pytest.raises(ValueError, match="timeout_ms"):
        QueueConfig(timeout_ms=-2)


# ---- progress ------------------------------------------------------------------------

def test_progress_is_persisted_and_read_with_get(service: TaskService) -> None:
    seen: List[Any] = []

    @service.task
    def steps(n: int) -> str:
        task = callbackworker.current_task()
        assert task is not None
        for i in range(n):
            task.progress({"done": i + 1, "of": n})
        seen.append(service.get(task.id).progress)
        return "ok"

    task_id = steps.enqueue(3)
    service.serve()
    service._dispatch_once()
    (while_running,) = seen
    assert while_running["of"] == 3  # the first report is written at once
    assert service.get(task_id).progress == {"done": 3, "of": 3}  # the last one at the end


def test_progress_writes_are_throttled_and_the_last_is_kept() -> None:
    from callbackworker.tasks.progress import ProgressReporter

    written: List[str] = []
    now = [0.0]
    reporter = ProgressReporter("t", written.append, clock=lambda: now[0], every_ms=200)
    reporter.report(1)
    reporter.report(2)
    now[0] = 0.199
    reporter.report(3)
    now[0] = 0.2
    reporter.report(4)
    reporter.report(5)
    reporter.close()
    assert written == ["1", "4", "5"]


def test_progress_json_cannot_encode_is_a_type_error_in_the_task(service: TaskService) -> None:
    @service.task
    def reports() -> None:
        task = callbackworker.current_task()
        assert task is not None
        task.progress(object())

    task_id = reports.enqueue()
    service.serve()
    service._dispatch_once()
    assert "TypeError: progress must be JSON-encodable" in service.get(task_id).message


def test_progress_outside_a_running_task_is_a_runtime_error() -> None:
    from callbackworker.tasks import TaskContext

    with pytest.raises(RuntimeError, match="thread running the task"):
        TaskContext("t", "q", 1).progress(1)


def test_an_attempt_stuck_outside_python_is_abandoned_and_the_queue_goes_on(db: str) -> None:
    release = threading.Event()
    with TaskService(db, lease_ms=300, poll_ms=10) as service:
        stuck = service.task(name="stuck", timeout_ms=50)(release.wait)  # blocks in C
        quick = service.task(name="quick")(lambda: "still served")
        stuck_id = stuck.enqueue()
        service.serve()
        try:
            with pytest.raises(callbackworker.TaskFailedError, match="did not stop"):
                service.result(stuck_id, timeout_ms=30_000)
            assert service.result(quick.enqueue(), timeout_ms=30_000) == "still served"
        finally:
            release.set()


def test_an_error_text_a_store_cannot_hold_fails_only_its_task(service: TaskService) -> None:
    @service.task
    def odd() -> None:
        raise ValueError("nul \0 and lone \udc80")

    good = service.task(name="good")(lambda: "fine")
    ids = [odd.enqueue(), good.enqueue()]
    service.declare_queue("default", QueueConfig(concurrency=2))
    service.serve()
    service._dispatch_once()
    info = service.get(ids[0])
    assert (info.status, info.message) == ("failed", "ValueError: nul \\x00 and lone \\udc80")
    assert "\0" not in (info.traceback or "") and "\\udc80" in (info.traceback or "")
    assert result_of(service, ids[1]) == "fine"


def test_serve_after_close_raises(service: TaskService) -> None:
    service.task(add)
    service.close()
    with pytest.raises(ServiceClosedError):
        service.serve()
    with pytest.raises(ServiceClosedError):
        service.enqueue_task("x")


# ---- a lost worker and the task's own retry limit --------------------------


def _lose_the_worker_of(service: TaskService, clock: FakeClock, task_id: str) -> None:
    """A worker of another process claims the task, starts its run and
    vanishes; its lease then expires."""
    store = service._store  # noqa: SLF001 - stands for the other process
    (claimed,) = store.claim("q", owner="elsewhere/1/gone", limit=1, now=clock(), lease_ms=100)
    assert claimed.id == task_id
    store.start(claimed.id, claimed.token, clock())
    clock.advance(100)


def test_a_lost_worker_leaves_a_task_its_own_retries(service: TaskService,
                                                     clock: FakeClock) -> None:
    runs: List[int] = []
    flaky = service.task(name="own-retries", queue="q", max_retries=2)(
        lambda: runs.append(1) or "done")
    service.serve()
    tid = flaky.enqueue()
    _lose_the_worker_of(service, clock, tid)
    drain(service)
    assert service.get(tid).status == "completed", service.get(tid)
    assert runs == [1]


def test_a_lost_worker_ends_a_task_without_retries_of_its_own(db: str,
                                                             clock: FakeClock) -> None:
    with TaskService(db, clock=clock, background=False) as service:
        service.declare_queue("q", QueueConfig(max_retries=3))
        runs: List[int] = []
        once = service.task(name="no-retries", queue="q", max_retries=0)(
            lambda: runs.append(1) or "done")
        service.serve()
        tid = once.enqueue()
        _lose_the_worker_of(service, clock, tid)
        drain(service)
        info = service.get(tid)
        assert (info.status, runs) == ("failed", []), info
        assert "no attempts left" in info.message
