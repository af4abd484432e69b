"""The persistent task queue rows of ``callbackworker bench`` (sections
``tasks`` and ``task-wakeups``; see ``callbackworker.bench`` for what each
measures).  Imported by the bench driver only when those sections run."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from .bench import _median_rate, _percentiles, _progress, _row

# ---- persistent task queues ---------------------------------------------

TASK_PAYLOAD = b"task payload 16b"


def _task_done(payload: memoryview) -> str:
    return "ok"


def tasks_rate(kind: str, n: int, end_to_end: bool) -> float:
    """Tasks/s for one run on a fresh SQLite file: enqueue only, or enqueue
    plus the handler until every task is completed in the database."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.db")
        return _TASK_RUNNERS[kind](path, n, end_to_end)


def counting_handler(n: int) -> Tuple[Callable[[memoryview], str], threading.Event]:
    """A trivial task handler, and an event it sets once it has run ``n``
    times (``benchmarks/task_drain.py`` uses it too)."""
    done = threading.Event()
    left = [n]
    lock = threading.Lock()

    def handler(payload: memoryview) -> str:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()
        return "ok"

    return handler, done


def _cbw_tasks(path: str, n: int, end_to_end: bool, prefetch: Optional[int] = None,
               batch: bool = False) -> float:
    from .tasks import QueueConfig, TaskService

    handler, done = counting_handler(n)
    with TaskService(path, background=end_to_end, prefetch=prefetch) as service:
        service.create_queue("bench", QueueConfig(), handler=handler)
        enqueue, payload = service.enqueue, TASK_PAYLOAD
        t0 = time.perf_counter()
        if batch:
            service.enqueue_many("bench", [payload] * n)
        else:
            for _ in range(n):
                enqueue("bench", payload)
        if end_to_end:
            done.wait()
            service.flush()  # completed means committed
        elapsed = time.perf_counter() - t0
    return n / elapsed


def _huey_tasks(path: str, n: int, end_to_end: bool) -> float:
    import logging

    from huey import SqliteHuey

    logging.getLogger("huey").setLevel(logging.WARNING)
    huey = SqliteHuey(filename=path, results=False)
    done = threading.Event()
    left = [n]

    @huey.task()
    def job(payload: bytes) -> str:
        left[0] -= 1
        if left[0] == 0:
            done.set()
        return "ok"

    consumer = huey.create_consumer(workers=1, worker_type="thread", initial_delay=0.001,
                                    max_delay=0.01) if end_to_end else None
    if consumer is not None:
        consumer.start()
    t0 = time.perf_counter()
    for _ in range(n):
        job(TASK_PAYLOAD)
    if consumer is not None:
        done.wait()
    elapsed = time.perf_counter() - t0
    if consumer is not None:
        consumer.stop(graceful=True)
    return n / elapsed


def _persistqueue_tasks(path: str, n: int, end_to_end: bool) -> float:
    from persistqueue import SQLiteAckQueue

    queue = SQLiteAckQueue(path, multithreading=True, auto_commit=True)
    done = threading.Event()

    def consume() -> None:
        for _ in range(n):
            item = queue.get()
            _task_done(memoryview(item))
            queue.ack(item)
        done.set()

    consumer: Optional[threading.Thread] = None
    if end_to_end:
        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
    t0 = time.perf_counter()
    for _ in range(n):
        queue.put(TASK_PAYLOAD)
    if consumer is not None:
        done.wait()
    return n / (time.perf_counter() - t0)


TASK_PREFETCH = 256

_TASK_RUNNERS: Dict[str, Callable[[str, int, bool], float]] = {
    "cbw": _cbw_tasks,
    "cbw-prefetch": lambda path, n, e2e: _cbw_tasks(path, n, e2e, prefetch=TASK_PREFETCH),
    "cbw-many": lambda path, n, e2e: _cbw_tasks(path, n, e2e, batch=True),
    "cbw-batch": lambda path, n, e2e: _cbw_tasks(path, n, e2e, prefetch=TASK_PREFETCH, batch=True),
    "huey": _huey_tasks,
    "persistqueue": _persistqueue_tasks,
}
_TASK_VARIANTS = {
    False: [("cbw", "enqueue, one per call"), ("cbw-batch", "enqueue_many")],
    True: [("cbw", "end-to-end, default settings"),
           ("cbw-many", "end-to-end, enqueue_many, default settings"),
           ("cbw-prefetch", f"end-to-end, prefetch {TASK_PREFETCH}"),
           ("cbw-batch", f"end-to-end, enqueue_many, prefetch {TASK_PREFETCH}")],
}
_TASK_BASELINES = [("huey", "huey", "SqliteHuey"), ("persistqueue", "persistqueue", "SQLiteAckQueue")]


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def bench_tasks(n: int, runs: int, rows: List[Tuple[str, str, str, str]],
                figures: Dict[str, float]) -> None:
    """Each baseline runs its own one-call-per-task API; every variant of
    ours is compared with the same baseline figures."""
    baselines = [(kind, label) for kind, module, label in _TASK_BASELINES if _installed(module)]
    for kind, module, label in _TASK_BASELINES:
        if not _installed(module):
            print(f"  (skipped {label}: {module} is not installed; pip install '.[bench]')",
                  flush=True)
    for end_to_end in (False, True):
        mode = "end-to-end" if end_to_end else "enqueue"
        base = {kind: _median_rate(lambda: tasks_rate(kind, n, end_to_end), runs, f"{label} {mode}")
                for kind, label in baselines}
        for kind, label in baselines:
            figures[f"{kind}_{mode}_per_s"] = base[kind]
        for variant, what in _TASK_VARIANTS[end_to_end]:
            ours = _median_rate(lambda: tasks_rate(variant, n, end_to_end), runs, f"tasks {what}")
            figures[f"tasks_{variant}_{mode}_per_s"] = ours
            _row(rows, f"{what}, {n:,}", f"{ours:,.0f}/s", "", "")
            for kind, label in baselines:
                _row(rows, f"  vs {label}", "", f"{base[kind]:,.0f}/s", f"{ours / base[kind]:.1f}x")


