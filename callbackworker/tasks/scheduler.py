"""Periodic tasks: ``Scheduler`` enqueues each due tick of a service's
schedules, once across every service on the database.

DESIGN

* What runs where.  ``@svc.periodic`` files a ``Periodic`` (schedule name,
  ``Schedule``, task name, queue, JSON arguments, priority) here; nothing
  runs until the service serves the schedule's queue.  Then the scheduler
  registers the schedule in the store and, from a thread of its own,
  claims its due ticks.  The task itself runs wherever its queue is served.
* Once per tick.  Every service computes the same tick instants
  (``schedules.py``), and enqueues a tick only through
  ``TaskStore.claim_tick``: a compare-and-set of the schedule's last tick
  in the same transaction as the enqueue.  Of any number of services
  claiming one tick, one enqueues it; no lock outlives a transaction, so a
  dead process holds nothing back.
* Downtime.  A schedule registered with its stored spec keeps its stored
  last tick, so after downtime one pass finds the latest tick due and runs
  it once: missed ticks coalesce.  A new schedule, or a changed spec,
  starts from the latest tick at or before the start: its first run is
  the next tick.
* Changes.  The spec a service registers at start is the one that runs:
  a service whose spec differs from the stored one (an older process
  still running after a newer one started with a changed spec) skips the
  schedule, saying so once in the log.  A schedule no code registers any
  more is claimed by nobody: it stops, and its row only documents it
  (``callbackworker schedules`` marks it overdue).
* Waiting.  After a pass the thread sleeps until the earliest next tick of
  its schedules, at most ``MAX_SLEEP_MS``, so a tick is claimed when it
  comes, not on a polling grid, and the store is read at most once per
  ``MAX_SLEEP_MS`` while nothing is due.  A failed pass (the database
  unreachable) is logged and tried again after the same pause.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Callable, Dict, List, NamedTuple, Optional, Set, Tuple

from .schedules import Schedule
from .storage import NewCall, ScheduleRecord, TaskStore

__all__ = ["Periodic", "ScheduleInfo", "Scheduler", "MAX_SLEEP_MS"]

log = logging.getLogger(__name__)

MAX_SLEEP_MS = 1_000
"""Longest pause between two passes of the scheduler thread."""


class Periodic(NamedTuple):
    """One ``@svc.periodic`` registration: schedule ``name`` enqueues a call
    of task ``task`` on ``queue`` with ``args`` (JSON text of ``[args,
    kwargs]``) and ``priority`` at every tick of ``schedule``."""

    name: str
    schedule: Schedule
    task: str
    queue: str
    args: str
    priority: int = 0


class ScheduleInfo(NamedTuple):
    """A schedule of this service (``TaskService.schedules``): its name and
    its next run in epoch milliseconds (at or before now: due, it runs at
    the next pass)."""

    name: str
    next_run_at_ms: int


class Scheduler:
    """Claims the due ticks of the schedules filed with ``add`` once
    ``serve`` has named their queues, on a thread of its own (unless
    ``background`` is False: then each ``run_due()`` call does one pass).
    ``clock`` returns epoch milliseconds; ``on_enqueued(queue)`` is told of
    every tick this service enqueued, so it can run it at once."""

    def __init__(self, store: TaskStore, clock: Callable[[], int],
                 on_enqueued: Callable[[str], None], *, background: bool = True) -> None:
        self._store = store
        self._clock = clock
        self._on_enqueued = on_enqueued
        self._background = background
        self._cond = threading.Condition()
        self._periodics: Dict[str, Periodic] = {}
        self._served_queues: Set[str] = set()
        self._active: Dict[str, Periodic] = {}  # registered in the store: claimed by passes
        self._skipped: Set[Tuple[str, str]] = set()  # (name, stored spec) warned about
        self._poked = False
        self._closed = False
        self._thread: Optional[threading.Thread] = None

    # ---- registration ---------------------------------------------------

    def add(self, periodic: Periodic) -> None:
        """Files ``periodic``; ``ValueError`` if its name is taken.  If its
        queue is served already, it is registered and runs at once."""
        with self._cond:
            if periodic.name in self._periodics:
                raise ValueError(f"a periodic task named {periodic.name!r} is already "
                                 "registered with this service; give one of them another "
                                 "name (periodic(name=...))")
            self._periodics[periodic.name] = periodic
            serve_now = periodic.queue in self._served_queues
        if serve_now:
            self._activate([periodic])

    def serve(self, queues: List[str]) -> None:
        """Starts claiming the ticks of every schedule (filed now or later)
        whose queue is in ``queues``: registers them in the store; the
        thread (started with the first) runs a pass at once."""
        with self._cond:
            self._served_queues.update(queues)
            fresh = [p for name, p in self._periodics.items()
                     if p.queue in self._served_queues and name not in self._active]
        self._activate(fresh)

    def _activate(self, periodics: List[Periodic]) -> None:
        now = self._clock()
        for p in periodics:
            baseline = p.schedule.last_tick(now)
            self._store.register_schedule(p.name, p.schedule.spec, queue=p.queue, task=p.task,
                                          baseline=baseline,
                                          next_run_at=p.schedule.next_tick(baseline), now=now)
            log.info("schedule %s (%s) registered: task %s on queue %s", p.name,
                     p.schedule.spec, p.task, p.queue)
        with self._cond:
            if self._closed:
                return
            self._active.update((p.name, p) for p in periodics)
            if periodics and self._background and self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="callbackworker-scheduler")
                self._thread.start()
            self._poked = True
            self._cond.notify_all()

    # ---- reading ------------------------------------------------------

    def schedules(self) -> List[ScheduleInfo]:
        """Every schedule filed here, by name, with its next run: the stored
        one if the store holds the same spec, else the first tick after now
        (when serving starts, the schedule is registered so)."""
        with self._cond:
            periodics = sorted(self._periodics.values(), key=lambda p: p.name)
        stored = {r.name: r for r in self._store.schedules()}
        now = self._clock()
        out = []
        for p in periodics:
            row = stored.get(p.name)
            if row is not None and row.spec == p.schedule.spec:
                out.append(ScheduleInfo(p.name, row.next_run_at))
            else:
                out.append(ScheduleInfo(p.name, p.schedule.next_tick(now)))
        return out

    # ---- passes ---------------------------------------------------------

    def run_due(self) -> int:
        """One pass: claims every due tick of the active schedules; returns
        how many this service enqueued (a tick another service claimed
        first counts nowhere here)."""
        enqueued, _ = self._pass()
        return enqueued

    def _pass(self) -> Tuple[int, int]:
        """One pass; returns ``(ticks enqueued, earliest next tick)``."""
        with self._cond:
            active = list(self._active.values())
        now = self._clock()
        wake = now + MAX_SLEEP_MS
        if not active:
            return 0, wake
        stored = {r.name: r for r in self._store.schedules()}
        enqueued = 0
        for p in active:
            row = stored.get(p.name)
            if not self._runs_here(p, row):
                continue
            assert row is not None
            last = row.last_tick
            due = p.schedule.due_tick(last, now)
            if due is not None:
                if self._claim(p, due, now):
                    enqueued += 1
                last = due
            wake = min(wake, p.schedule.next_tick(max(last, now)))
        return enqueued, wake

    def _runs_here(self, p: Periodic, row: Optional[ScheduleRecord]) -> bool:
        """Whether this service claims ``p``'s ticks: the store holds its
        spec (a service started later with another spec has taken it
        over; a row deleted meanwhile is registered again)."""
        if row is None:
            self._activate([p])
            return False
        if row.spec == p.schedule.spec:
            return True
        if (p.name, row.spec) not in self._skipped:
            self._skipped.add((p.name, row.spec))
            log.warning("schedule %s: the database holds spec %r, registered by a service "
                        "started later, so this service's %r is not run here; restart it to "
                        "run its own", p.name, row.spec, p.schedule.spec)
        return False

    def _claim(self, p: Periodic, tick: int, now: int) -> bool:
        task_id = uuid.uuid4().hex
        call = NewCall(task_id, p.task, p.args, p.priority, tick)
        if not self._store.claim_tick(p.name, p.schedule.spec, tick, p.schedule.next_tick(tick),
                                      p.queue, call, now):
            return False
        log.info("schedule %s: tick %d enqueued as task %s on queue %s", p.name, tick,
                 task_id, p.queue)
        self._on_enqueued(p.queue)
        return True

    def _loop(self) -> None:
        while True:
            try:
                _, wake = self._pass()
            except Exception:
                log.exception("scheduler pass failed; trying again in %d ms", MAX_SLEEP_MS)
                wake = self._clock() + MAX_SLEEP_MS
            with self._cond:
                if not self._poked and not self._closed:
                    pause_ms = min(max(wake - self._clock(), 0), MAX_SLEEP_MS)
                    self._cond.wait(pause_ms / 1000)
                self._poked = False
                if self._closed:
                    return

    # ---- lifecycle ------------------------------------------------------

    def close(self) -> None:
        """Stops the thread (a pass under way finishes first); idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
