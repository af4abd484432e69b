"""What the worker side of a ``TaskService`` costs per task:
``python benchmarks/task_drain.py [--tasks 50000] [--runs 3]
[--modes drain,e2e,e2e-one-enqueue]``.

Every mode serves one SQLite queue with default settings and a trivial
handler, and times from the service's start until the last handler has
run and its outcome is committed (``flush``):

* ``drain``: the tasks are enqueued beforehand with ``enqueue_many`` by a
  service that serves nothing; the timed service only claims, runs and
  settles them.
* ``e2e``: the timed service enqueues them with one ``enqueue_many`` call
  while it serves the queue.
* ``e2e-one-enqueue``: the same, with one ``enqueue`` call per task from
  the main thread (producer and worker share one process and the store).

Each mode prints the median over ``--runs`` of tasks per second, wall-clock
microseconds per task and process CPU microseconds per task (all threads;
on a shared machine the steadier figure).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Dict, List

from callbackworker.bench_tasks import counting_handler
from callbackworker.tasks import QueueConfig, TaskService

PAYLOAD = b"task payload 16b"


def run_once(mode: str, n: int) -> "tuple[float, float]":
    """Seconds of wall-clock and of process CPU time to get ``n`` tasks
    through a fresh service in ``mode``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.db")
        handler, done = counting_handler(n)
        if mode == "drain":
            with TaskService(path, background=False) as service:
                service.create_queue("bench", QueueConfig(), handler=handler)
                service.enqueue_many("bench", [PAYLOAD] * n)
        began, cpu = time.perf_counter(), time.process_time()
        with TaskService(path) as service:
            service.create_queue("bench", QueueConfig(), handler=handler)
            if mode == "e2e":
                service.enqueue_many("bench", [PAYLOAD] * n)
            elif mode == "e2e-one-enqueue":
                for _ in range(n):
                    service.enqueue("bench", PAYLOAD)
            done.wait()
            service.flush()
            return time.perf_counter() - began, time.process_time() - cpu


MODES: Dict[str, str] = {
    "drain": "claim, run and settle tasks enqueued beforehand",
    "e2e": "one enqueue_many call while serving",
    "e2e-one-enqueue": "one enqueue call per task while serving",
}


def main(argv: "List[str] | None" = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="modes: " + "; ".join(f"{k}: {v}"
                                                                  for k, v in MODES.items()))
    parser.add_argument("--tasks", type=int, default=50_000, help="tasks per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (median shown)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated modes: " + ", ".join(MODES))
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    for mode in modes:
        runs = [run_once(mode, args.tasks) for _ in range(args.runs)]
        times = [wall for wall, _ in runs]
        median = statistics.median(times)
        cpu = statistics.median(cpu for _, cpu in runs)
        print(f"{mode:16} {args.tasks / median:9.0f}/s {median / args.tasks * 1e6:7.1f} us/task"
              f" {cpu / args.tasks * 1e6:7.1f} us CPU/task"
              f"  (runs: {', '.join(f'{args.tasks / t:.0f}' for t in times)})", flush=True)


if __name__ == "__main__":
    main()
