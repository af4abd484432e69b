"""Tasks as functions (SPEC section 7), on both backends.

Each test builds a service with ``background=False`` and a ``FakeClock``;
``service._dispatch_once()`` runs one full pass synchronously, so no test
sleeps or depends on timing.  The ``db`` fixture runs every test on SQLite
and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterator, List

import pytest

import callbackworker
from callbackworker import NoRetry, QueueConfig, Retry, ServiceClosedError, Task, TaskService

from helpers import FakeClock


@pytest.fixture
def service(db: str, clock: FakeClock) -> Iterator[TaskService]:
    s = TaskService(db, clock=clock, background=False)
    try:
        yield s
    finally:
        s.close()


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
    task_id = service.task(name="r")(lambda: (_ for _ in ()).throw(Retry())).enqueue()
    service.serve()
    service._dispatch_once()
    clock.advance(49)
    assert service._dispatch_once() == 0
    clock.advance(1)
    assert service._dispatch_once() == 1


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
