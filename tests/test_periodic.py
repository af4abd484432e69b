"""``@svc.periodic`` and ``svc.schedules()`` on a ``TaskService`` driven by
a fake clock (``background=False``: ``_schedule_once`` enqueues due ticks,
``_dispatch_once`` runs them): what runs, exactly when, and what is
refused at registration."""

from __future__ import annotations

from typing import List

import pytest

from callbackworker import TaskService
from callbackworker.tasks.scheduler import ScheduleInfo
from helpers import FakeClock, epoch_ms as ms

MINUTE = 60_000


def test_a_periodic_task_runs_with_its_arguments_at_each_tick(service: TaskService,
                                                              clock: FakeClock) -> None:
    calls: List[object] = []

    @service.periodic(every_ms=MINUTE, name="report", args=[7], kwargs={"to": "ops"})
    def report(n: int, to: str) -> None:
        calls.append((n, to, clock.now))

    clock.now = ms("2026-05-01T10:00:30+00:00")
    service.serve()
    assert service._schedule_once() == 0
    clock.now = ms("2026-05-01T10:01:00+00:00")
    assert service._schedule_once() == 1
    assert service._dispatch_once() == 1
    assert calls == [(7, "ops", ms("2026-05-01T10:01:00+00:00"))]


def test_the_decorator_returns_the_task_and_calling_it_runs_inline(
        service: TaskService) -> None:
    @service.periodic(cron="0 3 * * *")
    def nightly(x: int = 1) -> int:
        return x + 1

    assert nightly(2) == 3
    assert nightly.name.endswith("nightly") and nightly.queue == "default"


def test_schedules_lists_each_schedule_and_its_next_run(service: TaskService,
                                                        clock: FakeClock) -> None:
    clock.now = ms("2026-05-01T10:00:30+00:00")
    service.periodic(every_ms=MINUTE, name="b")(lambda: None)
    service.periodic(cron="0 12 * * *", name="a")(lambda: None)
    expected = [ScheduleInfo("a", ms("2026-05-01T12:00:00+00:00")),
                ScheduleInfo("b", ms("2026-05-01T10:01:00+00:00"))]
    assert service.schedules() == expected  # before serving: from now
    service.serve()
    assert service.schedules() == expected
    assert [(name, at) for name, at in service.schedules()] == expected


def test_a_daily_cron_in_a_time_zone_runs_at_each_local_time_across_dst(
        service: TaskService, clock: FakeClock) -> None:
    # Berlin, 2026-10-25: 02:30 happens twice (CEST, then CET); croniter runs both.
    ran: List[int] = []
    service.periodic(cron="30 2 * * *", tz="Europe/Berlin", name="daily")(
        lambda: ran.append(clock.now))
    clock.now = ms("2026-10-24T12:00:00+00:00")
    service.serve()
    for _ in range(48 * 60):  # two days, minute by minute
        clock.advance(MINUTE)
        service._schedule_once()
        service._dispatch_once()
    assert ran == [ms("2026-10-25T00:30:00+00:00"), ms("2026-10-25T01:30:00+00:00"),
                   ms("2026-10-26T01:30:00+00:00")]


def test_after_downtime_missed_ticks_run_once(db: str, clock: FakeClock) -> None:
    clock.now = ms("2026-05-01T10:00:00+00:00")
    with TaskService(db, clock=clock, background=False) as first:
        first.periodic(every_ms=MINUTE, name="beat")(lambda: None)
        first.serve()
    clock.now = ms("2026-05-01T10:42:10+00:00")
    with TaskService(db, clock=clock, background=False) as second:
        second.periodic(every_ms=MINUTE, name="beat")(lambda: None)
        second.serve()
        assert second._schedule_once() == 1
        assert second._schedule_once() == 0
        assert second._dispatch_once() == 1
        assert second.schedules() == [ScheduleInfo("beat", ms("2026-05-01T10:43:00+00:00"))]


# ---- refused at registration ------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    ({}, ValueError, "exactly one of cron="),
    ({"cron": "0 3 * * *", "every_ms": MINUTE}, ValueError, "exactly one of cron="),
    ({"cron": "0 3 * *"}, ValueError, "not five fields"),
    ({"cron": "0 3 * * *", "tz": "Nowhere/Land"}, ValueError, "unknown time zone"),
    ({"every_ms": 10}, ValueError, "every_ms must be between"),
    ({"every_ms": MINUTE, "args": [object()]}, TypeError, "cannot be encoded as JSON"),
    ({"every_ms": MINUTE, "args": "abc"}, TypeError, "args must be a list or tuple"),
])
def test_a_schedule_that_cannot_run_is_refused_at_registration(
        service: TaskService, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        service.periodic(**kwargs)(lambda: None)
    assert service.schedules() == []


def test_a_periodic_name_is_registered_once(service: TaskService) -> None:
    service.periodic(every_ms=MINUTE, name="beat")(lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        service.periodic(cron="* * * * *", name="beat")(lambda: None)
