"""Where one job's time goes: start, run and wait, each timed on its own.

Starts N trivial jobs behind a job that holds the worker's only thread
(so the start loop runs alone), releases it and times the run phase until
the route is drained, then times waiting for every job, on the main thread
and on another thread.  With --many, the jobs are started with one
start_many and waited with one wait_many instead.  Prints medians of
--runs runs, in microseconds per job, and each as a share of one
iteration of the bench's bare loop (copy the request, call the callback).
Run: python benchmarks/phases.py [--runs 5] [-n 200000] [--many]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Callable, Dict, List

import callbackworker
from callbackworker.bench import bare_loop


def touch(request: memoryview) -> None:
    request[0] = 1


def one_run(n: int, wait_on_main: bool) -> Dict[str, float]:
    with callbackworker.Worker() as w:
        gate = threading.Event()
        w.start(lambda request: gate.wait(), b"")
        request = bytes(16)
        t0 = time.perf_counter()
        ids = [w.start(touch, request) for _ in range(n)]
        t1 = time.perf_counter()
        gate.set()
        w.wait_drained("default")
        t2 = time.perf_counter()

        def wait_all() -> None:
            wait = w.wait
            for job in ids:
                wait(job)

        if wait_on_main:
            wait_all()
        else:
            thread = threading.Thread(target=wait_all)
            thread.start()
            thread.join()
        t3 = time.perf_counter()
    return {"start": t1 - t0, "run": t2 - t1, "wait": t3 - t2}


def many_run(n: int) -> Dict[str, float]:
    """The phases of start_many + wait_many."""
    with callbackworker.Worker() as w:
        gate = threading.Event()
        w.start(lambda request: gate.wait(), b"")
        requests = [bytes(16)] * n
        t0 = time.perf_counter()
        ids = w.start_many(touch, requests)
        t1 = time.perf_counter()
        gate.set()
        w.wait_drained("default")
        t2 = time.perf_counter()
        w.wait_many(ids)
        t3 = time.perf_counter()
    return {"start_many": t1 - t0, "run": t2 - t1, "wait_many": t3 - t2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("-n", type=int, default=200_000)
    parser.add_argument("--many", action="store_true", help="start_many + wait_many")
    args = parser.parse_args()
    rows: Dict[str, List[float]] = {}
    for _ in range(args.runs):
        if args.many:
            for phase, secs in many_run(args.n).items():
                rows.setdefault(phase, []).append(secs / args.n * 1e6)
            continue
        for where in ("main thread", "other thread"):
            for phase, secs in one_run(args.n, where == "main thread").items():
                key = phase if phase != "wait" else f"wait ({where})"
                rows.setdefault(key, []).append(secs / args.n * 1e6)
    bare_us = 1e6 / statistics.median(bare_loop(args.n) for _ in range(args.runs))
    for phase, values in rows.items():
        us = statistics.median(values)
        print(f"{phase:<22} {us:6.3f} us/job  {us / bare_us:5.2f} bare-loop iterations")
    print(f"{'bare loop':<22} {bare_us:6.3f} us/job")


if __name__ == "__main__":
    main()
