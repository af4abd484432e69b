"""Prometheus metrics (``callbackworker.metrics``) and ``GET /metrics`` on
the HTTP app, on both backends."""

from __future__ import annotations

import asyncio
import gc
from typing import Dict, Mapping, Tuple

import httpx
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from callbackworker import QueueConfig, Retry, TaskService, current_task
from callbackworker.http import create_app
from callbackworker.metrics import TaskMetrics
from helpers import FakeClock

TOKEN = "metrics-token-0123456789abcdef0123456789"

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    """Every sample as ``{(name, sorted labels): value}``."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _get(app: Starlette, path: str, headers: Mapping[str, str] = {}) -> httpx.Response:
    """``GET path`` answered by ``app`` in this thread."""
    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path, headers=dict(headers))

    return asyncio.run(get())


def _service(db: str, clock: FakeClock) -> TaskService:
    svc = TaskService(db, clock=clock, background=False)

    @svc.task(name="add", queue="math")
    def add(a: int, b: int) -> int:
        return a + b

    @svc.task(name="boom", queue="math")
    def boom() -> None:
        raise ValueError("boom")

    @svc.task(name="again", queue="math", max_retries=1, backoff_ms=0)
    def again() -> str:
        task = current_task()
        if task is not None and task.attempt == 1:
            raise Retry(delay_ms=0)
        return "ok"

    svc.create_queue("raw", QueueConfig(concurrency=4), handler=lambda p: "done")
    return svc


def test_counters_count_enqueued_started_completed_failed_and_retried_per_queue_and_task(
        db: str, clock: FakeClock) -> None:
    with _service(db, clock) as svc:
        metrics = TaskMetrics(svc)
        svc.enqueue_task("add", [1, 2], queue="math")
        svc.enqueue_task("boom", queue="math")
        svc.enqueue_task("again", queue="math")
        svc.enqueue_many("raw", [b"a", b"b"])
        svc.serve()
        while svc._dispatch_once():
            pass
        samples = _samples(metrics.render().decode())
    math = {"queue": "math"}
    assert _value(samples, "callbackworker_tasks_enqueued_total", task="add", **math) == 1
    assert _value(samples, "callbackworker_tasks_enqueued_total", queue="raw", task="") == 2
    assert _value(samples, "callbackworker_tasks_started_total", task="again", **math) == 2
    assert _value(samples, "callbackworker_tasks_started_total", queue="raw", task="") == 2
    assert _value(samples, "callbackworker_tasks_completed_total", task="add", **math) == 1
    assert _value(samples, "callbackworker_tasks_completed_total", task="again", **math) == 1
    assert _value(samples, "callbackworker_tasks_completed_total", queue="raw", task="") == 2
    assert _value(samples, "callbackworker_tasks_failed_total", task="boom", **math) == 1
    assert _value(samples, "callbackworker_tasks_retried_total", task="again", **math) == 1
    assert _value(samples, "callbackworker_tasks_failed_total", task="add", **math) == 0


def test_run_time_histogram_observes_each_attempt_that_ran(db: str, clock: FakeClock) -> None:
    with _service(db, clock) as svc:
        metrics = TaskMetrics(svc)
        svc.enqueue_task("again", queue="math")
        svc.serve()
        while svc._dispatch_once():
            pass
        samples = _samples(metrics.render().decode())
    labels = {"queue": "math", "task": "again"}
    assert _value(samples, "callbackworker_task_run_seconds_count", **labels) == 2
    assert _value(samples, "callbackworker_task_run_seconds_bucket", le="+Inf", **labels) == 2
    assert _value(samples, "callbackworker_task_run_seconds_sum", **labels) >= 0


def test_gauges_read_pending_running_and_suspended_from_the_database_at_scrape_time(
        db: str, clock: FakeClock) -> None:
    with TaskService(db, clock=clock, background=False) as watcher, \
            TaskService(db, clock=clock, background=False) as producer:
        metrics = TaskMetrics(watcher)
        producer.enqueue_task("anything", queue="elsewhere")
        producer.enqueue_task("anything", queue="elsewhere")
        samples = _samples(metrics.render().decode())
        assert _value(samples, "callbackworker_tasks", queue="elsewhere", status="pending") == 2
        assert _value(samples, "callbackworker_tasks", queue="elsewhere", status="running") == 0
        assert ("callbackworker_tasks", (("queue", "elsewhere"), ("status", "suspended"))) \
            in samples
        assert ("callbackworker_tasks", (("queue", "elsewhere"), ("status", "completed"))) \
            not in samples
        producer.purge("elsewhere", status="cancelled")
        producer.clear_queue("elsewhere")
        samples = _samples(metrics.render().decode())
        assert _value(samples, "callbackworker_tasks", queue="elsewhere", status="pending") == 0


def test_each_metrics_object_has_its_own_registry(tmp_path: object, clock: FakeClock) -> None:
    with TaskService(f"{tmp_path}/t.db", clock=clock, background=False) as svc:
        first, second = TaskMetrics(svc), TaskMetrics(svc)
        svc.enqueue_task("fn", queue="q")
        for metrics in (first, second):
            samples = _samples(metrics.render().decode())
            assert _value(samples, "callbackworker_tasks_enqueued_total", queue="q",
                          task="fn") == 1
        assert first.registry is not second.registry
    assert REGISTRY.get_sample_value("callbackworker_tasks_enqueued_total",
                                     {"queue": "q", "task": "fn"}) is None


def test_metrics_nobody_refers_to_stop_counting_and_close_stops_too(
        tmp_path: object, clock: FakeClock) -> None:
    with TaskService(f"{tmp_path}/t.db", clock=clock, background=False) as svc:
        calls = []

        class Spy:
            def enqueued(self, queue: str, name: object, count: int) -> None:
                calls.append(count)

        spy = Spy()
        svc.events.subscribe(spy)  # type: ignore[arg-type]
        svc.enqueue_task("fn", queue="q")
        del spy
        gc.collect()
        svc.enqueue_task("fn", queue="q")
        assert calls == [1]
        metrics = TaskMetrics(svc)
        metrics.close()
        svc.enqueue_task("fn", queue="q")
        assert _value(_samples(metrics.render().decode()), "callbackworker_tasks_enqueued_total",
                      queue="q", task="fn") == 0


def test_get_metrics_needs_the_bearer_token(tmp_path: object, clock: FakeClock) -> None:
    with TaskService(f"{tmp_path}/t.db", clock=clock, background=False) as svc:
        app = create_app(svc, TOKEN)
        assert _get(app, "/metrics").status_code == 401
        assert _get(app, "/metrics", {"Authorization": "Bearer wrong"}).status_code == 401


def test_get_metrics_answers_prometheus_text_with_a_queue_label(db: str,
                                                                clock: FakeClock) -> None:
    with _service(db, clock) as svc:
        app = create_app(svc, TOKEN)
        svc.enqueue_task("add", [1, 2], queue="math")
        answer = _get(app, "/metrics", {"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    samples = _samples(answer.text)
    assert _value(samples, "callbackworker_tasks", queue="math", status="pending") == 1
    assert _value(samples, "callbackworker_tasks_enqueued_total", queue="math", task="add") == 1
