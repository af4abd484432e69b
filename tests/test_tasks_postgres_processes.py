"""Several worker processes on one PostgreSQL database, as several hosts
would run them: real ``callbackworker worker`` processes, a real server.

* Three workers on one queue: every task runs exactly once, none is lost.
* kill -9 of one worker in the middle of a task: the task runs again on
  another worker once the lease expires, its attempt counted.
* ``delay_ms`` holds between consecutive starts across all the workers.
* The SQLite suite's repeated kill -9 run, on PostgreSQL: every task ends
  completed or failed exactly once, attempts match the logged runs.

The handlers live in ``tests/task_apps.py`` and log every run to a file.
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

pytest.importorskip("psycopg", reason="psycopg 3 is not installed: "
                                      "pip install 'callbackworker[postgres]'")

import psycopg  # noqa: E402

from callbackworker import TaskService  # noqa: E402
from test_tasks_crash import _spawn, _wait_for, run_kill9  # noqa: E402


def _events(log: Path) -> List[Tuple[str, str, int, str]]:
    """``(event, task id, attempt, pid)`` per logged line."""
    out = []
    for line in log.read_text().splitlines():
        event, task_id, attempt, pid = line.split()
        out.append((event, task_id, int(attempt), pid))
    return out


def _stop(procs: "List[object]") -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    for proc in procs:
        _, err = proc.communicate(timeout=30)  # type: ignore[attr-defined]
        assert proc.returncode == 0, err.decode()  # type: ignore[attr-defined]
        assert b"Traceback" not in err, err.decode()


def test_three_workers_on_one_queue_run_every_task_exactly_once(
        pg_schema_dsn: str, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    workers = [_spawn(pg_schema_dsn, "task_apps:shared", log) for _ in range(3)]
    ids: List[str] = []
    with TaskService(pg_schema_dsn) as producer:
        for _ in range(30):  # many small commits, racing the workers' claims
            ids += producer.enqueue_many("shared", [b"x"] * 40)
    counts = _wait_for(pg_schema_dsn, len(ids), deadline_s=60)
    _stop(workers)
    assert counts["completed"] == len(ids), counts

    seen: Dict[str, List[Tuple[str, int]]] = defaultdict(list)
    pids: Set[str] = set()
    for event, task_id, attempt, pid in _events(log):
        seen[task_id].append((event, attempt))
        pids.add(pid)
    assert len(pids) == 3, "all three processes ran tasks"
    assert sorted(seen) == sorted(ids)
    for task_id, events in seen.items():
        assert events == [("start", 1), ("end", 1)], (task_id, events)


def test_kill9_of_a_worker_mid_task_runs_the_task_again_elsewhere(
        pg_schema_dsn: str, tmp_path: Path) -> None:
    """Each task sleeps 1 s; the victim is killed as soon as it has logged
    the "start" of a task and that start is committed.  With a 1 s lease a
    survivor takes the task back and runs it as attempt 2."""
    log = tmp_path / "runs.log"
    workers = [_spawn(pg_schema_dsn, "task_apps:slow_retrying", log, "--lease-ms", "1000")
               for _ in range(3)]
    with TaskService(pg_schema_dsn) as producer:
        ids = producer.enqueue_many("slow", [b"1.0"] * 6)
    victim = workers[0]
    deadline = time.monotonic() + 30
    started: List[str] = []
    with TaskService(pg_schema_dsn) as reader:
        # A run's start is committed with the next group commit, after its
        # handler began: killed before that, the run would go uncounted.
        while not any(reader.get(t).attempt == 1 for t in started):
            assert time.monotonic() < deadline, "the victim never started a task"
            time.sleep(0.01)
            started = [t for e, t, _, pid in _events(log)
                       if e == "start" and pid == str(victim.pid)]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    counts = _wait_for(pg_schema_dsn, len(ids), deadline_s=60)
    _stop(workers[1:])
    assert counts["completed"] == len(ids), counts

    events = _events(log)
    interrupted = {t for e, t, _, pid in events if e == "start" and pid == str(victim.pid)} - \
        {t for e, t, _, pid in events if e == "end" and pid == str(victim.pid)}
    assert len(interrupted) == 1, events
    (task_id,) = interrupted
    with TaskService(pg_schema_dsn) as reader:
        info = reader.get(task_id)
        assert (info.status, info.attempt) == ("completed", 2)
        for other in set(ids) - interrupted:
            assert reader.get(other).status == "completed"
    runs = [(e, a, pid == str(victim.pid)) for e, t, a, pid in events if t == task_id]
    assert runs == [("start", 1, True), ("start", 2, False), ("end", 2, False)], runs
    ends = [t for e, t, _, _ in events if e == "end"]
    assert sorted(ends) == sorted(ids), "every task finished exactly once"


def test_delay_ms_spaces_starts_across_all_workers(pg_schema_dsn: str, tmp_path: Path) -> None:
    """Three workers serve a queue with ``delay_ms=150``; each has one
    slot and a handler that holds it for 400 ms, so no worker can take two
    starts in a row and the starts must alternate between processes.  A
    trigger records each claim's start time as the claiming service saw it
    (``lease_expires_at - lease_ms``); sorted, consecutive starts are at
    least 150 ms apart, though three processes were claiming."""
    lease_ms = 30_000
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        TaskService(pg_schema_dsn).close()  # creates the schema
        conn.execute(f"""
            CREATE TABLE starts (at bigint NOT NULL, owner text NOT NULL);
            CREATE FUNCTION record_start() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO starts VALUES (NEW.lease_expires_at - {lease_ms}, NEW.owner);
                RETURN NEW;
            END $$;
            CREATE TRIGGER record_start AFTER UPDATE ON cbw_tasks FOR EACH ROW
                WHEN (OLD.status = 'pending' AND NEW.status = 'running')
                EXECUTE FUNCTION record_start();""")
    log = tmp_path / "runs.log"
    workers = [_spawn(pg_schema_dsn, "task_apps:spaced", log, "--lease-ms", str(lease_ms))
               for _ in range(3)]
    with TaskService(pg_schema_dsn) as producer:
        ids = producer.enqueue_many("spaced", [b"x"] * 12)
    counts = _wait_for(pg_schema_dsn, len(ids), deadline_s=60)
    _stop(workers)
    assert counts["completed"] == len(ids), counts

    with psycopg.connect(pg_schema_dsn) as conn:
        starts = conn.execute("SELECT at, owner FROM starts ORDER BY at").fetchall()
    assert len(starts) == len(ids)
    gaps = [b[0] - a[0] for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 150, gaps
    assert len({owner for _, owner in starts}) >= 2, "several workers took turns"


def test_kill9_repeatedly_loses_no_task(pg_schema_dsn: str, tmp_path: Path) -> None:
    run_kill9(tmp_path, n_tasks=4000, kills=4, seed=int(time.time()), db=pg_schema_dsn)
