"""What the task store's SQL costs per task, without the service:
``python benchmarks/task_sql.py [-n 50000] [--batch 1000] [--runs 3]
[--history 0] [--one 5000] [--cpu] [--backend sqlite|postgresql]``.

Each run opens a fresh store (``SQLiteTaskStore``, durability "normal", on
a temporary file; or ``PostgresTaskStore`` in a fresh schema) with one
queue, optionally fills it with ``--history`` finished tasks (as a queue
that has run for a while holds), then times:

* ``enqueue one``: ``--one`` tasks, one ``enqueue_many`` call (one
  committed transaction) each, as ``TaskService.enqueue`` does;
* ``enqueue many``: ``-n`` tasks in calls of ``--batch``;
* ``claim``: claims of ``--batch`` until the queue is empty;
* ``settle``: after each claim, one ``settle`` of its tasks as "complete"
  (a group commit of runs that ended before their start was recorded);
* ``start+complete``: the same with a "start" and a "complete" outcome per
  task in one ``settle`` (a group commit that records starts too);
  the tasks are claimed again from a second fill, so its claims are not
  counted.

Task ids come from ``taskids.new_task_ids``, as the service makes them.
PostgreSQL is a throwaway server started from the server programs found
as ``tests/pg_server.py`` finds them (with fsync on), or ``$CBW_PG_DSN``;
``--cpu`` there counts this process only, not the server's work.

It prints, per phase, the median over ``--runs`` runs of the microseconds
per task, and each run's figures, so the spread shows; ``--cpu`` counts
the process's CPU time instead of wall-clock time, which other programs on
a shared machine disturb less (the store runs on the calling thread, so
the two agree on an idle machine, apart from waits for the disk).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, ContextManager, Dict, Iterator, List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from callbackworker.tasks.sqlite import SQLiteTaskStore  # noqa: E402
from callbackworker.tasks.storage import Outcome, TaskStore  # noqa: E402
from callbackworker.tasks.taskids import new_task_ids  # noqa: E402

QUEUE = "bench"
PAYLOAD = b"task payload 16b"
PHASES = ("enqueue one", "enqueue many", "claim", "settle", "start+complete")

clock: Callable[[], float] = time.perf_counter
"""What the phases are timed with: wall-clock, or with ``--cpu`` the
process's CPU time."""


def _fill(store: TaskStore, n: int, batch: int, now: int) -> float:
    """Enqueues ``n`` tasks in calls of ``batch``; returns the seconds."""
    elapsed = 0.0
    for start in range(0, n, batch):
        tasks = list(zip(new_task_ids(min(batch, n - start)), [PAYLOAD] * batch))
        began = clock()
        store.enqueue_many(QUEUE, tasks, now)
        elapsed += clock() - began
    return elapsed


def _drain(store: TaskStore, batch: int, now: int,
           outcomes: Callable[[str, str], List[Outcome]]) -> "tuple[float, float, int]":
    """Claims ``batch`` at a time until the queue is empty, settling each
    claim with ``outcomes(id, token)`` per task; returns the seconds spent
    claiming, settling, and the number of tasks."""
    claiming = settling = 0.0
    count = 0
    while True:
        began = clock()
        claimed = store.claim(QUEUE, owner="bench", limit=batch, now=now, lease_ms=60_000)
        claimed_at = clock()
        if not claimed:
            return claiming, settling, count
        settled = [o for t in claimed for o in outcomes(t.id, t.token)]
        prepared_at = clock()
        applied = store.settle(settled)
        settled_at = clock()
        if not all(applied):
            raise RuntimeError("a settle did not apply: the benchmark is broken")
        claiming += claimed_at - began
        settling += settled_at - prepared_at
        count += len(claimed)


@contextlib.contextmanager
def sqlite_stores() -> Iterator[Callable[[], ContextManager[TaskStore]]]:
    """Fresh SQLite stores, each on a new temporary file."""
    @contextlib.contextmanager
    def fresh() -> Iterator[TaskStore]:
        with tempfile.TemporaryDirectory() as tmp:
            store = SQLiteTaskStore(os.path.join(tmp, "bench.db"))
            try:
                yield store
            finally:
                store.close()
    yield fresh


