"""Several ``callbackworker worker`` processes serving one schedule on one
database (a SQLite file, and PostgreSQL when a server is available), in
real time: every tick is enqueued once, never once per process, and a
worker killed with SIGKILL holds nothing back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import List

from helpers import wait_for

TESTS = Path(__file__).parent
WORKERS = 3
TICKS = 4


def _ticks(db: str) -> List[int]:
    """The tick (due time) of every call of "beat" in the database."""
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db) as conn:
            rows = conn.execute("SELECT next_run_at FROM cbw_tasks WHERE name = 'beat'").fetchall()
    else:
        import sqlite3

        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT next_run_at FROM tasks WHERE name = 'beat'").fetchall()
    return [row[0] for row in rows]


def _workers(db: str, n: int) -> "List[subprocess.Popen[bytes]]":
    """``n`` worker processes serving ``periodic_app:svc`` on ``db``, each
    past its start (it printed the queues it serves)."""
    env = dict(os.environ, PYTHONPATH=str(TESTS), CBW_APP_DB=db)
    procs = [subprocess.Popen([sys.executable, "-m", "callbackworker", "worker",
                               "--app", "periodic_app:svc"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(n)]
    for proc in procs:
        assert proc.stdout is not None
        assert "serving" in proc.stdout.readline().decode()
    return procs


def _stop(procs: "List[subprocess.Popen[bytes]]") -> None:
    """SIGTERM to each live worker; each must exit cleanly."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    errors = [proc.communicate(timeout=60)[1].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * len(procs), errors


def _assert_once_each(ticks: List[int]) -> None:
    assert [t for t, n in Counter(ticks).items() if n > 1] == []
    assert all(t % 1000 == 0 for t in ticks)


def test_several_processes_on_one_database_enqueue_each_tick_once(db: str) -> None:
    procs = _workers(db, WORKERS)
    try:
        wait_for(lambda: len(_ticks(db)) >= TICKS, timeout_s=60)
        # Read while every worker runs: a graceful stop gives a claimed tick
        # that has not started back with its due time set to the stop's.
        ticks = _ticks(db)
    finally:
        _stop(procs)
    assert len(ticks) >= TICKS
    _assert_once_each(ticks)


def test_a_killed_worker_leaves_the_ticks_to_the_others(db: str) -> None:
    survivors = _workers(db, 2)
    victim, = _workers(db, 1)
    try:
        wait_for(lambda: len(_ticks(db)) >= 2, timeout_s=60)
        victim.kill()
        victim.communicate(timeout=30)
        before = len(_ticks(db))
        wait_for(lambda: len(_ticks(db)) >= before + 3, timeout_s=60)
        ticks = _ticks(db)  # before a graceful stop moves a claimed tick's due time
    finally:
        if victim.poll() is None:
            victim.kill()
        _stop(survivors)
    _assert_once_each(ticks)
