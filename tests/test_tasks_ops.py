"""The operating verbs of ``TaskClient`` / ``TaskService``: ``list_tasks``,
``retry_task``, ``purge`` and ``QueueConfig.failed_retention_ms``, on both
backends."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest

from callbackworker import (
    QueueConfig,
    TaskClient,
    TaskNotRetryableError,
    TaskService,
    UnknownQueueError,
    UnknownTaskError,
)
from callbackworker.tasks import client as client_module
from helpers import FakeClock


def _fail_then_succeed(payload: memoryview) -> str:
    if bytes(payload) == b"bad":
        raise ValueError("bad payload")
    return "ok"


def _service(db: str, clock: FakeClock, **config: int) -> TaskService:
    svc = TaskService(db, clock=clock, background=False)
    svc.create_queue("q", QueueConfig(concurrency=10, **config), handler=_fail_then_succeed)
    return svc


def test_list_tasks_returns_task_infos_newest_first(db: str, clock: FakeClock) -> None:
    with _service(db, clock) as svc:
        good, bad = svc.enqueue("q", b"good"), svc.enqueue("q", b"bad")
        call = svc.enqueue_task("fn", [1], queue="other")
        svc._dispatch_once()
        listed = svc.list_tasks()
        assert [t.id for t in listed] == [call, bad, good]
        assert [(t.status, t.queue, t.name) for t in listed] == \
            [("pending", "other", "fn"), ("failed", "q", None), ("completed", "q", None)]
        assert listed[1].traceback is not None and "bad payload" in listed[1].traceback


def test_list_tasks_filters_by_queue_status_and_name(db: str, clock: FakeClock) -> None:
    with _service(db, clock) as svc:
        good, bad = svc.enqueue("q", b"good"), svc.enqueue("q", b"bad")
        call = svc.enqueue_task("fn", [1], queue="other")
        svc._dispatch_once()
        assert [t.id for t in svc.list_tasks(queue="q")] == [bad, good]
        assert [t.id for t in svc.list_tasks(status="failed")] == [bad]
        assert [t.id for t in svc.list_tasks(name="fn")] == [call]
        assert svc.list_tasks(queue="q", status="pending") == []


def test_list_tasks_pages_by_before_id_cover_every_task_once(db: str, clock: FakeClock) -> None:
    with _service(db, clock) as svc:
        ids = svc.enqueue_many("q", [b"x"] * 7)
        pages: List[List[str]] = []
        before = None
        while True:
            page = svc.list_tasks(limit=3, before_id=before)
            if not page:
                break
            pages.append([t.id for t in page])
            before = page[-1].id
        assert pages == [ids[6:3:-1], ids[3:0:-1], ids[:1]]


def test_list_tasks_refuses_bad_arguments(db: str, clock: FakeClock) -> None:
    with _service(db, clock) as svc:
        with pytest.raises(ValueError, match="list_tasks takes a status among pending"):
            svc.list_tasks(status="done")
        with pytest.raises(ValueError, match="limit must be between 1 and 10000"):
            svc.list_tasks(limit=0)
        with pytest.raises(TypeError, match="name must be a str"):
            svc.list_tasks(name=3)  # type: ignore[arg-type]
        with pytest.raises(UnknownTaskError):
            svc.list_tasks(before_id="gone")


def test_retry_task_runs_a_failed_task_again(db: str, clock: FakeClock) -> None:
    with TaskService(db, clock=clock, background=False) as svc:
        outcomes = ["fail", "succeed"]

        @svc.task(name="flaky")
        def flaky() -> str:
            if outcomes.pop(0) == "fail":
                raise RuntimeError("downstream is down")
            return "done"

        task_id = flaky.enqueue()
        svc.serve()
        svc._dispatch_once()
        assert svc.get(task_id).status == "failed"
        svc.retry_task(task_id)
        info = svc.get(task_id)
        assert (info.status, info.attempt, info.finished_at_ms) == ("pending", 0, None)
        svc._dispatch_once()
        assert svc.result(task_id, timeout_ms=0) == "done"
        assert svc.get(task_id).attempt == 1


def test_retry_task_makes_a_cancelled_task_pending(db: str, clock: FakeClock) -> None:
    with _service(db, clock) as svc:
        task_id = svc.enqueue("q", b"good")
        svc.cancel(task_id)
        svc.retry_task(task_id)
        assert svc.get(task_id).status == "pending"
        svc._dispatch_once()
        assert svc.get(task_id).status == "completed"


def test_retry_task_refuses_other_statuses_with_a_clear_message(db: str,
                                                                 clock: FakeClock) -> None:
    with _service(db, clock) as svc:
        done = svc.enqueue("q", b"good")
        svc._dispatch_once()
        with pytest.raises(TaskNotRetryableError, match="it completed .only failed and "
                                                        "cancelled tasks can be retried") as e:
            svc.retry_task(done)
        assert e.value.status == "completed"
        pending = svc.enqueue("q", b"z")
        with pytest.raises(TaskNotRetryableError, match="it is pending already"):
            svc.retry_task(pending)


def test_retry_task_of_an_unknown_task_raises_unknown_task_error(db: str,
                                                                 clock: FakeClock) -> None:
    with _service(db, clock) as svc:
        with pytest.raises(UnknownTaskError):
            svc.retry_task("no-such-task")


def test_purge_deletes_finished_tasks_of_one_status_in_batches(
        db: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "PURGE_BATCH", 2)
    with _service(db, clock) as svc:
        failed = svc.enqueue_many("q", [b"bad"] * 5)
        kept = svc.enqueue("q", b"good")
        svc._dispatch_once()
        progress: List[int] = []
        assert svc.purge("q", status="failed", on_batch=progress.append) == 5
        assert progress == [2, 4, 5]
        assert [t.id for t in svc.list_tasks(queue="q")] == [kept]
        for task_id in failed:
            with pytest.raises(UnknownTaskError):
                svc.get(task_id)
        assert svc.purge("q", status="failed") == 0


def test_purge_refuses_unfinished_statuses_and_unknown_queues(db: str,
                                                              clock: FakeClock) -> None:
    with _service(db, clock) as svc:
        with pytest.raises(ValueError, match="purge takes a status among completed, failed, "
                                             "cancelled, not 'pending'"):
            svc.purge("q", status="pending")
        with pytest.raises(UnknownQueueError):
            svc.purge("nope", status="failed")


def test_failed_tasks_are_kept_longer_than_completed_ones(db: str, clock: FakeClock) -> None:
    with _service(db, clock, retention_ms=60_000, failed_retention_ms=120_000) as svc:
        good, bad = svc.enqueue("q", b"good"), svc.enqueue("q", b"bad")
        svc._dispatch_once()
        clock.advance(60_001)
        svc._dispatch_once()
        with pytest.raises(UnknownTaskError):
            svc.get(good)
        assert svc.get(bad).status == "failed"
        clock.advance(60_000)
        svc._dispatch_once()
        with pytest.raises(UnknownTaskError):
            svc.get(bad)


def test_failed_retention_defaults_to_one_week_within_the_retention_bounds() -> None:
    assert QueueConfig().failed_retention_ms == 604_800_000
    with pytest.raises(ValueError, match="failed_retention_ms must be between 60000"):
        QueueConfig(failed_retention_ms=1000)


def test_a_client_lists_retries_and_purges_without_a_service(db: str) -> None:
    with TaskClient.open(db) as client:
        task_id = client.enqueue_task("fn", [], queue="q")
        client.cancel(task_id)
        assert [t.id for t in client.list_tasks(status="cancelled")] == [task_id]
        client.retry_task(task_id)
        client.cancel(task_id)
        assert client.purge("q", status="cancelled") == 1
        assert client.list_tasks() == []


def test_a_declared_queue_keeps_its_failed_retention(db: str, clock: FakeClock) -> None:
    with TaskService(db, clock=clock, background=False) as declarer:
        declarer.declare_queue("kept", QueueConfig(failed_retention_ms=120_000))
    with TaskService(db, clock=clock, background=False) as svc:
        @svc.task(name="explode", queue="kept")
        def explode() -> None:
            raise ValueError("boom")

        task_id = explode.enqueue()
        svc.serve()
        svc._dispatch_once()
        clock.advance(60_001)
        svc._dispatch_once()
        assert svc.get(task_id).status == "failed"
        clock.advance(60_000)
        svc._dispatch_once()
        with pytest.raises(UnknownTaskError):
            svc.get(task_id)


@pytest.mark.parametrize("name", ["a\x00b", "\x00", "line\nbreak"])
def test_list_tasks_refuses_a_name_filter_no_task_can_have(db: str, name: str) -> None:
    with TaskService(db) as service:
        with pytest.raises(ValueError, match="name must be printable"):
            service.list_tasks(name=name)


def test_a_database_path_in_a_missing_directory_creates_no_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "x.db"
    with pytest.raises(Exception):
        TaskService(str(missing)).close()
    assert not (tmp_path / "no").exists()
