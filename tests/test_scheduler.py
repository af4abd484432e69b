"""``Scheduler`` on each store, driven pass by pass on a fake clock: exact
tick times, one enqueue per tick across services, coalescing after
downtime, changed and removed schedules."""

from __future__ import annotations

import logging
import threading
from typing import Iterator, List

import pytest

from callbackworker.tasks.scheduler import Periodic, Scheduler, ScheduleInfo
from callbackworker.tasks.schedules import Schedule
from callbackworker.tasks.sqlite import SQLiteTaskStore
from callbackworker.tasks.storage import TaskStore
from helpers import FakeClock, epoch_ms as ms

MINUTE = 60_000



def open_store(db: str) -> TaskStore:
    if db.startswith("postgresql://"):
        from callbackworker.tasks.postgres import PostgresTaskStore

        return PostgresTaskStore(db)
    return SQLiteTaskStore(db)


class Services:
    """Scheduler "services" on one database, each with its own store
    connection, sharing one fake clock; all closed at the end."""

    def __init__(self, db: str, clock: FakeClock) -> None:
        self.db = db
        self.clock = clock
        self.store = open_store(db)  # the test's own view of the database
        self._open: List["tuple[Scheduler, TaskStore]"] = []

    def start(self, *periodics: Periodic, queues: "tuple[str, ...]" = ("q",)) -> Scheduler:
        store = open_store(self.db)
        scheduler = Scheduler(store, self.clock, lambda queue: None, background=False)
        for p in periodics:
            scheduler.add(p)
        scheduler.serve(list(queues))
        self._open.append((scheduler, store))
        return scheduler

    def stop(self, scheduler: Scheduler) -> None:
        for pair in self._open:
            if pair[0] is scheduler:
                scheduler.close()
                pair[1].close()
                self._open.remove(pair)
                return

    def enqueued(self) -> List[int]:
        """The tick of every task enqueued on queue "q" since the last call
        (a tick's call is due at its tick), in order; they are claimed, so
        the next call sees only new ones."""
        ticks = []
        for task in self.store.claim("q", owner="test", limit=1000, now=2**61, lease_ms=1000):
            record = self.store.get(task.id)
            assert record is not None
            assert (record.name, task.args) == ("mod.report", '[[7],{"to":"ops"}]')
            ticks.append(record.next_run_at)
        return sorted(ticks)

    def close(self) -> None:
        for scheduler, store in self._open:
            scheduler.close()
            store.close()
        self.store.close()


@pytest.fixture
def services(db: str, clock: FakeClock) -> Iterator[Services]:
    s = Services(db, clock)
    try:
        yield s
    finally:
        s.close()


def periodic(name: str = "report", **spec: object) -> Periodic:
    return Periodic(name, Schedule(**spec), "mod.report", "q", '[[7],{"to":"ops"}]')  # type: ignore[arg-type]


# ---- exact tick times ----------------------------------------------------------

def test_a_new_schedule_first_runs_at_the_next_tick(services: Services,
                                                    clock: FakeClock) -> None:
    clock.now = ms("2026-05-01T10:00:30+00:00")
    scheduler = services.start(periodic(every_ms=MINUTE))
    assert scheduler.run_due() == 0
    clock.now = ms("2026-05-01T10:00:59.999+00:00")
    assert scheduler.run_due() == 0
    clock.now = ms("2026-05-01T10:01:00+00:00")
    assert scheduler.run_due() == 1
    assert services.enqueued() == [ms("2026-05-01T10:01:00+00:00")]


def test_each_tick_is_enqueued_once_at_its_time(services: Services, clock: FakeClock) -> None:
    clock.now = ms("2026-05-01T10:00:00+00:00")
    scheduler = services.start(periodic(cron="*/15 * * * *"))
    runs = []
    for _ in range(4 * 60):  # an hour, minute by minute
        clock.advance(15_000)
        runs.append(scheduler.run_due())
    assert sum(runs) == 4
    assert services.enqueued() == [ms(f"2026-05-01T10:{m:02d}:00+00:00") for m in (15, 30, 45)] \
        + [ms("2026-05-01T11:00:00+00:00")]


def test_a_cron_tick_with_a_tz_across_dst_is_enqueued_at_its_instant(
        services: Services, clock: FakeClock) -> None:
    # 2026-03-29 in Berlin: 02:30 does not exist; the run is at 03:00 CEST (01:00 UTC).
    clock.now = ms("2026-03-28T12:00:00+00:00")
    scheduler = services.start(periodic(cron="30 2 * * *", tz="Europe/Berlin"))
    assert scheduler.schedules() == [ScheduleInfo("report", ms("2026-03-29T01:00:00+00:00"))]
    clock.now = ms("2026-03-29T00:59:59.999+00:00")
    assert scheduler.run_due() == 0
    clock.now = ms("2026-03-29T01:00:00+00:00")
    assert scheduler.run_due() == 1
    assert services.enqueued() == [ms("2026-03-29T01:00:00+00:00")]
    assert scheduler.schedules() == [ScheduleInfo("report", ms("2026-03-30T00:30:00+00:00"))]


def test_schedules_reports_the_next_run_of_each_schedule(services: Services,
                                                         clock: FakeClock) -> None:
    clock.now = ms("2026-05-01T10:00:30+00:00")
    scheduler = services.start(periodic("b", every_ms=MINUTE), periodic("a", cron="0 12 * * *"))
    assert scheduler.schedules() == [ScheduleInfo("a", ms("2026-05-01T12:00:00+00:00")),
                                     ScheduleInfo("b", ms("2026-05-01T10:01:00+00:00"))]


