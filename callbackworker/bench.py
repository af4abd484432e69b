"""Benchmarks behind ``callbackworker bench``: the project side by side with
its baselines, in one process, on the same workload.

Every figure is the median of ``--runs`` runs (at least 5 by default), and
every comparison is a ratio against a baseline measured in the same command,
because absolute timings on a shared machine mean little.

Workloads (trivial job: a 16-byte request, the callback writes one byte in
place):

* throughput  N jobs started one at a time, then all waited, vs
              ThreadPoolExecutor(max_workers=1) (submit a bytearray copy,
              then result()) and vs a bare loop (copy into a bytearray, call
              the callback): the floor for Python callbacks
* batch       the same through start_many, waiting each job with wait, and
              with wait_many (every response in a few core calls)
* latency     start + wait of one job, repeated: median and p99 vs
              ThreadPoolExecutor's submit + result()
* blobs       1 MiB requests: jobs/s and GB/s vs ThreadPoolExecutor
* memory      RSS per queued 16-byte job with the worker busy, vs
              ThreadPoolExecutor's pending futures (each in a subprocess)
* scaling     throughput at growing N
* close       close() with N queued jobs
* executor    callbackworker.Executor vs ThreadPoolExecutor(1): submit N
              trivial calls, then result() of each; and, for reference, a
              stdlib concurrent.futures.Future's own lifecycle with nothing
              run, which an Executor handing out plain stdlib futures could
              not outrun (this Executor's futures skip most of its cost)
* first-call  an idle pool's first call under a producer that keeps
              submitting: the time from its submit to its start, for the
              Executor and for start() vs ThreadPoolExecutor(1) (each pool
              has run one call and idled 20 ms first; the median of 4
              samples per run)
* progress    the plain start/wait path, run next to the same jobs started
              with an on_progress callback that is never called: the
              plain path must not pay for the feature
* tasks       persistent queues on a fresh SQLite file per run: enqueue
              (one durable commit per call) and end-to-end (enqueue N one at
              a time, a trivial handler, until all are completed in the
              database), vs huey's SqliteHuey (thread consumer) and
              persist-queue's SQLiteAckQueue (get/ack on a consumer thread);
              a baseline that is not installed (``pip install
              '.[bench]'``) is skipped with a message; end-to-end runs
              default settings, then enqueue_many, then prefetch 256
* task-wakeups  enqueue -> handler start across processes with an idle
              worker (default settings): p50 and p99 on SQLite and, with
              ``CBW_PG_DSN`` set, on PostgreSQL; and the idle worker's CPU
              share over 10 s (getrusage in the worker).  The target is
              absolute; polling alone would wait up to ``poll_ms``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Sequence, Tuple

from .executor import Executor
from .worker import Worker

REQUEST = bytes(range(16))
MIB = 1 << 20


def touch(request: memoryview) -> None:
    """The trivial job: write one byte in place."""
    request[0] = 1


def _progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def _median_rate(fn: Callable[[], float], runs: int, label: str) -> float:
    rates = []
    for i in range(runs):
        rates.append(fn())
        _progress(f"{label}: run {i + 1}/{runs} {rates[-1]:,.0f}/s")
    return statistics.median(rates)


# ---- throughput -------------------------------------------------------

def cbw_one_at_a_time(n: int) -> float:
    with Worker() as w:
        start, wait, req = w.start, w.wait, REQUEST
        t0 = time.perf_counter()
        ids = [start(touch, req) for _ in range(n)]
        for job in ids:
            wait(job)
        return n / (time.perf_counter() - t0)


def cbw_start_many(n: int) -> float:
    with Worker() as w:
        reqs = [REQUEST] * n
        wait = w.wait
        t0 = time.perf_counter()
        ids = w.start_many(touch, reqs)
        for job in ids:
            wait(job)
        return n / (time.perf_counter() - t0)


def cbw_start_many_wait_many(n: int) -> float:
    with Worker() as w:
        reqs = [REQUEST] * n
        t0 = time.perf_counter()
        w.wait_many(w.start_many(touch, reqs))
        return n / (time.perf_counter() - t0)


def tpe_one_at_a_time(n: int) -> float:
    with ThreadPoolExecutor(max_workers=1) as ex:
        submit, req = ex.submit, REQUEST
        t0 = time.perf_counter()
        futures = [submit(touch, bytearray(req)) for _ in range(n)]
        for f in futures:
            f.result()
        return n / (time.perf_counter() - t0)


def bare_loop(n: int) -> float:
    req = REQUEST
    t0 = time.perf_counter()
    for _ in range(n):
        touch(memoryview(bytearray(req)))
    return n / (time.perf_counter() - t0)


# ---- latency ----------------------------------------------------------

def _percentiles(samples: List[float]) -> Tuple[float, float]:
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def cbw_latency(n: int) -> Tuple[float, float]:
    with Worker() as w:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            w.wait(w.start(touch, REQUEST))
            out.append(time.perf_counter() - t0)
    return _percentiles(out)


def tpe_latency(n: int) -> Tuple[float, float]:
    with ThreadPoolExecutor(max_workers=1) as ex:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            ex.submit(touch, bytearray(REQUEST)).result()
            out.append(time.perf_counter() - t0)
    return _percentiles(out)


# ---- large blobs ------------------------------------------------------

def cbw_blobs(n: int) -> float:
    blob = bytes(MIB)
    with Worker() as w:
        t0 = time.perf_counter()
        ids = [w.start(touch, blob) for _ in range(n)]
        for job in ids:
            w.wait(job)
        return n / (time.perf_counter() - t0)


def tpe_blobs(n: int) -> float:
    blob = bytes(MIB)

    def job(b: bytearray) -> bytes:
        touch(memoryview(b))
        return bytes(b)

    with ThreadPoolExecutor(max_workers=1) as ex:
        t0 = time.perf_counter()
        futures = [ex.submit(job, bytearray(blob)) for _ in range(n)]
        for f in futures:
            f.result()
        return n / (time.perf_counter() - t0)


# ---- memory (run in a fresh interpreter) ------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_probe(kind: str, n: int) -> Dict[str, float]:
    """Bytes of RSS per queued job while the only thread is busy."""
    gate = threading.Event()
    before = _rss_bytes()
    if kind == "cbw":
        w = Worker()
        w.start(lambda r: gate.wait(), b"")
        for _ in range(n):
            w.start(touch, REQUEST)
        after = _rss_bytes()
        t0 = time.perf_counter()
        gate.set()
        w.close()
        close_s = time.perf_counter() - t0
    else:
        ex = ThreadPoolExecutor(max_workers=1)
        ex.submit(gate.wait)
        futures = [ex.submit(touch, bytearray(REQUEST)) for _ in range(n)]
        after = _rss_bytes()
        t0 = time.perf_counter()
        gate.set()
        ex.shutdown(wait=True, cancel_futures=True)
        close_s = time.perf_counter() - t0
        del futures
    return {"per_job": (after - before) / n, "close_s": close_s}


def memory_in_subprocess(kind: str, n: int) -> Dict[str, float]:
    code = ("import json, callbackworker.bench as b; "
            f"print(json.dumps(b._memory_probe({kind!r}, {n})))")
    out = subprocess.run([sys.executable, "-c", code], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cbw_close_queued(n: int) -> float:
    """Seconds close() takes with n queued jobs (the thread is busy)."""
    gate = threading.Event()
    w = Worker()
    w.start(lambda r: gate.wait(), b"")
    w.start_many(touch, [REQUEST] * n)
    t0 = time.perf_counter()
    gate.set()
    w.close()
    return time.perf_counter() - t0


# ---- executor and progress ---------------------------------------------

def _trivial() -> int:
    return 1


def executor_rate(kind: str, n: int) -> float:
    make = (lambda: Executor(max_workers=1)) if kind == "cbw" else (
        lambda: ThreadPoolExecutor(max_workers=1))
    with make() as ex:
        submit = ex.submit
        t0 = time.perf_counter()
        futures = [submit(_trivial) for _ in range(n)]
        for f in futures:
            f.result()
        return n / (time.perf_counter() - t0)


def future_lifecycle_rate(n: int) -> float:
    """What a stdlib ``concurrent.futures.Future`` costs per call without
    running anything: created, set running, resolved and read.  An Executor
    handing out such futures cannot outrun this; ``Executor``'s futures
    make no condition and run no ``__init__``."""
    from concurrent.futures import Future

    t0 = time.perf_counter()
    futures = [Future() for _ in range(n)]
    for f in futures:
        f.set_running_or_notify_cancel()
        f.set_result(_trivial())
    for f in futures:
        f.result()
    return n / (time.perf_counter() - t0)


FIRST_CALL_IDLE_S = 0.02
FIRST_CALL_CAP_S = 0.1
FIRST_CALL_SAMPLES = 4  # per run: one sample is one wake-up, and wake-ups scatter


def first_call_latency(kind: str) -> float:
    """Seconds from the submit of an idle pool's first call to its start,
    while the producer keeps submitting (until that call starts, at most
    FIRST_CALL_CAP_S)."""
    started = [0.0]

    def first(*_: object) -> None:
        started[0] = time.perf_counter()

    def other(*_: object) -> None:
        pass

    if kind == "start":
        with Worker() as w:
            w.wait(w.start(other, REQUEST))
            time.sleep(FIRST_CALL_IDLE_S)
            t0 = time.perf_counter()
            ids = [w.start(first, REQUEST)]
            while not started[0] and time.perf_counter() - t0 < FIRST_CALL_CAP_S:
                ids.append(w.start(other, REQUEST))
            w.wait_many(ids)
        return (started[0] or time.perf_counter()) - t0
    ex = Executor(max_workers=1) if kind == "cbw" else ThreadPoolExecutor(max_workers=1)
    with ex:
        ex.submit(other).result()
        time.sleep(FIRST_CALL_IDLE_S)
        t0 = time.perf_counter()
        futures = [ex.submit(first)]
        while not started[0] and time.perf_counter() - t0 < FIRST_CALL_CAP_S:
            futures.append(ex.submit(other))
        for f in futures:
            f.result()
    return (started[0] or time.perf_counter()) - t0


def progress_tracked(n: int) -> float:
    """The throughput workload with progress tracking switched on."""
    def ignore(job_id: int, data: object) -> None:
        pass

    with Worker() as w:
        start, wait, req = w.start, w.wait, REQUEST
        t0 = time.perf_counter()
        ids = [start(touch, req, on_progress=ignore) for _ in range(n)]
        for job in ids:
            wait(job)
        return n / (time.perf_counter() - t0)


# ---- driver -----------------------------------------------------------

SECTIONS = ["throughput", "batch", "latency", "blobs", "memory", "scaling", "close",
            "executor", "first-call", "progress", "tasks", "task-wakeups"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=5, help="runs per figure; the median is kept (default 5)")
    p.add_argument("-n", type=int, default=200_000, help="jobs per throughput run (default 200000)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, for a smoke test (figures are not meaningful)")
    p.add_argument("--only", nargs="*", default=None,
                   choices=SECTIONS,
                   help="run only these sections")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")


def _row(rows: List[Tuple[str, str, str, str]], name: str, ours: str, base: str, ratio: str) -> None:
    rows.append((name, ours, base, ratio))
    print(f"{name:<44} {ours:>16} {base:>18} {ratio:>10}", flush=True)


def main(args: argparse.Namespace) -> int:
    runs = max(1, args.runs)
    n = args.n
    scale = [100_000, 1_000_000, 10_000_000]
    lat_n, blob_n, mem_n, close_n, task_n = 20_000, 200, 1_000_000, 1_000_000, 5_000
    if args.quick:
        n, scale, lat_n, blob_n, mem_n, close_n = 5_000, [2_000, 10_000], 500, 10, 20_000, 20_000
        task_n = 300
        runs = min(runs, 3)
    want = set(args.only or SECTIONS)
    figures: Dict[str, float] = {}
    rows: List[Tuple[str, str, str, str]] = []
    print(f"callbackworker bench: median of {runs} runs; ratios against baselines run in this process")
    print(f"{'workload':<44} {'callbackworker':>16} {'baseline':>18} {'ratio':>10}")

    if want & {"throughput", "batch"}:
        tpe = _median_rate(lambda: tpe_one_at_a_time(n), runs, "ThreadPoolExecutor(1)")
        bare = _median_rate(lambda: bare_loop(n), runs, "bare loop")
        figures.update(tpe_per_s=tpe, bare_per_s=bare)
        if "throughput" in want:
            ours = _median_rate(lambda: cbw_one_at_a_time(n), runs, "start one at a time")
            figures["one_at_a_time_per_s"] = ours
            _row(rows, f"throughput, {n:,} jobs, vs TPE(1)", f"{ours:,.0f}/s", f"{tpe:,.0f}/s", f"{ours / tpe:.1f}x")
            _row(rows, "throughput vs bare Python loop", f"{ours:,.0f}/s", f"{bare:,.0f}/s", f"{ours / bare:.0%}")
        if "batch" in want:
            ours = _median_rate(lambda: cbw_start_many(n), runs, "start_many")
            figures["start_many_per_s"] = ours
            _row(rows, "start_many vs bare Python loop", f"{ours:,.0f}/s", f"{bare:,.0f}/s", f"{ours / bare:.0%}")
            _row(rows, "start_many vs TPE(1)", f"{ours:,.0f}/s", f"{tpe:,.0f}/s", f"{ours / tpe:.1f}x")
            ours = _median_rate(lambda: cbw_start_many_wait_many(n), runs, "start_many + wait_many")
            figures["start_many_wait_many_per_s"] = ours
            _row(rows, "start_many + wait_many vs bare Python loop", f"{ours:,.0f}/s",
                 f"{bare:,.0f}/s", f"{ours / bare:.0%}")

    if "latency" in want:
        ours_l = [cbw_latency(lat_n) for _ in range(runs)]
        base_l = [tpe_latency(lat_n) for _ in range(runs)]
        _progress("latency done")
        om, op = (statistics.median(x[i] for x in ours_l) * 1e6 for i in (0, 1))
        bm, bp = (statistics.median(x[i] for x in base_l) * 1e6 for i in (0, 1))
        figures.update(latency_median_us=om, latency_p99_us=op, tpe_latency_median_us=bm, tpe_latency_p99_us=bp)
        _row(rows, "round trip start+wait, median", f"{om:.1f} us", f"{bm:.1f} us", f"{om / bm:.2f}")
        _row(rows, "round trip start+wait, p99", f"{op:.1f} us", f"{bp:.1f} us", f"{op / bp:.2f}")

    if "blobs" in want:
        ours = _median_rate(lambda: cbw_blobs(blob_n), runs, "1 MiB blobs")
        base = _median_rate(lambda: tpe_blobs(blob_n), runs, "1 MiB blobs, TPE")
        figures.update(blob_jobs_per_s=ours, tpe_blob_jobs_per_s=base)
        _row(rows, "1 MiB requests, jobs/s", f"{ours:,.0f}/s", f"{base:,.0f}/s", f"{ours / base:.1f}x")
        _row(rows, "1 MiB requests, GB/s", f"{ours * MIB / 1e9:.2f}", f"{base * MIB / 1e9:.2f}", "")

    if "memory" in want:
        ours_m = [memory_in_subprocess("cbw", mem_n) for _ in range(min(runs, 3))]
        base_m = [memory_in_subprocess("tpe", mem_n) for _ in range(min(runs, 3))]
        _progress("memory done")
        o = statistics.median(m["per_job"] for m in ours_m)
        b = statistics.median(m["per_job"] for m in base_m)
        figures.update(bytes_per_queued_job=o, tpe_bytes_per_pending_future=b)
        _row(rows, f"RSS per queued 16-byte job ({mem_n:,})", f"{o:.0f} B", f"{b:.0f} B", f"{o / b:.2f}")
        _row(rows, "  of which overhead beyond the 16-byte blob", f"{o - 16:.0f} B", "", "")

    if "scaling" in want:
        base_rate = None
        for size in scale:
            rate = _median_rate(lambda: cbw_start_many_nowait(size), max(1, runs if size <= 1_000_000 else 1),
                                f"scaling {size:,}")
            figures[f"scaling_{size}_per_s"] = rate
            base_rate = base_rate or rate
            _row(rows, f"throughput at {size:,} jobs (start_many)", f"{rate:,.0f}/s", "", f"{rate / base_rate:.2f}")

    if "close" in want:
        secs = statistics.median(cbw_close_queued(close_n) for _ in range(runs))
        figures["close_queued_s"] = secs
        _row(rows, f"close() with {close_n:,} queued jobs", f"{secs * 1000:.0f} ms", "", "")

    if "executor" in want:
        ex_n = n // 4
        ours = _median_rate(lambda: executor_rate("cbw", ex_n), runs, "Executor")
        base = _median_rate(lambda: executor_rate("tpe", ex_n), runs, "ThreadPoolExecutor")
        figures.update(executor_per_s=ours, tpe_executor_per_s=base)
        _row(rows, f"Executor, {ex_n:,} trivial calls, vs TPE(1)", f"{ours:,.0f}/s", f"{base:,.0f}/s",
             f"{ours / base:.1f}x")
        floor = _median_rate(lambda: future_lifecycle_rate(ex_n), runs, "Future lifecycle")
        figures["future_lifecycle_per_s"] = floor
        _row(rows, "  a stdlib Future's lifecycle alone, vs TPE(1)", f"{floor:,.0f}/s",
             f"{base:,.0f}/s", f"{floor / base:.1f}x")

    if "first-call" in want:
        samples = {kind: [first_call_latency(kind) * 1e3 for _ in range(runs * FIRST_CALL_SAMPLES)]
                   for kind in ("cbw", "start", "tpe")}
        _progress("first-call done")
        first = {kind: statistics.median(v) for kind, v in samples.items()}
        figures.update(first_call_executor_ms=first["cbw"], first_call_start_ms=first["start"],
                       tpe_first_call_ms=first["tpe"])
        _row(rows, "first call starts, producer submitting", f"{first['cbw']:.2f} ms",
             f"{first['tpe']:.2f} ms", f"{first['cbw'] / first['tpe']:.2f}")
        _row(rows, "  same through start(), vs TPE(1)", f"{first['start']:.2f} ms",
             f"{first['tpe']:.2f} ms", f"{first['start'] / first['tpe']:.2f}")

    if "progress" in want:
        plain = _median_rate(lambda: cbw_one_at_a_time(n), runs, "no progress")
        tracked = _median_rate(lambda: progress_tracked(n), runs, "progress tracked")
        figures.update(plain_per_s=plain, progress_tracked_per_s=tracked)
        _row(rows, "jobs started with on_progress vs plain jobs", f"{tracked:,.0f}/s", f"{plain:,.0f}/s",
             f"{tracked / plain:.2f}")

    if "tasks" in want or "task-wakeups" in want:
        from .bench_tasks import bench_task_wakeups, bench_tasks
    if "tasks" in want:
        bench_tasks(task_n, runs, rows, figures)

    if "task-wakeups" in want:
        bench_task_wakeups(30 if args.quick else 200, runs, rows, figures,
                           idle_s=1.0 if args.quick else 10.0)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


def cbw_start_many_nowait(n: int) -> float:
    """Throughput at scale: start_many in chunks, then wait for every job."""
    chunk = 100_000
    with Worker() as w:
        wait = w.wait
        t0 = time.perf_counter()
        ids: List[int] = []
        for i in range(0, n, chunk):
            ids.extend(w.start_many(touch, [REQUEST] * min(chunk, n - i)))
        for job in ids:
            wait(job)
        return n / (time.perf_counter() - t0)


def run_cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py")
    add_arguments(parser)
    return main(parser.parse_args(argv))
