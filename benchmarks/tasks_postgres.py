"""Task queue throughput with 1, 2 and 4 worker processes on one database:
``python benchmarks/tasks_postgres.py [--tasks N] [--runs R] [--procs 1,2,4]``.

Each measurement pre-enqueues ``--tasks`` tasks (a trivial handler), starts
the worker processes, lets them all set up, then releases them at once and
times until the database says every task is done.  Medians of ``--runs``.

Systems, each in a fresh schema (PostgreSQL) or file (SQLite):

* ``cbw-pg``: ``TaskService`` on PostgreSQL, queue concurrency 4 per
  process, default settings (prefetch: the queue's concurrency), then
  ``prefetch=0`` and ``prefetch=64``.
* ``cbw-sqlite``: the same on one SQLite file (``durability="normal"``).
* ``procrastinate``: procrastinate's worker on the same server, concurrency
  4 per process, an ``async`` no-op task (skipped, saying so, unless
  ``pip install procrastinate``).

With ``--cpu`` each line also gives the CPU time spent per task by the
worker processes (from release until they are told to stop; procrastinate's
until its worker returns, the queue empty) and by the server's processes
(from release until the last task is done; only with the throwaway
cluster): on a machine with fewer cores than processes the rate follows
these, and they vary less than the rate between runs.

Completion is polled every 5 ms through the partial indexes of unfinished
tasks (procrastinate: an equally cheap ``EXISTS``), so that the poll takes
little of the CPU that the systems measured share with it.

The server is a throwaway cluster with PostgreSQL's default durability
(``fsync`` and ``synchronous_commit`` on; ``--no-fsync`` turns both off),
started from the server programs found as ``tests/pg_server.py`` finds
them, or ``$CBW_PG_DSN``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from pg_server import PostgresCluster, find_bindir, fresh_schema  # noqa: E402

from callbackworker import QueueConfig, TaskService  # noqa: E402
from callbackworker.tasks.client import open_store  # noqa: E402

QUEUE = "bench"
CONCURRENCY = 4
PREFETCH = 64

log = logging.getLogger("tasks_postgres")


def _noop(payload: memoryview) -> str:
    return ""


# ---- worker processes --------------------------------------------------------

def _cpu_s() -> float:
    """This process's CPU time so far (user and system), in seconds."""
    t = os.times()
    return t.user + t.system


def _cbw_worker(dsn: str, prefetch: Optional[int], ready: Any, go: Any, stop: Any,
                cpu: Any) -> None:
    with TaskService(dsn, prefetch=prefetch) as service:
        ready.set()
        go.wait()
        before = _cpu_s()
        service.create_queue(QUEUE, QueueConfig(concurrency=CONCURRENCY), handler=_noop)
        stop.wait()
        cpu.put(_cpu_s() - before)


def _procrastinate_app(dsn: str) -> Tuple[Any, Any]:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    async def noop(i: int) -> None:
        return None

    task = app.task(name="noop", queue=QUEUE)(noop)
    return app, task


def _procrastinate_worker(dsn: str, prefetch: int, ready: Any, go: Any, stop: Any,
                          cpu: Any) -> None:
    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    app, _ = _procrastinate_app(dsn)
    with app.open():
        ready.set()
        go.wait()
        before = _cpu_s()
        app.run_worker(queues=[QUEUE], concurrency=CONCURRENCY, wait=False,
                       install_signal_handlers=False, listen_notify=True)
        cpu.put(_cpu_s() - before)
    stop.wait()


# ---- one measurement ---------------------------------------------------------

def _cbw_prepare(dsn: str, n: int) -> Callable[[], bool]:
    store = open_store(dsn, "normal")
    try:
        store.ensure_queue(QUEUE)
    finally:
        store.close()
    with TaskService(dsn) as producer:
        for start in range(0, n, 1000):
            producer.enqueue_many(QUEUE, [b"x"] * min(1000, n - start))
    if "://" not in dsn and "=" not in dsn:  # an SQLite file
        reader = open_store(dsn, "normal")

        def sqlite_done() -> bool:
            row = reader.counts().get(QUEUE, {})
            return row.get("completed", 0) + row.get("failed", 0) >= n

        sqlite_done.close = reader.close  # type: ignore[attr-defined]
        return sqlite_done
    import psycopg

    conn = psycopg.connect(dsn, autocommit=True)

    def done() -> bool:
        # Through the partial indexes of unfinished tasks: polled every few
        # ms, a count of the whole table would take a good share of the
        # server's CPU from the workers measured.
        row = conn.execute("SELECT EXISTS (SELECT FROM cbw_tasks WHERE queue = %s "
                           "AND status IN ('pending', 'running', 'suspended'))",
                           (QUEUE,)).fetchone()
        return row is not None and not row[0]

    done.close = conn.close  # type: ignore[attr-defined]
    return done


def _procrastinate_prepare(dsn: str, n: int) -> Callable[[], bool]:
    import psycopg

    app, task = _procrastinate_app(dsn)
    with app.open():
        app.schema_manager.apply_schema()
        for start in range(0, n, 1000):
            task.batch_defer(*({"i": i} for i in range(start, min(n, start + 1000))))
    conn = psycopg.connect(dsn, autocommit=True)

    def done() -> bool:  # as cheap as cbw's check
        row = conn.execute("SELECT EXISTS (SELECT FROM procrastinate_jobs "
                           "WHERE status IN ('todo', 'doing'))").fetchone()
        return row is not None and not row[0]

    done.close = conn.close  # type: ignore[attr-defined]
    return done