# ---- once across services ----------------------------------------------------------

def test_services_on_one_database_enqueue_each_tick_once(services: Services,
                                                         clock: FakeClock) -> None:
    clock.now = ms("2026-05-01T10:00:00+00:00")
    schedulers = [services.start(periodic(every_ms=MINUTE)) for _ in range(3)]
    for _ in range(5):
        clock.advance(MINUTE)
        assert sum(s.run_due() for s in schedulers) == 1
    assert services.enqueued() == [ms(f"2026-05-01T10:0{m}:00+00:00") for m in range(1, 6)]


def test_a_schedule_runs_only_where_its_queue_is_served(services: Services,
                                                        clock: FakeClock) -> None:
    scheduler = services.start(periodic(every_ms=MINUTE), queues=("other",))
    clock.advance(10 * MINUTE)
    assert scheduler.run_due() == 0
    assert services.store.schedules() == []
    scheduler.serve(["q"])
    clock.advance(MINUTE)
    assert scheduler.run_due() == 1


def test_a_periodic_added_while_serving_runs_too(services: Services, clock: FakeClock) -> None:
    clock.now = ms("2026-05-01T10:00:00+00:00")
    scheduler = services.start()
    scheduler.add(periodic(every_ms=MINUTE))
    clock.advance(MINUTE)
    assert scheduler.run_due() == 1


def test_a_name_is_scheduled_once_per_service(services: Services) -> None:
    scheduler = services.start(periodic(every_ms=MINUTE))
    with pytest.raises(ValueError, match="already registered"):
        scheduler.add(periodic(cron="* * * * *"))


# ---- downtime, changes, removal ------------------------------------------------------

def test_ticks_missed_while_no_service_ran_coalesce_into_one_run(
        services: Services, clock: FakeClock) -> None:
    clock.now = ms("2026-05-01T10:00:00+00:00")
    first = services.start(periodic(cron="0 * * * *"))
    clock.now = ms("2026-05-01T11:00:00+00:00")
    assert first.run_due() == 1
    services.stop(first)
    clock.now = ms("2026-05-01T15:20:00+00:00")  # 12:00 .. 15:00 missed
    second = services.start(periodic(cron="0 * * * *"))
    assert second.run_due() == 1
    assert second.run_due() == 0
    assert services.enqueued() == [ms("2026-05-01T11:00:00+00:00"),
                                   ms("2026-05-01T15:00:00+00:00")]
    assert second.schedules() == [ScheduleInfo("report", ms("2026-05-01T16:00:00+00:00"))]


def test_a_changed_spec_takes_effect_on_the_next_start(services: Services, clock: FakeClock,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    clock.now = ms("2026-05-01T10:00:00+00:00")
    old = services.start(periodic(every_ms=MINUTE))
    clock.advance(MINUTE)
    assert old.run_due() == 1
    clock.now = ms("2026-05-01T10:01:30+00:00")
    new = services.start(periodic(every_ms=5 * MINUTE))
    caplog.set_level(logging.WARNING, logger="callbackworker.tasks.scheduler")
    for _ in range(10):  # to 10:11:30: the old spec's ticks are not run any more
        clock.advance(MINUTE)
        assert old.run_due() == 0
        new.run_due()
    assert services.enqueued() == [ms("2026-05-01T10:01:00+00:00"),
                                   ms("2026-05-01T10:05:00+00:00"),
                                   ms("2026-05-01T10:10:00+00:00")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'every 300000 ms'" in warnings[0]


def test_a_schedule_removed_from_the_code_stops(services: Services, clock: FakeClock) -> None:
    clock.now = ms("2026-05-01T10:00:00+00:00")
    before = services.start(periodic(every_ms=MINUTE))
    services.stop(before)
    after = services.start(periodic("other", every_ms=MINUTE))
    clock.advance(10 * MINUTE)
    assert after.run_due() == 1  # "other" only
    (report,) = [r for r in services.store.schedules() if r.name == "report"]
    assert report.last_tick == ms("2026-05-01T10:00:00+00:00")


def test_a_schedule_row_deleted_meanwhile_is_registered_again(
        services: Services, clock: FakeClock) -> None:
    clock.now = ms("2026-05-01T10:00:00+00:00")
    scheduler = services.start(periodic(every_ms=MINUTE))
    services.store.remove_schedule("report")
    clock.advance(MINUTE)
    assert scheduler.run_due() == 0
    assert [r.name for r in services.store.schedules()] == ["report"]
    clock.advance(MINUTE)
    assert scheduler.run_due() == 1


# ---- the thread ---------------------------------------------------------------------------

def test_close_stops_the_thread_and_is_idempotent(services: Services) -> None:
    store = open_store(services.db)
    scheduler = Scheduler(store, services.clock, lambda queue: None)
    scheduler.add(periodic(every_ms=MINUTE))
    scheduler.serve(["q"])
    assert scheduler_threads() == 1
    scheduler.close()
    scheduler.close()
    assert scheduler_threads() == 0
    store.close()


def scheduler_threads() -> int:
    return sum(t.name == "callbackworker-scheduler" for t in threading.enumerate())
