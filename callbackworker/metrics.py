"""Prometheus metrics of task queues (``callbackworker[metrics]``).

DESIGN

* One registry per ``TaskMetrics``, never prometheus_client's global
  one: an HTTP app, a worker command and every test each have their own.
* Counters count what this process did, as its ``TaskEvents`` tell it
  (``tasks/events.py``): tasks enqueued, attempts started, tasks
  completed, attempts retried, tasks failed, each by ``queue`` and
  ``task`` (the task function's name; "" for a raw task), and a histogram
  of attempts' run times.  A process that runs no task has zeros there.
* Gauges of pending, running and suspended tasks are read from the
  database at each scrape (``TaskClient.counts``), so one endpoint (the
  ``serve`` command's ``GET /metrics``) shows every queue of the fleet,
  whoever runs it.  A scrape therefore costs one counting query.
* Names follow Prometheus' conventions: ``callbackworker_`` prefix,
  ``_total`` on counters, seconds for durations.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator, Optional, Tuple, Union

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from .tasks.client import TaskClient
from .tasks.service import TaskService

__all__ = ["TaskMetrics", "CONTENT_TYPE", "GAUGED_STATUSES"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The ``Content-Type`` of ``TaskMetrics.render``'s text."""

GAUGED_STATUSES = ("pending", "running", "suspended")
"""The statuses whose task counts are gauges, read at each scrape."""

RUN_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                       60.0, 300.0, 900.0, 3600.0)
"""Histogram buckets of attempts' run times, from 5 ms to an hour."""

_LABELS = ("queue", "task")


class _StoreCounts:
    """A collector reading the task counts of every queue from the
    database at scrape time."""

    def __init__(self, client: TaskClient) -> None:
        self._client = client

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("callbackworker_tasks",
                                   "Tasks in the database by queue and status, read at scrape "
                                   "time (pending, running, suspended)",
                                   labels=("queue", "status"))
        for queue, row in sorted(self._client.counts().items()):
            for status in GAUGED_STATUSES:
                family.add_metric((queue, status), row.get(status, 0))
        yield family


class TaskMetrics:
    """The Prometheus metrics of a ``TaskService`` (or ``TaskClient``):
    this process's counters and run-time histogram, and the database's
    gauges.  ``registry`` is its own ``CollectorRegistry``; ``render()``
    gives the text format.  It counts from its creation on, while it is
    referenced (the service's events hold it weakly)."""

    def __init__(self, target: Union[TaskService, TaskClient]) -> None:
        if isinstance(target, TaskService):
            client = target.client
        elif isinstance(target, TaskClient):
            client = target
        else:
            raise TypeError(f"expected a TaskService or a TaskClient, not "
                            f"{type(target).__name__}")
        self.registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, text: str) -> Counter:
            return Counter(f"callbackworker_tasks_{name}", text, _LABELS, registry=self.registry)

        self._enqueued = counter("enqueued", "Tasks enqueued by this process")
        self._started = counter("started", "Attempts started by this process")
        self._completed = counter("completed", "Tasks completed in this process")
        self._failed = counter("failed", "Tasks failed in this process (no attempt left)")
        self._retried = counter("retried", "Failed attempts retried by this process")
        self._run_seconds = Histogram("callbackworker_task_run_seconds",
                                      "Run time of attempts that ended in this process",
                                      _LABELS, buckets=RUN_SECONDS_BUCKETS,
                                      registry=self.registry)
        self._by_outcome = {"complete": self._completed, "fail": self._failed,
                            "retry": self._retried}
        self.registry.register(_StoreCounts(client))  # type: ignore[arg-type]
        self._events = client.events
        self._events.subscribe(self)

    # ---- TaskObserver ---------------------------------------------------

    def enqueued(self, queue: str, name: Optional[str], count: int) -> None:
        self._enqueued.labels(queue, name or "").inc(count)

    def started(self, queue: str, name: Optional[str]) -> None:
        self._started.labels(queue, name or "").inc()

    def finished(self, queue: str, name: Optional[str], outcome: str, seconds: float) -> None:
        counter = self._by_outcome.get(outcome)
        if counter is not None:  # a release or a suspension ended no run
            counter.labels(queue, name or "").inc()
            self._run_seconds.labels(queue, name or "").observe(seconds)

    # ---- exposition -----------------------------------------------------

    def render(self) -> bytes:
        """Every metric in the Prometheus text format (``CONTENT_TYPE``);
        reads the database for the gauges."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> Tuple[Any, threading.Thread]:
        """Serves ``GET /metrics`` (no authentication: keep ``host`` a
        loopback address) on a thread; returns the server (stop it with
        ``shutdown()``) and the thread.  ``OSError`` if the port is taken."""
        return start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        """Stops counting (the gauges still read the database)."""
        self._events.unsubscribe(self)
