"""What one claim costs with a small and a huge backlog:
``python benchmarks/claim_cost.py [--sizes 10000,1000000] [--claims 500]
[--backends sqlite,postgresql]``.

For each backend and each size, a fresh database gets one queue with that
many due pending tasks (priorities 0..4, inserted in one statement), then
the store claims ``--claims`` times, 10 tasks each, as a dispatcher does.
It prints the claim statement's plan (SQLite's ``EXPLAIN QUERY PLAN``,
PostgreSQL's ``EXPLAIN``) and the median and 95th percentile of a claim.
The claim reads the ``tasks_claim`` index in claim order and stops after
10 rows, so the two sizes should cost the same.

PostgreSQL is a throwaway cluster started from the server programs found
as ``tests/pg_server.py`` finds them, or ``$CBW_PG_DSN``.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from callbackworker.tasks.sqlite import SQLiteTaskStore  # noqa: E402
from callbackworker.tasks.storage import TaskStore  # noqa: E402

LIMIT = 10
_PARAMS = {"owner": "bench", "expires": 2**62, "token": "t", "queue": "q", "now": 2**61,
           "limit": LIMIT}


def _fill_sqlite(store: SQLiteTaskStore, n: int) -> str:
    with sqlite3.connect(store.path) as db:
        db.execute("INSERT INTO queues(name) VALUES ('q')")
        db.execute("""WITH RECURSIVE i(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM i WHERE n < ?)
                      INSERT INTO tasks(id, queue, payload, status, next_run_at, created_at,
                                        priority)
                      SELECT 't' || n, 'q', x'', 'pending', n, 0, n % 5 FROM i""", (n,))
        db.execute("ANALYZE")
        plan = db.execute("EXPLAIN QUERY PLAN " + store.dialect.sql("claim"), _PARAMS).fetchall()
    return "\n".join(f"  {row[3]}" for row in plan)


def _fill_postgres(store: Any, n: int) -> str:
    import psycopg

    with psycopg.connect(store.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO cbw_queues(name) VALUES ('q')")
        conn.execute("""INSERT INTO cbw_tasks(id, queue, payload, status, next_run_at,
                                              created_at, priority)
                        SELECT 't' || i, 'q', '', 'pending', i, 0, i %% 5
                        FROM generate_series(1, %s) AS i""", (n,))
        conn.execute("ANALYZE cbw_tasks")
        plan = conn.execute("EXPLAIN " + store.dialect.sql("claim"), _PARAMS).fetchall()
    return "\n".join(f"  {row[0]}" for row in plan)


def measure(store: TaskStore, claims: int) -> List[float]:
    """Seconds of each of ``claims`` claims of ``LIMIT`` tasks."""
    times = []
    for i in range(claims):
        started = time.perf_counter()
        got = store.claim("q", owner="bench", limit=LIMIT, now=2**61, lease_ms=60_000)
        times.append(time.perf_counter() - started)
        assert len(got) == LIMIT, f"claim {i} got {len(got)} tasks"
    return times


def _report(backend: str, n: int, plan: str, times: List[float]) -> None:
    ordered = sorted(times)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    print(f"{backend} with {n:,} pending: claim of {LIMIT} median "
          f"{statistics.median(times) * 1e3:.3f} ms, p95 {p95 * 1e3:.3f} ms; plan:\n{plan}")


def run_sqlite(sizes: List[int], claims: int) -> None:
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            store = SQLiteTaskStore(os.path.join(tmp, "claims.db"))
            try:
                plan = _fill_sqlite(store, n)
                _report("sqlite", n, plan, measure(store, claims))
            finally:
                store.close()


def run_postgres(sizes: List[int], claims: int) -> None:
    from pg_server import PostgresCluster, find_bindir, fresh_schema

    from callbackworker.tasks.postgres import PostgresTaskStore

    cluster = None
    base = os.environ.get("CBW_PG_DSN")
    if base is None:
        bindir = find_bindir()
        if bindir is None:
            print("no PostgreSQL server programs found; set CBW_PG_DSN", file=sys.stderr)
            return
        cluster = PostgresCluster(bindir).start()
        base = cluster.dsn
    try:
        for n in sizes:
            with fresh_schema(base) as dsn:
                store = PostgresTaskStore(dsn)
                try:
                    plan = _fill_postgres(store, n)
                    _report("postgresql", n, plan, measure(store, claims))
                finally:
                    store.close()
    finally:
        if cluster is not None:
            cluster.stop()


BACKENDS: Dict[str, Callable[[List[int], int], None]] = {
    "sqlite": run_sqlite, "postgresql": run_postgres}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--claims", type=int, default=500)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    for backend in args.backends.split(","):
        BACKENDS[backend](sizes, args.claims)
    return 0


if __name__ == "__main__":
    sys.exit(main())