# ---- task wake-ups across processes ------------------------------------

_WAKE_WORKER = r"""
import resource, sys, time
from callbackworker import QueueConfig, TaskService

def started(payload):
    return str(time.monotonic_ns() - int(bytes(payload)))

with TaskService(sys.argv[1]) as service:
    service.create_queue("wake", QueueConfig(), handler=started)
    print("ready", flush=True)
    for line in sys.stdin:
        before = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(float(line))
        after = resource.getrusage(resource.RUSAGE_SELF)
        used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        print(used, flush=True)
"""


def task_wakeup_latency(dsn: str, n: int, idle_s: float) -> Tuple[List[float], float]:
    """Enqueue -> handler start across processes: a worker process (default
    settings) serves a queue on ``dsn``; this process enqueues one task at a
    time, each once the worker is idle again (its result came back, plus
    5 ms), the payload being ``time.monotonic_ns()`` just before the
    enqueue, and the handler answers how long ago that was (the monotonic
    clock is shared by the processes of a host).  Returns the latencies (s)
    and the worker's CPU share over ``idle_s`` idle seconds (getrusage, in
    the worker)."""
    from .tasks import TaskClient

    worker = subprocess.Popen([sys.executable, "-c", _WAKE_WORKER, dsn], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert worker.stdin is not None and worker.stdout is not None
    try:
        if worker.stdout.readline().strip() != "ready":
            raise RuntimeError("the wake-up bench worker did not start")
        latencies: List[float] = []
        with TaskClient.open(dsn) as client:
            for _ in range(n):
                time.sleep(0.005)
                task_id = client.enqueue("wake", str(time.monotonic_ns()).encode())
                latencies.append(int(client.result(task_id, timeout_ms=30_000)) / 1e9)
        time.sleep(0.5)  # past the last commit and its wake-ups
        worker.stdin.write(f"{idle_s}\n")
        worker.stdin.flush()
        cpu_share = float(worker.stdout.readline()) / idle_s
    finally:
        worker.stdin.close()
        worker.wait(60)
    return latencies, cpu_share


def bench_task_wakeups(n: int, runs: int, rows: List[Tuple[str, str, str, str]],
                       figures: Dict[str, float], idle_s: float) -> None:
    """Enqueue -> handler start across processes with an idle worker, on
    SQLite (a fresh file per run) and, when ``$CBW_PG_DSN`` names a server,
    on PostgreSQL; p50 and p99 of the runs' medians, and the idle worker's
    CPU share.  The target is absolute (p50 <= 5 ms, CPU < 1%); what the
    same wait would be by polling alone is the default ``poll_ms`` (200 ms,
    100 ms on average)."""
    backends: List[Tuple[str, Callable[[], "tempfile.TemporaryDirectory[str] | None"]]] = [
        ("SQLite", tempfile.TemporaryDirectory)]
    pg = os.environ.get("CBW_PG_DSN")
    if pg:
        backends.append(("PostgreSQL", lambda: None))
    else:
        print("  (skipped PostgreSQL wake-ups: set CBW_PG_DSN to a server's DSN)", flush=True)
    for name, place in backends:
        p50s, p99s, cpus = [], [], []
        for i in range(runs):
            tmp = place()
            dsn = os.path.join(tmp.name, "wake.db") if tmp is not None else str(pg)
            try:
                if tmp is None:
                    _clear_postgres_tasks(dsn)
                lat, cpu = task_wakeup_latency(dsn, n, idle_s)
            finally:
                if tmp is not None:
                    tmp.cleanup()
            p50, p99 = _percentiles(lat)
            p50s.append(p50)
            p99s.append(p99)
            cpus.append(cpu)
            _progress(f"{name} wake-up: run {i + 1}/{runs} p50 {p50 * 1e3:.2f} ms, "
                      f"p99 {p99 * 1e3:.2f} ms, idle CPU {cpu:.3%}")
        p50, p99, cpu = (statistics.median(x) for x in (p50s, p99s, cpus))
        key = name.lower()
        figures.update({f"{key}_wakeup_p50_ms": p50 * 1e3, f"{key}_wakeup_p99_ms": p99 * 1e3,
                        f"{key}_idle_worker_cpu": cpu})
        _row(rows, f"enqueue->start across processes, {name}, p50", f"{p50 * 1e3:.2f} ms",
             "poll 200 ms", "")
        _row(rows, "  p99", f"{p99 * 1e3:.2f} ms", "", "")
        _row(rows, f"  idle worker CPU over {idle_s:g} s", f"{cpu:.3%}", "", "")


def _clear_postgres_tasks(dsn: str) -> None:
    """Empties the wake-up bench's queue on a shared server."""
    from .tasks import TaskClient

    with TaskClient.open(dsn) as client:
        if "wake" in client.queues():
            client.clear_queue("wake")
