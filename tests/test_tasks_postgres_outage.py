"""The PostgreSQL server goes away under load, several times: every task
still finishes, none stays ``running``.

The group committer tries a commit that failed for a passing reason again
until the server answers; the dispatcher renews the leases of those tasks
meanwhile, and takes back, through lease expiry, whatever a crash lost.
A claim whose answer was lost with the connection never ran, so taking it
back costs no attempt: with the default ``max_retries=0`` no task fails.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest

from callbackworker import QueueConfig, TaskService

TASKS = 3000
RESTARTS = 3
DEADLINE_S = 240.0


def test_every_task_finishes_across_immediate_server_restarts() -> None:
    pytest.importorskip("psycopg")
    from pg_server import PostgresCluster, find_bindir

    bindir = find_bindir()
    if bindir is None or sys.platform == "win32":
        pytest.skip("needs the PostgreSQL server programs to restart a cluster of its own")
    # Durable (fsync and synchronous_commit on): a server that forgets commits
    # it confirmed would lose the outcomes of runs that happened, and a lost
    # run's attempt counts.
    cluster = PostgresCluster(bindir, fast=False).start()
    ran = 0
    lock = threading.Lock()

    def handler(payload: memoryview) -> str:
        nonlocal ran
        time.sleep(0.0005)
        with lock:
            ran += 1
        return "ok"

    try:
        with TaskService(cluster.dsn, lease_ms=3000, poll_ms=100) as service:
            # A claim committed whose answer was lost leaves tasks claimed
            # that never ran; they come back when their leases expire with no
            # attempt counted, so the default policy (no retries) suffices.
            service.create_queue("q", QueueConfig(concurrency=4), handler=handler)
            ids = service.enqueue_many("q", [b"%d" % i for i in range(TASKS)])
            for _ in range(RESTARTS):
                before = ran
                while ran < before + TASKS // (RESTARTS + 2):
                    time.sleep(0.01)
                cluster.restart(mode="immediate")
            deadline = time.monotonic() + DEADLINE_S
            counts = {}
            while time.monotonic() < deadline:
                try:
                    counts = service.counts()["q"]
                except Exception:  # the server may still be recovering
                    counts = {}
                if counts.get("completed") == TASKS:
                    break
                time.sleep(0.2)
            if counts.get("completed") != TASKS:
                unfinished = [info for info in map(service.get, ids) if info.status != "completed"]
                raise AssertionError(f"{counts}: {unfinished[:5]}\n{cluster.log_tail()}")
            assert counts.get("running", 0) == 0 and counts.get("pending", 0) == 0
    finally:
        cluster.stop()