SYSTEMS: Dict[str, Tuple[Callable[..., None], Callable[[str, int], Callable[[], bool]],
                         Optional[int]]] = {
    "cbw-pg": (_cbw_worker, _cbw_prepare, None),
    "cbw-pg-prefetch0": (_cbw_worker, _cbw_prepare, 0),
    f"cbw-pg-prefetch{PREFETCH}": (_cbw_worker, _cbw_prepare, PREFETCH),
    "cbw-sqlite": (_cbw_worker, _cbw_prepare, None),
    f"cbw-sqlite-prefetch{PREFETCH}": (_cbw_worker, _cbw_prepare, PREFETCH),
    "procrastinate": (_procrastinate_worker, _procrastinate_prepare, 0),
}


def server_cpu_s(datadir: str) -> float:
    """CPU time (user and system, seconds) used so far by the server whose
    data directory is ``datadir``: the postmaster and its live children."""
    with open(os.path.join(datadir, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        # After the command: state, ppid, ..., utime and stime (13th, 14th).
        if int(entry) == postmaster or int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / tick


class Measurement(NamedTuple):
    """One run: tasks per second, and CPU seconds per task of the worker
    processes and of the server (None when not measured)."""

    rate: float
    worker_cpu: float
    server_cpu: Optional[float]


def measure(system: str, dsn: str, n: int, procs: int,
            datadir: Optional[str] = None) -> Measurement:
    """Tasks per second with ``procs`` worker processes, from release to
    the last task done, and the CPU spent per task (the server's only given
    its ``datadir``)."""
    worker, prepare, prefetch = SYSTEMS[system]
    done = prepare(dsn, n)
    ctx = mp.get_context("spawn")
    go, stop, cpu = ctx.Event(), ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in range(procs)]
    workers = [ctx.Process(target=worker, args=(dsn, prefetch, r, go, stop, cpu))
               for r in readies]
    for p in workers:
        p.start()
    worker_cpu = 0.0
    try:
        for r in readies:
            if not r.wait(60):
                raise RuntimeError(f"{system}: a worker did not start")
        server_before = server_cpu_s(datadir) if datadir else 0.0
        start = time.perf_counter()
        go.set()
        deadline = start + 600
        while not done():
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{system}: not done after 600 s")
            time.sleep(0.005)
        elapsed = time.perf_counter() - start
        server = (server_cpu_s(datadir) - server_before) / n if datadir else None
        stop.set()
        worker_cpu = sum(cpu.get(timeout=60) for _ in workers) / n
    finally:
        stop.set()
        for p in workers:
            p.join(60)
            if p.is_alive():
                p.kill()
        done.close()  # type: ignore[attr-defined]
    return Measurement(n / elapsed, worker_cpu, server)


def _rate(per_s: float) -> str:
    return f"{per_s / 1000:.1f}k" if per_s >= 1000 else f"{per_s:.0f}"


def _procrastinate_available() -> Optional[str]:
    try:
        import procrastinate  # noqa: F401
    except ImportError:
        return "procrastinate is not installed (pip install procrastinate)"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--procs", default="1,2,4")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--no-fsync", action="store_true",
                        help="run the throwaway server with fsync and synchronous_commit off, "
                             "to see past the disk's flush rate")
    parser.add_argument("--cpu", action="store_true",
                        help="also report the CPU time per task of the workers and the server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    procs = [int(p) for p in args.procs.split(",")]
    systems = [s for s in args.systems.split(",") if s]
    skipped = _procrastinate_available()
    if skipped and "procrastinate" in systems:
        print(f"skipping procrastinate: {skipped}", file=sys.stderr)
        systems.remove("procrastinate")

    cluster: Optional[PostgresCluster] = None
    base = os.environ.get("CBW_PG_DSN")
    datadir: Optional[str] = None
    if base is None:
        bindir = find_bindir()
        if bindir is None:
            print("no PostgreSQL server programs found; set CBW_PG_DSN", file=sys.stderr)
            return 2
        cluster = PostgresCluster(bindir, fast=args.no_fsync).start()
        base = cluster.dsn
        datadir = cluster.datadir
    results: Dict[Tuple[str, int], float] = {}
    try:
        for system in systems:
            for k in procs:
                runs: List[Measurement] = []
                for _ in range(args.runs):
                    if system.startswith("cbw-sqlite"):
                        with tempfile.TemporaryDirectory() as tmp:
                            runs.append(measure(system, os.path.join(tmp, "t.db"),
                                                args.tasks, k))
                    else:
                        with fresh_schema(base) as dsn:
                            runs.append(measure(system, dsn, args.tasks, k, datadir))
                results[(system, k)] = statistics.median(r.rate for r in runs)
                line = (f"{system:<24} {k} procs: {results[(system, k)]:>9,.0f} tasks/s "
                        f"(runs: {', '.join(f'{r.rate:,.0f}' for r in runs)})")
                if args.cpu:
                    line += (f"; CPU per task: workers "
                             f"{statistics.median(r.worker_cpu for r in runs) * 1e6:,.0f} us")
                    servers = [r.server_cpu for r in runs if r.server_cpu is not None]
                    if servers and not system.startswith("cbw-sqlite"):
                        line += f", server {statistics.median(servers) * 1e6:,.0f} us"
                print(line, file=sys.stderr)
    finally:
        if cluster is not None:
            cluster.stop()

    server = "fsync off" if args.no_fsync else "default durability"
    print(f"\n{args.tasks} tasks, concurrency {CONCURRENCY} per process, medians of "
          f"{args.runs} runs (tasks/s); server: {server}\n")
    print("| system | " + " | ".join(f"{k} proc{'s' if k > 1 else ''}" for k in procs) + " |")
    print("|---|" + "---|" * len(procs))
    for system in systems:
        print(f"| {system} | " + " | ".join(_rate(results[(system, k)]) for k in procs) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
