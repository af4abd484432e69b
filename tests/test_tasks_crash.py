"""Crash safety of persistent queues, with real processes.

* kill -9: a worker serving thousands of tasks is killed at random points,
  again and again, and restarted; in the end every task has finished
  (completed or failed) exactly once, none is lost, none is left running,
  and the attempts the database counted match the runs the handler logged:
  a run's start is committed with the group commit after its handler
  began, so a kill in between leaves that run uncounted and the task runs
  that attempt again, but once at most per task (its later runs wait for
  their starts to be committed).
* Two worker processes on one file: no task runs twice, let alone
  concurrently, and "database is locked" never reaches anyone.

The handlers live in ``tests/task_apps.py`` and log every run to a file.
The ``soak`` variant kills more often, with more tasks.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from callbackworker import TaskService

TESTS = Path(__file__).parent
CONCURRENCY = 8  # task_apps.crash


def _spawn(db: "Path | str", app: str, log: Path, *options: str) -> "subprocess.Popen[bytes]":
    """A ``callbackworker worker`` process serving ``app`` (``task_apps``),
    started once its queues are set up; ``options`` go on its command line.
    It logs warnings and errors only: stderr is a pipe read at the end, which
    a line per completed task would fill, blocking the worker."""
    env = dict(os.environ, CBW_TASK_LOG=str(log), PYTHONPATH=str(TESTS))
    proc = subprocess.Popen([sys.executable, "-m", "callbackworker", "worker", "--db", str(db),
                             "--app", app, "--log-level", "WARNING", *options], env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "serving ..." once the queues are set up
    assert line.startswith(b"serving"), line + proc.stderr.read()  # type: ignore[union-attr]
    return proc


def _counts(db: "Path | str") -> Dict[str, int]:
    with TaskService(db) as reader:
        return dict(sum((list(c.items()) for c in reader.counts().values()), []))


def _wait_for(db: "Path | str", done: int, deadline_s: float) -> Dict[str, int]:
    end = time.monotonic() + deadline_s
    while True:
        counts = _counts(db)
        if counts["completed"] + counts["failed"] >= done or time.monotonic() > end:
            return counts
        time.sleep(0.05)


def _wait_until_running(db: "Path | str", deadline_s: float = 10.0) -> None:
    """Returns once some task is running (or the deadline passed, or none
    is left to run)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        counts = _counts(db)
        if counts["running"] > 0 or counts["pending"] == 0:
            return
        time.sleep(0.01)


def _runs(log: Path) -> Dict[str, List[int]]:
    runs: Dict[str, List[int]] = defaultdict(list)
    for line in log.read_text().splitlines():
        event, task_id, attempt, _ = line.split()
        if event in ("run", "start"):
            runs[task_id].append(int(attempt))
    return runs


def run_kill9(tmp_path: Path, n_tasks: int, kills: int, seed: int,
              db: "Path | str | None" = None) -> None:
    """The kill -9 run on ``db`` (default: a SQLite file in ``tmp_path``)."""
    rng = random.Random(seed)
    db = tmp_path / "crash.db" if db is None else db
    log = tmp_path / "runs.log"
    quiet = ("--log-level", "CRITICAL")  # every 13th task fails: tracebacks would fill stderr
    proc = _spawn(db, "task_apps:crash", log, *quiet)
    with TaskService(db) as producer:
        payloads = [b"fail" if i % 13 == 0 else b"ok %d" % i for i in range(n_tasks)]
        ids = producer.enqueue_many("crash", payloads)
    killed_busy = 0
    for _ in range(kills):
        _wait_until_running(db)  # a kill while nothing runs would test nothing
        time.sleep(rng.uniform(0.01, 0.1))
        proc.send_signal(signal.SIGKILL)
        killed_busy += _counts(db)["running"] > 0
        proc.wait()  # reaped: its pid is provably gone for the next worker
        proc = _spawn(db, "task_apps:crash", log, *quiet)
    counts = _wait_for(db, n_tasks, deadline_s=60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.stderr.read()  # type: ignore[union-attr]
    assert killed_busy >= kills // 2, f"only {killed_busy} of {kills} kills hit running tasks"

    assert counts["pending"] == counts["running"] == 0, counts
    assert counts["completed"] + counts["failed"] == n_tasks, counts
    runs = _runs(log)
    unlogged = 0
    with TaskService(db) as reader:
        for task_id, payload in zip(ids, payloads):
            info = reader.get(task_id)
            logged = runs.get(task_id, [])
            uncounted = len(logged) - len(set(logged))
            assert uncounted <= 1, f"{task_id}: more than one run went uncounted: {logged}"
            assert all(1 <= a <= info.attempt for a in logged), (task_id, info, logged)
            if info.status == "completed":
                assert info.message == f"done {info.attempt}" and max(logged) == info.attempt
            elif payload == b"fail" and not info.message.startswith("worker lost"):
                assert info.message == "RuntimeError: asked to fail"
                assert max(logged) == info.attempt == 3
            else:
                assert info.status == "failed" and info.message.startswith("worker lost"), info
            unlogged += info.attempt - len(logged)
    # An attempt is counted when its run's start is committed; only runs
    # killed between that commit and the handler's first line can have an
    # attempt without a logged run.
    assert unlogged <= kills * CONCURRENCY


def test_kill9_repeatedly_loses_no_task(tmp_path: Path) -> None:
    run_kill9(tmp_path, n_tasks=3000, kills=5, seed=int(time.time()))


@pytest.mark.soak
def test_kill9_soak(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if "soak" not in (request.config.getoption("markexpr", "") or ""):
        pytest.skip("long kill -9 run: select it with `-m soak`")
    run_kill9(tmp_path, n_tasks=20_000, kills=40, seed=int(time.time()))


def test_two_processes_on_one_file_never_run_a_task_twice(tmp_path: Path) -> None:
    db, log = tmp_path / "shared.db", tmp_path / "runs.log"
    workers = [_spawn(db, "task_apps:shared", log) for _ in range(2)]
    ids: List[str] = []
    with TaskService(db) as producer:
        for _ in range(40):  # many small commits, racing the workers' claims
            ids += producer.enqueue_many("shared", [b"x"] * 50)
    counts = _wait_for(db, len(ids), deadline_s=60)
    for proc in workers:
        proc.send_signal(signal.SIGTERM)
    errors = [proc.communicate(timeout=30)[1].decode() for proc in workers]
    assert [proc.returncode for proc in workers] == [0, 0], errors
    assert all("locked" not in e and "Traceback" not in e for e in errors), errors
    assert counts["completed"] == len(ids)

    events: Dict[str, List[Tuple[str, str]]] = defaultdict(list)
    pids: Set[str] = set()
    for line in log.read_text().splitlines():
        event, task_id, attempt, pid = line.split()
        events[task_id].append((event, attempt))
        pids.add(pid)
    assert len(pids) == 2, "both processes ran tasks"
    assert sorted(events) == sorted(ids)
    for task_id, seen in events.items():
        assert seen == [("start", "1"), ("end", "1")], (task_id, seen)