@contextlib.contextmanager
def postgres_stores() -> Iterator[Callable[[], ContextManager[TaskStore]]]:
    """Fresh PostgreSQL stores, each in a new schema of one server."""
    from pg_server import PostgresCluster, find_bindir, fresh_schema

    from callbackworker.tasks.postgres import PostgresTaskStore

    cluster = None
    base = os.environ.get("CBW_PG_DSN")
    if base is None:
        bindir = find_bindir()
        if bindir is None:
            raise SystemExit("no PostgreSQL server programs found; set CBW_PG_DSN")
        cluster = PostgresCluster(bindir, fast=False).start()
        base = cluster.dsn

    @contextlib.contextmanager
    def fresh() -> Iterator[TaskStore]:
        with fresh_schema(base) as dsn:
            store = PostgresTaskStore(dsn)
            try:
                yield store
            finally:
                store.close()
    try:
        yield fresh
    finally:
        if cluster is not None:
            cluster.stop()


BACKENDS = {"sqlite": sqlite_stores, "postgresql": postgres_stores}


def one_run(opened: ContextManager[TaskStore], n: int, batch: int, one: int,
            history: int) -> Dict[str, float]:
    """One fresh store; microseconds per task of each phase."""
    now = int(time.time() * 1000)

    def complete(task_id: str, token: str) -> List[Outcome]:
        return [Outcome(task_id, token, "complete", "", now)]

    def start_complete(task_id: str, token: str) -> List[Outcome]:
        return [Outcome(task_id, token, "start", "", now),
                Outcome(task_id, token, "complete", "", now)]

    figures: Dict[str, float] = {}
    with opened as store:
        store.ensure_queue(QUEUE)
        if history:
            _fill(store, history, batch, now)
            _drain(store, batch, now, complete)
        began = clock()
        for task_id in new_task_ids(one):
            store.enqueue_many(QUEUE, [(task_id, PAYLOAD)], now)
        figures["enqueue one"] = (clock() - began) / one
        figures["enqueue many"] = _fill(store, n, batch, now) / n
        claiming, settling, count = _drain(store, batch, now, complete)
        figures["claim"] = claiming / count
        figures["settle"] = settling / count
        _fill(store, n, batch, now)
        _, settling, count = _drain(store, batch, now, start_complete)
        figures["start+complete"] = settling / count
    return {phase: seconds * 1e6 for phase, seconds in figures.items()}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=50_000,
                        help="tasks enqueued in batches, claimed and settled per run")
    parser.add_argument("--batch", type=int, default=1000,
                        help="tasks per enqueue_many, claim and settle")
    parser.add_argument("--one", type=int, default=5000,
                        help="tasks enqueued one transaction each per run")
    parser.add_argument("--history", type=int, default=0,
                        help="finished tasks in the table before timing")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cpu", action="store_true",
                        help="time with the process's CPU time, not wall-clock time")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="sqlite")
    args = parser.parse_args(argv)
    global clock
    if args.cpu:
        clock = time.process_time
    with BACKENDS[args.backend]() as stores:
        runs = [one_run(stores(), args.n, args.batch, args.one, args.history)
                for _ in range(args.runs)]
    print(f"{args.backend} store, {'CPU' if args.cpu else 'wall-clock'} us/task, median of "
          f"{args.runs} runs (n={args.n}, "
          f"batch={args.batch}, history={args.history}):")
    for phase in PHASES:
        each = [run[phase] for run in runs]
        print(f"  {phase:<15} {statistics.median(each):7.2f}   "
              f"({', '.join(f'{x:.2f}' for x in each)})")
    claim_settle = statistics.median(run["claim"] + run["settle"] for run in runs)
    print(f"  claim+settle ceiling: {1e6 / claim_settle:,.0f} tasks/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
