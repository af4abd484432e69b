"""What the SQLite store's claim, settle and batch enqueue cost per task
while another Python thread computes: ``python
benchmarks/store_contention.py [--tasks 10000] [--batch 300]
[--enqueue 5000] [--runs 3]``.

A ``TaskService`` serves its queue with three threads (dispatcher, route
thread, committer); the dispatcher's claims and the committer's settles
hold the store's lock while the route thread runs handlers.  This script
claims and settles ``--batch`` tasks at a time on one store, first alone,
then while a second thread runs a pure Python loop (as a route thread
running quick handlers does), and prints the median wall-clock and CPU
microseconds per task of each; then the same for one ``enqueue_many`` of
``--enqueue`` 16-byte payloads (into a queue of its own).  CPU time that stays the same while the
wall-clock time grows is time spent waiting for the interpreter lock
inside the store's calls, with the store's lock held.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from typing import Callable, List, Tuple

from callbackworker.tasks import QueueConfig, TaskService
from callbackworker.tasks.sqlite import SQLiteTaskStore
from callbackworker.tasks.storage import Outcome
from callbackworker.tasks.taskids import new_task_ids

Costs = Tuple[float, float, float, float]
"""Per task: claim wall, claim CPU, settle wall, settle CPU (seconds)."""

Work = Callable[[], Tuple[float, ...]]


def _fill(path: str, n: int) -> None:
    with TaskService(path, background=False) as service:
        service.create_queue("bench", QueueConfig(), handler=lambda payload: None)
        service.enqueue_many("bench", [b"task payload 16b"] * n)


def _claim_and_settle(store: SQLiteTaskStore, n: int, batch: int) -> Costs:
    """Claims and completes ``n`` tasks, ``batch`` at a time."""
    now = time.time_ns() // 1_000_000
    claim_wall = claim_cpu = settle_wall = settle_cpu = 0.0
    done = 0
    while done < n:
        wall, cpu = time.perf_counter(), time.thread_time()
        claimed = store.claim("bench", owner="bench", limit=batch, now=now, lease_ms=60_000)
        claim_wall += time.perf_counter() - wall
        claim_cpu += time.thread_time() - cpu
        if not claimed:
            raise RuntimeError("the queue ran out of tasks; give a smaller --tasks")
        outcomes = [Outcome(t.id, t.token, "complete", "", now) for t in claimed]
        wall, cpu = time.perf_counter(), time.thread_time()
        store.settle(outcomes)
        settle_wall += time.perf_counter() - wall
        settle_cpu += time.thread_time() - cpu
        done += len(claimed)
    return claim_wall / done, claim_cpu / done, settle_wall / done, settle_cpu / done


def _enqueue(store: SQLiteTaskStore, n: int) -> Tuple[float, float]:
    """One ``enqueue_many`` of ``n`` tasks: wall and CPU seconds per task."""
    tasks = [(task_id, b"task payload 16b") for task_id in new_task_ids(n)]
    now = time.time_ns() // 1_000_000
    wall, cpu = time.perf_counter(), time.thread_time()
    store.enqueue_many("fill", tasks, now)
    return (time.perf_counter() - wall) / n, (time.thread_time() - cpu) / n


def _with_busy_thread(work: Work) -> Tuple[float, ...]:
    running = True

    def compute() -> None:
        count = 0
        while running:
            count += 1

    busy = threading.Thread(target=compute, name="busy")
    busy.start()
    try:
        return work()
    finally:
        running = False
        busy.join()


def _show(label: str, runs: List[Tuple[float, ...]]) -> None:
    claim_wall, claim_cpu, settle_wall, settle_cpu = (
        statistics.median(r[i] for r in runs) * 1e6 for i in range(4))
    print(f"{label:22} claim {claim_wall:6.1f} us/task (CPU {claim_cpu:5.1f})   "
          f"settle {settle_wall:6.1f} us/task (CPU {settle_cpu:5.1f})", flush=True)


def _show_enqueue(label: str, runs: List[Tuple[float, ...]]) -> None:
    wall, cpu = (statistics.median(r[i] for r in runs) * 1e6 for i in range(2))
    print(f"{label:22} enqueue_many {wall:6.1f} us/task (CPU {cpu:5.1f})", flush=True)


def main(argv: "List[str] | None" = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per measurement")
    parser.add_argument("--batch", type=int, default=300, help="tasks per claim and settle")
    parser.add_argument("--enqueue", type=int, default=5_000, help="tasks per enqueue_many")
    parser.add_argument("--runs", type=int, default=3, help="measurements (median shown)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.db")
        _fill(path, 2 * (args.tasks + args.batch) * args.runs)
        store = SQLiteTaskStore(path)
        try:
            def drain() -> Costs:
                return _claim_and_settle(store, args.tasks, args.batch)

            def enqueue() -> Tuple[float, float]:
                return _enqueue(store, args.enqueue)

            _show("alone", [drain() for _ in range(args.runs)])
            _show("beside a busy thread", [_with_busy_thread(drain) for _ in range(args.runs)])
            store.ensure_queue("fill")
            _show_enqueue("alone", [enqueue() for _ in range(args.runs)])
            _show_enqueue("beside a busy thread", [_with_busy_thread(enqueue)
                                                   for _ in range(args.runs)])
        finally:
            store.close()


if __name__ == "__main__":
    main()
