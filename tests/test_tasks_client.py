"""``TaskClient``: the task verbs that need no thread, on their own (over a
store another component owns, or over one it opens) and as a
``TaskService``'s ``client``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

import callbackworker
from callbackworker import (
    ServiceClosedError,
    TaskClient,
    TaskInfo,
    TaskNotCancellableError,
    TaskService,
    UnknownCallbackError,
    UnknownQueueError,
    UnknownTaskError,
)
from callbackworker.tasks import client as client_module
from callbackworker.tasks.client import open_store
from callbackworker.tasks.storage import TaskStore

from helpers import FakeClock


@pytest.fixture
def store(db: str) -> Iterator[TaskStore]:
    """A store with the queues "q" and "other", as a service left them."""
    s = open_store(db)
    s.ensure_queue("q")
    s.ensure_queue("other")
    try:
        yield s
    finally:
        s.close()


def _threads() -> "set[threading.Thread]":
    return set(threading.enumerate())


def test_public_name_is_exported() -> None:
    assert callbackworker.TaskClient is TaskClient
    assert callbackworker.tasks.TaskClient is TaskClient


def test_every_verb_works_without_starting_a_thread(store: TaskStore, clock: FakeClock) -> None:
    before = _threads()
    with TaskClient(store, clock=clock) as client:
        first = client.enqueue("q", b"one")
        second, third = client.enqueue_many("q", [b"two", bytearray(b"three")])
        assert client.get(first)[:3] == ("pending", "", 0)
        assert client.queues() == ["other", "q"]
        assert client.counts()["q"]["pending"] == 3
        client.cancel(first)
        assert client.get(first).status == "cancelled"
        with pytest.raises(TaskNotCancellableError):
            client.cancel(first)
        assert client.clear_queue("q") == 2
        assert [client.get(t).status for t in (second, third)] == ["cancelled"] * 2
        with pytest.raises(UnknownCallbackError):
            client.send_callback_success("A" * 32, b"x")
        assert _threads() == before


def test_unknown_names_are_the_services_errors(store: TaskStore) -> None:
    with TaskClient(store) as client:
        with pytest.raises(UnknownQueueError):
            client.enqueue("missing", b"")
        with pytest.raises(UnknownQueueError):
            client.clear_queue("missing")
        with pytest.raises(UnknownTaskError):
            client.get("missing")
        with pytest.raises(UnknownTaskError):
            client.cancel("missing")


def test_closing_a_client_over_a_store_leaves_the_store_open(store: TaskStore) -> None:
    client = TaskClient(store)
    client.close()
    client.close()
    assert store.queues() == ["other", "q"]
    for call in (lambda: client.enqueue("q", b""), lambda: client.get("x"),
                 lambda: client.cancel("x"), lambda: client.counts(),
                 lambda: client.queues(), lambda: client.clear_queue("q"),
                 lambda: client.send_callback_heartbeat("A" * 32)):
        with pytest.raises(ServiceClosedError):
            call()


def test_a_client_that_opened_its_store_closes_it(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    opened: List[TaskStore] = []

    def recording_open(dsn: str, durability: str = "normal") -> TaskStore:
        opened.append(open_store(dsn, durability))
        return opened[-1]

    monkeypatch.setattr(client_module, "open_store", recording_open)
    with TaskClient.open(tmp_path / "t.db") as client:
        assert client.queues() == []
    with pytest.raises(RuntimeError, match="closed"):
        opened[0].queues()


def test_constructor_checks_its_arguments(store: TaskStore) -> None:
    with pytest.raises(TypeError, match="TaskStore"):
        TaskClient("tasks.db")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clock"):
        TaskClient(store, clock=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_commit"):
        TaskClient(store, on_commit="wake")  # type: ignore[arg-type]


def test_on_commit_follows_each_committed_enqueue_and_signal(db: str, clock: FakeClock) -> None:
    """A client of another process signals a suspended task; the service
    serving its queue replays it."""

    def approval(payload: memoryview) -> str:
        ctx = callbackworker.current_job()
        handles.append(ctx.create_callback("approval"))
        return "approved " + ctx.callback_result(handles[-1]).decode()

    handles: List[callbackworker.CallbackHandle] = []
    commits: List[Optional[str]] = []
    with TaskService(db, clock=clock, background=False) as service:
        service.create_queue("q", handler=approval)
        store = open_store(db)
        try:
            client = TaskClient(store, clock=clock, on_commit=commits.append)
            task = client.enqueue("q", b"")
            client.enqueue_many("q", [])
            assert commits == ["q"]
            service._dispatch_once()
            assert client.get(task).status == "suspended"
            client.send_callback_success(handles[-1].callback_id, b"by mail")
            assert commits == ["q", None]
        finally:
            store.close()
        service._dispatch_once()
        assert service.get(task)[:3] == ("completed", "approved by mail", 1)


def test_a_services_client_shares_its_store_and_closes_with_it(db: str, clock: FakeClock) -> None:
    service = TaskService(db, clock=clock, background=False)
    service.create_queue("q", handler=lambda payload: "ran")
    client = service.client
    assert isinstance(client, TaskClient)
    task = client.enqueue("q", b"")
    assert service._dispatch_once() == 1
    assert client.get(task)[:3] == service.get(task)[:3] == ("completed", "ran", 1)
    service.close()
    with pytest.raises(ServiceClosedError):
        client.get(task)


def test_callbacks_lists_the_durable_callbacks_a_task_still_holds(db: str,
                                                                  clock: FakeClock) -> None:
    def two_approvals(payload: memoryview) -> str:
        ctx = callbackworker.current_job()
        first = ctx.create_callback("first", timeout_ms=1000)
        second = ctx.create_callback("second")
        return (ctx.callback_result(first) + ctx.callback_result(second)).decode()

    with TaskService(db, clock=clock, background=False) as service:
        service.create_queue("q", handler=two_approvals)
        task_id = service.enqueue("q", b"")
        service._dispatch_once()
        client = service.client
        assert client.callbacks("no-such-task") == []
        first, second = client.callbacks(task_id)
        assert (first.owner, first.name, first.state, first.timeout_ms) == (task_id, "first",
                                                                            "pending", 1000)
        assert (second.name, second.state, second.timeout_ms) == ("second", "pending", 0)
        client.send_callback_success(first.callback_id, b"a")
        service._dispatch_once()
        assert [(c.name, c.state, c.result) for c in client.callbacks(task_id)] == [
            ("first", "succeeded", b"a"), ("second", "pending", None)]
        clock.advance(5000)  # past the first's limit, but it has succeeded already
        assert [c.state for c in client.callbacks(task_id)] == ["succeeded", "pending"]
        client.send_callback_success(second.callback_id, b"b")
        service._dispatch_once()
        assert service.get(task_id).message == "ab"
        assert client.callbacks(task_id) == []


def test_callbacks_shows_a_pending_callback_past_its_limit_as_timed_out(
        db: str, clock: FakeClock) -> None:
    def approval(payload: memoryview) -> str:
        ctx = callbackworker.current_job()
        return ctx.callback_result(ctx.create_callback("ok", timeout_ms=1000)).decode()

    with TaskService(db, clock=clock, background=False) as service:
        service.create_queue("q", handler=approval)
        task_id = service.enqueue("q", b"")
        service._dispatch_once()
        clock.advance(1000)
        assert [c.state for c in service.client.callbacks(task_id)] == ["timed_out"]
